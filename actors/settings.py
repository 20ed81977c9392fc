"""The shard's settings: one typed object, built by whoever deploys the shards.

A shard actor is a process of its own kind, but Ray starts it (and restarts it after a
crash) from the arguments of its constructor, never from an environment of ours. So the
deploying process (``dispatch up``, ``dispatch shards deploy``, a test) builds one
:class:`ShardSettings` and passes it to every shard it creates; Ray keeps the
constructor's arguments and gives the same settings back on every restart. Nothing in a
shard reads the environment.

Read from the environment of the deploying process (prefix ``DISPATCH_SHARD_``, except
``REDIS_URL``) by :meth:`ShardSettings.build`; see docs/operations.md for the table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dispatch.errors import ConfigError
from dispatch.region import Region, region_from_toml

DEFAULT_NAMESPACE = "dispatch"

# Values recorded by a running local stack (its stack.json and secrets.json), by field
# name: they fill in what neither the caller nor the environment gives (see
# :func:`recorded_defaults`).
_recorded: ContextVar[Mapping[str, Any]] = ContextVar(
    "dispatch_recorded_settings", default=MappingProxyType({})
)


class _RecordedSource(PydanticBaseSettingsSource):
    """The settings source under the environment: the running stack's recorded values."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _recorded.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in _recorded.get().items():
            field = self.settings_cls.model_fields.get(name)
            if field is None or value is None:
                continue
            # A field with aliases is validated under one of them, not under its name.
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                alias = alias.choices[0]
            out[alias if isinstance(alias, str) else name] = value
        return out


@contextmanager
def recorded_defaults(values: Mapping[str, Any]) -> Iterator[None]:
    """Settings built inside this block take ``values`` (by field name) where neither their
    arguments nor the environment set the field: arguments > environment > ``values`` >
    defaults. How a command joins the stack that ``dispatch up`` recorded in its data dir
    without writing the environment."""
    token = _recorded.set(dict(values))
    try:
        yield
    finally:
        _recorded.reset(token)


class ProcessSettings(BaseSettings):
    """Base of every process's settings: the recorded stack's values rank under the
    environment (:func:`recorded_defaults`)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
            _RecordedSource(settings_cls),
        )


class ShardSettings(ProcessSettings):
    """Everything a shard actor needs, passed in its constructor (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_SHARD_", extra="ignore", frozen=True)

    # The region file's text: every process of a deployment computes the same shard map
    # from it, so the shards get the text itself, not a path that means nothing on their host.
    region_toml: str
    namespace: str = Field(
        DEFAULT_NAMESPACE, validation_alias=AliasChoices("DISPATCH_SHARD_NAMESPACE", "DISPATCH_NAMESPACE")
    )
    # Where shards publish client events and ride records. None: they publish nothing and
    # records wait in the outbox (and drop past it), so deploying commands refuse it.
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "DISPATCH_REDIS_URL"))
    # Ride records kept while Redis is unreachable; past it the oldest are dropped, counted
    # and logged (``events.dropped`` in ``dispatch shards status``).
    outbox_max: int = Field(100_000, gt=0)
    # CPU reserved per shard for scheduling. Four shards must fit on a 2-core machine next
    # to the edge; on a cluster, give each shard a whole core (1).
    num_cpus: float = Field(0.25, ge=0)
    # A custom Ray resource that marks shard hosts (``ray start --resources
    # '{"shard_host": 100}'``); each shard asks for ``host_resource_amount`` of it, so
    # shards land only on those hosts. None: anywhere.
    host_resource: str | None = None
    host_resource_amount: float = Field(1.0, gt=0)
    # How long deploying waits for the shards to be placed and answer before it says
    # which resources were asked for and what the cluster has.
    deploy_timeout_s: float = Field(60.0, gt=0)

    @field_validator("region_toml")
    @classmethod
    def _region_parses(cls, v: str) -> str:
        region_from_toml(v)  # ConfigError (a ValueError) for a bad file
        return v

    def region(self) -> Region:
        return region_from_toml(self.region_toml)

    @classmethod
    def build(cls, **values: Any) -> ShardSettings:
        """From ``values``, the environment and the recorded stack; ConfigError if invalid."""
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"shard settings: {exc}") from None
