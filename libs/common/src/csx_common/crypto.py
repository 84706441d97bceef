"""Field encryption at rest: AES-256-GCM under keys from a keyring, bound to where the value lives.

Ciphertext layout (version 1):  0x01 | len(key_id) | key_id | nonce (12 bytes) | ciphertext+tag
Associated data: "csx:v1|service|table|record_id|field|key_id", so a ciphertext copied to another
row, table, field or service fails authentication (DataLossError), never decrypts to a value.

The keyring is a JSON file in development (generated on first run) with one primary key; other
keys stay for decryption. The per-child key hierarchy (data keys wrapped by key-encryption keys),
rotation and erasure by key destruction build on `KeyProvider`: callers name a key *scope*
(e.g. a child id) and the provider answers with the key to use for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
NONCE_BYTES = 12


class DataLossError(Exception):
    """A stored ciphertext failed authentication: tampered, moved, or its key is gone."""


@dataclass(frozen=True, slots=True)
class FieldContext:
    service: str
    table: str
    record_id: str
    field: str

    def aad(self, key_id: str) -> bytes:
        return f"csx:v{VERSION}|{self.service}|{self.table}|{self.record_id}|{self.field}|{key_id}".encode()


class KeyProvider(Protocol):
    def encryption_key(self, scope: str) -> tuple[str, bytes]:
        """(key id, 32-byte key) to encrypt new values of this scope with."""
        ...

    def decryption_key(self, key_id: str) -> bytes | None:
        """The key with this id, or None if it does not exist (any more)."""
        ...


class Keyring:
    """Named AES-256 keys, one of them primary. Loaded from (and created as) a JSON file."""

    def __init__(self, keys: dict[str, bytes], primary: str, blind_index_key: bytes) -> None:
        if primary not in keys:
            raise ValueError("primary key id not in keyring")
        if any(len(k) != 32 for k in keys.values()) or len(blind_index_key) != 32:
            raise ValueError("keyring keys must be 32 bytes")
        self._keys = dict(keys)
        self._primary = primary
        self.blind_index_key = blind_index_key

    @classmethod
    def generate(cls) -> Keyring:
        key_id = "k" + secrets.token_hex(4)
        return cls({key_id: AESGCM.generate_key(256)}, key_id, secrets.token_bytes(32))

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        data = json.loads(Path(path).read_text())
        return cls(
            {k["id"]: base64.b64decode(k["material"]) for k in data["keys"]},
            data["primary"],
            base64.b64decode(data["blind_index_key"]),
        )

    @classmethod
    def load_or_create(cls, path: str | Path) -> Keyring:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ring = cls.generate()
        ring.save(path)
        return ring

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "primary": self._primary,
            "keys": [{"id": k, "material": base64.b64encode(v).decode()} for k, v in self._keys.items()],
            "blind_index_key": base64.b64encode(self.blind_index_key).decode(),
        }
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(path)

    def encryption_key(self, scope: str) -> tuple[str, bytes]:
        return self._primary, self._keys[self._primary]

    def decryption_key(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)


class FieldCipher:
    def __init__(self, keys: KeyProvider, service: str) -> None:
        self._keys = keys
        self.service = service

    def context(self, table: str, record_id: str, field: str) -> FieldContext:
        return FieldContext(self.service, table, record_id, field)

    def encrypt(self, plaintext: bytes, ctx: FieldContext, scope: str = "") -> bytes:
        key_id, key = self._keys.encryption_key(scope)
        kid = key_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext, ctx.aad(key_id))
        return bytes([VERSION, len(kid)]) + kid + nonce + sealed

    def decrypt(self, blob: bytes, ctx: FieldContext) -> bytes:
        try:
            if blob[0] != VERSION:
                raise DataLossError("unknown ciphertext version")
            kid_len = blob[1]
            key_id = blob[2 : 2 + kid_len].decode()
            nonce = blob[2 + kid_len : 2 + kid_len + NONCE_BYTES]
            sealed = blob[2 + kid_len + NONCE_BYTES :]
        except (IndexError, UnicodeDecodeError) as exc:
            raise DataLossError("malformed ciphertext") from exc
        key = self._keys.decryption_key(key_id)
        if key is None or len(nonce) != NONCE_BYTES:
            raise DataLossError("ciphertext key unavailable or malformed")
        try:
            return AESGCM(key).decrypt(nonce, sealed, ctx.aad(key_id))
        except InvalidTag as exc:
            raise DataLossError("ciphertext failed authentication") from exc


def blind_index(key: bytes, purpose: str, value: str, *, length: int = 16) -> str:
    """Truncated HMAC-SHA256 for exact-match lookup of a normalised value, per purpose."""
    sub_key = hmac.new(key, f"csx-blind-index:{purpose}".encode(), hashlib.sha256).digest()
    return hmac.new(sub_key, value.encode(), hashlib.sha256).hexdigest()[:length]
