"""Console entry point `fipo-convert` (see fipo_megatron/convert/cli.py)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from fipo_megatron.convert.cli import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
