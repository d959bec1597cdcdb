"""Entry point: ``torchrun ... -m fipo_megatron.train [--config FILE.yaml] [Megatron-style flags]``
(console script ``fipo-train``). Arguments are parsed and validated BEFORE any process group starts;
a bad value exits with status 2 and a message naming it. See ``fipo-train --help``.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, train; exit status 2 for bad arguments, 1 when another run holds the run directories or a
    checkpoint / rollout failure stopped the run (one line on stderr naming it)."""
    from fipo_megatron.trainer.reliability import tie_to_launcher

    tie_to_launcher()  # a torchrun worker dies with its launcher (and takes its helper processes along)
    from fipo_megatron.trainer.args import parse_args

    try:
        cfg = parse_args(argv)
    except ValueError as exc:
        print(f"fipo-train: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fipo_megatron.trainer.loop import train

    try:
        train(cfg)
    except _run_stopping_errors() as exc:  # evaluated only when something was raised
        print(f"fipo-train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from fipo_megatron.megatron.parallel import destroy_parallel

            destroy_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _run_stopping_errors() -> tuple:
    """The errors that stop a run with one clear line (not a traceback): the run lock is held by another
    run, --save is unwritable or full, a checkpoint write failed, a rollout failed for good."""
    from fipo_megatron.megatron.checkpoint import CheckpointWriteError
    from fipo_megatron.trainer.loop import RolloutError
    from fipo_megatron.trainer.reliability import RunLockedError, SaveDirError

    return RunLockedError, SaveDirError, CheckpointWriteError, RolloutError


if __name__ == "__main__":
    sys.exit(main())
