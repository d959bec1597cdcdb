"""Parallel-layout and memory planner for fipo_megatron runs (no Megatron import).

``python -m fipo_megatron.plan --model qwen2.5-32b --nodes 8 --tp 8 --pp 2 --cp 2 ...`` validates a
TP/PP/CP/DP layout against the model shape and the world size and prints a per-GPU memory estimate.
The SLURM recipes in ``examples/`` call it from their ``--dry-run``.

The model table in :mod:`fipo_megatron.plan.models` is derived from the Megatron-free
:mod:`fipo_megatron.models` (the one table of published Qwen2.5 ``config.json`` numbers and the
shared shape rules), so this package stays importable without Megatron.
"""

from fipo_megatron.plan.layout import Layout, LayoutError, RunShape, validate_layout
from fipo_megatron.plan.memory import MemoryEstimate, estimate_memory
from fipo_megatron.plan.models import PRESETS, ModelShape, load_hf_config, param_count

__all__ = [
    "PRESETS",
    "Layout",
    "LayoutError",
    "MemoryEstimate",
    "ModelShape",
    "RunShape",
    "estimate_memory",
    "load_hf_config",
    "param_count",
    "validate_layout",
]
