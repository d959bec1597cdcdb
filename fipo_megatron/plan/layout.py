"""Validate a TP/PP/CP/DP layout against the model shape, the world size and the run's batch shape.

Rules (each violation is reported with the values that break it and the values that would work):

- world size = nodes * gpus_per_node = TP * PP * CP * DP (DP is derived and must be an integer).
- the model-shape rules of ``fipo_megatron.models.rules.layout_problems`` (shared with the
  trainer and the converters): TP divides the attention heads AND the KV groups (megatron-core
  0.16 requires ``num_query_groups % tensor_model_parallel_size == 0``) and the MLP intermediate
  size; PP divides the number of layers (uniform stages); heads divisible by KV groups.
- Every sequence is padded to a multiple of 2 * CP * TP (zigzag CP split into 2*CP chunks, each a
  multiple of TP for sequence parallelism); the micro-batch token budget must be a multiple of that
  and must hold one padded full-length sample (max prompt + max response).
- max prompt + max response <= max_position_embeddings of the model config.
- global batch (prompts) divisible by the mini-batch (prompts per optimizer step), and the sequences
  of one mini-batch (mini * n_samples) divisible by DP so every DP rank gets the same count.

Warnings (legal but slow): TP crossing a node boundary; fewer sequences per DP rank per mini-batch
than pipeline stages (pipeline bubble dominates). Notes: CP > 1 needs Transformer Engine (THD + CP).

``max_tokens_per_micro_batch`` counts the tokens of one micro-batch of one model replica (DP rank)
BEFORE the CP split: each GPU holds max_tokens_per_micro_batch / CP of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fipo_megatron.models.rules import layout_problems, round_up, sequence_pad_multiple
from fipo_megatron.plan.models import ModelShape


class LayoutError(ValueError):
    """An invalid parallel layout; ``problems`` lists every broken rule."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid parallel layout:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class RunShape:
    """The run's batch and length settings (prompts count as in the trainer CLI)."""

    max_prompt_length: int = 2048
    max_response_length: int = 20480
    global_batch_size: int = 512          # prompts per train batch
    mini_batch_size: int = 64             # prompts per optimizer step
    n_samples_per_prompt: int = 16
    max_tokens_per_micro_batch: int = 24576

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    nodes: int
    gpus_per_node: int
    world_size: int
    sequence_parallel: bool
    layers_per_stage: int
    seq_pad_multiple: int
    padded_max_seq_len: int
    tokens_per_gpu_per_micro_batch: int
    sequences_per_step: int
    sequences_per_mini_batch_per_dp_rank: int
    optimizer_steps_per_train_batch: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def validate_layout(model: ModelShape, *, nodes: int, gpus_per_node: int, tp: int, pp: int,
                    cp: int, run: RunShape) -> Layout:
    """Return the derived :class:`Layout` or raise :class:`LayoutError` listing every problem."""
    problems: list[str] = []
    ints = {"nodes": nodes, "gpus_per_node": gpus_per_node, "tp": tp, "pp": pp, "cp": cp,
            "max_prompt_length": run.max_prompt_length,
            "max_response_length": run.max_response_length,
            "global_batch_size": run.global_batch_size, "mini_batch_size": run.mini_batch_size,
            "n_samples_per_prompt": run.n_samples_per_prompt,
            "max_tokens_per_micro_batch": run.max_tokens_per_micro_batch}
    bad = [f"{k}={v!r} must be a positive integer" for k, v in ints.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise LayoutError(bad)

    problems += layout_problems(
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_kv_heads,
        intermediate_size=model.intermediate_size, num_hidden_layers=model.num_layers, tp=tp, pp=pp,
        model=model.name)

    world = nodes * gpus_per_node
    model_parallel = tp * pp * cp
    if world % model_parallel:
        problems.append(
            f"world size {world} (= {nodes} nodes x {gpus_per_node} GPUs) is not a multiple of "
            f"TP*PP*CP = {tp}*{pp}*{cp} = {model_parallel}; world size must equal TP*PP*CP*DP")
    dp = max(world // model_parallel, 1) if world % model_parallel == 0 else 0

    max_seq = run.max_seq_len
    if max_seq > model.max_position_embeddings:
        problems.append(
            f"max prompt + max response = {max_seq} tokens exceeds max_position_embeddings="
            f"{model.max_position_embeddings} of {model.name}; raise max_position_embeddings in the "
            f"model's config.json (the paper extends Qwen2.5-Math-7B from 4096 to 32768, appendix C) "
            f"and pass --max-position-embeddings to the planner")
    pad = sequence_pad_multiple(max(cp, 1), max(tp, 1))
    padded_seq = round_up(max_seq, pad)
    budget = run.max_tokens_per_micro_batch
    if budget % pad:
        problems.append(
            f"max_tokens_per_micro_batch={budget} must be a multiple of the sequence padding {pad} "
            f"(2*CP*TP with CP > 1, else TP; each sequence is padded to it for the CP split); "
            f"nearest: {round_up(budget, pad)}")
    if budget < padded_seq:
        problems.append(
            f"max_tokens_per_micro_batch={budget} cannot hold one full-length sample: max prompt + "
            f"max response = {max_seq}, padded to a multiple of 2*CP*TP={pad} -> {padded_seq}")

    gb, mb, n = run.global_batch_size, run.mini_batch_size, run.n_samples_per_prompt
    if gb % mb:
        problems.append(f"global batch ({gb} prompts) must be divisible by the mini-batch "
                        f"({mb} prompts per optimizer step)")
    if dp and (mb * n) % dp:
        problems.append(
            f"sequences per mini-batch (mini-batch {mb} x n-samples {n} = {mb * n}) must be "
            f"divisible by DP={dp} so every data-parallel rank gets the same number of sequences")
    if problems:
        raise LayoutError(problems)

    warnings: list[str] = []
    if tp > gpus_per_node or gpus_per_node % tp:
        warnings.append(f"TP={tp} groups cross node boundaries ({gpus_per_node} GPUs per node): "
                        "tensor-parallel all-reduces then go over the inter-node network (slow)")
    seqs_per_rank = mb * n // dp
    if pp > 1 and seqs_per_rank < pp:
        warnings.append(f"only {seqs_per_rank} sequences per DP rank per mini-batch for PP={pp} "
                        "stages: the pipeline bubble dominates")
    if cp > 1:
        warnings.append("CP > 1 needs Transformer Engine attention (THD packed sequences); the "
                        "local (CPU) layer spec supports CP=1 only")
    return Layout(
        tp=tp, pp=pp, cp=cp, dp=dp, nodes=nodes, gpus_per_node=gpus_per_node, world_size=world,
        sequence_parallel=tp > 1, layers_per_stage=model.num_layers // pp, seq_pad_multiple=pad,
        padded_max_seq_len=padded_seq, tokens_per_gpu_per_micro_batch=budget // cp,
        sequences_per_step=gb * n, sequences_per_mini_batch_per_dp_rank=seqs_per_rank,
        optimizer_steps_per_train_batch=gb // mb, warnings=warnings)
