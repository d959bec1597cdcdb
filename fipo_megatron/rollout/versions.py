"""Engine versions: the supported window per engine, checked at connect, and the version-dependent steps.

Windows (min inclusive, max exclusive) are what the adapters were checked against in the engines'
own source: SGLang 0.5.3 - 0.5.23, vLLM 0.10.2 - 0.32. The audit reads each version's wheel
(`tools/audit_engine_fields.py`; the field lists and the wheel/file each came from are in
`tests/engine_fields_audit.py`, checked by `tests/test_rollout_engine_fields.py`). Version facts used here:

- SGLang < 0.5.3 has no `sampling_seed` sampling parameter (0.5.2 `SamplingParams.__init__`), so it
  rejects every /generate we send: 0.5.3 is the floor. From 0.5.21 /update_weights_from_distributed
  must sit between /begin_weight_update and /end_weight_update (0.5.21 scheduler_components/
  weight_updater.py: "must run between"; 0.5.20 has neither route) (`sglang_needs_update_session`).
- vLLM: /v1/completions with token-id prompts, `return_tokens_as_token_ids` and `return_token_ids`
  from 0.10.2. Weight updates need the dev-mode routes: the disk path (/pause + collective_rpc
  `reload_weights(weights_path=...)`) from 0.16 (0.15's `GPUModelRunner.reload_weights` takes no
  argument, 0.11 has no /pause); the NCCL path from 0.17: 0.16 has the HTTP routes but its
  `trainer_send_weights(iterator, group=..., ...)` predates `NCCLTrainerSendWeightsArgs`
  (`vllm_check_weight_sync`). The trainer side is `NCCLWeightTransferEngine.trainer_init` +
  `NCCLTrainerSendWeightsArgs` in 0.17 - 0.27 and `NCCLTrainerWeightTransferEngine` (with `packed`
  in the init info, no longer in the update info) from 0.28 (`vllm_nccl_trainer_api`);
  /start_weight_update and /finish_weight_update exist and are mandatory from 0.21
  (`vllm_needs_start_finish`; 0.21 gpu_worker: "start_weight_update must be called before").

`check_version` raises `EngineError` (naming the engine, the installed version and the window) for a
version outside the window or one the server did not report; `check=False` (the trainer's
`--rollout-skip-version-check`) turns that into a warning, for a version the user has verified.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from .types import EngineError

Version = tuple[int, int, int]

SUPPORTED: dict[str, tuple[Version, Version]] = {
    "sglang": ((0, 5, 3), (0, 5, 24)),
    "vllm": ((0, 10, 2), (0, 33, 0)),
}

SGLANG_UPDATE_SESSION_FROM: Version = (0, 5, 21)
VLLM_NCCL_LEGACY_FROM: Version = (0, 17, 0)
VLLM_NCCL_ENGINE_FROM: Version = (0, 28, 0)
VLLM_START_FINISH_FROM: Version = (0, 21, 0)
VLLM_DISK_RELOAD_FROM: Version = (0, 16, 0)


def parse_version(text: Optional[str]) -> Optional[Version]:
    """'0.5.1.post3' -> (0, 5, 1); '0.11.0rc1+cu128' -> (0, 11, 0); None/garbage -> None."""
    if not text:
        return None
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def fmt_version(v: Version) -> str:
    """(0, 5, 21) -> '0.5.21'."""
    return ".".join(map(str, v))


def window_text(engine: str) -> str:
    """'0.5.3 <= version < 0.5.24' for SUPPORTED[engine]."""
    lo, hi = SUPPORTED[engine]
    return f"{fmt_version(lo)} <= version < {fmt_version(hi)}"


def check_version(engine: str, version: Optional[str], *, check: bool = True, url: Optional[str] = None) -> bool:
    """True when `version` is inside SUPPORTED[engine].

    Otherwise (also when the version is unknown) raise EngineError naming the version, the window
    and the way out; with `check=False` warn instead and return False.
    """
    lo, hi = SUPPORTED[engine]
    parsed = parse_version(version)
    if parsed is not None and lo <= parsed < hi:
        return True
    where = f" at {url}" if url else ""
    what = (f"reported version {version!r}, which could not be parsed" if parsed is None
            else f"version {version}")
    msg = (f"{engine}{where}: {what} is outside the supported window {window_text(engine)}; install a "
           f"version inside it, or pass --rollout-skip-version-check (check_version=False) if you have "
           f"verified this one")
    if check:
        raise EngineError(msg)
    warnings.warn(msg, stacklevel=2)
    return False


def one_server_version(engine: str, versions: dict[str, Optional[str]], *, check: bool = True) -> Optional[str]:
    """The version all servers run: each checked (:func:`check_version`), all equal (the weight-update steps
    depend on it), else :class:`EngineError` listing them. ``versions``: {url: reported version}."""
    for url, v in versions.items():
        check_version(engine, v, check=check, url=url)
    if len(set(versions.values())) > 1:
        listing = ", ".join(f"{u}: {v}" for u, v in versions.items())
        raise EngineError(f"{engine}: the servers run different versions ({listing}); the weight-update steps "
                          f"depend on the version, so run one version everywhere")
    return next(iter(versions.values()))


def _require(engine: str, version: Optional[str]) -> Version:
    parsed = parse_version(version)
    if parsed is None:
        raise EngineError(f"{engine}: the server's version {version!r} is unknown; the weight-update protocol "
                          f"depends on it")
    return parsed


def sglang_needs_update_session(version: Optional[str]) -> bool:
    """True when /update_weights_from_distributed must be wrapped in /begin_weight_update ... /end_weight_update."""
    return _require("sglang", version) >= SGLANG_UPDATE_SESSION_FROM


def vllm_needs_start_finish(version: Optional[str]) -> bool:
    """True when vLLM's weight transfer needs /start_weight_update and /finish_weight_update (>= 0.21)."""
    return _require("vllm", version) >= VLLM_START_FINISH_FROM


