"""Entry point: ``torchrun ... -m fipo_megatron.train [--config FILE.yaml] [Megatron-style flags]``
(console script ``fipo-train``). Arguments are parsed and validated BEFORE any process group starts;
a bad value exits with status 2 and a message naming it. See ``fipo-train --help``.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from fipo_megatron.megatron.parallel import destroy_parallel

            destroy_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
