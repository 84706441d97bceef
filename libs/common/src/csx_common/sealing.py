"""Seal and unseal the encrypted fields of a proto message, as the sensitivity registry says.

A repository keeps a record's operational fields in columns and its sealed fields in one
`sealed` column: a JSON object mapping field path -> base64 ciphertext. Each ciphertext is bound
to (service, table, record id, field path), so it is useless anywhere else.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import TypeVar

from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor

from csx_common.crypto import DataLossError, FieldCipher
from csx_common.sensitivity import SensitivityRegistry

M = TypeVar("M", bound=pb_message.Message)


_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")
_INDICES = re.compile(r"\[\d+\]")


def _is_csx_message(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.file.package.startswith("csx.")


class Sealer:
    def __init__(self, cipher: FieldCipher, registry: SensitivityRegistry) -> None:
        self._cipher = cipher
        self._registry = registry

    def seal(self, msg: pb_message.Message, *, table: str, record_id: str, scope: str = "") -> dict[str, str]:
        """Encrypt every non-empty sealed field of `msg` (nested and repeated messages included,
        under paths like `actions[2].description`) and clear it in place."""
        sealed: dict[str, str] = {}
        self._seal(msg, "", sealed, table, record_id, scope)
        return sealed

    def _seal(
        self,
        msg: pb_message.Message,
        prefix: str,
        sealed: dict[str, str],
        table: str,
        record_id: str,
        scope: str,
    ) -> None:
        for field in msg.DESCRIPTOR.fields:
            path = prefix + field.name
            if _is_csx_message(field):
                if field.is_repeated:
                    for i, item in enumerate(getattr(msg, field.name)):
                        self._seal(item, f"{path}[{i}].", sealed, table, record_id, scope)
                elif msg.HasField(field.name):
                    self._seal(getattr(msg, field.name), path + ".", sealed, table, record_id, scope)
                continue
            if not self._registry.field(field).encrypt:
                continue
            if field.is_repeated:
                raise TypeError(f"sealed repeated scalar {field.full_name} is not supported")
            value = getattr(msg, field.name)
            if value in ("", b""):
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            ctx = self._cipher.context(table, record_id, path)
            sealed[path] = base64.b64encode(self._cipher.encrypt(raw, ctx, scope)).decode()
            msg.ClearField(field.name)

    def unseal(
        self,
        msg: M,
        sealed: dict[str, str],
        *,
        table: str,
        record_id: str,
        only: Callable[[str], bool] | None = None,
    ) -> M:
        """Decrypt `sealed` into `msg` in place — only the paths `only` accepts (given the path
        without indices, e.g. `actions.description`), so what a caller may not see is never even
        decrypted. A path that is not a sealed field, or a ciphertext that fails authentication, is
        DataLossError: the stored record was tampered with."""
        for path, b64 in sealed.items():
            if only is not None and not only(_INDICES.sub("", path)):
                continue
            holder, field = self._locate(msg, path)
            ctx = self._cipher.context(table, record_id, path)
            raw = self._cipher.decrypt(base64.b64decode(b64), ctx)
            setattr(holder, field.name, raw.decode() if field.type == FieldDescriptor.TYPE_STRING else raw)
        return msg

    def _locate(self, msg: pb_message.Message, path: str) -> tuple[pb_message.Message, FieldDescriptor]:
        *parents, leaf = path.split(".")
        for part in parents:
            match = _INDEX.match(part)
            name, index = (match.group(1), int(match.group(2))) if match else (part, None)
            field = msg.DESCRIPTOR.fields_by_name.get(name)
            if field is None or not _is_csx_message(field) or field.is_repeated != (index is not None):
                raise DataLossError("sealed path does not fit the record")
            if index is None:
                msg = getattr(msg, name)
            else:
                items = getattr(msg, name)
                while len(items) <= index:
                    items.add()
                msg = items[index]
        field = msg.DESCRIPTOR.fields_by_name.get(leaf)
        if field is None or field.is_repeated or not self._registry.field(field).encrypt:
            raise DataLossError("sealed path does not fit the record")
        return msg, field

    def seal_record(
        self, msg: pb_message.Message, *, table: str, record_id: str, scope: str = ""
    ) -> tuple[bytes, dict[str, str]]:
        """(the message's operational remainder serialized, its sealed fields) for storage."""
        clear = type(msg)()
        clear.CopyFrom(msg)
        sealed = self.seal(clear, table=table, record_id=record_id, scope=scope)
        return clear.SerializeToString(), sealed

    def open_record(
        self,
        cls: type[M],
        body: bytes,
        sealed: dict[str, str],
        *,
        table: str,
        record_id: str,
        only: Callable[[str], bool] | None = None,
    ) -> M:
        return self.unseal(cls.FromString(body), sealed, table=table, record_id=record_id, only=only)
