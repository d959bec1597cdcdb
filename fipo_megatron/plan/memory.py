"""Per-GPU memory estimate of one training step (the worst pipeline stage is reported).

Notation: h hidden, d head dim, a heads, g KV groups, I intermediate, L layers, t = TP, p = PP,
c = CP, DP = data-parallel size, Vp = vocab padded to a multiple of 128*t (Megatron's
``make_vocab_size_divisible_by`` * TP), T = tokens of one micro-batch before the CP split, so each
GPU holds T/c tokens.

Parameters on stage s (TP-sharded matrices, replicated RMSNorm weights):
    P_s = (L/p) * (layer_matrices/t + 2h) + [s == 0] * Vp*h/t + [s == p-1] * (Vp*h/t + h)
  (with p > 1 and tied embeddings the last stage keeps its own copy of the output weight, as
  Megatron does; with p == 1 and tied embeddings the output weight is not counted twice.)

Model and optimizer state (mixed precision, Megatron DDP + distributed optimizer):
    weights    = 2 * P_s                  bf16
    gradients  = grad_bytes * P_s         fp32 main-grad buffer by default (Megatron-LM's
                                          accumulate_allreduce_grads_in_fp32 for bf16); not sharded
    optimizer  = 12 * P_s / (DP*c)        fp32 main params + Adam exp_avg + exp_avg_sq, sharded over
                                          the data-parallel group, which includes CP ranks
                 (12 * P_s when the distributed optimizer is off)

Activations, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. for sequence + tensor parallelism, 34*h/t bytes per token per layer), re-derived for a
Qwen2 layer with flash attention (no s^2 score matrix), no dropout, GQA and SwiGLU, bf16:
    per token per layer  A = (12h + 4*g*d + 6I)/t + 4a/t   bytes
      attention: norm input 2h, norm output 2h, q 2h + k,v 4gd (after RoPE), attention output 2h,
                 softmax log-sum-exp 4a (fp32);  MLP: norm input 2h, norm output 2h,
                 fc1 output [gate; up] 4I, SwiGLU output 2I.  Sequence parallel divides all by t.
    with n = L/p layers per stage, m_s = p - s micro-batches in flight on stage s under the 1F1B
    schedule (Korthikanti: the first stage holds p micro-batches of L/p layers, i.e. L layers' worth):
    none:      act_s = m_s * n * (T/c) * A
    selective: act_s = m_s * n * (T/c) * A_sel  +  (T/c) * 4a/t,   A_sel = A - 4a/t
               (Megatron recompute_granularity=selective, recompute_modules=[core_attn], what
               --recompute-activations means. It drops what core attention stores beyond its inputs
               q, k, v and its output (both kept: checkpoint inputs / the output projection's input).
               Korthikanti's selective recompute drops the 5*a*s/t bytes per token of score, softmax
               and dropout-mask matrices; with flash attention those are never stored, so only the fp32
               softmax log-sum-exp (4a/t) goes, and one layer's worth comes back while it is recomputed.)
    full, uniform, N layers per chunk (N divides n):
               act_s = m_s * (n/N) * (T/c) * 2h/t  +  N * (T/c) * A
               (Korthikanti: only each recomputed chunk's input, the layer input 2h/t per token, is
               kept; the chunk being recomputed in the backward pass holds its N layers' activations.
               N = 1, every layer recomputed, is the smallest: that is what "full" means in the tables)
    full, block, N recomputed layers per stage (N <= n): the first N layers keep only their inputs,
               the other n - N keep everything:
               act_s = m_s * (T/c) * (N * 2h/t + (n - N) * A)  +  (T/c) * A

Attention: ``attention="flash"`` (Transformer Engine, or the torch SDPA flash / memory-efficient kernels:
no score matrix is stored; the formulas above). ``attention="local"`` (megatron-core's local
DotProductAttention, the only attention without TE before the SDPA module): it materialises the
[b, a/t, s, s] scores of every padded row of length s = min(prompt + response, T); the softmax output
is kept for the backward, the scores while the softmax runs, bf16: per token per layer
    S = 4 * (a/t) * s  bytes, counted like A: every stored layer under none, one layer (the one being
    recomputed) under selective, the N recomputed layers under full.

Logits (last stage): vocab-parallel logits are never gathered, but the WHOLE micro-batch's logits are:
    the model output, bf16, kept for the log-prob backward        (T/c) * Vp/t * 2
    its gradient, bf16 (backward)                                 (T/c) * Vp/t * 2
    the log-prob code's fp32 work buffers, one chunk of C tokens  C * Vp/t * 8  (two: log-probs + entropy)
    with ``fp32_logits`` (Megatron's Float16Module default fp32_output=True, before this project called
    the model with fp32_output=False) an fp32 copy of the output and its fp32 gradient: (T/c) * Vp/t * 8
    plus the final norm's input and output: (T/c) * 4h/t bytes.  C = min(T/c, chunk), chunk 4096 as the
    trainer's log-prob code uses (``models.rules.LOGPROB_CHUNK_TOKENS``).

Fixed overhead (CUDA context, NCCL buffers, TE workspaces, allocator fragmentation): a constant
(``overhead_gib``, default 4 GiB). No reference model is held (KL coefficient 0 in the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fipo_megatron.models.rules import LOGPROB_CHUNK_TOKENS, padded_vocab_size
from fipo_megatron.plan.layout import Layout, RunShape
from fipo_megatron.plan.models import ModelShape

GIB = 1024 ** 3


def padded_vocab(model: ModelShape, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary of `model` at TP=tp (`models.rules.padded_vocab_size`)."""
    return padded_vocab_size(model.vocab_size, divisible_by, tp)


