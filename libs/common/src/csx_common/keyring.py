"""Key-encryption keys (KEKs): what wraps every data key, and nothing else.

`KekProvider` is the seam to a real key service: a KMS or Vault transit key exposes the same two
calls (wrap = Encrypt, unwrap = Decrypt, with the associated data as encryption context) and keeps
the KEK material itself out of the process. `FileKeyring` is the development provider: a JSON file
(0600) of AES-256 KEKs, each in one of Tink's states:

    enabled    decrypts (added for rotation, or demoted after it) — never wraps
    primary    wraps new data keys, and decrypts
    destroyed  material gone; only the id remains, for the record

Services re-read the file when it changes, so `csx keys rotate` (add, promote, re-wrap, destroy)
rolls out without a restart. The file also holds the blind-index key, which is not a KEK and never
rotates with them (rotating it would orphan every stored index).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from csx_common.crypto import KEY_BYTES, NONCE_BYTES, DataLossError

PRIMARY, ENABLED, DESTROYED = "primary", "enabled", "destroyed"
# How stale a reader's view of the file may get (a wrap always re-checks).
REFRESH_SECONDS = 10.0


class KekProvider(Protocol):
    async def wrap(self, dek: bytes, aad: bytes) -> tuple[str, bytes]:
        """(KEK id, wrapped key) under the current primary KEK."""
        ...

    async def unwrap(self, kek_id: str, wrapped: bytes, aad: bytes) -> bytes:
        """The data key; DataLossError if the KEK is unknown or destroyed, or the blob is not intact."""
        ...


@dataclass(slots=True)
class Kek:
    kek_id: str
    state: str
    created_at: str
    material: bytes | None = field(default=None, repr=False)


class KeyringError(Exception):
    """The keyring file is missing, malformed, or asked to do something out of order."""


class FileKeyring:
    """KEKs in a JSON file; reloaded whenever the file changes on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._next_refresh = 0.0
        self.keks: dict[str, Kek] = {}
        self.blind_index_key = b""
        self.rotation: dict[str, str] | None = None
        self._load()

    # Files ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path) -> FileKeyring:
        path = Path(path)
        kek = _new_kek(PRIMARY)
        _write(path, {"version": 2, "keks": [_kek_json(kek)], "blind_index_key": _b64(secrets.token_bytes(32))})
        return cls(path)

    @classmethod
    def load_or_create(cls, path: str | Path) -> FileKeyring:
        return cls(path) if Path(path).exists() else cls.create(path)

    def _file_stamp(self) -> tuple[int, int, int]:
        # Every save is a rename, so the inode changes even when mtime and size do not.
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> None:
        stamp = self._file_stamp()
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != 2:
                raise KeyringError("keyring file is not version 2 (delete var/ to regenerate a dev keyring)")
            keks = {
                k["id"]: Kek(k["id"], k["state"], k["created_at"], _unb64(k["material"]) if k.get("material") else None)
                for k in data["keks"]
            }
            blind_index_key = _unb64(data["blind_index_key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyringError("keyring file is malformed") from exc
        primaries = [k for k in keks.values() if k.state == PRIMARY]
        if len(primaries) != 1 or any(
            k.state != DESTROYED and len(k.material or b"") != KEY_BYTES for k in keks.values()
        ):
            raise KeyringError("keyring needs exactly one primary KEK and 32-byte keys")
        self.keks, self.blind_index_key, self.rotation = keks, blind_index_key, data.get("rotation")
        self._stamp = stamp

    def refresh(self) -> None:
        """Re-read the file if it changed (cheap: one stat)."""
        self._next_refresh = time.monotonic() + REFRESH_SECONDS
        if self._file_stamp() != self._stamp:
            self._load()

    def save(self) -> None:
        data: dict[str, object] = {
            "version": 2,
            "keks": [_kek_json(k) for k in self.keks.values()],
            "blind_index_key": _b64(self.blind_index_key),
        }
        if self.rotation:
            data["rotation"] = self.rotation
        _write(self.path, data)
        self._stamp = self._file_stamp()

    # Provider -------------------------------------------------------------------------------
    @property
    def primary_id(self) -> str:
        return next(k.kek_id for k in self.keks.values() if k.state == PRIMARY)

    async def wrap(self, dek: bytes, aad: bytes) -> tuple[str, bytes]:
        self.refresh()  # a promotion by `csx keys rotate` takes effect on the next wrap
        kek = self.keks[self.primary_id]
        nonce = os.urandom(NONCE_BYTES)
        assert kek.material is not None
        return kek.kek_id, nonce + AESGCM(kek.material).encrypt(nonce, dek, aad + b"|" + kek.kek_id.encode())

    async def unwrap(self, kek_id: str, wrapped: bytes, aad: bytes) -> bytes:
        if time.monotonic() >= self._next_refresh:
            # A reader re-checks now and then too, so a destroyed KEK leaves its memory soon.
            self.refresh()
        kek = self.keks.get(kek_id)
        if kek is None:
            self.refresh()  # added by a rotation since we last looked
            kek = self.keks.get(kek_id)
        if kek is None or kek.material is None:
            raise DataLossError("key-encryption key unknown or destroyed")
        try:
            return AESGCM(kek.material).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad + b"|" + kek_id.encode()
            )
        except (InvalidTag, ValueError) as exc:
            raise DataLossError("wrapped data key failed authentication") from exc

    # Rotation steps (Tink's order; `csx keys rotate` drives them) ---------------------------------
    def add(self) -> str:
        kek = _new_kek(ENABLED)
        self.keks[kek.kek_id] = kek
        return kek.kek_id

    def promote(self, kek_id: str) -> None:
        target = self.keks.get(kek_id)
        if target is None or target.state == DESTROYED:
            raise KeyringError("only an enabled KEK can be promoted")
        for kek in self.keks.values():
            if kek.state == PRIMARY:
                kek.state = ENABLED
        target.state = PRIMARY

    def destroy(self, kek_id: str) -> None:
        kek = self.keks[kek_id]
        if kek.state == PRIMARY:
            raise KeyringError("the primary KEK cannot be destroyed")
        kek.state, kek.material = DESTROYED, None

    def enabled_ids(self) -> list[str]:
        """KEKs that still decrypt but no longer wrap: what a finished rotation destroys."""
        return [k.kek_id for k in self.keks.values() if k.state == ENABLED]


def _new_kek(state: str) -> Kek:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return Kek("kek-" + secrets.token_hex(6), state, now, AESGCM.generate_key(256))


def _kek_json(kek: Kek) -> dict[str, str]:
    out = {"id": kek.kek_id, "state": kek.state, "created_at": kek.created_at}
    if kek.material is not None:
        out["material"] = _b64(kek.material)
    return out


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _write(path: Path, data: dict[str, object]) -> None:
    """Atomically, 0600: readers see the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
