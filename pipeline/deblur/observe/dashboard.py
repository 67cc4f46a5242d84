"""The Grafana dashboard, as code: ``python -m deblur.observe.dashboard`` writes
helm/deblur/files/deblur-dashboard.json (the only copy; the chart and the compose stack ship it).

No Grafana server runs in the tests, so the dashboard is valid by construction: it is built
with Grafana's own foundation SDK (``grafana-foundation-sdk``, the ``test`` extra), whose typed
builders only produce panel types, options and queries Grafana's schema has. The committed
file must equal this module's output (tests/test_dashboard.py), so a hand edit that the SDK
could not have produced fails there.

Conventions (docs/monitoring.md):
- the job picker is ``$job_id``, after its label (``job`` is Prometheus' scrape job);
- counters are plotted through ``rate()``/``increase()``, which see through a driver restart
  (a counter that starts again at 0), never as raw values;
- firing deblur alerts (Prometheus' ``ALERTS`` series) are annotations on every panel;
- progress counts the whole job across resumes (``deblur_job_images_*``, from the ledger).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[3] / "helm" / "deblur" / "files" / \
    "deblur-dashboard.json"
JOB = 'job_id=~"$job_id"'
# Long enough to see a job's whole history between resumes; DeblurDriverLost looks as far back.
LOOK_BACK = "3d"


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    # Imported here: only generating the file needs the SDK, not the pipeline.
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import gauge, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models.dashboard import (DataSourceRef, VariableOption,
                                                         VariableRefresh, VariableSort)

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")

    def query(expr: str, legend: str, ref: str = "A", instant: bool = False) -> Any:
        q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
        q = q.datasource(source)
        return q.instant() if instant else q.range()

    def panel(kind: Any, title: str, unit: str, *targets: Any, description: str = "") -> Any:
        p = kind().title(title).datasource(source).unit(unit).height(8).span(8)
        if description:
            p = p.description(description)
        for target in targets:
            p = p.with_target(target)
        # Options spelled out: a panel without them renders with whatever its plugin defaults
        # to in the reader's Grafana version.
        if kind is timeseries.Panel:
            return p.legend(cb.VizLegendOptions().show_legend(True)
                            .display_mode(common.LegendDisplayMode.LIST)
                            .placement(common.LegendPlacement.BOTTOM)) \
                .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                         .sort(common.SortOrder.NONE))
        return p.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))

    ts, st, ga = timeseries.Panel, stat.Panel, gauge.Panel
    panels = [
        panel(ts, "Images/s (all workers)", "ops",
              query(f"sum(rate(deblur_images_total{{{JOB}}}[$__rate_interval]))", "images/s")),
        panel(ts, "Images/s per worker", "ops",
              query(f"sum by (worker) (rate(deblur_images_total{{{JOB}}}[$__rate_interval]))",
                    "{{worker}}")),
        panel(ga, "Progress (whole job, across resumes)", "percentunit",
              query(f"sum(max by (job_id) (max_over_time(deblur_job_images_finished{{{JOB}}}"
                    f"[{LOOK_BACK}]))) / sum(max by (job_id) (max_over_time("
                    f"deblur_job_images_planned{{{JOB}}}[{LOOK_BACK}])))", "done",
                    instant=True),
              description="Images with a final result over images in the job, earlier runs "
                          "included (the ledger's count when a run started, plus that run's)."),
        panel(st, "ETA (this run)", "s",
              query(f"sum(deblur_images_pending{{{JOB}}}) / clamp_min(sum(rate("
                    f"deblur_images_total{{{JOB}}}[5m])), 0.001)", "eta", instant=True)),
        panel(ts, "Failed images/s by reason", "ops",
              query(f"sum by (reason) (rate(deblur_failures_total{{{JOB}}}"
                    "[$__rate_interval]))", "{{reason}}")),
        panel(st, "Failure ratio (time range)", "percentunit",
              query(f'sum(increase(deblur_images_total{{{JOB}, status="failed"}}[$__range])) '
                    f"/ clamp_min(sum(increase(deblur_images_total{{{JOB}}}[$__range])), 1)",
                    "failed share", instant=True)),
        *(panel(ts, f"Stage latency p{q}", "s",
                query(f"histogram_quantile(0.{q}, sum by (le, stage) (rate("
                      f"deblur_stage_seconds_bucket{{{JOB}}}[$__rate_interval])))",
                      "{{stage}}"))
          for q in ("50", "95", "99")),
        panel(ts, "Batch size (mean)", "short",
              query(f"sum(rate(deblur_batch_size_sum{{{JOB}}}[$__rate_interval])) / "
                    f"sum(rate(deblur_batch_size_count{{{JOB}}}[$__rate_interval]))", "images")),
        panel(ts, "Batch fill (useful / padded pixels)", "percentunit",
              query(f"sum(rate(deblur_batch_fill_ratio_sum{{{JOB}}}[$__rate_interval])) / "
                    f"sum(rate(deblur_batch_fill_ratio_count{{{JOB}}}[$__rate_interval]))",
                    "fill")),
        panel(ts, "Busy: model (engine) and GPU (NVML)", "percentunit",
              query(f"max by (worker) (deblur_engine_busy_ratio{{{JOB}}})", "engine {{worker}}"),
              query(f"max by (worker) (deblur_gpu_utilization_ratio{{{JOB}}})",
                    "gpu {{worker}}", ref="B"),
              description="Engine: share of a shard's wall time the model ran. GPU: the "
                          "device's own utilisation from NVML (absent without it)."),
        panel(ts, "GPU memory (peak allocated)", "bytes",
              query(f"max by (worker) (deblur_gpu_memory_peak_bytes{{{JOB}}})", "{{worker}}")),
        panel(ts, "Workers active vs pending", "short",
              query(f"sum by (state) (deblur_workers{{{JOB}}})", "{{state}}")),
        panel(ts, "Shards by state (this run)", "short",
              query(f"sum by (state) (deblur_shards{{{JOB}}})", "{{state}}")),
        panel(ts, "Shards queued at the driver", "short",
              query(f"sum(deblur_shard_queue_depth{{{JOB}}})", "shards")),
        panel(ts, "Decoded images waiting for the model (peak per shard)", "short",
              query(f"max by (worker) (deblur_decode_queue_peak_images{{{JOB}}})",
                    "{{worker}}")),
        panel(ts, "Bytes/s in and out", "Bps",
              query(f"sum by (direction) (rate(deblur_bytes_total{{{JOB}}}[$__rate_interval]))",
                    "{{direction}}")),
        panel(ts, "Retries/s (storage requests, shards)", "ops",
              query(f"sum(rate(deblur_storage_retries_total{{{JOB}}}[$__rate_interval]))",
                    "storage"),
              query(f"sum(rate(deblur_shard_retries_total{{{JOB}}}[$__rate_interval]))",
                    "shards", ref="B")),
        panel(ts, "Against the references: PSNR input → output (evaluation jobs)", "dB",
              query(f"max by (job_id, image) (deblur_reference_psnr_db{{{JOB}}})",
                    "{{job_id}} {{image}}"),
              query(f"max by (job_id) (deblur_reference_psnr_gain_db{{{JOB}}})",
                    "{{job_id}} gain", ref="B"),
              description="Jobs whose manifest has a reference column: mean PSNR of the "
                          "inputs and of the outputs against the references, and the gain "
                          "(did deblurring help). Empty for other jobs."),
    ]

    datasource = (db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    job_id = (db.QueryVariable("job_id").label("Job id").datasource(source)
              .query("label_values(deblur_job_info, job_id)")
              .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_DESC)
              .include_all(True).multi(True).all_value(".*")
              .current(VariableOption(text="All", value="$__all")))
    alerts = (db.AnnotationQuery().name("Deblur alerts firing").datasource(source).enable(True)
              .icon_color("red")
              .expr(f'ALERTS{{alertstate="firing", alertname=~"Deblur.*", {JOB}}}'))

    dash = (db.Dashboard("deblur").uid("deblur-jobs").tags(["deblur", "ray"])
            .description("Throughput, failures, latency, batching, GPU use and the worker pool "
                         "of deblur jobs (metrics served by the driver on :9464).")
            .time("now-3h", "now").refresh("30s").timezone("utc").editable()
            .with_variable(datasource).with_variable(job_id).annotation(alerts))
    for number, p in enumerate(panels, start=1):
        dash = dash.with_panel(p.id(number))
    return json.loads(json.dumps(dash.build(), cls=JSONEncoder))


def problems(data: dict[str, Any]) -> list[str]:
    """What would make Grafana reject or mis-render ``data`` (empty when nothing): read back
    through the SDK's typed model of Grafana's dashboard schema, a key the schema does not
    have is lost, so a round trip that changes the JSON names it; panel and query types must
    be ones the schema knows; every panel needs its data source and queries; every
    ``$variable`` must be defined."""
    import re

    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.runtime import Runtime
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    runtime = Runtime()
    found: list[str] = []
    try:
        model = Dashboard.from_json(data)
        back = json.loads(json.dumps(model, cls=JSONEncoder))
    except Exception as exc:  # noqa: BLE001 - a malformed model is one problem among others
        return [f"not a Grafana dashboard model: {type(exc).__name__}: {exc}"]
    found += [f"not in Grafana's dashboard schema: {path}" for path in _differences(data, back)]
    found += [f"wrong type in Grafana's dashboard schema: {path}" for path in _type_errors(model)]
    variables = {v.get("name") for v in (data.get("templating") or {}).get("list", [])}
    for panel in data.get("panels") or []:
        name = f"panel {panel.get('id')} ({panel.get('title')!r})"
        if panel.get("type") not in runtime.panelcfg_variants:
            found.append(f"{name}: unknown panel type {panel.get('type')!r}")
        if not (panel.get("datasource") or {}).get("uid"):
            found.append(f"{name}: no data source")
        targets = panel.get("targets") or []
        if not targets:
            found.append(f"{name}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            found.append(f"{name}: queries need distinct refIds: {refs}")
        for target in targets:
            kind = (target.get("datasource") or panel.get("datasource") or {}).get("type")
            if kind not in runtime.dataquery_variants:
                found.append(f"{name}: unknown query type {kind!r}")
            if not str(target.get("expr") or "").strip():
                found.append(f"{name}: query {target.get('refId')} has no expression")
    text = json.dumps(data)
    for used in sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))):
        if not used.startswith("__") and used not in variables:
            found.append(f"${used} is used but no dashboard variable has that name")
    return found


def _type_errors(obj: Any, path: str = "") -> list[str]:
    """Values of the typed model whose type is not the one its field declares (``from_json``
    copies values as they come)."""
    import enum
    import typing

    if isinstance(obj, list):
        return [e for i, item in enumerate(obj) for e in _type_errors(item, f"{path}/{i}")]
    if isinstance(obj, dict):
        return [e for k, item in obj.items() for e in _type_errors(item, f"{path}/{k}")]
    if not type(obj).__module__.startswith("grafana_foundation_sdk.models"):
        return []
    if isinstance(obj, enum.Enum):
        return []
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # noqa: BLE001 - a model the SDK cannot describe is not checked
        return []

    def fits(value: Any, hint: Any) -> bool:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is Any or hint is object:
            return True
        if origin is typing.Union:
            return any(fits(value, h) for h in args)
        if origin is typing.Literal:
            return value in args
        if hint is type(None):
            return value is None
        if origin in (list, dict):
            return isinstance(value, origin)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return isinstance(value, hint) or value in {m.value for m in hint}
        return isinstance(value, hint) if isinstance(hint, type) else True

    out = []
    for field, hint in hints.items():
        value = getattr(obj, field, None)
        where = f"{path}/{field}"
        if not fits(value, hint):
            out.append(f"{where} ({value!r} is not {hint})")
        else:
            out += _type_errors(value, where)
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}" for k in a if k not in b]
        return out + [d for k in a if k in b for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path} ({a!r} read back as {b!r})"]


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT.name} is out of date: run python -m deblur.observe.dashboard",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
