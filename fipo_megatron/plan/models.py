"""Qwen2.5 model shapes and their exact parameter count.

The presets are derived from the ONE table of published Hugging Face ``config.json`` numbers,
``fipo_megatron.models.qwen25.QWEN25_PRESETS`` (Megatron-free), under their recipe names
(``PRESET_ALIASES``: "qwen2.5-32b", "qwen2.5-math-7b" = "qwen2.5-7b-math", ...).

Parameter count of a Qwen2 decoder (RMSNorm, GQA attention with bias on q/k/v only, SwiGLU MLP
without bias), with h = hidden, d = h / heads, g = KV heads, I = intermediate, V = vocab, L = layers:

    attention per layer = h*h + h            (q weight + bias)
                        + 2 * (h*g*d + g*d)  (k and v weight + bias)
                        + h*h                (o_proj, no bias)
    mlp per layer       = 3 * h * I          (gate, up, down)
    norms per layer     = 2 * h              (input + post-attention RMSNorm)
    total = L * (attention + mlp + norms) + V*h (embedding) + h (final norm) + [V*h if untied]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from fipo_megatron.models import qwen25


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen2 ``config.json`` that layout and memory depend on."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def with_max_positions(self, n: int) -> "ModelShape":
        return replace(self, max_position_embeddings=int(n))


def shape_from_hf(cfg: Mapping[str, Any], name: str) -> ModelShape:
    """The `ModelShape` of a normalised config.json dict (see `fipo_megatron.models.load_hf_config`)."""
    return ModelShape(
        name=name,
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg["num_key_value_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        rope_theta=float(cfg["rope_theta"]),
    )


def _recipe_presets() -> dict[str, ModelShape]:
    """Recipe name -> shape; aliases share the object named by the first (canonical) recipe name."""
    by_key: dict[str, ModelShape] = {}
    out: dict[str, ModelShape] = {}
    for alias, key in qwen25.PRESET_ALIASES.items():
        if key not in by_key:
            by_key[key] = shape_from_hf(qwen25.load_hf_config(key), alias)
        out[alias] = by_key[key]
    return out


PRESETS: dict[str, ModelShape] = _recipe_presets()


def get_preset(name: str) -> ModelShape:
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))} "
                       "(or pass --hf-config path/to/config.json)")
    return PRESETS[key]


def load_hf_config(path: str | Path, name: str | None = None) -> ModelShape:
    """Read a Qwen2 ``config.json`` (a file or a directory holding one) without transformers.

    Parsing and defaults are `fipo_megatron.models.load_hf_config`'s (ValueError on missing fields).
    The shape is named `name`, else the config's ``_name_or_path``, else the directory's name.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    cfg = qwen25.load_hf_config(str(p) if p.is_file() else str(path))
    return shape_from_hf(cfg, name or cfg.get("_name_or_path") or p.parent.name)


def layer_param_count(m: ModelShape) -> int:
    """Parameters of one decoder layer (see the module docstring)."""
    h, kv = m.hidden_size, m.num_kv_heads * m.head_dim
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    mlp = 3 * h * m.intermediate_size
    return attention + mlp + 2 * h


def param_count(m: ModelShape, padded_vocab: int | None = None) -> int:
    """Total parameters; ``padded_vocab`` counts Megatron's padded embedding/output rows."""
    v = m.vocab_size if padded_vocab is None else padded_vocab
    embed = v * m.hidden_size
    output = 0 if m.tie_word_embeddings else v * m.hidden_size
    return m.num_layers * layer_param_count(m) + embed + output + m.hidden_size
