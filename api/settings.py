"""The edge's settings: one typed object, read from the environment at startup.

Built by :func:`load_settings` when an edge starts (never at import time: Ray workers
re-import modules). Every variable is prefixed ``DISPATCH_`` except the three URLs every
tool in this field already knows: ``RAY_ADDRESS``, ``REDIS_URL``, ``DATABASE_URL``.

Secrets (the JWT key, the operator key) come from the environment only. ``dispatch up``
generates them for a local stack and keeps them in ``<data-dir>/secrets.json`` (mode
0600), so ``dispatch token`` can mint development tokens for it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatch.errors import ConfigError


class Settings(BaseSettings):
    """Everything an edge process needs to know. See docs/operations.md for the table."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore", frozen=True)

    # -- where things are ------------------------------------------------------------
    ray_address: str | None = Field(
        None, validation_alias=AliasChoices("RAY_ADDRESS", "DISPATCH_RAY_ADDRESS")
    )
    namespace: str = "dispatch"
    region_file: str | None = None
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "DISPATCH_REDIS_URL"))
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "DISPATCH_DATABASE_URL")
    )
    data_dir: str = ".dispatch"
    edge_id: str = Field(default_factory=lambda: f"edge-{os.getpid()}-{secrets.token_hex(2)}")

    # -- auth ------------------------------------------------------------------------
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    # HS256: the shared secret (at least 32 bytes). RS256: unused.
    jwt_secret: SecretStr | None = None
    # RS256: the identity provider's public key (PEM), or a path to it.
    jwt_public_key: str | None = None
    jwt_issuer: str = "dispatch"
    jwt_audience: str = "dispatch"
    # Leeway for clocks that disagree a little (seconds).
    jwt_leeway_s: float = 10.0
    # The longest token the issuing endpoint mints (seconds).
    token_max_ttl_s: int = 7 * 24 * 3600
    # Guards POST /v1/auth/token. Unset: the endpoint answers 403 to everyone.
    operator_key: SecretStr | None = None
    # Prometheus scrapes /metrics with this bearer token (or an admin JWT).
    metrics_token: SecretStr | None = None

    # -- REST ------------------------------------------------------------------------
    # The largest request body a REST route takes (api/body_limit.py); larger gets 413.
    http_max_body_bytes: int = 64 * 1024

    # -- sockets ---------------------------------------------------------------------
    # A driver app sends one position every 1-4 s; 10/s with a burst of 20 leaves room
    # for catching up after a tunnel and still stops a runaway client.
    driver_location_rate_per_s: float = 10.0
    driver_location_burst: int = 20
    # A location frame is ~100 bytes; anything past this on a driver socket is refused.
    driver_max_frame_bytes: int = 4096
    # A gateway batch of 5,000 updates as columnar msgpack is ~250 kB.
    gateway_max_frame_bytes: int = 4 * 1024 * 1024
    # (Limits on a position's time and speed are the region's: [drivers] in its file.)
    # Close a socket that has sent nothing (not even a heartbeat) for this long.
    idle_timeout_s: float = 60.0

    # The WebSocket implementation. "direct" (api/ws_server.py) is uvicorn's
    # "websockets-sansio" with frames handed to the socket's handler straight from the
    # transport; "websockets-sansio", "websockets" and "wsproto" are uvicorn's own, where
    # each frame wakes the socket's task. Edge CPU per single-location frame at 25,000
    # frames/s with each, measured with the shard calls stubbed out: direct 14 µs,
    # websockets-sansio 30, websockets 37, wsproto 40 (loadtests/bench_edge.py measures
    # the whole path; figures in the README).
    ws_impl: Literal["direct", "websockets-sansio", "websockets", "wsproto"] = "direct"

    # -- the router to the shards -------------------------------------------------------
    # A shard's buffer goes out when its oldest row is this old (or the buffer is full).
    # Each call costs the edge and the shard about a millisecond of CPU apiece: at 50k
    # updates/s over 4 shards, 0.02 s made 200 calls/s and 0.1 s cost 0.23 cores less
    # (bench_match); positions come every few seconds, so 50 ms more staleness is noise.
    flush_interval_s: float = 0.05
    max_rows_per_call: int = 2000

    # -- Postgres ----------------------------------------------------------------------
    # Apply pending migrations when the edge starts (safe with many edges: they queue on
    # an advisory lock). Turn off where migrations are a deploy step (`dispatch migrate`).
    auto_migrate: bool = True
    db_pool_size: int = 20

    # -- REST --------------------------------------------------------------------------
    # Ride requests and quotes being handled at once by this edge; past it they get 503
    # with Retry-After, so a burst cannot starve the location path (measured: at 256 in
    # flight on 2 cores the router fell behind and shard calls timed out).
    ride_requests_in_flight: int = 128
    nearby_max_radius_m: float = 3000.0
    nearby_max_limit: int = 100
    # Per-principal request rate on REST (token bucket in this process).
    rest_rate_per_s: float = 20.0
    rest_burst: int = 40

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.jwt_algorithm == "HS256":
            if self.jwt_secret is None or len(self.jwt_secret.get_secret_value()) < 32:
                raise ValueError(
                    "DISPATCH_JWT_SECRET must be set to at least 32 characters "
                    "(`dispatch up` generates one for a local stack)"
                )
        elif not self.jwt_public_key:
            raise ValueError("DISPATCH_JWT_PUBLIC_KEY (PEM or a path to it) is required with RS256")
        for name in ("driver_location_rate_per_s", "flush_interval_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DISPATCH_{name.upper()} must be > 0")
        return self

    def public_key_pem(self) -> str:
        key = self.jwt_public_key or ""
        return key if "-----BEGIN" in key else Path(key).read_text()


def load_settings(**overrides) -> Settings:
    """Build the settings from the environment (and overrides); ConfigError if invalid."""
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"edge settings: {exc}") from None


# -- the local stack's secrets ---------------------------------------------------------------


def local_secrets(data_dir: str | Path, create: bool = True) -> dict[str, str]:
    """The local stack's JWT secret and operator key, kept in ``<data-dir>/secrets.json``.

    Created (random, mode 0600) on first use when ``create``; {} if absent otherwise.
    """
    path = Path(data_dir) / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "DISPATCH_JWT_SECRET": secrets.token_urlsafe(48),
        "DISPATCH_OPERATOR_KEY": secrets.token_urlsafe(24),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return values
