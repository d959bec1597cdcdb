"""Command line + YAML -> :class:`TrainConfig`.

Contract:
- Flags are Megatron-LM style names taken from the config dataclasses' field metadata
  (:mod:`fipo_megatron.trainer.config`); every flag has a help line (``--help`` groups them by section).
- ``--config FILE.yaml`` supplies the same keys, either flat (``lr: 1e-6``, ``tensor-model-parallel-size: 2``;
  dashes or underscores) or nested by section (``optim: {lr: 1e-6}``). Precedence: command line >
  YAML > dataclass defaults. An unknown YAML key or a badly typed value is a ``ValueError`` naming it.
- Booleans take ``--flag`` / ``--no-flag``. List flags (``--train-data``, ``--eval-data``,
  ``--rollout-urls``) are repeatable and accept comma lists. Optional ints accept ``none``.
- :func:`parse_args` validates the result (:meth:`TrainConfig.validate`) unless ``validate=False``;
  nothing here touches torch.distributed.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Optional, Sequence

from .config import SECTIONS, TrainConfig


def _field_kind(cls: type, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls)[f.name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = [t for t in typing.get_args(hint) if t is not type(None)][0]
    base = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}[hint]
    return ("opt_" if optional else "") + base


def _convert(kind: str, value: Any, flag: str) -> Any:
    """Convert a CLI string or a YAML value to the field's type (ValueError naming the flag)."""
    base = kind.removeprefix("opt_")
    is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
    if kind.startswith("opt_") and is_none:
        return None
    try:
        if base == "list":
            items = value if isinstance(value, (list, tuple)) else [value]
            out: list[str] = []
            for it in items:
                out.extend(s.strip() for s in str(it).split(",") if s.strip())
            return out
        if base == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: expected {kind.replace('opt_', 'optional ')}, got {value!r}") from None


def _fields():
    """(section, cls, field, kind, flag) for every config field."""
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield sec, cls, f, _field_kind(cls, f), f.metadata["flag"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (all defaults suppressed, so only given flags appear in the namespace)."""
    parser = argparse.ArgumentParser(
        prog="fipo-train", argument_default=argparse.SUPPRESS,
        description="FIPO / DAPO / GRPO RL training of Qwen2.5 models on Megatron-Core. "
                    "Launch with torchrun; defaults follow the paper's appendix B (Qwen2.5-32B FIPO).")
    parser.add_argument("--config", help="YAML file with the same keys as the flags (command line wins).")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for sec, cls, f, kind, flag in _fields():
        g = groups.setdefault(sec, parser.add_argument_group(sec, (cls.__doc__ or "").strip()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata['help']} (default: {default!r})"
        dest = f.name
        if kind == "bool":
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_)
        elif kind in ("list", "opt_list"):
            g.add_argument(flag, dest=dest, action="append", metavar="VALUE", help=help_)
        else:
            choices = f.metadata.get("choices")
            g.add_argument(flag, dest=dest, metavar=kind.replace("opt_", "").upper() if not choices else None,
                           choices=choices, help=help_, type=str)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config into ``{field_name: raw_value}`` (flat or nested-by-section keys)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the YAML config must be a mapping, got {type(doc).__name__}")
    # a key is a field name or its flag (``algorithm`` / ``--algorithm`` -> loss.kind), dashes or underscores
    known = {f.name: f.name for _, _, f, _, _ in _fields()}
    known.update({flag.lstrip("-").replace("-", "_"): f.name for _, _, f, _, flag in _fields()})
    out: dict[str, Any] = {}

    def put(key: str, value: Any, where: str) -> None:
        name = key.strip().lstrip("-").replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown config key {where}{key!r}")
        out[known[name]] = value

    for key, value in doc.items():
        if key in SECTIONS and isinstance(value, dict):
            for k2, v2 in value.items():
                put(str(k2), v2, f"{key}.")
        else:
            put(str(key), value, "")
    return out


def parse_args(argv: Optional[Sequence[str]] = None, *, validate: bool = True,
               world_size: Optional[int] = None) -> TrainConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) and an optional ``--config`` YAML into a TrainConfig."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    raw: dict[str, Any] = {}
    if ns.get("config"):
        raw.update(load_yaml(ns.pop("config")))
    ns.pop("config", None)
    raw.update(ns)  # command line wins
    cfg = TrainConfig()
    for sec, _cls, f, kind, flag in _fields():
        if f.name in raw:
            value = _convert(kind, raw[f.name], flag)
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:  # None: an optional flag given 'none'
                raise ValueError(f"{flag}: {value!r} is not one of {', '.join(choices)}")
            setattr(getattr(cfg, sec), f.name, value)
    if validate:
        cfg.validate(world_size)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The config as nested YAML (what the run directory records as config.yaml)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
