"""Training-side compute time per RL step: an ESTIMATE from FLOP counts and an assumed MFU.

Per token of a sequence of length S (forward, bf16 matmuls only; the embedding lookup is free):
    F_fwd = 2 * (L * layer_matrices + Vp*h)  +  2 * L * h * S     (causal attention: QK^T and AV,
                                                                   each 2*h*S/2 per token on average)
One RL step on the trainer = old log-prob forward (1 x F_fwd) + update forward and backward
(3 x F_fwd) + the recomputed forward R per token:
    R = 0 (none);  2 * L * h * S (selective: the core attention, QK^T and AV);
        F_layers = 2 * L * layer_matrices + 2 * L * h * S (full, uniform: every layer once more);
        F_layers * N / (L/p) (full, block: N of the L/p layers of each stage)
    FLOPs/step = tokens_per_step * (4 * F_fwd + R),  tokens_per_step = prompts * n * (prompt + response)
    seconds    = FLOPs/step / (world_size * peak_flops * mfu)
Rollout (generation) time is NOT modelled: it is decode-bound and depends on the engine, its batch
size, the KV-cache capacity and the response-length distribution; measure it from the run's
``time/generate`` metric.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fipo_megatron.plan.layout import Layout, RunShape
from fipo_megatron.plan.memory import check_recompute, layer_matrix_params, padded_vocab
from fipo_megatron.plan.models import ModelShape


@dataclass
class TrainTimeEstimate:
    avg_prompt_tokens: int
    avg_response_tokens: int
    tokens_per_step: int
    tflop_per_step: float
    mfu: float
    peak_tflops_per_gpu: float
    train_seconds_per_step: float
    train_tokens_per_second_per_gpu: float

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def estimate_train_time(model: ModelShape, layout: Layout, run: RunShape, *,
                        avg_prompt_tokens: int, avg_response_tokens: int, mfu: float = 0.35,
                        peak_tflops_per_gpu: float = 989.0, recompute: str = "full",
                        recompute_method: str | None = "uniform", recompute_num_layers: int | None = 1
                        ) -> TrainTimeEstimate:
    seq = avg_prompt_tokens + avg_response_tokens
    h, L = model.hidden_size, model.num_layers
    vp = padded_vocab(model, layout.tp)
    f_fwd = 2 * (L * layer_matrix_params(model) + vp * h) + 2 * L * h * seq
    check_recompute(layout.layers_per_stage, recompute, recompute_method, recompute_num_layers)
    attn = 2 * L * h * seq
    f_layers = 2 * L * layer_matrix_params(model) + attn
    if recompute == "none":
        extra = 0.0
    elif recompute == "selective":
        extra = float(attn)
    elif recompute_method == "uniform":
        extra = float(f_layers)
    else:
        extra = f_layers * recompute_num_layers / layout.layers_per_stage
    tokens = run.global_batch_size * run.n_samples_per_prompt * seq
    flops = tokens * (4 * f_fwd + extra)
    seconds = flops / (layout.world_size * peak_tflops_per_gpu * 1e12 * mfu)
    return TrainTimeEstimate(
        avg_prompt_tokens=avg_prompt_tokens, avg_response_tokens=avg_response_tokens,
        tokens_per_step=tokens, tflop_per_step=flops / 1e12, mfu=mfu,
        peak_tflops_per_gpu=peak_tflops_per_gpu, train_seconds_per_step=seconds,
        train_tokens_per_second_per_gpu=tokens / seconds / layout.world_size)
