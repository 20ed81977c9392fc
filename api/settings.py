"""The settings of the edge and of the command line: one typed object per process,
built once when it starts and passed down.

- :class:`EdgeSettings` (alias ``Settings``): an edge process, built by :func:`load_settings`
  (never at import time: Ray workers re-import modules).
- :class:`StackSettings`: the ``dispatch`` command and the local stack it runs (data dir,
  the edge's host and port, the Ray address, the URLs, the region file).
- The shard's settings are :class:`actors.settings.ShardSettings`.

Every variable is prefixed ``DISPATCH_`` except the three URLs every tool in this field
already knows: ``RAY_ADDRESS``, ``REDIS_URL``, ``DATABASE_URL``. A command given a data
dir where ``dispatch up`` runs also takes what that stack recorded (:func:`stack_record`:
its URLs, Ray address and Ray auth, its secrets) for whatever the environment leaves
unset, without writing the environment.

Secrets (the JWT key, the operator key) come from the environment or the stack's record
only. ``dispatch up`` generates them for a local stack and keeps them in
``<data-dir>/secrets.json`` (mode 0600), so ``dispatch token`` can mint development
tokens for it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from actors.settings import DEFAULT_NAMESPACE, ProcessSettings, recorded_defaults
from dispatch.errors import ConfigError

if TYPE_CHECKING:
    from actors.directory import RayAuth


class _RayJoin:
    """Mixin: how a process joins the cluster (address and, for a head that enforces
    tokens, the token's file that ``dispatch up`` recorded)."""

    ray_address: str | None
    ray_auth_mode: Literal["token", "disabled"] | None
    ray_auth_token_path: str | None

    def ray_auth(self) -> RayAuth | None:
        from actors.directory import RayAuth

        if self.ray_auth_mode is None:
            return None
        return RayAuth(self.ray_auth_mode, self.ray_auth_token_path)


class EdgeSettings(_RayJoin, ProcessSettings):
    """Everything an edge process needs to know. See docs/operations.md for the table."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore", frozen=True)

    # -- where things are ------------------------------------------------------------
    ray_address: str | None = Field(
        None, validation_alias=AliasChoices("RAY_ADDRESS", "DISPATCH_RAY_ADDRESS")
    )
    # Ray's token auth: "token" with the token's file, as the stack recorded them.
    ray_auth_mode: Literal["token", "disabled"] | None = None
    ray_auth_token_path: str | None = None
    # Ray workers' logs copied to this process's stderr.
    ray_log_to_driver: bool = True
    namespace: str = DEFAULT_NAMESPACE
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
    # Garbage collection (api/gc_policy.py): freeze the survivors this often, and collect
    # everything once this often (the one long pause).
    gc_freeze_every_s: float = Field(default=60.0, gt=0)
    gc_full_every_s: float = Field(default=600.0, gt=0)

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
    # New rides and accepts are written in batches (storage/rides.py): one statement at a
    # time, at most this often, with what arrived meanwhile. A lone write goes out at once.
    # Under load each waits up to this long and costs a share of one statement: at 10k
    # rides/min on 2 cores, ~0.4 ms of CPU for a statement alone, ~0.1 a row of four.
    ride_write_window_s: float = Field(default=0.02, ge=0, le=1)

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
    def _check(self) -> EdgeSettings:
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


Settings = EdgeSettings  # the name most of the edge knows it by


def load_settings(stack: dict[str, Any] | None = None, **overrides: Any) -> EdgeSettings:
    """Build the edge's settings: ``overrides`` > the environment > ``stack`` (what a
    running local stack recorded, :func:`stack_record`) > defaults. ConfigError if invalid."""
    try:
        with recorded_defaults(stack or {}):
            return EdgeSettings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"edge settings: {exc}") from None


class StackSettings(_RayJoin, ProcessSettings):
    """The ``dispatch`` command and the local stack it runs (``dispatch up``)."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore", frozen=True)

    # Where a local stack keeps Postgres's and Redis's data, its secrets and its record.
    data_dir: str = ".dispatch"
    # The edge's bind address and port (`dispatch up`, `dispatch edge`).
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    region_file: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    ray_address: str | None = Field(
        None, validation_alias=AliasChoices("RAY_ADDRESS", "DISPATCH_RAY_ADDRESS")
    )
    ray_auth_mode: Literal["token", "disabled"] | None = None
    ray_auth_token_path: str | None = None
    # Start Ray's dashboard with a local instance (`dispatch up` without --address).
    ray_dashboard: bool = False
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "DISPATCH_REDIS_URL"))
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "DISPATCH_DATABASE_URL")
    )

    @classmethod
    def load(cls, data_dir: str | None = None, *, join: bool = True, **overrides: Any) -> StackSettings:
        """``overrides`` (command-line flags; None ones ignored) > the environment > what
        the stack in the data dir recorded (when ``join``) > defaults. ConfigError if invalid."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            if data_dir is None:
                data_dir = cls(**given).data_dir
            with recorded_defaults(stack_record(data_dir) if join else {}):
                return cls(data_dir=data_dir, **given)
        except ValueError as exc:
            raise ConfigError(f"settings: {exc}") from None

    def stack(self) -> dict[str, Any]:
        """What the stack in :attr:`data_dir` recorded (see :func:`stack_record`)."""
        return stack_record(self.data_dir)


STACK_FILE = "stack.json"
_RECORDED_FIELDS = (
    "redis_url",
    "database_url",
    "namespace",
    "ray_address",
    "ray_auth_mode",
    "ray_auth_token_path",
)


def stack_record(data_dir: str | Path) -> dict[str, Any]:
    """What a local stack (``dispatch up``) recorded in ``data_dir`` for the processes that
    join it, by settings field name: ``redis_url``, ``database_url``, ``namespace``, ``ray_address``,
    ``ray_auth_mode``, ``ray_auth_token_path``, ``jwt_secret``, ``operator_key``. {} when
    no stack ran there."""
    out: dict[str, Any] = {}
    secrets_ = local_secrets(data_dir, create=False)
    for env_name, field in (("DISPATCH_JWT_SECRET", "jwt_secret"), ("DISPATCH_OPERATOR_KEY", "operator_key")):
        if secrets_.get(env_name):
            out[field] = secrets_[env_name]
    path = Path(data_dir) / STACK_FILE
    if path.exists():
        info = json.loads(path.read_text())
        for field in _RECORDED_FIELDS:
            if info.get(field):
                out[field] = info[field]
    return out


def write_stack_record(data_dir: str | Path, **values: Any) -> Path:
    """Record the running stack for the processes that join it (mode 0600: it may point
    at Ray's auth token and holds the database URL)."""
    path = Path(data_dir) / STACK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({k: v for k, v in values.items() if v is not None}, f)
    return path


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
