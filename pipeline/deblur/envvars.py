"""Settings from the environment: ``DEBLUR_<SECTION>__<FIELD>`` (e.g.
``DEBLUR_SCHEDULER__MAX_WORKERS=4``) and ``DEBLUR_<FIELD>`` for top-level fields (e.g.
``DEBLUR_SHARD_SIZE=500``), the double underscore separating section and field as in
pydantic-settings and Helm-style tooling. Values are YAML scalars (``4``, ``true``, ``fp16``).

Precedence: defaults < ``--config`` file < environment < command-line flags. A name with
``__`` that names no setting is an error (a typo must not be silently ignored); other
``DEBLUR_*`` names (tools' own variables, e.g. ``DEBLUR_TORCH_CPU_INDEX``) are left alone.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

PREFIX = "DEBLUR_"
# Given as arguments on every command that takes a config; an environment value would only
# ever be overridden, so accepting one would just mislead.
NOT_FROM_ENV = frozenset({"source", "destination"})


def env_name(dotted: str) -> str:
    """``scheduler.max_workers`` -> ``DEBLUR_SCHEDULER__MAX_WORKERS``."""
    return PREFIX + dotted.replace(".", "__").upper()


def settings() -> dict[str, Any]:
    """Every setting an environment variable can give: dotted name -> field annotation."""
    from deblur.config import JobConfig

    hints = typing.get_type_hints(JobConfig)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(JobConfig):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            sub = typing.get_type_hints(hint)
            for inner in dataclasses.fields(hint):
                out[f"{field.name}.{inner.name}"] = sub[inner.name]
        elif field.name not in NOT_FROM_ENV:
            out[field.name] = hint
    return out


def overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The dotted overrides the environment gives, each checked against its field's type.

    Raises ConfigError naming the variable (one line, exit 2 in the CLI)."""
    import yaml

    from deblur.config import _coerce
    from deblur.errors import ConfigError

    known = settings()
    by_name = {env_name(dotted): dotted for dotted in known}
    out: dict[str, Any] = {}
    for name in sorted(environ):
        if not name.startswith(PREFIX):
            continue
        dotted = by_name.get(name)
        if dotted is None:
            if "__" in name:
                raise ConfigError(f"{name}: no such setting; the form is "
                                  f"DEBLUR_<SECTION>__<FIELD>, e.g. "
                                  f"DEBLUR_SCHEDULER__MAX_WORKERS (README.md, Configuration)")
            continue
        text = environ[name]
        if _accepts_str(known[dotted]):  # a name, a URI, a region: the text as given
            out[dotted] = text
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if isinstance(value, (dict, list)) and typing.get_origin(known[dotted]) is not tuple:
            value = text
        if value is None:
            continue
        if typing.get_origin(known[dotted]) is tuple and isinstance(value, str):
            value = [part for part in value.split(",") if part]
        try:
            out[dotted] = _coerce(value, known[dotted], name)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from the environment)") from None
    return out


def _accepts_str(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return False
    return annotation is str or str in typing.get_args(annotation)


def merged(environ: Mapping[str, str], flags: dict[str, Any]) -> dict[str, Any]:
    """Environment overrides, then the flags given (None: not given) over them."""
    return {**overrides(environ), **{k: v for k, v in flags.items() if v is not None}}
