"""Who is calling: JWT bearer tokens with roles, checked on every request and socket.

Roles:

- ``rider``: requests rides and sees its own; ``sub`` is the rider id.
- ``driver``: reports its own position, takes offers and runs its trips; ``sub`` is the
  driver id (``drv-42``; the number is the id the shards use).
- ``gateway``: a trusted fleet service that pushes updates for many drivers at once.
- ``admin``: operators: shard status, any ride, all nearby drivers.

Tokens are HS256 with a shared secret by default, or RS256 verified with an external
identity provider's public key. Claims: ``sub``, ``role``, ``exp``, ``iat``, ``iss``,
``aud``; all required.

HS256 tokens are checked by :func:`verify_hs256` below, RS256 ones by PyJWT. PyJWT took
67 µs a token here, and an edge checks a token for every new socket and client (a dead
edge's sockets all arrive at once on the others); the check below takes 12 µs. It
accepts a subset of what PyJWT accepts (``tests/unit/test_hs256.py`` compares the two on
valid, forged and malformed tokens): canonical base64url segments only, ``alg`` HS256,
no ``crit`` header, numeric times.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import jwt

from api.settings import Settings
from dispatch.drivers import parse_driver_id
from dispatch.errors import DispatchError, InvalidInput


class Role(StrEnum):
    RIDER = "rider"
    DRIVER = "driver"
    GATEWAY = "gateway"
    ADMIN = "admin"


class Unauthorized(DispatchError):
    """No token, or one that is malformed, expired, badly signed or for someone else."""

    code = "unauthorized"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. ``driver_id`` is set for drivers (the shards' integer id)."""

    sub: str
    role: Role
    driver_id: int | None = None
    expires_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


_SUB_MAX = 128


