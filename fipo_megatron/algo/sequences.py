"""Per-sequence reductions for the two token layouts: rows [B, L] and packed 1-D [T] + cu_seqlens."""

from __future__ import annotations

import torch

from fipo_megatron.algo.future_kl import _validate_cu_seqlens
from fipo_megatron.algo.tensor_utils import float_mask

__all__ = ["Sequences"]

_EXACT_FLOAT_COUNT = 2**24  # float32 represents every integer count below this


class Sequences:
    """Which sequence each token belongs to, and sums over / broadcasts from sequences.

    Rows layout: sequence i is row i. Packed layout: sequence i is tokens cu[i]:cu[i+1]; tokens after
    cu[-1] belong to no sequence (their per-sequence broadcast is ``fill``, their sums are dropped).
    ``cu`` is the validated offsets as a list (None for rows), for callers that need them on the host.
    """

    def __init__(self, shape: torch.Size, cu_seqlens: torch.Tensor | None, device: torch.device):
        self.packed = cu_seqlens is not None
        if not self.packed:
            self.num_seqs = shape[0]
            self.cu = None
            self._seg_ids = None
            self.num_outside = 0
            return
        self.cu = cu = _validate_cu_seqlens(cu_seqlens, shape[0])
        self.num_seqs = len(cu) - 1
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])] + [shape[0] - cu[-1]], device=device)
        # Token -> sequence id; the trailing tokens after cu[-1] get the extra id num_seqs.
        self._seg_ids = torch.repeat_interleave(torch.arange(self.num_seqs + 1, device=device), lengths,
                                                output_size=shape[0])  # known size: no device sync
        self.num_outside = shape[0] - cu[-1]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums [S] of a per-token tensor (differentiable)."""
        if not self.packed:
            return values.sum(dim=1)
        out = values.new_zeros(self.num_seqs + 1).index_add(0, self._seg_ids, values)
        return out[: self.num_seqs]

    def count(self, flags: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-sequence number [S] (of ``dtype``) of True tokens in a bool tensor."""
        if not self.packed and flags.shape[1] >= _EXACT_FLOAT_COUNT:
            return torch.count_nonzero(flags, dim=1).to(dtype)
        # A float 0/1 mask summed per sequence is exact below 2^24 tokens and several times faster on CPU
        # than count_nonzero(dim=1), which converts the whole bool tensor to int64 first.
        return self.sum(float_mask(flags, dtype))

    def broadcast(self, per_seq: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-token tensor holding each token's sequence value (``fill`` outside every sequence)."""
        if not self.packed:
            return per_seq.unsqueeze(1)
        padded = torch.cat([per_seq, per_seq.new_full((1,), fill)])
        return padded[self._seg_ids]

    def outside_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """The tokens after cu[-1] (empty for the rows layout)."""
        if not self.packed or self.num_outside == 0:
            return values.new_zeros(0)
        return values[values.shape[0] - self.num_outside:]
