"""Qwen2.5 model shapes and their exact parameter count.

The presets copy the published Hugging Face ``config.json`` numbers. They are a deliberate small
duplicate of ``fipo_megatron.megatron.qwen.QWEN25_PRESETS`` so that the planner never imports
Megatron (the lead merges the two tables later).

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

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


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


PRESETS: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True, 32768, 1e6),
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True, 131072, 1e6),
    "qwen2.5-3b": ModelShape("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, True, 32768, 1e6),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, 131072, 1e6),
    "qwen2.5-math-7b": ModelShape("qwen2.5-math-7b", 3584, 28, 28, 4, 18944, 152064, False, 4096, 1e4),
    "qwen2.5-14b": ModelShape("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False, 131072, 1e6),
    "qwen2.5-32b": ModelShape("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, False, 131072, 1e6),
}
# Aliases used by the recipes.
PRESETS["qwen2.5-7b-math"] = PRESETS["qwen2.5-math-7b"]


def get_preset(name: str) -> ModelShape:
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))} "
                       "(or pass --hf-config path/to/config.json)")
    return PRESETS[key]


def load_hf_config(path: str | Path, name: str | None = None) -> ModelShape:
    """Read a Qwen2 ``config.json`` (a file or a directory holding one) without transformers."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    cfg = json.loads(p.read_text())
    try:
        return ModelShape(
            name=name or cfg.get("_name_or_path") or p.parent.name,
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rope_theta=float(cfg.get("rope_theta", 1e6)),
        )
    except KeyError as e:
        raise ValueError(f"{p}: config.json lacks {e.args[0]!r}, not a Qwen2 config") from None


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
