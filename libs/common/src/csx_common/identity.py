"""Who is asking: the peer system (from its mTLS certificate) and the originating user (a signed,
short-lived token in call metadata). Decisions are made on the originating user, never on the
service that relays the call.

Tokens are JWTs signed with Ed25519 (EdDSA) by the partnership's identity provider (in development,
the key in ./var/pki); they carry the user id, agency, role and purpose, and live minutes.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from csx_common.pki import PeerIdentity

AUDIENCE = "csx"
TOKEN_METADATA_KEY = "authorization"  # noqa: S105 - a metadata key, not a secret
DEFAULT_TTL_SECONDS = 300
MAX_TTL_SECONDS = 3600
PRINCIPAL_CLAIMS = ("sub", "agency", "role", "purpose")
# The width of the user-id columns (decided_by, recorded_by, requested_by, user_id).
MAX_CLAIM_LENGTH = 64
# Seconds of clock skew allowed between the identity provider and this service.
LEEWAY_SECONDS = 5
# Verified tokens remembered (a token is reused for most of its life: csx_common.client.TokenSource).
TOKEN_CACHE_SIZE = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class IdentityError(Exception):
    """The caller could not be identified (missing, expired, forged or mismatched credentials)."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    agency: str  # lower-case agency name, e.g. "police"
    role: str
    purpose: str


@dataclass(frozen=True, slots=True)
class Caller:
    """One call's identity: the peer system and, for user calls, the originating user."""

    peer: PeerIdentity
    user: Principal | None


current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("csx_caller", default=None)


def actor_id(user: Principal | None) -> str:
    """Who to record as having done something: the user, or "system" for a service's own work."""
    return user.user_id if user else "system"


def current_user() -> Principal | None:
    """The originating user of the call being handled (None: a service's own work, or INSECURE_DEV)."""
    caller = current_caller.get()
    return caller.user if caller else None


class TokenIssuer:
    def __init__(self, private_key_pem: bytes, issuer: str = "csx-dev-idp") -> None:
        self._key = private_key_pem
        self._issuer = issuer

    def issue(self, principal: Principal, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> str:
        now = int(time.time())
        claims = {
            "iss": self._issuer,
            "aud": AUDIENCE,
            "sub": principal.user_id,
            "agency": principal.agency,
            "role": principal.role,
            "purpose": principal.purpose,
            "iat": now,
            "exp": now + min(ttl_seconds, MAX_TTL_SECONDS),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA")


class TokenVerifier:
    """Verifies user tokens, remembering the ones that verified until they expire.

    A signature check costs far more than the rest of a call's security layer, and a client sends
    the same token for minutes. A remembered token answers only while now < exp: stricter than a
    fresh check, which allows LEEWAY_SECONDS past exp. A token that fails is never remembered, and
    the cache is keyed by the token's SHA-256, so it holds no usable credentials."""

    def __init__(
        self, public_key_pem: bytes, *, cache_size: int = TOKEN_CACHE_SIZE, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = public_key_pem
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[Principal, int]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                if now < hit[1]:
                    self._cache.move_to_end(key)
                    return hit[0]
                del self._cache[key]
        principal, exp = self._verify(token, now)
        if now < exp and self._cache_size > 0:
            with self._lock:
                self._cache[key] = (principal, exp)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str, now: float) -> tuple[Principal, int]:
        """The token's user and expiry, or IdentityError."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                options={"require": ["exp", "iat", "sub", "aud"]},
                leeway=LEEWAY_SECONDS,
            )
        except jwt.PyJWTError as exc:
            raise IdentityError(f"token rejected: {type(exc).__name__}") from None
        exp = int(claims["exp"])  # as PyJWT read it to check it
        # PyJWT checked exp against the system clock; checked again against ours (the same one
        # unless a test injects another), so the cache and a fresh check never disagree.
        if exp <= now - LEEWAY_SECONDS:
            raise IdentityError("token rejected: ExpiredSignatureError")
        if claims["exp"] - claims["iat"] > MAX_TTL_SECONDS + LEEWAY_SECONDS:
            raise IdentityError("token lives too long")
        try:
            values = [claims[name] for name in PRINCIPAL_CLAIMS]
        except KeyError as exc:
            raise IdentityError(f"token lacks claim {exc.args[0]}") from None
        # A validly signed token can still carry claims no column can hold: a user id is written
        # as decided_by, recorded_by, a grant's user_id (64 characters) and into the audit chain
        # (no control characters). Refused here, rather than failing in a handler as INTERNAL.
        for name, value in zip(PRINCIPAL_CLAIMS, values, strict=True):
            if not isinstance(value, str) or not 0 < len(value) <= MAX_CLAIM_LENGTH or _CONTROL.search(value):
                raise IdentityError(f"token claim {name} is not a short printable string")
        return Principal(*values), exp


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, f"Bearer {token}"),)
