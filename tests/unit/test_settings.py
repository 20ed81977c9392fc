"""Settings: one typed object per kind of process, from arguments, the environment and a
running stack's record, in that order; nothing deeper reads the environment."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from actors.settings import ShardSettings, recorded_defaults
from api.settings import StackSettings, load_settings, stack_record, write_stack_record
from dispatch.errors import ConfigError
from dispatch.region import region_file_text

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s" * 40


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("REDIS_URL", "DATABASE_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    import os

    for name in [n for n in os.environ if n.startswith("DISPATCH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_shard_settings_read_their_variables_and_take_arguments_first(clean_env):
    clean_env.setenv("REDIS_URL", "redis://bus:6379/0")
    clean_env.setenv("DISPATCH_SHARD_NUM_CPUS", "1")
    clean_env.setenv("DISPATCH_SHARD_OUTBOX_MAX", "500")
    clean_env.setenv("DISPATCH_SHARD_HOST_RESOURCE", "shard_host")
    clean_env.setenv("DISPATCH_NAMESPACE", "from-env")
    s = ShardSettings.build(region_toml=region_file_text())
    assert (s.redis_url, s.num_cpus, s.outbox_max, s.host_resource) == (
        "redis://bus:6379/0",
        1.0,
        500,
        "shard_host",
    )
    assert s.namespace == "from-env"
    assert s.region().name == "sf"
    given = ShardSettings.build(region_toml=region_file_text(), namespace="given", redis_url="redis://other")
    assert (given.namespace, given.redis_url) == ("given", "redis://other")


def test_bad_shard_settings_are_a_config_error(clean_env):
    with pytest.raises(ConfigError, match="region_toml"):
        ShardSettings.build(region_toml="shard_count = [")
    clean_env.setenv("DISPATCH_SHARD_NUM_CPUS", "lots")
    with pytest.raises(ConfigError, match="num_cpus"):
        ShardSettings.build(region_toml=region_file_text())


def test_shard_settings_survive_pickling_for_the_actor_constructor(clean_env):
    import pickle

    s = ShardSettings.build(region_toml=region_file_text(), redis_url="redis://x")
    assert pickle.loads(pickle.dumps(s)) == s


def test_a_stack_record_fills_in_what_the_environment_leaves_unset(clean_env, tmp_path):
    (tmp_path / "secrets.json").write_text(json.dumps({"DISPATCH_JWT_SECRET": SECRET}))
    write_stack_record(
        tmp_path,
        redis_url="redis://recorded",
        database_url="postgresql://recorded/db",
        ray_address="10.0.0.1:6379",
        ray_auth_mode="token",
        ray_auth_token_path="/run/token",
        namespace="stack-ns",
    )
    assert (tmp_path / "stack.json").stat().st_mode & 0o777 == 0o600
    clean_env.setenv("REDIS_URL", "redis://from-env")
    edge = load_settings(stack=stack_record(tmp_path))
    assert edge.redis_url == "redis://from-env"  # the environment outranks the record
    assert edge.database_url == "postgresql://recorded/db"
    assert edge.jwt_secret is not None and edge.jwt_secret.get_secret_value() == SECRET
    assert edge.namespace == "stack-ns"
    auth = edge.ray_auth()
    assert auth is not None and (auth.mode, auth.token_path) == ("token", "/run/token")
    cli = StackSettings.load(str(tmp_path), ray_address="10.0.0.9:6379", port=None)
    assert cli.ray_address == "10.0.0.9:6379"  # a flag outranks both
    assert cli.port == 8000 and cli.database_url == "postgresql://recorded/db"
    fresh = StackSettings.load(str(tmp_path), join=False)
    assert fresh.database_url is None and fresh.ray_address is None


def test_recorded_values_apply_only_inside_their_block(clean_env):
    with recorded_defaults({"redis_url": "redis://inside"}):
        inside = ShardSettings.build(region_toml=region_file_text())
    outside = ShardSettings.build(region_toml=region_file_text())
    assert (inside.redis_url, outside.redis_url) == ("redis://inside", None)


def test_an_edge_without_a_jwt_secret_does_not_start(clean_env):
    with pytest.raises(ConfigError, match="DISPATCH_JWT_SECRET"):
        load_settings()


def _environ_uses(package: str) -> list[tuple[str, int, str]]:
    """``os.environ`` / ``os.getenv`` / ``os.putenv`` in a package's code, as (file, line,
    innermost enclosing function or "<module>")."""
    found = []

    def visit(node: ast.AST, path: Path, where: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            where = node.name
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "getenv", "putenv")
        ):
            found.append((str(path.relative_to(ROOT)), node.lineno, where))
        for child in ast.iter_child_nodes(node):
            visit(child, path, where)

    for path in sorted((ROOT / package).rglob("*.py")):
        visit(ast.parse(path.read_text()), path, "<module>")
    return found


@pytest.mark.parametrize("package", ["dispatch", "actors", "storage"])
def test_the_core_the_actors_and_storage_never_touch_the_environment(package):
    # Ray's auth variables included: the command line starts again with them set
    # (api/cli.py: _join_ray_env) instead of writing its own environment.
    assert _environ_uses(package) == []
