"""Future-KL: the discounted sum of a response's future log-probability shifts (FIPO, eq. 6).

    FKL_t = sum_{k in R(t)} gamma^(k - t) * M_k * delta_k,      gamma = 2 ** (-1 / decay_rate)

where R(t) are the positions k of the same sequence with k >= t (start="current", the paper and the
official code) or k > t (start="next"), and, with ``window=W``, also k < t + W.

Algorithm (exact, O(B*L) memory, O(B*L*C) time for the block size C):

* Unwindowed suffix sums S(t) = sum_{k >= t} gamma^(k-t) x_k are computed blockwise: inside each block
  of C positions a C x C decay matmul gives the block-local suffix sums; the value at block n's start
  obeys S_n = head_n + gamma^C * S_{n+1}, which is the same problem on nb = L / C block heads with decay
  gamma^C, so it is solved by the same routine recursively (log_C(L) levels). Every factor used is a
  power gamma^d with d >= 0, so nothing overflows for any decay rate, and terms that underflow are
  smaller than the float32 resolution of the result.
* A hard window W is summed by binary decomposition of [t, t+W) into power-of-two pieces
  (F_{2m}(t) = F_m(t) + gamma^m F_m(t+m)); only additions of same-sign-weighted terms, no
  subtraction of large suffix sums, so no cancellation.
* start="next" is gamma * (current-start sum with window W-1) shifted by one position.
* Packed (THD) input is regrouped into padded rows per sequence, bucketed by length class
  (lengths in (2^(k-1), 2^k]) so padding at most doubles memory; nothing crosses a sequence end.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fipo_megatron.algo.tensor_utils import all_finite, float_mask

__all__ = ["future_kl", "future_kl_unchecked", "decay_gamma", "discounted_suffix_sum"]

_STARTS = ("current", "next")
DEFAULT_BLOCK = 64


def decay_gamma(decay_rate: float) -> float:
    """gamma = 2 ** (-1 / decay_rate): the weight of a token decay_rate positions ahead is 1/2."""
    if isinstance(decay_rate, bool) or not isinstance(decay_rate, (int, float)):
        raise ValueError(f"decay_rate must be a number, got {decay_rate!r}")
    if not math.isfinite(decay_rate) or decay_rate <= 0:
        raise ValueError(f"decay_rate must be finite and > 0, got {decay_rate}")
    return 2.0 ** (-1.0 / decay_rate)


@functools.lru_cache(maxsize=64)
def _block_constants(n: int, gamma: float, dtype: torch.dtype, device: torch.device):
    """Decay constants of one block of n positions (computed in float64, cached):

    wt[j, i] = gamma^(j-i) for j >= i else 0 (so (x @ wt)[i] is the block-local suffix sum),
    head[j] = gamma^j (the block-local sum at i = 0), tail[0, i] = gamma^(n-i) (the weight of the
    next block's start as seen from offset i). Built outside inference mode so that a later caller with
    autograd can use them.
    """
    with torch.inference_mode(False), torch.no_grad():
        idx = torch.arange(n, device=device, dtype=torch.float64)
        g = torch.tensor(gamma, dtype=torch.float64, device=device)
        dist = idx[:, None] - idx[None, :]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        wt = torch.where(dist >= 0, torch.pow(g, dist.clamp(min=0)), zero)
        return wt.to(dtype), torch.pow(g, idx).to(dtype), torch.pow(g, n - idx).to(dtype)[None, :]


def _shift_left(x: torch.Tensor, m: int) -> torch.Tensor:
    """y[:, t] = x[:, t + m], zero past the end."""
    if m == 0:
        return x
    if m >= x.shape[1]:
        return torch.zeros_like(x)
    return F.pad(x[:, m:], (0, m))


def discounted_suffix_sum(x: torch.Tensor, gamma: float, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """S[r, t] = sum_{k >= t} gamma^(k-t) x[r, k] for a 2-D tensor, blockwise (see the module docstring)."""
    rows, n = x.shape
    wt, head, tail = _block_constants(min(n, block), gamma, x.dtype, x.device)
    if n <= block:
        return x @ wt
    num_blocks = -(-n // block)
    if num_blocks * block != n:
        x = F.pad(x, (0, num_blocks * block - n))
    flat = x.reshape(rows * num_blocks, block)
    block_starts = discounted_suffix_sum((flat @ head).view(rows, num_blocks), gamma**block, block)
    carry_in = F.pad(block_starts[:, 1:], (0, 1)).reshape(rows * num_blocks, 1)  # S at the next block's start
    out = (flat @ wt).addmm_(carry_in, tail)  # local suffix sums + gamma^(block - i) * carry
    return out.view(rows, num_blocks * block)[:, :n]


def _discounted_window_sum(x: torch.Tensor, gamma: float, window: int) -> torch.Tensor:
    """sum_{k=t}^{t+window-1} gamma^(k-t) x[:, k] by binary decomposition of the window."""
    acc = torch.zeros_like(x)
    piece, size, offset, remaining = x, 1, 0, window
    while True:
        if remaining & 1:
            weight = gamma**offset
            if weight > 0.0:
                acc = acc + weight * _shift_left(piece, offset)
            offset += size
        remaining >>= 1
        if remaining == 0 or offset >= x.shape[1]:
            return acc
        piece = piece + (gamma**size) * _shift_left(piece, size)
        size *= 2


def _range_sum(x: torch.Tensor, gamma: float, start: str, window: int | None, block: int) -> torch.Tensor:
    """sum over k in R(t) of gamma^(k-t) x_k for rows of x (each row is one sequence)."""
    if start == "next":
        if window is not None:
            window -= 1
            if window == 0:
                return torch.zeros_like(x)
        return gamma * _shift_left(_range_sum(x, gamma, "current", window, block), 1)
    if window is None or window >= x.shape[1]:
        return discounted_suffix_sum(x, gamma, block)
    return _discounted_window_sum(x, gamma, window)


def _future_kl_rows(x: torch.Tensor, mask: torch.Tensor, gamma: float, start: str,
                    window: int | None, average: bool, block: int) -> torch.Tensor:
    """Rows layout core: x = M * delta (float), mask bool, both [R, N]; returns float32 [R, N]."""
    if not average:
        return _range_sum(x.float(), gamma, start, window, block)
    # The average is a ratio of two tiny numbers far from the nearest participating token; float64
    # keeps the denominator from underflowing until gamma^distance < 1e-308.
    m64 = float_mask(mask, torch.float64)
    x64 = x.to(torch.float64)
    num = _range_sum(x64, gamma, start, window, block)
    den = _range_sum(m64, gamma, start, window, block)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    if x64.numel() == 0:
        return ratio.float()
    bound = x64.abs().max()  # a tensor: no host read
    return torch.minimum(torch.maximum(ratio, -bound), bound).float()  # a weighted mean of values in [-bound, bound]


def _validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S+1]")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    cu = [int(v) for v in cu_seqlens.tolist()]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] > total:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but the packed stream has only {total} tokens")
    return cu


def _future_kl_packed(x: torch.Tensor, mask: torch.Tensor, cu: list[int], gamma: float, start: str,
                      window: int | None, average: bool, block: int) -> torch.Tensor:
    """Packed 1-D stream: regroup sequences into padded rows by length class, compute, scatter back."""
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    buckets: dict[int, list[int]] = {}
    for seg, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > a:
            buckets.setdefault((b - a - 1).bit_length(), []).append(seg)
    for segs in buckets.values():
        # The gather / scatter tables are built on the host from the Python offsets (no device reads).
        starts = torch.tensor([cu[s] for s in segs])
        lengths = torch.tensor([cu[s + 1] - cu[s] for s in segs])
        width = max(cu[s + 1] - cu[s] for s in segs)
        cols = torch.arange(width)
        valid = cols[None, :] < lengths[:, None]
        index = torch.where(valid, starts[:, None] + cols[None, :], torch.zeros_like(valid, dtype=torch.long))
        total = int(sum(cu[s + 1] - cu[s] for s in segs))
        row_of = torch.repeat_interleave(torch.arange(len(segs)), lengths, output_size=total)
        col_of = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths,
                                                                output_size=total)
        picked = row_of * width + col_of  # the valid entries of the [rows, width] table, row-major
        dst = (starts[row_of] + col_of).to(x.device)
        index, valid, picked = index.to(x.device), valid.to(x.device), picked.to(x.device)
        rows = _future_kl_rows(x[index] * valid, mask[index] & valid, gamma, start, window, average, block)
        out[dst] = rows.reshape(-1)[picked]
    return out


def future_kl_unchecked(masked_delta: torch.Tensor, mask: torch.Tensor, gamma: float, *, start: str,
                        window: int | None, average: bool, cu: list[int] | None,
                        block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """:func:`future_kl` without its input checks, for callers that validated their inputs (``policy_loss``):
    ``masked_delta`` = M * delta (finite), ``mask`` = M (bool), ``gamma`` = :func:`decay_gamma`, ``cu`` the
    packed sequences' offsets as a Python list (None: one sequence per row). float32 result."""
    if cu is None:
        return _future_kl_rows(masked_delta, mask, gamma, start, window, average, block)
    return _future_kl_packed(masked_delta, mask, cu, gamma, start, window, average, block)


def future_kl(delta: torch.Tensor, mask: torch.Tensor, decay_rate: float, *, start: str = "current",
              window: int | None = None, average: bool = False, cu_seqlens: torch.Tensor | None = None,
              block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Future-KL of every token (see the module docstring for the exact sum).

    Args:
        delta: [B, L] (rows = sequences) or 1-D [T] packed with ``cu_seqlens``; log-prob shifts, already
            clamped to [-20, 20] by the caller. Gradients are not tracked (inputs are detached).
        mask: same shape, bool or 0/1 numbers: response mask * participation mask (padding must be 0).
        decay_rate: half-life in tokens; gamma = 2 ** (-1 / decay_rate).
        start: "current" (k >= t) or "next" (k > t).
        window: None, or W >= 1 to keep only k < t + W (counted from t whatever ``start`` is).
        average: divide by D_t = sum over the same k of gamma^(k-t) M_k; 0 where D_t == 0.
        cu_seqlens: int [S+1] segment offsets of the packed stream (sequence i = cu[i]:cu[i+1]);
            tokens after cu[-1] get 0.
        block: block size C of the blockwise scan (a tuning knob; results do not depend on it).

    Returns: float32 tensor of delta's shape, without autograd graph.
    """
    gamma = decay_gamma(decay_rate)
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}, got {start!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"block must be an int >= 2, got {block!r}")
    if not isinstance(delta, torch.Tensor) or not delta.dtype.is_floating_point:
        raise ValueError("delta must be a floating-point tensor")
    if not isinstance(mask, torch.Tensor) or mask.shape != delta.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have delta's shape {tuple(delta.shape)}, got {got}")
    if cu_seqlens is None and delta.dim() != 2:
        raise ValueError(f"delta must be [B, L] (or 1-D with cu_seqlens), got shape {tuple(delta.shape)}")
    if cu_seqlens is not None and delta.dim() != 1:
        raise ValueError(f"with cu_seqlens, delta must be 1-D [T], got shape {tuple(delta.shape)}")
    with torch.no_grad():
        delta = delta.detach()
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must contain only 0 and 1")
            mask = mask != 0
        x = delta * float_mask(mask, delta.dtype)  # M * delta (torch.where is ~10x slower on CPU) ...
        if not all_finite(x):
            x = torch.where(mask, delta, 0.0)  # ... unless NaN / inf sit at masked-out positions
            if not all_finite(x):
                raise ValueError("delta contains NaN or inf at masked-in positions")
        if cu_seqlens is None:
            return _future_kl_rows(x, mask, gamma, start, window, average, block)
        cu = _validate_cu_seqlens(cu_seqlens, delta.shape[0])
        return _future_kl_packed(x, mask, cu, gamma, start, window, average, block)
