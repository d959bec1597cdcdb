"""Random RL samples for tests: prompts and responses of random token ids, alternating advantages."""
from __future__ import annotations

from typing import Sequence

import torch


def random_rl_samples(n: int, vocab: int, seed: int, *, advantages: Sequence[float] = (1.0, -1.0),
                      prompt_len: tuple[int, int] = (2, 6), response_len: tuple[int, int] = (3, 9)) -> list:
    """``n`` :class:`RLSample` with prompt / response lengths drawn from [lo, hi) and token ids from
    [1, vocab); sample i gets ``advantages[i % len(advantages)]``. Deterministic in ``seed``."""
    from fipo_megatron.parallel.packing import RLSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(*prompt_len, (1,), generator=g))
        R = int(torch.randint(*response_len, (1,), generator=g))
        out.append(RLSample(torch.randint(1, vocab, (P,), generator=g).tolist(),
                            torch.randint(1, vocab, (R,), generator=g).tolist(),
                            advantage=advantages[i % len(advantages)]))
    return out
