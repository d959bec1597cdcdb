"""How RL samples become model inputs: micro-batching, THD packing, and the inverse.

A sample is one (prompt, response) pair plus per-response data:

    RLSample(prompt_ids, response_ids, advantage, old_log_prob=None, ref_log_prob=None,
             engine_log_prob=None)

`advantage` is a float (broadcast to every response token) or a per-response-token sequence;
the log-prob fields are per-response-token sequences (len == len(response_ids)).

Label alignment (the one rule every layout follows)
---------------------------------------------------
The model input of a sample is x = prompt_ids + response_ids (length n = P + R, P >= 1).
The logits at position t predict token x[t+1], so `labels[t] = x[t+1]` and the log-prob of
response token j (= x[P+j]) is produced at position t = P - 1 + j. Every per-response-token array
(response mask, advantages, old / ref / engine log-probs) is therefore written at the LABEL
positions P-1 .. P+R-2; the last input position (n-1) has no label (label = pad, mask 0).
`response_label_positions(P, R)` is the single implementation of this rule; `unpack_responses`
reads per-token model outputs back at the same positions.

Layout
------
THD (the only one: Transformer Engine's attention, or `megatron.attention.SDPAttention`): one token
  stream [T] with each sequence padded to a multiple of
  `pad_multiple` (= 2 * CP * TP when CP > 1, else TP), `cu_seqlens` (real lengths) and
  `cu_seqlens_padded` (padded lengths), position ids restarting at 0 per sequence. Labels are
  shifted here, before any CP split (`parallel.cp_shard`), so no label is lost at a chunk boundary.
  Per-token arrays are segmented by `cu_seqlens_padded` (padding has mask 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from fipo_megatron.models.rules import round_up, sequence_pad_multiple

TOKEN_FIELDS = ("advantages", "old_log_prob", "ref_log_prob", "engine_log_prob")


@dataclass
class RLSample:
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: Union[float, Sequence[float]] = 0.0
    old_log_prob: Optional[Sequence[float]] = None
    ref_log_prob: Optional[Sequence[float]] = None
    engine_log_prob: Optional[Sequence[float]] = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def response_label_positions(prompt_len: int, response_len: int) -> range:
    """Positions (within the sample's input) where response tokens' log-probs are produced."""
    if prompt_len < 1:
        raise ValueError("a sample needs at least one prompt token (e.g. BOS) to predict its first response token")
    return range(prompt_len - 1, prompt_len - 1 + response_len)


# ----------------------------------------------------------------------------- micro-batching
def split_into_micro_batches(samples: Sequence[Union[RLSample, int]], max_tokens_per_micro_batch: int, *,
                             pad_multiple: int = 1, min_num_micro_batches: int = 1,
                             allow_oversize: bool = False,
                             max_samples_per_micro_batch: Optional[int] = None) -> list[list[int]]:
    """Dynamic batch size: partition sample indices into micro-batches under a token budget.

    Cost of a micro-batch: the sum of its lengths rounded up to `pad_multiple`. The budget counts the packed
    stream BEFORE the CP split (each CP rank holds 1/CP of it). Algorithm (deterministic): longest-first (ties
    by index), each sample into the least-loaded micro-batch that can still take it (ties: lowest micro-batch);
    the number of micro-batches starts at max(min_num_micro_batches, ceil(total / budget)) and grows until
    everything fits. A sample longer than the budget raises ValueError unless `allow_oversize=True`, in which
    case it gets a micro-batch of its own. Micro-batches are returned with sorted indices, ordered by their
    first index. Pass the DP-wide maximum as `min_num_micro_batches` when every DP rank must run the same number
    of micro-batches. `max_samples_per_micro_batch=N` (Megatron's ``--micro-batch-size``) additionally caps
    every micro-batch at N samples (the number of micro-batches then starts at least at ceil(n / N)); None = no
    count limit (the token budget alone decides).
    """
    if max_tokens_per_micro_batch < 1:
        raise ValueError("max_tokens_per_micro_batch must be >= 1")
    if max_samples_per_micro_batch is not None and max_samples_per_micro_batch < 1:
        raise ValueError(f"max_samples_per_micro_batch must be >= 1 or None, got {max_samples_per_micro_batch}")
    cap = max_samples_per_micro_batch or max(1, len(samples))  # None: no count limit
    lens = [round_up(s if isinstance(s, int) else s.length, pad_multiple) for s in samples]
    n = len(lens)
    if n == 0:
        return []
    if min_num_micro_batches > n:
        raise ValueError(f"min_num_micro_batches={min_num_micro_batches} > number of samples {n}")
    alone = [i for i, ln in enumerate(lens) if ln > max_tokens_per_micro_batch]
    if alone and not allow_oversize:
        i = alone[0]
        raise ValueError(f"sample {i} has {lens[i]} tokens (padded to {pad_multiple}) > "
                         f"max_tokens_per_micro_batch={max_tokens_per_micro_batch}; raise the budget "
                         f"or pass allow_oversize=True")
    rest = [i for i in range(n) if lens[i] <= max_tokens_per_micro_batch]
    order = sorted(rest, key=lambda i: (-lens[i], i))
    k = max(min_num_micro_batches - len(alone), math.ceil(sum(lens[i] for i in rest) / max_tokens_per_micro_batch),
            math.ceil(len(rest) / cap), 1 if rest else 0)
    bins: list[list[int]] = []
    while rest:
        bins = [[] for _ in range(k)]
        load = [0] * k
        for i in order:  # longest first
            cand = [(load[b], b) for b in range(k)
                    if len(bins[b]) < cap and load[b] + lens[i] <= max_tokens_per_micro_batch]
            if not cand:
                break
            b = min(cand)[1]
            bins[b].append(i)
            load[b] = load[b] + lens[i]
        else:
            if not all(bins):
                raise ValueError(f"cannot fill {k} non-empty micro-batches from {len(rest)} samples")
            break
        k += 1
    out = [sorted(b) for b in bins] + [[i] for i in alone]
    return sorted(out, key=lambda b: b[0])


# ----------------------------------------------------------------------------- shared helpers
def _field_values(samples: Sequence[RLSample]) -> dict[str, Optional[list[torch.Tensor]]]:
    """Per-sample per-response-token float tensors for each field in TOKEN_FIELDS (None if absent).

    A field must be given for every sample or for none; an empty response may omit it.
    """
    out: dict[str, Optional[list[torch.Tensor]]] = {}
    for name in TOKEN_FIELDS:
        vals: list[Optional[torch.Tensor]] = []
        for i, s in enumerate(samples):
            R = len(s.response_ids)
            v = s.advantage if name == "advantages" else getattr(s, name)
            if v is None:
                vals.append(None)
                continue
            if name == "advantages" and isinstance(v, (int, float)):
                t = torch.full((R,), float(v), dtype=torch.float32)
            else:
                t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if t.numel() != R:
                raise ValueError(f"sample {i}: {name} has {t.numel()} values for {R} response tokens")
            vals.append(t)
        missing = [i for i, (v, s) in enumerate(zip(vals, samples)) if v is None and len(s.response_ids) > 0]
        if all(v is None for v in vals):
            out[name] = None
        elif missing:
            raise ValueError(f"{name} is given for some samples and not others (missing: sample {missing[0]})")
        else:
            out[name] = [torch.zeros(0) if v is None else v for v in vals]
    return out


def _check(samples: Sequence[RLSample]) -> None:
    if len(samples) == 0:
        raise ValueError("cannot pack an empty micro-batch")
    for i, s in enumerate(samples):
        if len(s.prompt_ids) < 1:
            raise ValueError(f"sample {i}: empty prompt (needs >= 1 token to predict the first response token)")


# ----------------------------------------------------------------------------- THD
@dataclass
class THDBatch:
    """Packed token stream (THD). All per-token tensors are 1-D [T] (T = cu_seqlens_padded[-1]).

    After `cp_shard.shard_packed_batch` the per-token tensors hold only this CP rank's tokens
    (zigzag order) and `cp` holds the layout; cu_seqlens* stay GLOBAL (what TE's CP attention
    expects: it derives the local split itself).
    """
    tokens: torch.Tensor            # [T] int64
    position_ids: torch.Tensor      # [T] int64, restarting at 0 for each sequence
    labels: torch.Tensor            # [T] int64, next token within the sequence; pad where none
    response_mask: torch.Tensor     # [T] float32
    cu_seqlens: torch.Tensor        # [S+1] int32, real lengths
    cu_seqlens_padded: torch.Tensor  # [S+1] int32, lengths padded to pad_multiple
    pad_multiple: int
    prompt_lens: list[int]
    response_lens: list[int]
    advantages: Optional[torch.Tensor] = None
    old_log_prob: Optional[torch.Tensor] = None
    ref_log_prob: Optional[torch.Tensor] = None
    engine_log_prob: Optional[torch.Tensor] = None
    cp: Optional[object] = field(default=None)  # cp_shard.CPLayout once sharded

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def max_seqlen(self) -> int:
        d = self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]
        return int(d.max()) if d.numel() else 0

    def token_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-token tensor (the ones a CP split must slice), by field name."""
        names = ("tokens", "position_ids", "labels", "response_mask") + TOKEN_FIELDS
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def packed_seq_params(self, cp_group=None):
        from megatron.core.packed_seq_params import PackedSeqParams

        m = self.max_seqlen
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=self.cu_seqlens_padded,
                               cu_seqlens_kv_padded=self.cu_seqlens_padded, max_seqlen_q=m, max_seqlen_kv=m,
                               cp_group=cp_group)

    def model_inputs(self, cp_group=None) -> dict:
        """GPTModel kwargs: THD uses a batch dimension of 1 and no attention mask."""
        return dict(input_ids=self.tokens.unsqueeze(0), position_ids=self.position_ids.unsqueeze(0),
                    attention_mask=None, packed_seq_params=self.packed_seq_params(cp_group))


def pack_thd(samples: Sequence[RLSample], *, cp_size: int = 1, tp_size: int = 1, pad_token_id: int = 0) -> THDBatch:
    """Pack samples into one THD stream, each sequence padded to 2*CP*TP (CP > 1) or TP (CP == 1)."""
    _check(samples)
    if cp_size < 1 or tp_size < 1:
        raise ValueError("cp_size and tp_size must be >= 1")
    mult = sequence_pad_multiple(cp_size, tp_size)
    lens = [x.length for x in samples]
    plens = [round_up(n, mult) for n in lens]
    T = sum(plens)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    cup = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cup[1:] = torch.cumsum(torch.tensor(plens), 0)
    tokens = torch.full((T,), pad_token_id, dtype=torch.long)
    labels = torch.full((T,), pad_token_id, dtype=torch.long)
    position_ids = torch.empty(T, dtype=torch.long)
    mask = torch.zeros(T)
    vals = _field_values(samples)
    arrays = {k: (torch.zeros(T) if v is not None else None) for k, v in vals.items()}
    for i, x in enumerate(samples):
        o = int(cup[i])
        P, R = len(x.prompt_ids), len(x.response_ids)
        ids = torch.as_tensor(list(x.prompt_ids) + list(x.response_ids), dtype=torch.long)
        tokens[o:o + P + R] = ids
        labels[o:o + P + R - 1] = ids[1:]
        position_ids[o:o + plens[i]] = torch.arange(plens[i])
        pos = response_label_positions(P, R)
        mask[o + pos.start:o + pos.stop] = 1.0
        for k, v in vals.items():
            if v is not None:
                arrays[k][o + pos.start:o + pos.stop] = v[i]
    return THDBatch(tokens=tokens, position_ids=position_ids, labels=labels, response_mask=mask, cu_seqlens=cu,
                    cu_seqlens_padded=cup, pad_multiple=mult, prompt_lens=[len(x.prompt_ids) for x in samples],
                    response_lens=[len(x.response_ids) for x in samples], **arrays)


# ----------------------------------------------------------------------------- the actor's unit
@dataclass
class MicroBatch:
    """One micro-batch as the trainer sees it: a packed THD stream (this CP rank's zigzag share when
    CP > 1) plus the indices of its samples in the caller's list. THD serves every path (TE on GPU,
    `megatron.attention.SDPAttention` elsewhere), so the actor needs no layout branches:

    - `model_inputs()`: GPTModel / `forward_logits` inputs, tokens and position ids [1, T_local],
      attention_mask None, `packed_seq_params` with the GLOBAL cu_seqlens (what both attentions want);
    - `loss_inputs()`: labels, response_mask and the per-token fields present ([1, T_local] each) and
      the CP layout ("cp_layout"; cp_size 1 when unsharded) for `cp_loss.cp_policy_loss`;
    - `.to(device)`: a copy with every tensor (layout included) on `device`, except the layout's
      `local_cu_seqlens`, the per-sequence offsets the loss reads on the host;
    - `responses(values)`: per-sample response values from this rank's per-token output (all-gathered
      over the CP group when sharded: collective, every CP rank must call it).
    """
    batch: THDBatch
    indices: list[int]
    cp_group: Optional[object] = None

    @classmethod
    def pack(cls, samples: Sequence[RLSample], indices: Sequence[int], *, cp_size: int = 1, cp_rank: int = 0,
             tp_size: int = 1, pad_token_id: int = 0, cp_group=None) -> "MicroBatch":
        """Pack `samples[i] for i in indices` (THD, padded for CP x TP) and keep rank `cp_rank`'s share
        (at CP = 1 the whole stream, with its one-rank layout, so the loss takes one path)."""
        from .cp_shard import shard_packed_batch

        b = pack_thd([samples[i] for i in indices], cp_size=cp_size, tp_size=tp_size, pad_token_id=pad_token_id)
        return cls(shard_packed_batch(b, cp_size, cp_rank), list(indices), cp_group)

    def model_inputs(self) -> dict:
        return dict(tokens=self.batch.tokens.unsqueeze(0), position_ids=self.batch.position_ids.unsqueeze(0),
                    attention_mask=None, packed_seq_params=self.batch.packed_seq_params(self.cp_group))

    def loss_inputs(self) -> dict:
        out = {n: t.unsqueeze(0) for n, t in self.batch.token_tensors().items() if n not in ("tokens", "position_ids")}
        out["cp_layout"] = self.batch.cp
        return out

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        import dataclasses

        def move(obj):
            return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device, non_blocking=non_blocking)
                                               for f in dataclasses.fields(obj)
                                               if isinstance(getattr(obj, f.name), torch.Tensor)})

        b = move(self.batch)
        if b.cp is not None:  # the loss reads its per-sequence offsets on the host: they stay there
            b = dataclasses.replace(b, cp=dataclasses.replace(move(b.cp), local_cu_seqlens=b.cp.local_cu_seqlens))
        return MicroBatch(b, list(self.indices), self.cp_group)

    def responses(self, values: torch.Tensor) -> list[torch.Tensor]:
        """values: [T_local] or [1, T_local] per-token output of this rank -> one [R_i] tensor per sample."""
        if self.batch.cp is None or self.batch.cp.cp_size == 1:
            return unpack_responses(values, self.batch)
        from .cp_shard import gather_responses

        return gather_responses(values, self.batch, self.cp_group)