class TokenAuthority:
    """Verifies tokens (and, with HS256, issues them). One per edge process."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.jwt_algorithm
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway_s = settings.jwt_leeway_s
        self.max_ttl_s = settings.token_max_ttl_s
        if self.algorithm == "HS256":
            assert settings.jwt_secret is not None  # checked by Settings
            self._sign_key: str | None = settings.jwt_secret.get_secret_value()
            self._verify_key = self._sign_key.encode()
        else:
            self._sign_key = None  # the identity provider signs; we only verify
            self._verify_key = settings.public_key_pem().encode()
        # Tokens already verified, until they expire: a client sends the same token with
        # every request, and checking its signature again costs more than the lookup
        # (PyJWT was 3.6% of a busy edge). Bounded; the oldest entries go first.
        self._verified: dict[str, Principal] = {}

    def issue(self, sub: str, role: Role | str, ttl_s: int = 3600, now: float | None = None) -> str:
        """A signed token for ``sub`` with ``role``. Raises InvalidInput for a bad subject,
        role or lifetime, and Unauthorized with RS256 (tokens come from the provider)."""
        if self._sign_key is None:
            raise Unauthorized("this edge verifies RS256 tokens; ask the identity provider for one")
        principal = principal_from_claims({"sub": sub, "role": str(role)})
        if not (isinstance(ttl_s, int) and 0 < ttl_s <= self.max_ttl_s):
            raise InvalidInput(f"ttl_s must be an integer in 1..{self.max_ttl_s}", ttl_s=ttl_s)
        now = time.time() if now is None else now
        claims = {
            "sub": principal.sub,
            "role": principal.role.value,
            "iat": int(now),
            "exp": int(now) + ttl_s,
            "iss": self.issuer,
            "aud": self.audience,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._sign_key, algorithm=self.algorithm)

    VERIFIED_CACHE = 50_000

    def verify(self, token: str | None) -> Principal:
        """The principal of a bearer token; Unauthorized with the reason otherwise."""
        if not token:
            raise Unauthorized("missing bearer token")
        known = self._verified.get(token)
        if known is not None:
            if time.time() <= known.expires_at + self.leeway_s:
                return known
            del self._verified[token]  # expired: the full check below says so
        principal = self._verify(token)
        if len(self._verified) >= self.VERIFIED_CACHE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        if len(token) > 8192:
            raise Unauthorized("token too long")
        if self.algorithm == "HS256":
            claims = verify_hs256(token, self._verify_key, self.audience, self.issuer, self.leeway_s)
        else:
            claims = self._verify_pyjwt(token)
        try:
            p = principal_from_claims(claims)
        except InvalidInput as exc:
            raise Unauthorized(f"invalid token: {exc.message}") from None
        return Principal(p.sub, p.role, p.driver_id, float(claims["exp"]))

    def _verify_pyjwt(self, token: str) -> dict:
        try:
            return jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None


_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_REQUIRED = ("exp", "iat", "sub", "iss", "aud")


def _b64(segment: str) -> bytes:
    if len(segment) % 4 == 1:
        raise ValueError("a base64url segment cannot be 1 mod 4 characters long")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # A last character whose unused bits are set decodes to the same bytes: refused, as
    # PyJWT refuses it, so a token has one spelling.
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode():
        raise ValueError("a base64url segment must be canonical")
    return raw


def _numeric_time(claims: dict, name: str) -> int:
    v = claims[name]
    if type(v) not in (int, float) or not math.isfinite(v):
        raise Unauthorized(f"invalid token: {name} must be a number")
    return int(v)


def verify_hs256(token: str, key: bytes, audience: str, issuer: str, leeway_s: float) -> dict:
    """The claims of a compact HS256 JWS signed with ``key``, after the checks PyJWT makes
    with our options (signature first, then required claims, ``iat``/``nbf``/``exp``
    with ``leeway_s``, ``iss``, ``aud``, ``sub``/``jti`` types). Unauthorized otherwise."""
    m = _JWS.fullmatch(token)
    if m is None:
        raise Unauthorized("invalid token: not three base64url segments")
    head, body, sig = m.groups()
    try:
        header = json.loads(_b64(head))
        signature = _b64(sig)
    except (ValueError, binascii.Error, RecursionError):
        raise Unauthorized("invalid token: malformed header or signature") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise Unauthorized("invalid token: the algorithm must be HS256")
    if "crit" in header or "b64" in header or not isinstance(header.get("kid", ""), str):
        raise Unauthorized("invalid token: unsupported header")
    expected = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise Unauthorized("invalid token: Signature verification failed")
    try:
        claims = json.loads(_b64(body))
    except (ValueError, binascii.Error, RecursionError):
        raise Unauthorized("invalid token: malformed payload") from None
    if not isinstance(claims, dict):
        raise Unauthorized("invalid token: the payload must be a JSON object")
    for name in _REQUIRED:
        if claims.get(name) is None:
            raise Unauthorized(f'invalid token: Token is missing the "{name}" claim')
    now = time.time()
    if _numeric_time(claims, "iat") > now + leeway_s:
        raise Unauthorized("invalid token: The token is not yet valid (iat)")
    if "nbf" in claims and _numeric_time(claims, "nbf") > now + leeway_s:
        raise Unauthorized("invalid token: The token is not yet valid (nbf)")
    if _numeric_time(claims, "exp") <= now - leeway_s:
        raise Unauthorized("token expired")
    if claims["iss"] != issuer:
        raise Unauthorized("invalid token: Invalid issuer")
    aud = claims["aud"]
    auds = [aud] if isinstance(aud, str) else aud
    if not (isinstance(auds, list) and all(isinstance(a, str) for a in auds) and audience in auds):
        raise Unauthorized("invalid token: Audience doesn't match")
    if not isinstance(claims["sub"], str) or not isinstance(claims.get("jti", ""), str):
        raise Unauthorized("invalid token: sub and jti must be strings")
    return claims


def principal_from_claims(claims: dict) -> Principal:
    """Check ``sub`` and ``role``; a driver's ``sub`` must name a driver id (``drv-42``)."""
    sub, role = claims.get("sub"), claims.get("role")
    if not (isinstance(sub, str) and 0 < len(sub) <= _SUB_MAX and sub.isprintable()):
        raise InvalidInput(f"sub must be 1..{_SUB_MAX} printable characters")
    roles = [x.value for x in Role]
    if not (isinstance(role, str) and role in roles):
        raise InvalidInput(f"role must be one of {roles}, got {role!r}")
    r = Role(role)
    driver_id = None
    if r is Role.DRIVER:
        try:
            driver_id = parse_driver_id(sub)
        except (ValueError, TypeError):
            raise InvalidInput(f"a driver's sub must be a driver id like 'drv-42', got {sub!r}") from None
    return Principal(sub, r, driver_id)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
