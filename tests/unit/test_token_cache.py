"""TokenAuthority remembers verified tokens until they expire, and only those; RS256
tokens are checked with the identity provider's public key."""

import time

import jwt
import pytest

from api.auth import Role, TokenAuthority, Unauthorized
from api.settings import load_settings

SECRET = "s" * 40


def _authority() -> TokenAuthority:
    return TokenAuthority(load_settings(jwt_secret=SECRET, jwt_leeway_s=0))


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch):
    auth = _authority()
    checks = []
    full_check = auth._verify
    monkeypatch.setattr(auth, "_verify", lambda t: checks.append(t) or full_check(t))
    token = auth.issue("drv-7", Role.DRIVER, ttl_s=60)
    first = auth.verify(token)
    assert first.driver_id == 7 and len(checks) == 1
    assert auth.verify(token) is first and len(checks) == 1  # no second signature check
    # Past its expiry the cached entry is not used: the token is checked in full again,
    # and refused.
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(Unauthorized, match="expired"):
        auth.verify(token)
    assert len(checks) == 2 and token not in auth._verified
    # A token that has expired is refused and never remembered.
    stale = auth.issue("drv-8", Role.DRIVER, ttl_s=60, now=later - 3600)
    with pytest.raises(Unauthorized, match="expired"):
        auth.verify(stale)
    assert stale not in auth._verified


def test_refused_tokens_are_not_remembered_and_the_cache_is_bounded(monkeypatch):
    auth = _authority()
    other = TokenAuthority(load_settings(jwt_secret="x" * 40, jwt_leeway_s=0))
    forged = other.issue("rider-1", Role.RIDER)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="invalid token"):
            auth.verify(forged)
    assert auth._verified == {}
    monkeypatch.setattr(TokenAuthority, "VERIFIED_CACHE", 3)
    tokens = [auth.issue(f"rider-{i}", Role.RIDER) for i in range(5)]
    for t in tokens:
        auth.verify(t)
    assert list(auth._verified) == tokens[2:]  # the oldest went first


def test_rs256_tokens_of_the_identity_provider_are_verified_with_its_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    def keypair() -> tuple[bytes, str]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private, public.decode()

    provider, public_pem = keypair()
    impostor, _ = keypair()
    pem_file = tmp_path / "idp.pem"
    pem_file.write_text(public_pem)
    now = int(time.time())
    claims = {"sub": "drv-9", "role": "driver", "iat": now, "exp": now + 60}
    claims |= {"iss": "dispatch", "aud": "dispatch"}
    for key_setting in (public_pem, str(pem_file)):  # the PEM itself, or a file holding it
        auth = TokenAuthority(load_settings(jwt_algorithm="RS256", jwt_public_key=key_setting))
        assert auth.verify(jwt.encode(claims, provider, algorithm="RS256")).driver_id == 9
        with pytest.raises(Unauthorized, match="invalid token"):
            auth.verify(jwt.encode({**claims, "sub": "drv-10"}, impostor, algorithm="RS256"))
        with pytest.raises(Unauthorized, match="expired"):
            auth.verify(jwt.encode({**claims, "exp": now - 60}, provider, algorithm="RS256"))
        # An HS256 token signed with the public key as a secret (algorithm confusion).
        with pytest.raises(Unauthorized):
            auth.verify(jwt.encode(claims, "x" * 40, algorithm="HS256"))
        with pytest.raises(Unauthorized, match="identity provider"):
            auth.issue("drv-9", Role.DRIVER)
