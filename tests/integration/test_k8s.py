"""Kubernetes manifests (deploy/k8s/): every overlay renders with `kubectl kustomize`, validates
strictly against the Kubernetes 1.32 schemas offline (kubernetes-validate), and has what an SRE
relies on: probes, resources, a drain that fits the grace period, GPU scheduling, Redis with AOF on
a volume, PDB, queue-depth autoscaling, a ServiceMonitor and API keys only by reference."""

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr_triage.observability import metrics
from cxr_triage.serving.lifecycle import SHUTDOWN_MARGIN_S
from tests.helpers import ROOT, require_binary

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32"
OVERLAYS = ["cpu", "gpu"]
# Custom resources: kubernetes-validate ships only built-in kinds, so these are checked for shape
# (apiVersion, kind, metadata.name, spec) and by the assertions below, not against a schema.
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1"}

Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    kubectl = require_binary("kubectl", "kubectl (1.32, with kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def with_components(tmp: Path, *components: str) -> list[Doc]:
    """The cpu overlay plus optional components, as a user's own overlay would add them."""
    rel = Path(os.path.relpath(K8S, tmp))  # kustomize refuses absolute resource paths
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "cxr-triage",
                "resources": [str(rel / "overlays" / "cpu")],
                "components": [str(rel / "components" / c) for c in components],
            }
        )
    )
    return kustomize(tmp)


# ids: a bare "gpu" would read as the gpu marker, which conftest skips on machines without CUDA.
@pytest.fixture(scope="module", params=OVERLAYS, ids=[f"overlays-{o}" for o in OVERLAYS])
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    out["keda"] = with_components(tmp_path_factory.mktemp("keda"), "keda")
    out["external-redis"] = with_components(tmp_path_factory.mktemp("ext"), "external-redis")
    return out


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[Doc]) -> Doc:
    containers = one(docs, "Deployment", "cxr-triage")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "cxr-triage")


def config(docs: list[Doc]) -> dict[str, str]:
    prefix = "cxr-triage-config"  # plus kustomize's content hash
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)]
    assert len(maps) == 1
    return maps[0]["data"]


def cores(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_every_variant_validates_against_the_kubernetes_schemas(variants: dict[str, list[Doc]]) -> None:
    import kubernetes_validate

    for name, docs in variants.items():
        for doc in docs:
            where = f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            assert "namespace" not in doc["metadata"] or name in ("keda", "external-redis"), (
                f"{where}: the base and overlays leave the namespace to the user"
            )
            if doc["kind"] in CRD_KINDS:
                assert doc["apiVersion"] == CRD_KINDS[doc["kind"]], where
                assert doc["metadata"]["name"] and isinstance(doc["spec"], dict) and doc["spec"], where
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: not a built-in kind and not listed in CRD_KINDS")


def test_probes_resources_security_and_spread(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    c = container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading needs minutes"
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][section]), section
    pod = one(docs, "Deployment", "cxr-triage")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
    assert "USER 10001" in (ROOT / "Dockerfile").read_text()
    assert pod["topologySpreadConstraints"] and pod["affinity"]["podAntiAffinity"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == config(docs)["CXR_MODEL_REPO"])
    assert mount["readOnly"] is True
    assert one(docs, "Service", "cxr-triage")["spec"]["ports"][0]["port"] == 8000
    env = config(docs)
    assert env["CXR_HOST"] == "0.0.0.0" and env["CXR_REDIS_URL"] == "redis://cxr-redis:6379/0"
    # 0 would mean "one per node core", far beyond the container's CPU
    assert int(env["CXR_INTRA_OP_THREADS"]) > 0 and int(env["CXR_DECODE_WORKERS"]) > 0


def test_grace_period_covers_prestop_and_drain(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    c = container(docs)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    env = config(docs)
    drain = float(env["CXR_DRAIN_GRACE_S"])
    grace = one(docs, "Deployment", "cxr-triage")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop >= 5, "endpoints need a few seconds to leave the Service before SIGTERM"
    # the drain ends itself SHUTDOWN_MARGIN_S before its grace; LitServe's stop needs that margin
    assert grace >= pre_stop + drain, f"grace {grace} < preStop {pre_stop} + drain {drain}"
    # a drain waits for requests in flight, which may take the request timeout
    assert drain - SHUTDOWN_MARGIN_S >= float(env["CXR_REQUEST_TIMEOUT_S"])


def test_each_pod_names_itself(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["CXR_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_cpu_overlay_requests_match_the_engine_threads(variants: dict[str, list[Doc]]) -> None:
    docs = variants["cpu"]
    env = config(docs)
    assert env["CXR_BACKEND"] == "cpu"
    threads = int(env["CXR_INTRA_OP_THREADS"]) * int(env["CXR_INFERENCE_WORKERS"])
    resources = container(docs)["resources"]
    assert cores(resources["requests"]["cpu"]) == threads
    assert cores(resources["limits"]["cpu"]) >= threads
    assert container(docs)["image"] == "cxr-triage:latest"
    assert "nvidia.com/gpu" not in resources["limits"]


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes(variants: dict[str, list[Doc]]) -> None:
    docs = variants["gpu"]
    c = container(docs)
    assert c["image"] == "cxr-triage:gpu"
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert config(docs)["CXR_BACKEND"] == "auto"
    pod = one(docs, "Deployment", "cxr-triage")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    memory = container(variants["cpu"])["resources"]["limits"]["memory"]
    assert c["resources"]["limits"]["memory"] != memory  # more memory than the CPU pods


def test_redis_persists_with_aof_on_a_volume(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    redis = one(docs, "StatefulSet", "cxr-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "always"
    assert pairs["--maxmemory-policy"] == "noeviction"
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    mounts = redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] in claims and m["mountPath"] == pairs["--dir"] for m in mounts)
    assert one(docs, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    assert one(docs, "Service", "cxr-redis")["spec"]["ports"][0]["port"] == 6379


def test_pdb_hpa_on_queue_depth_and_service_monitor(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    labels = one(docs, "Deployment", "cxr-triage")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in one(docs, "Deployment", "cxr-triage")["spec"], "the HPA owns the count"
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cxr-triage"}
    assert hpa["spec"]["scaleTargetRef"] == target
    (metric,) = hpa["spec"]["metrics"]
    # The adapter rule serves the HPA's metric name from the service's queue-depth gauge.
    rule = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["external"][0]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith(metrics.QUEUE_DEPTH._name + "{")
    assert "max by (namespace, priority)" in rule["metricsQuery"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert endpoint["authorization"]["credentials"]["name"] == "cxr-api-keys"


def test_api_keys_only_by_reference(variants: dict[str, list[Doc]]) -> None:
    for name, docs in variants.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name}: a Secret belongs out of band"
        assert not [d for d in docs if "data" in d and d["kind"] != "ConfigMap"]
        env = {e["name"]: e for e in container(docs)["env"]}
        assert env["CXR_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "cxr-api-keys", "key": "keys"}
        assert all("value" not in e for e in env.values()), f"{name}: no literal env values"
        assert not any("KEY" in k or "PASSWORD" in k for k in config(docs)), f"{name}: secrets in a ConfigMap"


def test_keda_component_replaces_the_hpa(variants: dict[str, list[Doc]]) -> None:
    docs = variants["keda"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "cxr-triage"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert metrics.QUEUE_DEPTH._name in trigger["metadata"]["query"]


def test_external_redis_component_drops_the_statefulset(variants: dict[str, list[Doc]]) -> None:
    docs = variants["external-redis"]
    assert not [d for d in docs if d["metadata"]["name"].startswith("cxr-redis")]
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["CXR_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "cxr-redis-url"