def layer_matrix_params(model: ModelShape) -> int:
    """TP-sharded parameters of one layer (everything but the two RMSNorm weights)."""
    h, kv = model.hidden_size, model.num_kv_heads * model.head_dim
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * model.intermediate_size


def stage_params(model: ModelShape, layout: Layout, stage: int, divisible_by: int = 128) -> float:
    """Parameters held by one GPU of pipeline stage ``stage`` (see the module docstring)."""
    t, p, h = layout.tp, layout.pp, model.hidden_size
    vp = padded_vocab(model, t, divisible_by)
    n = layout.layers_per_stage * (layer_matrix_params(model) / t + 2 * h)
    if stage == 0:
        n += vp * h / t
    if stage == p - 1:
        n += h
        if not (model.tie_word_embeddings and p == 1):
            n += vp * h / t
    return n


def activation_bytes_per_token_layer(model: ModelShape, tp: int) -> float:
    """A = (12h + 4gd + 6I)/t + 4a/t bytes (see the module docstring)."""
    h, gd = model.hidden_size, model.num_kv_heads * model.head_dim
    return (12 * h + 4 * gd + 6 * model.intermediate_size + 4 * model.num_attention_heads) / tp


RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def check_recompute(layers_per_stage: int, recompute: str, method: str | None, num_layers: int | None) -> None:
    """Megatron's rules for the recompute settings (the trainer's --recompute-* validation); ValueError."""
    if recompute not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_GRANULARITIES)}, got {recompute!r}")
    if recompute != "full":
        return
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"full recompute needs recompute method uniform or block, got {method!r}")
    if num_layers is None or not 1 <= num_layers <= layers_per_stage:
        raise ValueError(f"recompute num layers must be between 1 and the layers per pipeline stage "
                         f"({layers_per_stage}), got {num_layers}")
    if method == "uniform" and layers_per_stage % num_layers:
        raise ValueError(f"recompute method uniform: recompute num layers {num_layers} must divide the layers "
                         f"per pipeline stage ({layers_per_stage})")


