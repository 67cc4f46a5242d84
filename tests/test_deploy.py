"""The Helm chart and cluster-launcher config, checked with a real helm and the CRD schemas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "deblur"
def _schemas_dir() -> Path:
    """../shared/schemas beside the checkout; CI's clean clone may live elsewhere, so also the
    workplace's shared folder (or DEBLUR_SCHEMAS). Missing everywhere is a failure, not a skip."""
    candidates = [Path(os.environ["DEBLUR_SCHEMAS"])] if os.environ.get("DEBLUR_SCHEMAS") else []
    candidates += [ROOT.parent / "shared" / "schemas", Path("/work/shared/schemas")]
    for path in candidates:
        if (path / "kuberay").is_dir():
            return path
    raise AssertionError(f"CRD schemas not found in any of {candidates}")


SCHEMAS = _schemas_dir()
VALUES = sorted((ROOT / "tests" / "helm-values").glob("*.yaml"))
CRD_FILES = {
    "RayCluster": "kuberay/ray.io_rayclusters.yaml",
    "RayJob": "kuberay/ray.io_rayjobs.yaml",
    "PodMonitor": "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
}


def helm() -> str:
    path = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    assert Path(path).exists(), "helm missing: scripts/install_tools.sh installs it"
    return path


def render(values: Path | None = None, *sets: str) -> list[dict]:
    cmd = [helm(), "template", "t", str(CHART)]
    if values:
        cmd += ["-f", str(values)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def crd_schema(kind: str, api_version: str) -> dict:
    assert kind in CRD_FILES, f"no CRD schema known for {kind}"
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{kind} {api_version}: version not in {CRD_FILES[kind]}")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("values", [None, *VALUES], ids=lambda v: v.name if v else "default")
def test_lint_and_validate_against_crds(values: Path | None) -> None:
    cmd = [helm(), "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    lint = subprocess.run(cmd, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(values)
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_FILES or doc["apiVersion"].split("/")[0] in (
                "ray.io", "monitoring.coreos.com"):
            # Not jsonschema.validate: it checks the schema itself first, and the CRDs carry
            # Go regexes (`^(?i)…`) Python's re rejects, in fields we never set.
            validator = jsonschema.Draft7Validator(crd_schema(doc["kind"], doc["apiVersion"]))
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validator.iter_errors(doc)]
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors[:5]}"
            checked += 1
    assert by_kind(docs, "RayCluster") and by_kind(docs, "RayJob") and checked >= 2
    text = yaml.safe_dump_all(docs)
    assert "secretAccessKey" not in text and "AWS_SECRET_ACCESS_KEY\n  value" not in text
    for doc in docs:  # credentials only ever by secretKeyRef
        for env in _envs(doc):
            if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def _envs(node: object):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for value in node.values():
            yield from _envs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _envs(value)


def test_defaults_autoscale_gpu_workers_with_token_auth_and_private_dashboard() -> None:
    docs = render()
    cluster = by_kind(docs, "RayCluster")[0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)
    worker = group["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert worker["tolerations"] and worker["nodeSelector"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    head_env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]
                ["containers"][0]["env"]}
    assert head_env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in head_env
    assert by_kind(docs, "Secret") and "token" in by_kind(docs, "Secret")[0]["data"]
    job = by_kind(docs, "RayJob")[0]["spec"]
    assert job["entrypoint"].startswith("'deblur' 'run' 's3://my-bucket/blurry/'")
    assert "--weights" in job["entrypoint"] and "'/etc/deblur/job.yaml'" in job["entrypoint"]
    config = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["job.yaml"])
    assert config["scheduler"]["max_workers"] == 8 and config["metrics"]["host"] == "0.0.0.0"
    ports = {p["name"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
             ["ports"]}
    assert {"metrics", "deblur-metrics"} <= ports
    monitors = by_kind(docs, "PodMonitor")
    endpoints = {e["port"] for m in monitors for e in m["spec"]["podMetricsEndpoints"]}
    assert endpoints == {"metrics", "deblur-metrics"}
    dashboards = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get(
        "grafana_dashboard") == "1"]
    assert json.loads(dashboards[0]["data"]["deblur-dashboard.json"])["uid"] == "deblur-jobs"
    rules = by_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"DeblurStalled", "DeblurWorkersPendingLong"}


def test_value_sets_change_what_they_should() -> None:
    fixed = render(ROOT / "tests/helm-values/fixed-size-secret.yaml")
    spec = by_kind(fixed, "RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    assert spec["workerGroupSpecs"][0]["replicas"] == 4
    env = {e["name"]: e for e in _envs(by_kind(fixed, "RayCluster")[0])}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "deblur-s3"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert not by_kind(fixed, "ServiceAccount")

    irsa = render(ROOT / "tests/helm-values/irsa-autoscaling.yaml")
    account = by_kind(irsa, "ServiceAccount")[0]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in _envs(irsa)}
    assert "'--resume'" in by_kind(irsa, "RayJob")[0]["spec"]["entrypoint"]
    assert by_kind(irsa, "PodMonitor")[0]["metadata"]["labels"]["release"] == "kube-prometheus"

    amd = render(ROOT / "tests/helm-values/custom-gpu.yaml")
    group = by_kind(amd, "RayCluster")[0]["spec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 2
    assert group["rayStartParams"]["num-gpus"] == "2"
    assert not by_kind(amd, "PodMonitor") and not by_kind(amd, "PrometheusRule")
    assert by_kind(amd, "RayCluster")[0]["spec"]["headGroupSpec"]["serviceType"] == \
        "LoadBalancer"
    assert not by_kind(amd, "Secret")  # an existing token Secret is used


@pytest.mark.parametrize("bad", ["s3.accessKey=AKIA123", "workers.maxReplicas=-1",
                                 "workers.minReplicas=notanumber", "gpu.resourceName=gpu",
                                 "head.serviceType=Public"])
def test_schema_rejects_bad_values(bad: str) -> None:
    out = subprocess.run([helm(), "template", "t", str(CHART), "--set", bad],
                         capture_output=True, text=True)
    assert out.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in out.stderr.lower() or "values" in out.stderr.lower()


def test_chart_ships_the_same_dashboard_and_rules_as_deploy() -> None:
    pairs = [(ROOT / "deploy/grafana/deblur-dashboard.json", CHART / "files/deblur-dashboard.json"),
             (ROOT / "deploy/prometheus/alerts.yml", CHART / "files/alerts.yml")]
    for source, copy in pairs:
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy} differs from {source}: copy it over (one source of truth)")


def test_cluster_launcher_config_matches_rays_schema() -> None:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((ROOT / "deploy" / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
