"""Engine version checks at start-up.

Each adapter declares the version range it was written against (`SUPPORTED`). Outside the range
we warn (default) or raise (`strict=True`); `check=False` skips the check (an escape hatch for a
newer engine the user has verified). Unknown versions (server did not report one) only warn.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from .types import EngineError

# (min inclusive, max exclusive, what the adapter was written against)
SUPPORTED = {
    # SGLang: batched update_weights_from_distributed (names/dtypes/shapes), pause/continue_generation,
    # weight_version field; written against the docs/io_struct of 0.4.6 - 0.5.x.
    "sglang": ((0, 4, 6), (0, 6, 0)),
    # vLLM: V1 engine, raw_logprobs default, token-id prompts + return_tokens_as_token_ids,
    # native weight-transfer HTTP API (init_weight_transfer_engine/update_weights, pause/resume).
    "vllm": ((0, 10, 0), (1, 0, 0)),
}


def parse_version(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """'0.5.1.post3' -> (0, 5, 1); '0.11.0rc1+cu128' -> (0, 11, 0); None/garbage -> None."""
    if not text:
        return None
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def check_version(engine: str, version: Optional[str], *, strict: bool = False, check: bool = True) -> bool:
    """True if `version` is inside SUPPORTED[engine]; otherwise warn (or raise EngineError if strict)."""
    if not check:
        return True
    lo, hi = SUPPORTED[engine]
    parsed = parse_version(version)
    if parsed is None:
        warnings.warn(f"{engine}: could not determine the server version ({version!r}); "
                      f"this adapter was written for {_fmt(lo)} <= version < {_fmt(hi)}", stacklevel=2)
        return False
    if lo <= parsed < hi:
        return True
    msg = (f"{engine} version {version} is outside the range this adapter was written for "
           f"({_fmt(lo)} <= version < {_fmt(hi)}); pass check_version=False to accept it")
    if strict:
        raise EngineError(msg)
    warnings.warn(msg, stacklevel=2)
    return False
