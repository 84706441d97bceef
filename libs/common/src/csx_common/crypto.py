"""Field encryption at rest: AES-256-GCM under a record's data key, bound to where the value lives.

Ciphertext layout (version 1):  0x01 | len(key_id) | key_id | nonce (12 bytes) | ciphertext+tag
Associated data: "csx:v1|service|table|record_id|field|key_id", so a ciphertext copied to another
row, table, field or service fails authentication (DataLossError), never decrypts to a value.

The key id names a *data key* (csx_common.datakeys): one per child, place or service, wrapped by a
key-encryption key from the keyring (csx_common.keyring). This module only does the arithmetic.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32


class DataLossError(Exception):
    """A stored ciphertext failed authentication: tampered, moved, or its key is unknown."""


class KeyDestroyedError(DataLossError):
    """The value's data key was destroyed on purpose: the record was erased."""


@dataclass(frozen=True, slots=True)
class FieldContext:
    service: str
    table: str
    record_id: str
    field: str

    def aad(self, key_id: str) -> bytes:
        return f"csx:v{VERSION}|{self.service}|{self.table}|{self.record_id}|{self.field}|{key_id}".encode()


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"DataKey({self.key_id})"


def key_id_of(blob: bytes) -> str:
    """The data key id a ciphertext names (DataLossError if the blob is not a ciphertext)."""
    try:
        if blob[0] != VERSION:
            raise DataLossError("unknown ciphertext version")
        key_id = blob[2 : 2 + blob[1]].decode("ascii")
    except (IndexError, UnicodeDecodeError) as exc:
        raise DataLossError("malformed ciphertext") from exc
    if not key_id or len(key_id) != blob[1]:
        raise DataLossError("malformed ciphertext")
    return key_id


class FieldCipher:
    def __init__(self, service: str) -> None:
        self.service = service

    def context(self, table: str, record_id: str, field: str) -> FieldContext:
        return FieldContext(self.service, table, record_id, field)

    def encrypt(self, plaintext: bytes, ctx: FieldContext, key: DataKey) -> bytes:
        kid = key.key_id.encode("ascii")
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key.key).encrypt(nonce, plaintext, ctx.aad(key.key_id))
        return bytes([VERSION, len(kid)]) + kid + nonce + sealed

    def decrypt(self, blob: bytes, ctx: FieldContext, keys: Mapping[str, bytes]) -> bytes:
        key_id = key_id_of(blob)
        body = blob[2 + len(key_id) :]
        key = keys.get(key_id)
        if key is None or len(body) < NONCE_BYTES + 16:
            raise DataLossError("ciphertext key unavailable or malformed")
        try:
            return AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], ctx.aad(key_id))
        except InvalidTag as exc:
            raise DataLossError("ciphertext failed authentication") from exc


def blind_index(key: bytes, purpose: str, value: str, *, bits: int = 64) -> str:
    """Truncated HMAC-SHA256 of a normalised value, under a key of its own per purpose.

    Truncation is deliberate: with few bits several people share a value, so the index alone
    neither identifies anyone nor confirms a guess; callers compare decrypted candidates exactly.
    """
    if not 4 <= bits <= 256 or bits % 4:
        raise ValueError("blind index bits must be a multiple of 4 between 4 and 256")
    sub_key = hmac.new(key, f"csx-blind-index:{purpose}".encode(), hashlib.sha256).digest()
    return hmac.new(sub_key, value.encode(), hashlib.sha256).hexdigest()[: bits // 4]
