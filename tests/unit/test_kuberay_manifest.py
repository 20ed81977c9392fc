"""ray-cluster.kuberay.yaml against KubeRay's RayCluster schema (vendored under
tests/fixtures/kuberay/), and against the layout the engine needs: a head that takes no
actors, a shard group marked ``shard_host``, an edge group marked ``edge_host``, token
auth, and GCS fault tolerance on an external Redis.

The API server prunes fields a structural schema does not declare, silently; so the
schema is checked here with unknown fields made errors, which is what a typo would cost.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "ray-cluster.kuberay.yaml"
SCHEMA = ROOT / "tests" / "fixtures" / "kuberay" / "raycluster-v1.openapi.json"


def _strict(schema: dict) -> dict:
    """Every object schema that lists its properties refuses others (as pruning would drop
    them), unless it keeps unknown fields on purpose (``x-kubernetes-preserve-unknown-fields``)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def validator():
    schema = _strict(json.loads(SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _start_resources(group: dict) -> dict:
    # KubeRay hands rayStartParams to `ray start` through a shell: the JSON is quoted twice.
    raw = group["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def _group(raycluster: dict, name: str) -> dict:
    return next(g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def test_the_manifest_is_a_valid_raycluster(validator, raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert _errors(validator, raycluster) == []


def test_the_strict_schema_catches_a_misspelt_field_and_a_wrong_type(validator, raycluster):
    typo = copy.deepcopy(raycluster)
    typo["spec"]["gcsFaultTolerance"] = typo["spec"].pop("gcsFaultToleranceOptions")
    assert any("gcsFaultTolerance" in e for e in _errors(validator, typo))
    wrong = copy.deepcopy(raycluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "three"
    assert any("replicas" in e for e in _errors(validator, wrong))
    bad_enum = copy.deepcopy(raycluster)
    bad_enum["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions/mode" in e for e in _errors(validator, bad_enum))


def test_the_head_takes_no_actors(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _start_resources(head) == {"head": 1}


def test_the_shard_group_is_marked_shard_host_and_the_edge_group_edge_host(raycluster):
    shard, edge = _group(raycluster, "shard"), _group(raycluster, "edge")
    assert _start_resources(shard) == {"shard_host": 100}
    assert float(shard["rayStartParams"]["num-cpus"]) >= 1
    assert _start_resources(edge) == {"edge_host": 1}
    assert edge["rayStartParams"]["num-cpus"] == "0"
    # A fixed shard layout; the operator refuses a group without both bounds when the
    # autoscaler is off (validation.go).
    assert raycluster["spec"]["enableInTreeAutoscaling"] is False
    for g in (shard, edge):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_gcs_fault_tolerance_on_external_redis_with_the_password_from_a_secret(raycluster):
    spec = raycluster["spec"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["externalStorageNamespace"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]
    # The operator refuses these next to gcsFaultToleranceOptions (validation.go).
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
    assert "redis-password" not in spec["headGroupSpec"]["rayStartParams"]
    assert "ray.io/ft-enabled" not in raycluster["metadata"].get("annotations", {})


def test_every_ray_process_gets_the_token(raycluster):
    spec = raycluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    # Token mode needs Ray 2.52 or later (validation.go).
    assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= (2, 52, 0)
    # KubeRay sets the token only in each pod's Ray container; the edge is a driver in a
    # second container and brings it from the same secret.
    edge = _group(raycluster, "edge")["template"]["spec"]["containers"]
    assert edge[0]["name"] == "ray-worker"
    driver = next(c for c in edge if c["name"] == "edge")
    env = {e["name"]: e for e in driver["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (spec["authOptions"]["secretName"], "auth_token")
    assert env["RAY_ADDRESS"]["value"] == f"{raycluster['metadata']['name']}-head-svc:6379"
    # ... and shares the node's /tmp/ray, where its raylet's sockets are.
    mounts = [{m["mountPath"] for m in c.get("volumeMounts", [])} for c in edge]
    assert all("/tmp/ray" in m for m in mounts)


def test_ray_cluster_yaml_has_the_same_layout_and_passes_rays_own_check():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--num-cpus=0" in head and """--resources='{"head": 1}'""" in head
    assert """--resources='{"shard_host": 100}'""" in workers
    assert """--num-cpus=0 --resources='{"edge_host": 1}'""" in workers
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token" in commands and "RAY_AUTH_TOKEN_PATH=" in commands
    assert "RAY_REDIS_ADDRESS=" in head