def vllm_nccl_trainer_api(version: Optional[str]) -> str:
    """Which trainer-side NCCL API the server's vLLM expects: 'legacy' (0.17 - 0.27:
    NCCLWeightTransferEngine.trainer_init + NCCLTrainerSendWeightsArgs) or 'engine' (>= 0.28:
    NCCLTrainerWeightTransferEngine). EngineError below 0.17 (0.16's trainer API differs; older: no transfer)."""
    v = _require("vllm", version)
    if v < VLLM_NCCL_LEGACY_FROM:
        raise EngineError(f"vllm {version}: the trainer side of vLLM's HTTP NCCL weight transfer is supported as it "
                          f"exists from {fmt_version(VLLM_NCCL_LEGACY_FROM)}; use --weight-sync disk or a newer vLLM")
    return "legacy" if v < VLLM_NCCL_ENGINE_FROM else "engine"


def vllm_check_weight_sync(version: Optional[str], weight_sync: str) -> None:
    """EngineError when a vLLM server of `version` cannot take weight updates by `weight_sync`
    ("disk": /pause + reload_weights(weights_path), from 0.16; "nccl": see `vllm_nccl_trainer_api`).
    Called before any request, so a refused combination never leaves the servers paused. An unknown
    version passes for "disk" (the steps do not depend on it) and fails for "nccl"."""
    if weight_sync == "nccl":
        vllm_nccl_trainer_api(version)
        return
    v = parse_version(version)
    if v is not None and v < VLLM_DISK_RELOAD_FROM:
        raise EngineError(f"vllm {version}: weight updates from disk need /pause and reload_weights(weights_path=...) "
                          f"of a dev-mode server, which exist from {fmt_version(VLLM_DISK_RELOAD_FROM)}; "
                          f"use a newer vLLM")
