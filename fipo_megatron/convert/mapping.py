"""The ONE Hugging Face Qwen2 <-> Megatron-Core GPTModel name and layout mapping.

Used by the checkpoint converters (hf_to_mcore, mcore_to_hf, reshard) and by the rollout weight
sync (`fipo_megatron.convert.live.iter_hf_tensors_from_model`).

Shapes (L layers, H hidden, n heads, g = num_key_value_heads groups, q = n // g query heads per
group, d = head_dim = H // n unless the config says otherwise, F = intermediate_size, V = HF vocab,
Vp = padded vocab):

HF name (layer i)                      Megatron checkpoint key (stacked, leading layer axis)
model.layers.i.self_attn.{q,k,v}_proj  decoder.layers.self_attention.linear_qkv.{weight,bias}
    q: [n*d, H], k/v: [g*d, H]          [L, g*(q+2)*d, H]: for group j in turn, rows
                                        [q_j heads of d rows; k_j (d rows); v_j (d rows)].
                                        Biases follow the same row order.
                                        TP=t splits the rows in t contiguous blocks = whole groups
                                        (needs t | g).
model.layers.i.self_attn.o_proj        decoder.layers.self_attention.linear_proj.weight [L, H, n*d]
                                        (row parallel: TP splits dim 1)
model.layers.i.input_layernorm         decoder.layers.self_attention.linear_qkv.layer_norm_weight
                                        (live module: `input_layernorm.weight` with the local spec,
                                        `self_attention.linear_qkv.layer_norm_weight` with TE)
model.layers.i.mlp.{gate,up}_proj      decoder.layers.mlp.linear_fc1.weight [L, 2F, H] = [gate; up]
                                        globally, whatever the TP. A TP rank r of t holds
                                        [gate[rF/t:(r+1)F/t]; up[rF/t:(r+1)F/t]] (Megatron's swiglu
                                        sharded factory splits/joins the two halves).
model.layers.i.post_attention_layernorm decoder.layers.mlp.linear_fc1.layer_norm_weight
                                        (live: `pre_mlp_layernorm.weight` with the local spec)
model.layers.i.mlp.down_proj           decoder.layers.mlp.linear_fc2.weight [L, H, F] (TP dim 1)
model.embed_tokens.weight [V, H]       embedding.word_embeddings.weight [Vp, H]: rows >= V are
                                        padding (zeros on import, dropped on export). TP dim 0.
model.norm.weight                      decoder.final_layernorm.weight
lm_head.weight [V, H] (untied only)    output_layer.weight [Vp, H]. Tied: absent in HF and in the
                                        checkpoint; with PP > 1 the last stage's copy is not
                                        exported (embed_tokens is exported once).

Vp = ceil(V / (make_vocab_size_divisible_by * TP)) * make_vocab_size_divisible_by * TP, as
Megatron-LM pads it. The checkpoint keys above are the same for the TE and local layer specs (the
local spec maps its norm names onto the TE keys in `sharded_state_dict`), verified against
megatron-core 0.16.1 `GPTModel.sharded_state_dict()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fipo_megatron.models.qwen25 import load_hf_config
from fipo_megatron.models.rules import padded_vocab_size as _padded_vocab_size

EMBED_KEY = "embedding.word_embeddings.weight"
FINAL_NORM_KEY = "decoder.final_layernorm.weight"
OUTPUT_KEY = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."

# Per-layer `_extra_state` ShardedObjects that GPTModel (local and TE spec) puts in its sharded
# state dict; a checkpoint must contain them for a strict model load.
EXTRA_STATE_SUFFIXES = (
    "self_attention.linear_proj._extra_state",
    "self_attention.linear_qkv._extra_state",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2._extra_state",
)
# Non-layer `_extra_state` ShardedObject (shape (1,), offset (0,)) of the TE spec only: Transformer Engine's
# RMSNorm (TENorm, the final norm) is a fusible op with a torch extra state; the local spec never asks for it.
FINAL_NORM_EXTRA_STATE_KEY = "decoder.final_layernorm._extra_state"

# Live-module parameter names (local spec) that are stored under a different checkpoint suffix.
LOCAL_SPEC_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class QwenDims:
    """The numbers of a Qwen2 config that decide tensor names and shapes."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg) -> "QwenDims":
        """Build from anything `fipo_megatron.models.load_hf_config` takes (a config.json dict, a
        `transformers` config, a preset name or a path); its defaults and checks apply."""
        c = load_hf_config(cfg)
        n = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return cls(
            num_layers=int(c["num_hidden_layers"]), hidden_size=hidden, num_heads=n,
            num_kv_heads=int(c["num_key_value_heads"] or n), head_dim=int(c.get("head_dim") or hidden // n),
            ffn_hidden_size=int(c["intermediate_size"]), vocab_size=int(c["vocab_size"]),
            tie_word_embeddings=bool(c["tie_word_embeddings"]), rope_theta=float(c["rope_theta"]),
            rms_norm_eps=float(c["rms_norm_eps"]),
        )


def padded_vocab(vocab_size: int, tp: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron-LM's padding (`fipo_megatron.models.rules.padded_vocab_size`; argument order kept
    for the convert API): round V up to a multiple of make_vocab_size_divisible_by * TP."""
    return _padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)


# ---- layout transforms (weights [rows, H] and biases [rows] alike: row axis 0) -------------------

def qkv_hf_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: QwenDims) -> torch.Tensor:
    """[q; k; v] (HF) -> per group [q_j; k_j; v_j] (Megatron linear_qkv)."""
    g, qpg, d = dims.num_kv_heads, dims.heads_per_group, dims.head_dim
    rest = q.shape[1:]
    qg = q.reshape(g, qpg * d, *rest)
    kg = k.reshape(g, d, *rest)
    vg = v.reshape(g, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(dims.qkv_rows, *rest)


def qkv_mcore_to_hf(qkv: torch.Tensor, dims: QwenDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_hf_to_mcore`: Megatron linear_qkv rows -> (q, k, v), contiguous."""
    g, qpg, d = dims.num_kv_heads, dims.heads_per_group, dims.head_dim
    rest = qkv.shape[1:]
    if qkv.shape[0] != dims.qkv_rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {dims.qkv_rows} "
                         f"= (heads {dims.num_heads} + 2 * groups {dims.num_kv_heads}) * head_dim {d}")
    grouped = qkv.reshape(g, (qpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [qpg * d, d, d], dim=1)
    return (q.reshape(g * qpg * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def fc1_hf_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Global linear_fc1 = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def fc1_mcore_to_hf(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global [gate; up] -> (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def fc1_tp_shards_to_global(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """TP rank r holds [gate_r; up_r]; the global tensor is [gate_0..gate_t-1; up_0..up_t-1]."""
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def pad_vocab_rows(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to `padded` rows (import)."""
    if t.shape[0] > padded:
        raise ValueError(f"vocabulary has {t.shape[0]} rows, more than the padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def unpad_vocab_rows(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop the padding rows (export)."""
    if t.shape[0] < vocab_size:
        raise ValueError(f"embedding has {t.shape[0]} rows, fewer than the HF vocab_size {vocab_size}")
    return t[:vocab_size].contiguous()


# ---- the rule table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <-> one or more HF tensors.

    `mcore_key`: checkpoint key (per-layer keys without the layer index; stacked along axis 0).
    `hf_names`: HF names; '{i}' is the layer index. `to_mcore(hf_tensors, dims)` and
    `to_hf(mcore_tensor, dims) -> tuple` convert one layer's (or the global) tensor.
    `tp_dim`: the dimension Megatron splits under TP (None = replicated); `kind` in
    {"plain", "qkv", "fc1", "vocab"} selects the TP-gather rule for live models.
    """

    mcore_key: str
    hf_names: tuple[str, ...]
    to_mcore: Callable
    to_hf: Callable
    tp_dim: int | None
    kind: str = "plain"
    per_layer: bool = True

    def hf(self, layer: int | None) -> list[str]:
        return [n.format(i=layer) for n in self.hf_names]


def _ident_in(ts, dims):
    return ts[0]


def _ident_out(t, dims):
    return (t,)


def _vocab_in(ts, dims, padded):
    return pad_vocab_rows(ts[0], padded)


def _vocab_out(t, dims):
    return (unpad_vocab_rows(t, dims.vocab_size),)


_L = "model.layers.{i}."
LAYER_RULES: tuple[Rule, ...] = (
    Rule("self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), _ident_in, _ident_out, None),
    Rule("self_attention.linear_qkv.weight", tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
         lambda ts, d: qkv_hf_to_mcore(*ts, d), qkv_mcore_to_hf, 0, "qkv"),
    Rule("self_attention.linear_qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
         lambda ts, d: qkv_hf_to_mcore(*ts, d), qkv_mcore_to_hf, 0, "qkv"),
    Rule("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), _ident_in, _ident_out, 1),
    Rule("mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), _ident_in, _ident_out, None),
    Rule("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         lambda ts, d: fc1_hf_to_mcore(*ts), lambda t, d: fc1_mcore_to_hf(t), 0, "fc1"),
    Rule("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), _ident_in, _ident_out, 1),
)


def global_rules(dims: QwenDims, padded_vocab_size: int) -> list[Rule]:
    """Embedding, final norm and (untied only) output layer rules."""
    vin = lambda ts, d: _vocab_in(ts, d, padded_vocab_size)  # noqa: E731
    rules = [Rule(EMBED_KEY, ("model.embed_tokens.weight",), vin, _vocab_out, 0, "vocab", False),
             Rule(FINAL_NORM_KEY, ("model.norm.weight",), _ident_in, _ident_out, None, "plain", False)]
    if not dims.tie_word_embeddings:
        rules.append(Rule(OUTPUT_KEY, ("lm_head.weight",), vin, _vocab_out, 0, "vocab", False))
    return rules


def mcore_layer_key(suffix: str) -> str:
    return LAYER_PREFIX + suffix


def expected_hf_shapes(dims: QwenDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2 HF checkpoint must hold, with its shape, in HF order."""
    H, d, F, V = dims.hidden_size, dims.head_dim, dims.ffn_hidden_size, dims.vocab_size
    qd, kd = dims.num_heads * d, dims.num_kv_heads * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (qd, H),
            p + "self_attn.k_proj.weight": (kd, H), p + "self_attn.v_proj.weight": (kd, H),
            p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kd,),
            p + "self_attn.v_proj.bias": (kd,), p + "self_attn.o_proj.weight": (H, qd),
            p + "post_attention_layernorm.weight": (H,), p + "mlp.gate_proj.weight": (F, H),
            p + "mlp.up_proj.weight": (F, H), p + "mlp.down_proj.weight": (H, F),
        })
    out["model.norm.weight"] = (H,)
    if not dims.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    return out


def expected_mcore_shapes(dims: QwenDims, padded_vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of every tensor in the Megatron checkpoint (per-layer keys stacked)."""
    L, H, F = dims.num_layers, dims.hidden_size, dims.ffn_hidden_size
    shapes = {
        EMBED_KEY: (padded_vocab_size, H), FINAL_NORM_KEY: (H,),
        mcore_layer_key("self_attention.linear_qkv.layer_norm_weight"): (L, H),
        mcore_layer_key("self_attention.linear_qkv.weight"): (L, dims.qkv_rows, H),
        mcore_layer_key("self_attention.linear_qkv.bias"): (L, dims.qkv_rows),
        mcore_layer_key("self_attention.linear_proj.weight"): (L, H, dims.num_heads * dims.head_dim),
        mcore_layer_key("mlp.linear_fc1.layer_norm_weight"): (L, H),
        mcore_layer_key("mlp.linear_fc1.weight"): (L, 2 * F, H),
        mcore_layer_key("mlp.linear_fc2.weight"): (L, H, F),
    }
    if not dims.tie_word_embeddings:
        shapes[OUTPUT_KEY] = (padded_vocab_size, H)
    return shapes


def live_param_suffix(local_name: str) -> str:
    """Checkpoint suffix of a live layer parameter name (after 'decoder.layers.<j>.')."""
    return LOCAL_SPEC_ALIASES.get(local_name, local_name)


def iter_hf_tensors(source, hf_config=None):
    """(hf_name, full tensor) stream, the contract the rollout weight sync buckets.

    `source` is either live model chunks (collective over the model's TP/PP ranks; see
    `live.iter_hf_tensors_from_model`) or a Megatron checkpoint directory (see
    `mcore_to_hf.iter_hf_tensors_from_checkpoint`)."""
    import os

    if isinstance(source, (str, os.PathLike)):
        from .mcore_to_hf import iter_hf_tensors_from_checkpoint

        return iter_hf_tensors_from_checkpoint(os.fspath(source), hf_config)
    from .live import iter_hf_tensors_from_model

    return iter_hf_tensors_from_model(source, hf_config)
