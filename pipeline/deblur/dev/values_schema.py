"""Generate the ``job.config`` part of the Helm chart's values schema from pipeline/deblur/config.py.

Helm validates values against ``helm/deblur/values.schema.json`` at ``helm install`` /
``helm template``, so a typo in ``job.config`` (``batch.max_bach``) or a wrong type fails there,
naming the key, instead of inside the driver after the cluster started. The schema is derived
from the same dataclasses deblur's own loader uses (pipeline/deblur/config.py ``from_dict``), so the two
cannot drift; tests/test_deploy.py checks the committed file is what this prints.

    python -m deblur.dev.values_schema          # rewrite helm/deblur/values.schema.json
    python -m deblur.dev.values_schema --check  # exit 1 when the committed file is stale
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from deblur.config import JobConfig

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "helm" / "deblur" / "values.schema.json"

# What the chart itself needs on top of deblur's types: the templates read these keys, and
# max_workers is derived from the worker group (the chart computes --max-workers).
_CHART_RULES: dict[str, Any] = {
    "required": ["worker", "metrics"],
    "properties": {
        "worker": {"properties": {"gpus_per_worker": {"exclusiveMinimum": 0}}},
        "metrics": {"properties": {"port": {"minimum": 1, "maximum": 65535}}},
        "scheduler": {"not": {"required": ["max_workers"]},
                      "description": "max_workers is derived from workers.maxReplicas"},
    },
}


def _type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of one field, accepting what deblur.config._coerce accepts."""
    if dataclasses.is_dataclass(annotation):
        return _object_schema(annotation)  # type: ignore[arg-type]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(annotation)[0])}
    kinds = (typing.get_args(annotation) if origin in (typing.Union, types.UnionType)
             else (annotation,))
    names = {str: "string", bool: "boolean", int: "integer", float: "number",
             type(None): "null"}
    out = [names[k] for k in kinds]
    return {"type": out[0] if len(out) == 1 else out}


def _object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {"type": "object",
            "properties": {f.name: _type_schema(hints[f.name]) for f in dataclasses.fields(cls)},
            "additionalProperties": False}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def job_config_schema() -> dict[str, Any]:
    """The schema of ``job.config``: every JobConfig key and type, unknown keys refused."""
    schema = _merge(_object_schema(JobConfig), _CHART_RULES)
    return {"description": "deblur job config (configs/*.yaml layout), generated from "
                           "pipeline/deblur/config.py by `python -m deblur.dev.values_schema`",
            **schema}


def values_schema(current: dict[str, Any]) -> dict[str, Any]:
    """``current`` (the chart's hand-written schema) with its job.config part regenerated."""
    schema = json.loads(json.dumps(current))
    schema["properties"]["job"]["properties"]["config"] = job_config_schema()
    return schema


def render(current: dict[str, Any]) -> str:
    return json.dumps(values_schema(current), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = SCHEMA_PATH.read_text()
    fresh = render(json.loads(text))
    if "--check" in argv:
        if fresh != text:
            print(f"{SCHEMA_PATH.name} is stale: run python -m deblur.dev.values_schema",
                  file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(fresh)
    print(f"wrote {SCHEMA_PATH.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