# ----------------------------------------------------------------------------- inverse
def unpack_responses(values: torch.Tensor, batch: THDBatch) -> list[torch.Tensor]:
    """Per-sample response values (e.g. log-probs) from per-token model output.

    `values`: [T] / [1, T], the full stream (`batch` may be the full or a sharded batch, whose
    cu_seqlens are global; gather CP shards first, see `cp_shard.gather_responses`). Returns one 1-D
    tensor of length R_i per sample (graph kept).
    """
    out = []
    v = values.reshape(-1) if values.dim() == 2 and values.shape[0] == 1 else values
    T = int(batch.cu_seqlens_padded[-1])
    if v.dim() != 1 or v.shape[0] != T:
        hint = " (a CP shard: gather it first with cp_shard.gather_responses / gather_from_cp)" if batch.cp else ""
        raise ValueError(f"THD values must be the full stream [T={T}], got {tuple(values.shape)}{hint}")
    for i, (P, R) in enumerate(zip(batch.prompt_lens, batch.response_lens)):
        o = int(batch.cu_seqlens_padded[i])
        pos = response_label_positions(P, R)
        out.append(v[o + pos.start:o + pos.stop])
    return out


__all__ = ["RLSample", "THDBatch", "MicroBatch", "TOKEN_FIELDS", "response_label_positions",
           "split_into_micro_batches", "pack_thd", "unpack_responses"]
