"""The chart's PodMonitors label targets as KubeRay's own do, so Ray's Grafana dashboards
(which filter by ``ray_io_cluster``) show these pods. Rendered with the real ``helm``; the
rendering is validated against the PodMonitor CRD by tests/test_deploy.py."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import ROOT, by_kind, render

# KubeRay's config/prometheus/podMonitor.yaml: the pod label ray.io/cluster, as Prometheus'
# Kubernetes discovery names it, copied to the target label ray_io_cluster.
KUBERAY_RELABELING = {"action": "replace",
                      "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                      "targetLabel": "ray_io_cluster"}


@pytest.mark.integration  # renders the chart with helm
def test_every_pod_metrics_endpoint_relabels_the_ray_cluster() -> None:
    monitors = by_kind(render(), "PodMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"t-deblur-head", "t-deblur-workers"}
    endpoints = [e for m in monitors for e in m["spec"]["podMetricsEndpoints"]]
    assert len(endpoints) == 3  # Ray on head and workers, the driver on the head
    for endpoint in endpoints:
        assert KUBERAY_RELABELING in endpoint.get("relabelings", []), endpoint


@pytest.mark.integration
def test_prometheus_gives_the_scraped_pods_their_ray_cluster(tmp_path: Path) -> None:
    """A real Prometheus applies the relabeling (as prometheus-operator writes it: snake_case
    keys) to a target carrying the pod label Kubernetes discovery would give it, and the
    target comes out with ``ray_io_cluster``. (Debian's Prometheus has no Kubernetes discovery:
    a static target stands in, with the same meta label.)"""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: scripts/install_tools.sh installs it"
    [monitor] = [m for m in by_kind(render(), "PodMonitor")
                 if m["metadata"]["name"] == "t-deblur-workers"]
    rules = [{"action": r["action"], "source_labels": r["sourceLabels"],
              "target_label": r["targetLabel"]}
             for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]]
    cluster = monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [{
        "job_name": "ray-workers", "relabel_configs": rules,
        "static_configs": [{"targets": ["127.0.0.1:9"],
                            "labels": {"__meta_kubernetes_pod_label_ray_io_cluster": cluster}}],
    }]}))
    proc = subprocess.Popen([prometheus, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets",
                                            timeout=2) as response:
                    targets = json.loads(response.read())["data"]["activeTargets"]
                if targets:
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not list its target"
            time.sleep(0.2)
        assert [t["labels"].get("ray_io_cluster") for t in targets] == [cluster], targets
    finally:
        proc.terminate()
        proc.wait(20)
