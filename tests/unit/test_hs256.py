"""The edge's own HS256 check agrees with PyJWT's: every token it accepts PyJWT accepts
with the same claims, and every forged, expired, mis-addressed or malformed one is refused
by both. Where they differ, ours is the stricter (canonical base64url, numeric times)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from api.auth import Unauthorized, verify_hs256

KEY = "k" * 40
AUD, ISS, LEEWAY = "dispatch", "dispatch", 5.0


def _pyjwt(token: str) -> dict | None:
    try:
        return jwt.decode(
            token,
            KEY,
            algorithms=["HS256"],
            audience=AUD,
            issuer=ISS,
            leeway=LEEWAY,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.InvalidTokenError:
        return None


def _ours(token: str) -> dict | None:
    try:
        return verify_hs256(token, KEY.encode(), AUD, ISS, LEEWAY)
    except Unauthorized:
        return None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed(header: object, payload: object, key: str = KEY) -> str:
    h = _b64(json.dumps(header).encode())
    p = _b64(json.dumps(payload).encode())
    sig = hmac.new(key.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{_b64(sig)}"


def _claims(**over: object) -> dict:
    now = int(time.time())
    c: dict = {"sub": "rider-1", "role": "rider", "iat": now, "exp": now + 600, "iss": ISS, "aud": AUD}
    c.update(over)
    return {k: v for k, v in c.items() if v is not _DROP}


_DROP = object()


def _now() -> int:
    return int(time.time())


HS = {"alg": "HS256", "typ": "JWT"}

ACCEPTED = {
    "plain": lambda: _signed(HS, _claims()),
    "by PyJWT": lambda: jwt.encode(_claims(jti="abc"), KEY, algorithm="HS256"),
    "audience list": lambda: _signed(HS, _claims(aud=["other", AUD])),
    "float times": lambda: _signed(HS, _claims(iat=_now() + 0.5, exp=_now() + 60.5)),
    "iat within leeway": lambda: _signed(HS, _claims(iat=_now() + 3)),
    "exp within leeway": lambda: _signed(HS, _claims(exp=_now() - 3)),
    "nbf past": lambda: _signed(HS, _claims(nbf=_now() - 10)),
    "no typ": lambda: _signed({"alg": "HS256"}, _claims()),
    "string kid": lambda: _signed({**HS, "kid": "k1"}, _claims()),
}
REFUSED = {
    "other key": lambda: _signed(HS, _claims(), key="x" * 40),
    "alg none": lambda: _b64(b'{"alg":"none"}') + "." + _b64(json.dumps(_claims()).encode()) + ".",
    "alg none signed": lambda: _signed({"alg": "none"}, _claims()),
    "alg HS512 header": lambda: _signed({"alg": "HS512"}, _claims()),
    "alg RS256 header": lambda: _signed({"alg": "RS256"}, _claims()),
    "header not an object": lambda: _signed(["HS256"], _claims()),
    "payload not an object": lambda: _signed(HS, ["sub"]),
    "expired": lambda: _signed(HS, _claims(exp=_now() - 60)),
    "iat in the future": lambda: _signed(HS, _claims(iat=_now() + 600)),
    "nbf in the future": lambda: _signed(HS, _claims(nbf=_now() + 600)),
    "wrong audience": lambda: _signed(HS, _claims(aud="someone-else")),
    "audience not strings": lambda: _signed(HS, _claims(aud=[1, 2])),
    "empty audience": lambda: _signed(HS, _claims(aud=[])),
    "wrong issuer": lambda: _signed(HS, _claims(iss="evil")),
    "issuer not a string": lambda: _signed(HS, _claims(iss=1)),
    "no exp": lambda: _signed(HS, _claims(exp=_DROP)),
    "no iat": lambda: _signed(HS, _claims(iat=_DROP)),
    "no sub": lambda: _signed(HS, _claims(sub=_DROP)),
    "no aud": lambda: _signed(HS, _claims(aud=_DROP)),
    "no iss": lambda: _signed(HS, _claims(iss=_DROP)),
    "null exp": lambda: _signed(HS, _claims(exp=None)),
    "exp a word": lambda: _signed(HS, _claims(exp="soon")),
    "sub a number": lambda: _signed(HS, _claims(sub=7)),
    "jti a number": lambda: _signed(HS, _claims(jti=7)),
    "kid a number": lambda: _signed({**HS, "kid": 1}, _claims()),
    "unknown crit": lambda: _signed({**HS, "crit": ["exp"], "exp": 1}, _claims()),
    "two segments": lambda: ".".join(_signed(HS, _claims()).split(".")[:2]),
    "four segments": lambda: _signed(HS, _claims()) + ".e30",
    "empty": lambda: "",
    "garbage": lambda: "not a token at all",
    "header not json": lambda: _b64(b"{nope") + "." + _signed(HS, _claims()).split(".", 1)[1],
    "deeply nested header": lambda: _b64(b"[" * 3000 + b"]" * 3000) + ".e30.e30",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_tokens_pyjwt_accepts_are_accepted_with_the_same_claims(name):
    token = ACCEPTED[name]()
    theirs = _pyjwt(token)
    assert theirs is not None, "the case must be valid for PyJWT"
    assert _ours(token) == theirs


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_tokens_pyjwt_refuses_are_refused(name):
    token = REFUSED[name]()
    assert _pyjwt(token) is None, "the case must be invalid for PyJWT"
    assert _ours(token) is None


def test_a_changed_character_anywhere_is_refused():
    token = ACCEPTED["plain"]()
    for i, ch in enumerate(token):
        if ch == ".":
            continue
        changed = token[:i] + ("A" if ch != "A" else "B") + token[i + 1 :]
        assert _ours(changed) is None, f"changed at {i}"


def test_a_last_character_with_unused_bits_set_is_refused_like_pyjwt_refuses_it():
    """Such a segment decodes to the same bytes; one spelling per token, as PyJWT has it."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    token = ACCEPTED["plain"]()
    h, p, s = token.split(".")
    assert len(s) % 4 == 3  # 32 bytes: the last character carries 2 unused bits
    odd = alphabet[alphabet.index(s[-1]) ^ 1]
    twin = f"{h}.{p}.{s[:-1]}{odd}"
    assert base64.urlsafe_b64decode(s + "=") == base64.urlsafe_b64decode(f"{s[:-1]}{odd}=")
    assert _pyjwt(twin) is None and _ours(twin) is None
    assert _ours(token) is not None


def test_non_canonical_base64_is_refused_even_where_pyjwt_lets_it_through():
    token = ACCEPTED["plain"]()
    h, p, s = token.split(".")
    for odd in (f"{h}.{p}.{s}=", f"{h}.{p} .{s}", f"{h}.{p}.{s}\n", f" {token}"):
        assert _ours(odd) is None


def test_the_reasons_are_told():
    with pytest.raises(Unauthorized, match="expired"):
        verify_hs256(REFUSED["expired"](), KEY.encode(), AUD, ISS, LEEWAY)
    with pytest.raises(Unauthorized, match="Signature verification failed"):
        verify_hs256(REFUSED["other key"](), KEY.encode(), AUD, ISS, LEEWAY)
    with pytest.raises(Unauthorized, match="HS256"):
        verify_hs256(REFUSED["alg HS512 header"](), KEY.encode(), AUD, ISS, LEEWAY)
