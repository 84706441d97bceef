"""Seal and unseal the encrypted fields of a proto message, as the sensitivity registry says.

A repository keeps a record's operational fields in columns and its sealed fields in one
`sealed` column: a JSON object mapping field path -> base64 ciphertext. Each ciphertext is bound
to (service, table, record id, field path), so it is useless anywhere else.
"""

from __future__ import annotations

import base64
from typing import TypeVar

from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor

from csx_common.crypto import FieldCipher
from csx_common.sensitivity import SensitivityRegistry

M = TypeVar("M", bound=pb_message.Message)


def _resolve(msg: pb_message.Message, path: str, create: bool) -> tuple[pb_message.Message, str] | None:
    *parents, leaf = path.split(".")
    for name in parents:
        if not create and not msg.HasField(name):
            return None
        msg = getattr(msg, name)
    return msg, leaf


class Sealer:
    def __init__(self, cipher: FieldCipher, registry: SensitivityRegistry) -> None:
        self._cipher = cipher
        self._registry = registry

    def seal(
        self, msg: pb_message.Message, *, table: str, record_id: str, scope: str = ""
    ) -> dict[str, str]:
        """Encrypt every non-empty sealed field of `msg` and clear it in place."""
        sealed: dict[str, str] = {}
        for path in self._registry.sealed_paths(msg.DESCRIPTOR):
            found = _resolve(msg, path, create=False)
            if found is None:
                continue
            holder, leaf = found
            field = holder.DESCRIPTOR.fields_by_name[leaf]
            if field.is_repeated:
                raise TypeError(f"sealed repeated field {path} is not supported")
            value = getattr(holder, leaf)
            if value in ("", b"", 0):
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            ctx = self._cipher.context(table, record_id, path)
            sealed[path] = base64.b64encode(self._cipher.encrypt(raw, ctx, scope)).decode()
            holder.ClearField(leaf)
        return sealed

    def unseal(self, msg: M, sealed: dict[str, str], *, table: str, record_id: str) -> M:
        """Decrypt `sealed` into `msg` in place (DataLossError on any tampering)."""
        allowed = set(self._registry.sealed_paths(msg.DESCRIPTOR))
        for path, b64 in sealed.items():
            if path not in allowed:
                continue
            found = _resolve(msg, path, create=True)
            assert found is not None
            holder, leaf = found
            ctx = self._cipher.context(table, record_id, path)
            raw = self._cipher.decrypt(base64.b64decode(b64), ctx)
            field = holder.DESCRIPTOR.fields_by_name[leaf]
            setattr(holder, leaf, raw.decode() if field.type == FieldDescriptor.TYPE_STRING else raw)
        return msg

    def seal_record(
        self, msg: pb_message.Message, *, table: str, record_id: str, scope: str = ""
    ) -> tuple[bytes, dict[str, str]]:
        """(the message's operational remainder serialized, its sealed fields) for storage."""
        clear = type(msg)()
        clear.CopyFrom(msg)
        sealed = self.seal(clear, table=table, record_id=record_id, scope=scope)
        return clear.SerializeToString(), sealed

    def open_record(self, cls: type[M], body: bytes, sealed: dict[str, str], *, table: str, record_id: str) -> M:
        return self.unseal(cls.FromString(body), sealed, table=table, record_id=record_id)