def activation_bytes(model: ModelShape, layout: Layout, tokens: float, in_flight: int, recompute: str,
                     method: str | None = "uniform", num_layers: int | None = 1) -> float:
    """Activation bytes of one GPU of a stage with ``in_flight`` micro-batches of ``tokens`` tokens each
    (the module docstring's formulas)."""
    t, n = layout.tp, layout.layers_per_stage
    a_layer = activation_bytes_per_token_layer(model, t)
    lse = 4 * model.num_attention_heads / t
    layer_input = 2 * model.hidden_size / t
    if recompute == "none":
        return in_flight * n * tokens * a_layer
    if recompute == "selective":
        return in_flight * n * tokens * (a_layer - lse) + tokens * lse
    check_recompute(n, recompute, method, num_layers)
    assert num_layers is not None
    if method == "uniform":
        return in_flight * (n // num_layers) * tokens * layer_input + num_layers * tokens * a_layer
    return in_flight * tokens * (num_layers * layer_input + (n - num_layers) * a_layer) + tokens * a_layer


def attention_score_bytes(model: ModelShape, layout: Layout, tokens: float, row_length: float, in_flight: int,
                          recompute: str, method: str | None = "uniform", num_layers: int | None = 1) -> float:
    """Stored [b, a/t, s, s] attention scores of the local (non-flash) attention (module docstring)."""
    t, n = layout.tp, layout.layers_per_stage
    per_layer = tokens * 4 * model.num_attention_heads / t * row_length
    if recompute == "none":
        return in_flight * n * per_layer
    if recompute == "selective":
        return per_layer
    assert num_layers is not None
    if method == "uniform":
        return num_layers * per_layer
    return (in_flight * (n - num_layers) + 1) * per_layer


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the worst stage; ``stage_totals`` has the total of every stage.
    ``activations_full_recompute`` uses ``recompute_method`` / ``recompute_num_layers`` when
    ``recompute`` is full, else uniform with 1 layer (every layer recomputed)."""

    stage: int
    recompute: str
    recompute_method: str | None
    recompute_num_layers: int | None
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_no_recompute: float
    activations_selective_recompute: float
    activations_full_recompute: float
    attention_scores: float
    logits: float
    overhead: float
    gpu_memory: float
    stage_totals: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.attention_scores
                + self.logits + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("stage_totals",)}
        plain = ("stage", "recompute", "recompute_method", "recompute_num_layers")
        out = {k: d[k] for k in plain}
        for k, v in d.items():
            if k not in plain:
                out[f"{k}_gib"] = round(v / GIB, 3)
        out["total_gib"] = round(self.total / GIB, 3)
        out["stage_totals_gib"] = [round(v / GIB, 3) for v in self.stage_totals]
        out["fits"] = self.fits
        return out


def estimate_memory(model: ModelShape, layout: Layout, run: RunShape, *, recompute: str = "full",
                    recompute_method: str | None = "uniform", recompute_num_layers: int | None = 1,
                    grad_bytes: int = 4, distributed_optimizer: bool = True,
                    logits_chunk_tokens: int | None = LOGPROB_CHUNK_TOKENS, overhead_gib: float = 4.0,
                    gpu_memory_gib: float = 80.0, vocab_divisible_by: int = 128, attention: str = "flash",
                    fp32_logits: bool = False) -> MemoryEstimate:
    """``recompute``: none | selective | full (Megatron's recompute_granularity); with full,
    ``recompute_method`` uniform | block and ``recompute_num_layers`` as Megatron's (ignored otherwise).
    ``attention``: flash | local; ``fp32_logits``: the model's output upcast to fp32 (module docstring)."""
    if attention not in ("flash", "local"):
        raise ValueError(f"attention must be 'flash' or 'local', got {attention!r}")
    check_recompute(layout.layers_per_stage, recompute, recompute_method, recompute_num_layers)
    if recompute != "full":
        recompute_method, recompute_num_layers = None, None
    full_method, full_n = (recompute_method, recompute_num_layers) if recompute == "full" else ("uniform", 1)
    t, p, c, h = layout.tp, layout.pp, layout.cp, model.hidden_size
    tokens = run.max_tokens_per_micro_batch / c
    vp = padded_vocab(model, t, vocab_divisible_by)
    chunk = tokens if not logits_chunk_tokens else min(tokens, logits_chunk_tokens)
    shard = layout.dp * c if distributed_optimizer else 1

    best: MemoryEstimate | None = None
    totals: list[float] = []
    for s in range(p):
        n = stage_params(model, layout, s, vocab_divisible_by)
        in_flight = p - s
        act_none = activation_bytes(model, layout, tokens, in_flight, "none")
        act_sel = activation_bytes(model, layout, tokens, in_flight, "selective")
        act_full = activation_bytes(model, layout, tokens, in_flight, "full", full_method, full_n)
        act = {"none": act_none, "selective": act_sel, "full": act_full}[recompute]
        scores = 0.0
        if attention == "local":
            row = min(run.max_seq_len, run.max_tokens_per_micro_batch)
            scores = attention_score_bytes(model, layout, tokens, row, in_flight, recompute, full_method, full_n)
        last = s == p - 1
        logits = 0.0
        if last:
            logits = tokens * vp / t * (4 + (8 if fp32_logits else 0)) + chunk * vp / t * 8 + tokens * 4 * h / t
        est = MemoryEstimate(
            stage=s, recompute=recompute, recompute_method=recompute_method,
            recompute_num_layers=recompute_num_layers, weights=2 * n, gradients=grad_bytes * n,
            optimizer=12 * n / shard, activations=act, activations_no_recompute=act_none,
            activations_selective_recompute=act_sel, activations_full_recompute=act_full,
            attention_scores=scores, logits=logits, overhead=overhead_gib * GIB, gpu_memory=gpu_memory_gib * GIB)
        totals.append(est.total)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    best.stage_totals = totals
    return best
