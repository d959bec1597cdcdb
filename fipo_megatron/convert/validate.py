"""Validation run before any conversion: configs agree, layouts are legal, inputs are complete.

Every failure raises `ConversionError` with a message naming the offending field / file / tensor,
so a mismatch is never a silently wrong model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from fipo_megatron.models.rules import layout_problems

from .mapping import QwenDims

# Fields compared between an HF config and Megatron arguments / a checkpoint's recorded config.
COMPARED_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                   "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings")

# Megatron-LM argument name -> QwenDims field (for user-supplied Megatron arguments).
MEGATRON_ARG_FIELDS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
    "num_query_groups": "num_kv_heads", "kv_channels": "head_dim", "ffn_hidden_size": "ffn_hidden_size",
    "vocab_size": "vocab_size", "rotary_base": "rope_theta", "norm_epsilon": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}


class ConversionError(RuntimeError):
    """A conversion input is invalid; nothing was written (or the partial output was removed)."""


def load_hf_config(hf_dir: str) -> dict[str, Any]:
    """Read <hf_dir>/config.json and check it is a Qwen2 decoder config."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"missing {path}: --hf-dir must contain the Hugging Face config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    check_hf_config(cfg, path)
    return cfg


def check_hf_config(cfg: Mapping[str, Any], where: str = "config") -> QwenDims:
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps")
    for k in required:
        if cfg.get(k) is None:
            raise ConversionError(f"{where}: field '{k}' is missing")
    mt = cfg.get("model_type")
    if mt not in (None, "qwen2"):
        raise ConversionError(f"{where}: model_type '{mt}' is not supported (expected 'qwen2')")
    try:
        dims = QwenDims.from_hf_config(dict(cfg))
    except ValueError as e:  # e.g. hidden_act other than silu (models.load_hf_config)
        raise ConversionError(f"{where}: {e}") from e
    problems = _shape_problems(dims, 1, 1)  # TP = PP = 1: only the heads / KV groups rule can fail
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))
    return dims


def _shape_problems(dims: QwenDims, tp: int, pp: int) -> list[str]:
    return layout_problems(num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
                           intermediate_size=dims.ffn_hidden_size, num_hidden_layers=dims.num_layers,
                           tp=tp, pp=pp)


def check_layout(dims: QwenDims, tp: int, pp: int) -> None:
    """Raise ConversionError unless tp/pp fit the model (`fipo_megatron.models.rules.layout_problems`:
    TP must divide the KV groups and the heads, since megatron-core 0.16 splits linear_qkv by whole
    groups, and intermediate_size; PP must divide the number of layers)."""
    problems = _shape_problems(dims, tp, pp)
    if problems:
        raise ConversionError("; ".join(problems))


def compare_dims(expected: QwenDims, actual: QwenDims, expected_name: str, actual_name: str) -> None:
    """Raise naming the first differing field."""
    for f in COMPARED_FIELDS:
        a, b = getattr(expected, f), getattr(actual, f)
        same = abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0) if isinstance(a, float) else a == b
        if not same:
            raise ConversionError(f"config mismatch in '{f}': {expected_name} has {a!r}, {actual_name} has {b!r}")


def check_megatron_args(dims: QwenDims, megatron_args: Mapping[str, Any] | None) -> None:
    """Megatron arguments given by the user (Megatron-LM names; None = not given) must agree
    with the HF config."""
    for arg, value in (megatron_args or {}).items():
        if value is None:
            continue
        if arg not in MEGATRON_ARG_FIELDS:
            raise ConversionError(f"unknown Megatron argument '{arg}'")
        field = MEGATRON_ARG_FIELDS[arg]
        ref = getattr(dims, field)
        if isinstance(ref, float):
            ok = abs(float(value) - ref) <= 1e-12 * max(abs(ref), 1.0)
        else:
            ok = type(ref)(value) == ref
        if not ok:
            raise ConversionError(f"config mismatch in '{arg}': Megatron argument is {value!r}, "
                                  f"HF config.json has {field}={ref!r}")


def check_tensor_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                        where: str) -> None:
    """Every expected tensor present with its shape; nothing unexpected."""
    for name, shape in expected.items():
        if name not in found:
            raise ConversionError(f"{where}: tensor '{name}' is missing")
        if tuple(found[name]) != tuple(shape):
            raise ConversionError(f"{where}: tensor '{name}' has shape {tuple(found[name])}, expected {tuple(shape)} "
                                  "from the config")
    extra = sorted(set(found) - set(expected))
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ConversionError(f"{where}: unexpected tensors not covered by the Qwen2 mapping: {extra[:5]}")


def check_output_dir(out: str, force: bool = False) -> None:
    if os.path.exists(out) and not force:
        raise ConversionError(f"output directory {out} already exists (pass --force to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConversionError(f"parent directory of the output {parent} does not exist")
