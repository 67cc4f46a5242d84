"""Deployment files, checked with the real tools: helm lint/template over several value sets,
every custom resource validated against its CRD schema (vendored in deploy/schemas/), the values
schema refusing credentials and bad types, the chart's dashboard and rules (helm/deblur/files/,
the only copy), the compose stack's mounts and Prometheus configs, and the cluster-launcher
config against Ray's own schema."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from deblur import config as job_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "deblur"
VALUES = sorted((ROOT / "tests" / "helm-values").glob("*.yaml"))
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


# Upstream CRDs, vendored unchanged (deploy/schemas/README.md: sources, versions, licence).
SCHEMAS = ROOT / "deploy" / "schemas"
CRD_FILES = {
    "RayCluster": "kuberay/ray.io_rayclusters.yaml",
    "RayJob": "kuberay/ray.io_rayjobs.yaml",
    "PodMonitor": "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
}
# Kubernetes' own API groups need no CRD; anything else the chart renders must have a schema.
BUILTIN_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "rbac.authorization.k8s.io"}


def helm() -> str:
    path = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    assert Path(path).exists(), "helm missing: scripts/install_tools.sh installs it"
    return path


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def render(values: Path | None = None, *sets: str, release: str = "t") -> list[dict]:
    args = ["template", release, str(CHART)] + (["-f", str(values)] if values else [])
    for s in sets:
        args += ["--set", s]
    out = run_helm(*args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.load_all(out.stdout, Loader=Loader) if d]


def _strict(node: object) -> object:
    """The API server silently prunes fields a CRD does not declare, so a typo would vanish
    without an error. Forbid undeclared fields wherever the schema lists properties and does
    not itself keep unknown fields."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    assert kind in CRD_FILES, f"no CRD schema known for {kind} ({api_version})"
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=Loader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            # Not jsonschema.validate: it checks the schema first, and the CRDs carry Go
            # regexes (`^(?i)…`) Python's re rejects, in fields the chart never sets.
            return jsonschema.Draft7Validator(_strict(v["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"{kind} {api_version}: version not in {CRD_FILES[kind]}")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _envs(node: object):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for value in node.values():
            yield from _envs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _envs(value)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _group(docs: list[dict]) -> dict:
    return by_kind(docs, "RayCluster")[0]["spec"]["workerGroupSpecs"][0]


def _head(docs: list[dict]) -> dict:
    return by_kind(docs, "RayCluster")[0]["spec"]["headGroupSpec"]


@pytest.mark.parametrize("values", [None, *VALUES], ids=lambda v: v.name if v else "default")
def test_lint_render_and_validate_against_crds(values: Path | None) -> None:
    lint = run_helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # A long release name too: KubeRay refuses RayJob names over 47 characters.
    for release in ("t", "a-very-long-release-name-for-the-nightly-batch"):
        docs = render(values, release=release)
        for doc in docs:
            group = doc["apiVersion"].rpartition("/")[0]
            if group in BUILTIN_GROUPS:
                continue
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in crd_validator(doc["kind"], doc["apiVersion"]).iter_errors(doc)]
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors[:5]}"
        for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayJob"):
            name = doc["metadata"]["name"]
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name  # DNS-1035
            assert len(name) <= (53 if doc["kind"] == "RayCluster" else 47), name
    cluster, job = by_kind(docs, "RayCluster"), by_kind(docs, "RayJob")
    assert len(cluster) == 1 and len(job) == 1
    assert job[0]["spec"]["clusterSelector"] == {"ray.io/cluster": cluster[0]["metadata"]["name"]}
    # Credentials only ever by reference.
    for env in _envs(docs):
        if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    # The job config is one deblur itself accepts (unknown keys, bad types and bad values fail
    # here); the weights come from the entrypoint's --weights flag, as on the cluster.
    configs = [d for d in by_kind(docs, "ConfigMap") if "job.yaml" in d.get("data", {})]
    data = yaml.safe_load(configs[0]["data"]["job.yaml"])
    data.setdefault("model", {})["weights"] = "s3://m/MIMO-UNet.pkl"
    job_config.from_dict(data).validate()
    # The head's volume is that ConfigMap, mounted where the entrypoint reads it.
    head = _head(docs)["template"]["spec"]
    assert {"name": "job-config", "configMap": {"name": configs[0]["metadata"]["name"]}} in \
        head["volumes"]
    assert "'/etc/deblur/job.yaml'" in job[0]["spec"]["entrypoint"]


def test_defaults_autoscale_gpu_workers_with_token_auth_and_private_dashboard() -> None:
    docs = render()
    cluster = by_kind(docs, "RayCluster")[0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["version"] == "v2" and options["upscalingMode"] == "Default"
    assert options["idleTimeoutSeconds"] == 300
    assert set(_env(options)) == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # no S3 access
    group = _group(docs)
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)
    worker = group["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "num-gpus" not in group["rayStartParams"]  # Ray detects NVIDIA GPUs itself
    assert {p["containerPort"]: p["name"] for p in worker["containers"][0]["ports"]} == \
        {8080: "metrics"}
    # Private by default: ClusterIP head, no extra Service, no LoadBalancer/NodePort anywhere.
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not by_kind(docs, "Service") and not by_kind(docs, "Ingress")
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = _env(head)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == \
        {"name": "t-deblur-ray-token", "key": "token"}
    secret = by_kind(docs, "Secret")[0]
    assert secret["metadata"]["name"] == "t-deblur-ray-token" and len(secret["data"]["token"]) > 40
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["deblur-metrics"] == 9464
    assert {p["name"] for p in head["ports"]} >= {"metrics", "dashboard", "gcs-server", "client"}
    job = by_kind(docs, "RayJob")[0]["spec"]
    assert job["entrypoint"].startswith("'deblur' 'run' 's3://my-bucket/blurry/' "
                                        "'s3://my-bucket/deblurred/' '--config'")
    assert "'--weights' 's3://my-models/MIMO-UNet.pkl'" in job["entrypoint"]
    assert "'--max-workers' '8'" in job["entrypoint"]
    assert set(_env(job["submitterPodTemplate"]["spec"]["containers"][0])) == \
        {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    config = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["job.yaml"])
    assert config["scheduler"]["max_workers"] == 8 and config["metrics"]["host"] == "0.0.0.0"
    # Ray on every pod, the driver on the head.
    monitors = {m["metadata"]["name"]: m["spec"] for m in by_kind(docs, "PodMonitor")}
    assert {e["port"] for e in monitors["t-deblur-head"]["podMetricsEndpoints"]} == \
        {"metrics", "deblur-metrics"}
    assert monitors["t-deblur-head"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert {e["port"] for e in monitors["t-deblur-workers"]["podMetricsEndpoints"]} == {"metrics"}
    assert monitors["t-deblur-workers"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"


def test_dashboard_configmap_and_rules_are_the_shipped_files() -> None:
    docs = render()
    dashboards = [d for d in by_kind(docs, "ConfigMap")
                  if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    shipped = json.loads((CHART / "files/deblur-dashboard.json").read_text())
    assert json.loads(dashboards[0]["data"]["deblur-dashboard.json"]) == shipped
    rules = yaml.safe_load((CHART / "files/alerts.yml").read_text())
    assert by_kind(docs, "PrometheusRule")[0]["spec"]["groups"] == rules["groups"]
    alerts = {r.get("alert") for g in rules["groups"] for r in g["rules"]}
    assert "DeblurStalled" in alerts


def test_dashboard_and_rules_have_one_copy() -> None:
    """helm/deblur/files/ is the only copy; the compose stack and scripts/monitor.sh use it."""
    for name in ("deblur-dashboard.json", "alerts.yml"):
        copies = [p.relative_to(ROOT).as_posix() for folder in ("deploy", "helm", "scripts")
                  for p in (ROOT / folder).rglob(name)]
        assert copies == [f"helm/deblur/files/{name}"], copies


def test_vendored_crd_schemas_are_documented() -> None:
    vendored = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.yaml")}
    assert vendored == set(CRD_FILES.values())
    readme = (SCHEMAS / "README.md").read_text()
    for path in vendored:
        assert f"`{path}`" in readme, f"{path} missing from deploy/schemas/README.md"
    assert "Apache-2.0" in readme and (SCHEMAS / "LICENSE-Apache-2.0").is_file()


def test_fixed_pool_with_secret_credentials() -> None:
    docs = render(ROOT / "tests/helm-values/fixed-size-secret.yaml")
    spec = by_kind(docs, "RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    group = _group(docs)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    env = _env(_head(docs)["template"]["spec"]["containers"][0])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "deblur-s3", "key": key}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert set(_env(_group(docs)["template"]["spec"]["containers"][0])) == set(env)
    assert not by_kind(docs, "ServiceAccount")
    assert _group(docs)["template"]["spec"]["serviceAccountName"] == "default"


def test_irsa_autoscaling_has_no_keys_and_resumes_its_job_root() -> None:
    docs = render(ROOT / "tests/helm-values/irsa-autoscaling.yaml")
    account = by_kind(docs, "ServiceAccount")[0]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws")
    for pod in (_head(docs), _group(docs)):
        assert pod["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    names = {e["name"] for e in _envs(docs)}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    spec = by_kind(docs, "RayCluster")[0]["spec"]
    assert spec["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    assert (_group(docs)["minReplicas"], _group(docs)["maxReplicas"]) == (0, 16)
    entrypoint = by_kind(docs, "RayJob")[0]["spec"]["entrypoint"]
    assert "'--job-root' 's3://b/out/_deblur/nightly/' '--resume'" in entrypoint
    for kind in ("PodMonitor", "PrometheusRule"):
        assert all(d["metadata"]["labels"]["release"] == "kube-prometheus"
                   for d in by_kind(docs, kind))


def test_custom_gpu_type_node_pool_and_opt_in_dashboard() -> None:
    docs = render(ROOT / "tests/helm-values/custom-gpu.yaml")
    group = _group(docs)
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in json.dumps(group)
    assert worker["nodeSelector"] == {"cloud.google.com/gke-accelerator": "mi300x"}
    assert group["rayStartParams"]["num-gpus"] == "2"  # Ray only finds NVIDIA GPUs itself
    # 3 pods x 2 GPUs / 0.5 GPU per actor.
    assert "'--max-workers' '12'" in by_kind(docs, "RayJob")[0]["spec"]["entrypoint"]
    assert not by_kind(docs, "PodMonitor") and not by_kind(docs, "PrometheusRule")
    assert not [d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in
                d["metadata"]["labels"]]
    # The opt-in Service publishes 8265 alone; the head Service (GCS, client) stays private.
    assert _head(docs)["serviceType"] == "ClusterIP"
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in service["spec"]["ports"]] == [8265]
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    assert not by_kind(docs, "Secret")  # the existing token Secret is used
    env = _env(_head(docs)["template"]["spec"]["containers"][0])
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-ray-token"


def test_auth_off_renders_no_token_anywhere() -> None:
    docs = render(ROOT / "tests/helm-values/auth-off-long-name.yaml")
    assert not by_kind(docs, "Secret")
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in _envs(docs)}
    assert "env" not in by_kind(docs, "RayCluster")[0]["spec"]["autoscalerOptions"]


@pytest.mark.parametrize("bad", [
    "s3.accessKey=AKIAEXAMPLE",                 # credentials never in values
    "s3.secretAccessKey=x",
    "auth.token=x",
    "workers.maxReplicas=-1",
    "workers.minReplicas=notanumber",
    "workers.gpusPerPod=0",
    "gpu.resourceName=gpu",
    "head.serviceType=Public",
    "autoscaler.upscalingMode=Fast",
    "job.config.scheduler.max_workers=3",       # derived from the worker group
    "unknownTopLevel=1",
])
def test_values_schema_rejects(bad: str) -> None:
    out = run_helm("template", "t", str(CHART), "--set", bad)
    assert out.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in out.stderr.lower(), out.stderr


@pytest.mark.parametrize("sets", [
    ["head.exposeDashboard=true", "auth.enabled=false"],   # never unauthenticated
    ["workers.minReplicas=5", "workers.maxReplicas=2"],
])
def test_chart_refuses_unsafe_or_inconsistent_combinations(sets: list[str]) -> None:
    args = [x for s in sets for x in ("--set", s)]
    out = run_helm("template", "t", str(CHART), *args)
    assert out.returncode != 0, f"{sets} was accepted"
    assert "workers.minReplicas" in out.stderr or "exposeDashboard" in out.stderr or \
        "schema" in out.stderr.lower(), out.stderr


def test_no_plain_credentials_in_any_rendering() -> None:
    for values in [None, *VALUES]:
        out = run_helm("template", "t", str(CHART), *(["-f", str(values)] if values else []))
        text = out.stdout
        assert "minioadmin" not in text and not re.search(r"AKIA[0-9A-Z]{12,}", text)
        for doc in yaml.load_all(text, Loader=Loader):
            if doc and doc["kind"] == "ConfigMap" and "job.yaml" in doc["data"]:
                assert not re.search(r"(?i)secret|password|access_?key", doc["data"]["job.yaml"])


COMPOSE_FILES = sorted((ROOT / "deploy").glob("*compose*.y*ml"))


def _binds(service: dict) -> list[tuple[str, str]]:
    """(host source, container target) of a service's bind mounts, short or long syntax; named
    volumes are left out."""
    binds = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                binds.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            binds.append((source, target))
    return binds


def _host(compose_file: Path, source: str) -> Path:
    # Compose resolves relative host paths against the compose file's folder.
    return (compose_file.parent / source).resolve()


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_mounts_and_build_paths_exist_in_the_repository(compose_file: Path) -> None:
    compose = yaml.safe_load(compose_file.read_text())
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in _binds(service):
            assert not source.startswith(("/", "~")), f"{name}: {source} is outside the repo"
            path = _host(compose_file, source)
            assert path.is_relative_to(ROOT), f"{name}: {source} resolves outside the repo"
            assert path.exists(), f"{name}: {source} ({path.relative_to(ROOT)}) missing"
            # A file mounted onto a file path (Docker would otherwise create a directory).
            assert path.is_file() == bool(Path(target).suffix), f"{name}: {source}:{target}"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in named, f"{name}: undeclared volume {volume}"
        build = service.get("build")
        if build:
            context = _host(compose_file, build["context"])
            assert context.is_relative_to(ROOT) and context.is_dir(), build
            assert (context / build["dockerfile"]).is_file(), build
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def _promtool_check_config(config: Path) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/install_tools.sh installs prometheus"
    out = subprocess.run([promtool, "check", "config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout, out.stdout  # the rules are loaded, not skipped
    return out.stdout


def test_compose_stack_prometheus_and_grafana_see_the_charts_files(tmp_path: Path) -> None:
    compose_file = ROOT / "deploy" / "docker-compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    assert compose["services"]["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"
    # Prometheus: lay out its bind mounts as the container sees them, then check the config at
    # the container's --config.file path, so its rule_files must resolve through the mounts.
    prometheus = compose["services"]["prometheus"]
    container = tmp_path / "container"
    for source, target in _binds(prometheus):
        path, dest = _host(compose_file, source), container / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy)(path, dest)
    (flag,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config = container / flag.partition("=")[2].lstrip("/")
    assert config.is_file(), f"{flag} is not among the mounts"
    _promtool_check_config(config)
    rules = yaml.safe_load(config.read_text())["rule_files"]
    assert all((config.parent / r).resolve().read_bytes() ==
               (CHART / "files/alerts.yml").read_bytes() for r in rules), rules
    # The same config in the checkout: relative paths resolve identically here.
    assert "alerts.yml" in _promtool_check_config(ROOT / "deploy/prometheus/compose.yml")
    # Grafana: the chart's dashboard, mounted into the folder the provider loads.
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/deblur.yaml").read_text())
    mounted = [(s, t) for s, t in _binds(compose["services"]["grafana"])
               if t.endswith("dashboard.json")]
    assert len(mounted) == 1
    source, target = mounted[0]
    assert _host(compose_file, source) == CHART / "files/deblur-dashboard.json"
    assert target.startswith(provider["providers"][0]["options"]["path"] + "/")


def test_monitor_script_prometheus_config_loads_the_charts_rules() -> None:
    config = ROOT / "deploy/prometheus/prometheus.yml"
    assert config.relative_to(ROOT).as_posix() in (ROOT / "scripts/monitor.sh").read_text()
    _promtool_check_config(config)
    rules = yaml.safe_load(config.read_text())["rule_files"]
    assert [(config.parent / r).resolve() for r in rules] == [CHART / "files/alerts.yml"]


def test_cluster_launcher_config_matches_rays_schema() -> None:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((ROOT / "deploy" / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]
    assert any("pip install" in c and " ." in c for c in config["setup_commands"])
    assert all("127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


# -- retries on Kubernetes never re-plan a job (issue 14, point 12) ---------------------------

def _rayjob(*sets: str, release: str = "nightly", namespace: str = "batch") -> dict:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    out = run_helm(*args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.load_all(out.stdout, Loader=Loader) if d]
    (job,) = by_kind(docs, "RayJob")
    errors = [e.message for e in crd_validator("RayJob", job["apiVersion"]).iter_errors(job)]
    assert not errors, errors
    job["configmap"] = next(d for d in by_kind(docs, "ConfigMap")
                            if "job.yaml" in d.get("data", {}))
    return job


def _entrypoint_params(job: dict) -> dict:
    """The entrypoint parsed by deblur's own CLI (click), without running it: every option the
    chart passes exists, and these are the values `deblur run` would get."""
    import shlex

    import typer

    from deblur.cli import app

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["deblur", "run"], argv
    command = typer.main.get_command(app)
    run = command.get_command(None, "run")  # type: ignore[attr-defined]
    return run.make_context("run", argv[2:]).params


def test_rayjob_pins_its_job_root_by_release_and_always_resumes() -> None:
    job = _rayjob()
    params = _entrypoint_params(job)
    assert params["resume"] is True
    assert params["job_id"] == "batch.nightly"
    assert params["job_root"] == "s3://my-bucket/deblurred/_deblur/batch.nightly/"
    # The same release renders the same command (a re-created RayJob resumes the same job);
    # another release or namespace gets its own job root.
    assert _rayjob()["spec"]["entrypoint"] == job["spec"]["entrypoint"]
    other = {_entrypoint_params(_rayjob(release="weekly"))["job_root"],
             _entrypoint_params(_rayjob(namespace="prod"))["job_root"]}
    assert other == {"s3://my-bucket/deblurred/_deblur/batch.weekly/",
                     "s3://my-bucket/deblurred/_deblur/prod.nightly/"}
    # An explicit job root wins; the job id still comes from the release.
    given = _entrypoint_params(_rayjob("job.jobRoot=s3://b/ledgers/x/"))
    assert (given["job_root"], given["job_id"], given["resume"]) == \
        ("s3://b/ledgers/x/", "batch.nightly", True)
    # Long names stay a valid job id (64 characters at most, starting with a letter/digit).
    from deblur.job.ledger import check_job_id

    long_id = _entrypoint_params(_rayjob(release="r" * 53, namespace="n" * 63))["job_id"]
    assert check_job_id(long_id) == long_id and len(long_id) <= 64


def test_rayjob_level_retries_are_off_and_submitter_retries_use_kuberays_setting() -> None:
    # KubeRay retries a failed RayJob (spec.backoffLimit) by deleting the RayCluster it runs
    # on, the chart's own with clusterSelector, and exit 1 (some images failed) is such a
    # failure: the chart never asks for it.
    spec = _rayjob()["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["submitterConfig"] == {"backoffLimit": 2}
    assert _rayjob("job.submitterBackoffLimit=5")["spec"]["submitterConfig"] == {"backoffLimit": 5}
    for bad in ("job.backoffLimit=2", "job.submitterBackoffLimit=-1"):
        out = run_helm("template", "t", str(CHART), "--set", bad)
        assert out.returncode != 0 and "schema" in out.stderr.lower(), (bad, out.stderr)


def test_every_try_of_the_rendered_entrypoint_finishes_one_job(tmp_path: Path) -> None:
    """The first run of the rendered command plans the job (--resume on an empty job root
    plans); a second run, as a re-created RayJob or a resubmitting submitter would start it,
    opens that same job instead of planning another."""
    from deblur.io.storage import Storage
    from deblur.job.ledger import Ledger
    from deblur.run.driver import open_or_plan
    from tests.conftest import jpeg

    storage = Storage()
    src, dest = tmp_path / "in", tmp_path / "out"
    for i in range(5):
        storage.put(str(src / f"{i}.jpg"), jpeg(16, 16, i))
    job = _rayjob(f"job.source={src}", f"job.destination={dest}", "job.weights=")
    params = _entrypoint_params(job)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(job["configmap"]["data"]["job.yaml"])
    config = job_config.load(config_file, {
        "source": params["source"], "destination": params["destination"],
        "job_root": params["job_root"], "model.name": params["model"],
        "scheduler.max_workers": params["max_workers"], "shard_size": 2,
        "model.random_weights": True})
    root = f"{dest}/_deblur/batch.nightly/"
    assert not storage.exists(root + "job.json")

    first = open_or_plan(config, storage, resume=params["resume"], job_id=params["job_id"])
    assert first.job_root.rstrip("/") == root.rstrip("/")
    assert first.job()["job_id"] == "batch.nightly" and len(first.shard_ids()) == 3
    planned = {p.name: p.stat().st_mtime_ns for p in (Path(root) / "shards").iterdir()}
    first.release_lease()  # the try ended (the driver releases its lease on exit)

    second = open_or_plan(config, storage, resume=params["resume"], job_id=params["job_id"])
    assert second.job() == first.job()
    assert {p.name: p.stat().st_mtime_ns for p in (Path(root) / "shards").iterdir()} == planned
    assert [p.name for p in Path(dest, "_deblur").iterdir()] == ["batch.nightly"]
    second.release_lease()
    assert Ledger.open(storage, root).job()["job_id"] == "batch.nightly"


# KubeRay ray-cluster chart conventions (issue 19): private registry, names, per-group pod
# settings. tests/helm-values/private-registry.yaml also goes through the CRD check above.
def _submitter(docs: list[dict]) -> dict:
    return by_kind(docs, "RayJob")[0]["spec"]["submitterPodTemplate"]["spec"]


def test_private_registry_and_per_group_pod_settings_land_in_every_pod() -> None:
    docs = render(ROOT / "tests/helm-values/private-registry.yaml")
    head, group = _head(docs), _group(docs)
    pods = {"head": head["template"]["spec"], "workers": group["template"]["spec"],
            "submitter": _submitter(docs)}
    for name, pod in pods.items():
        assert pod["imagePullSecrets"] == [{"name": "regcred"}], name
        assert pod["containers"][0]["image"] == "registry.example.com/ml/deblur:0.1.0", name
    # nameOverride: resource names and the name label; the job id stays <ns>.<release>.
    cluster = by_kind(docs, "RayCluster")[0]
    assert cluster["metadata"]["name"] == "t-deblurx"
    assert cluster["metadata"]["labels"]["app.kubernetes.io/name"] == "deblurx"
    assert "'--job-id' 'default.t'" in by_kind(docs, "RayJob")[0]["spec"]["entrypoint"]
    # Head: its own scheduling, security context (merged into the chart's), env after the
    # chart's, envFrom, extra volume + mount beside the chart's, ray start flags merged.
    h = pods["head"]
    assert h["nodeSelector"] == {"pool": "cpu"}
    assert h["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in h["affinity"]
    assert h["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 1000}
    container = h["containers"][0]
    assert [e["name"] for e in container["env"]][-1] == "HTTPS_PROXY"
    assert {"AWS_REGION", "RAY_AUTH_TOKEN"} <= set(_env(container))
    assert container["envFrom"] == [{"configMapRef": {"name": "proxy-settings"}}]
    assert {v["name"] for v in h["volumes"]} == {"job-config", "dshm", "ca-certs"}
    assert {m["name"] for m in container["volumeMounts"]} == {"job-config", "dshm", "ca-certs"}
    assert head["rayStartParams"] == {"num-cpus": "1", "object-store-memory": "2000000000",
                                      "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    # Workers: GPU pool selector/taints plus the group's own, the rest as for the head.
    w = pods["workers"]
    assert w["nodeSelector"] == {"nvidia.com/gpu.present": "true", "gpu-pool": "a100"}
    assert [t["key"] for t in w["tolerations"]] == ["nvidia.com/gpu", "spot"]
    assert "podAntiAffinity" in w["affinity"]
    assert w["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}
    wc = w["containers"][0]
    assert _env(wc)["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "sts"
    assert wc["envFrom"] == [{"secretRef": {"name": "extra-env"}}]
    assert {v["name"] for v in w["volumes"]} == {"dshm", "scratch"}
    assert {"name": "scratch", "mountPath": "/scratch"} in wc["volumeMounts"]
    assert group["rayStartParams"] == {"num-cpus": "6", "metrics-export-port": "8080"}
    # The submitter is a CPU pod scheduled like the head.
    s = pods["submitter"]
    assert s["nodeSelector"] == {"pool": "cpu"} and "nodeAffinity" in s["affinity"]
    assert s["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000}


def test_defaults_render_no_pull_secrets_and_the_previous_pod_settings() -> None:
    docs = render()
    pods = [_head(docs)["template"]["spec"], _group(docs)["template"]["spec"], _submitter(docs)]
    assert not any("imagePullSecrets" in p or "affinity" in p for p in pods)
    assert pods[0]["securityContext"] == pods[1]["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}
    assert _head(docs)["rayStartParams"]["num-cpus"] == "0"  # the head schedules no work
    assert by_kind(docs, "RayCluster")[0]["metadata"]["name"] == "t-deblur"


def test_fullname_override_names_every_resource() -> None:
    docs = render(None, "fullnameOverride=deblur-prod")
    names = {d["metadata"]["name"] for d in docs}
    assert {"deblur-prod", "deblur-prod-job"} <= names
    assert all(n.startswith("deblur-prod") for n in names), names
    job = by_kind(docs, "RayJob")[0]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "deblur-prod"}


@pytest.mark.parametrize("bad", [
    "imagePullSecrets[0].secret=regcred",               # [{name: ...}] only
    "head.env[0].name=AWS_SECRET_ACCESS_KEY,head.env[0].value=x",   # credentials by ref only
    "workers.env[0].name=RAY_AUTH_TOKEN,workers.env[0].value=x",
    "workers.volumes[0].name=dshm",                     # the chart's own volume
    "head.rayStartParams.num-cpus=4",                   # ray start flags are strings
    "fullnameOverride=Not_A_Name",
    "job.config.batch.max_batch=eight",                 # types come from pipeline/deblur/config.py
    "job.config.model.precison=fp16",
])
def test_values_schema_rejects_bad_pod_settings_and_config(bad: str) -> None:
    out = run_helm("template", "t", str(CHART), "--set", bad)
    assert out.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in out.stderr.lower(), out.stderr


def test_a_job_config_typo_fails_at_helm_template_naming_the_key(tmp_path: Path) -> None:
    values = tmp_path / "typo.yaml"
    values.write_text("job:\n  config:\n    batch:\n      max_bach: 8\n")
    out = run_helm("template", "t", str(CHART), "-f", str(values))
    assert out.returncode != 0
    assert "max_bach" in out.stderr and "/job/config/batch" in out.stderr, out.stderr


def test_committed_values_schema_is_generated_from_the_config_classes() -> None:
    from deblur.dev import values_schema

    text = values_schema.SCHEMA_PATH.read_text()
    assert values_schema.render(json.loads(text)) == text, \
        "helm/deblur/values.schema.json is stale: run python -m deblur.dev.values_schema"
    # Every section and key deblur knows is in the schema, and the shipped configs pass it.
    schema = values_schema.job_config_schema()
    for f in dataclasses.fields(job_config.JobConfig):
        assert f.name in schema["properties"], f.name
    validator = jsonschema.Draft7Validator({**schema, "required": []})
    for path in (ROOT / "configs").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        data.get("scheduler", {}).pop("max_workers", None)  # derived by the chart
        assert not list(validator.iter_errors(data)), path
