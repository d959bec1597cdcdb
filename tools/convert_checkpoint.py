#!/usr/bin/env python
"""Thin script around `fipo-convert` (fipo_megatron.convert.cli); same arguments, e.g.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir H --out M --tp 2 --pp 1
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir M --out H2 --hf-dir H
    python tools/convert_checkpoint.py reshard --mcore-dir M --out M2 --tp 1 --pp 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # import-safe: dist_checkpointing.save starts helper processes
    from fipo_megatron.tools_cli import main

    sys.exit(main())
