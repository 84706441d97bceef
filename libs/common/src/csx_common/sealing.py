"""Seal and unseal the encrypted fields of a proto message, as the sensitivity registry says.

A repository keeps a record's operational fields in columns and its sealed fields in one
`sealed` column: a JSON object mapping field path -> base64 ciphertext. Each ciphertext is bound
to (service, table, record id, field path) and encrypted under the data key of the record's
scope (the child, place or service it belongs to), so it is useless anywhere else and gone when
that scope is erased. Sealing and unsealing run inside the caller's transaction: the data key
rows are read (and encryptions counted) there.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from csx_common.crypto import DataLossError, FieldCipher, KeyDestroyedError, key_id_of
from csx_common.datakeys import DataKeys
from csx_common.db import Tx
from csx_common.sensitivity import SensitivityRegistry, descriptor_of

M = TypeVar("M", bound=pb_message.Message)


_NESTED, _SEALED = "nested", "sealed"
_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")
_INDICES = re.compile(r"\[\d+\]")


def _is_csx_message(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.file.package.startswith("csx.")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise DataLossError("sealed value is not base64") from exc


class Sealer:
    def __init__(self, keys: DataKeys, registry: SensitivityRegistry) -> None:
        self.keys = keys
        self._cipher = FieldCipher(keys.service)
        self._registry = registry
        self._plans: dict[str, dict[str, str]] = {}

    async def seal(
        self, session: Tx, msg: pb_message.Message, *, table: str, record_id: str, scope: str
    ) -> dict[str, str]:
        """Encrypt every non-empty sealed field of `msg` (nested and repeated messages included,
        under paths like `actions[2].description`) under `scope`'s data key, and clear it in place."""
        found: list[tuple[pb_message.Message, FieldDescriptor, str]] = []
        self._collect(msg, "", found)
        if not found:
            return {}
        key = await self.keys.encryption_key(session, scope, len(found))
        sealed: dict[str, str] = {}
        for holder, field, path in found:
            value = getattr(holder, field.name)
            raw = value.encode() if isinstance(value, str) else bytes(value)
            ctx = self._cipher.context(table, record_id, path)
            sealed[path] = base64.b64encode(self._cipher.encrypt(raw, ctx, key)).decode()
            holder.ClearField(field.name)
        return sealed

    def _collect(
        self, msg: pb_message.Message, prefix: str, found: list[tuple[pb_message.Message, FieldDescriptor, str]]
    ) -> None:
        # Only the fields that are set (ListFields), against a plan made once per message type.
        plan = self._plan(descriptor_of(msg))
        for field, value in msg.ListFields():
            kind = plan.get(field.name)
            if kind is None:
                continue
            path = prefix + field.name
            if kind == _NESTED:
                if field.is_repeated:
                    for i, item in enumerate(value):
                        self._collect(item, f"{path}[{i}].", found)
                else:
                    self._collect(value, path + ".", found)
            elif value not in ("", b""):
                found.append((msg, field, path))

    def _plan(self, descriptor: Descriptor) -> dict[str, str]:
        """Field name -> _NESTED (a CSX message to walk into) or _SEALED (encrypted at rest)."""
        plan = self._plans.get(descriptor.full_name)
        if plan is None:
            plan = {}
            for field in descriptor.fields:
                if _is_csx_message(field):
                    plan[field.name] = _NESTED
                elif self._registry.field(field).encrypt:
                    if field.is_repeated:
                        raise TypeError(f"sealed repeated scalar {field.full_name} is not supported")
                    plan[field.name] = _SEALED
            self._plans[descriptor.full_name] = plan
        return plan

    async def unseal(
        self,
        session: Tx,
        msg: M,
        sealed: dict[str, str],
        *,
        table: str,
        record_id: str,
        only: Callable[[str], bool] | None = None,
        scope: str | None = None,
    ) -> M:
        """Decrypt `sealed` into `msg` in place — only the paths `only` accepts (given the path
        without indices, e.g. `actions.description`), so what a caller may not see is never even
        decrypted. A path that is not a sealed field, or a ciphertext that fails authentication, is
        DataLossError: the stored record was tampered with. KeyDestroyedError: it was erased."""
        loaded = await self._load(session, msg, sealed, table=table, record_id=record_id, scope=scope)
        loaded.decrypt_into(msg, only)
        return msg

    async def _load(
        self, session: Tx, msg: M, sealed: dict[str, str], *, table: str, record_id: str, scope: str | None
    ) -> SealedRecord[M]:
        blobs = {path: _b64decode(b64) for path, b64 in sealed.items()}
        # Every key the record names is checked, decrypted or not: an erased record fails whole.
        keys = await self.keys.decryption_keys(session, {key_id_of(blob) for blob in blobs.values()}, scope=scope)
        return SealedRecord(self, msg, blobs, keys, table, record_id)

    async def ensure_not_erased(self, session: Tx, scope: str) -> None:
        """KeyDestroyedError if `scope` was erased: for reads of records with nothing sealed."""
        if await self.keys.erased(session, scope):
            raise KeyDestroyedError("the scope was erased")

    def _locate(self, msg: pb_message.Message, path: str) -> tuple[pb_message.Message, FieldDescriptor]:
        *parents, leaf = path.split(".")
        for part in parents:
            match = _INDEX.match(part)
            name, index = (match.group(1), int(match.group(2))) if match else (part, None)
            field = descriptor_of(msg).fields_by_name.get(name)
            if field is None or not _is_csx_message(field) or field.is_repeated != (index is not None):
                raise DataLossError("sealed path does not fit the record")
            if index is None:
                msg = getattr(msg, name)
            else:
                items = getattr(msg, name)
                while len(items) <= index:
                    items.add()
                msg = items[index]
        field = descriptor_of(msg).fields_by_name.get(leaf)
        if field is None or field.is_repeated or not self._registry.field(field).encrypt:
            raise DataLossError("sealed path does not fit the record")
        return msg, field

    async def seal_record(
        self, session: Tx, msg: pb_message.Message, *, table: str, record_id: str, scope: str
    ) -> tuple[bytes, dict[str, str]]:
        """(the message's operational remainder serialized, its sealed fields) for storage."""
        clear = type(msg)()
        clear.CopyFrom(msg)
        # Only fields the contract names are stored: an unknown field is neither classified nor
        # sealed, so it must never reach the clear body (the edges drop them too; this is the
        # second line of defence).
        clear.DiscardUnknownFields()
        sealed = await self.seal(session, clear, table=table, record_id=record_id, scope=scope)
        return clear.SerializeToString(), sealed

    async def load_record(
        self,
        session: Tx,
        cls: type[M],
        body: bytes,
        sealed: dict[str, str],
        *,
        table: str,
        record_id: str,
        scope: str | None = None,
    ) -> SealedRecord[M]:
        """The stored record with its keys fetched (so an erased one fails here) and nothing yet
        decrypted: `.message` is its operational part, `.reveal(only)` decrypts without I/O."""
        try:
            msg = cls.FromString(body)
        except pb_message.DecodeError as exc:
            raise DataLossError("stored record body does not parse") from exc
        msg.DiscardUnknownFields()  # a body stored before unknown fields were dropped never answers with them
        return await self._load(session, msg, sealed, table=table, record_id=record_id, scope=scope)

    async def open_record(
        self,
        session: Tx,
        cls: type[M],
        body: bytes,
        sealed: dict[str, str],
        *,
        table: str,
        record_id: str,
        only: Callable[[str], bool] | None = None,
        scope: str | None = None,
    ) -> M:
        loaded = await self.load_record(session, cls, body, sealed, table=table, record_id=record_id, scope=scope)
        loaded.decrypt_into(loaded.message, only)
        return loaded.message


class SealedRecord(Generic[M]):
    """A record read from its row with its data keys in hand: decide what to show on `message`
    (its operational part), then `reveal` only that."""

    def __init__(
        self, sealer: Sealer, message: M, blobs: dict[str, bytes], keys: dict[str, bytes], table: str, record_id: str
    ) -> None:
        self.message = message
        self._sealer, self._blobs, self._keys = sealer, blobs, keys
        self._table, self._record_id = table, record_id

    def reveal(self, only: Callable[[str], bool] | None = None) -> M:
        """A copy of the record with the sealed paths `only` accepts decrypted (all by default)."""
        msg = type(self.message)()
        msg.CopyFrom(self.message)
        self.decrypt_into(msg, only)
        return msg

    def decrypt_into(self, msg: M, only: Callable[[str], bool] | None) -> None:
        sealer, cipher = self._sealer, self._sealer._cipher
        for path, blob in self._blobs.items():
            if only is not None and not only(_INDICES.sub("", path)):
                continue
            holder, field = sealer._locate(msg, path)
            raw = cipher.decrypt(blob, cipher.context(self._table, self._record_id, path), self._keys)
            setattr(holder, field.name, raw.decode() if field.type == FieldDescriptor.TYPE_STRING else raw)
