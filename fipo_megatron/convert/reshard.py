"""Reshard a Megatron torch_dist checkpoint written by fipo-convert to another TP/PP layout.

A torch_dist checkpoint stores global tensors, so any TP/PP model can already load it with
`dist_checkpointing.load`; what depends on the layout is the vocabulary padding
Vp = ceil(V / (divisible_by * TP)) * divisible_by * TP (embedding / output rows) and the layout
recorded in `fipo_convert.json`. Resharding validates the new layout against the recorded HF config
(TP | KV groups and heads, PP | layers), then streams the checkpoint layer by layer
(`dist_checkpointing.load` of one layer's slices), re-pads the vocabulary rows (padding rows are
zero; real rows are copied bit for bit) and saves a new checkpoint through the same staged writer
as hf_to_mcore, atomically (`<out>.tmp-<pid>` renamed at the end).
"""
from __future__ import annotations

import os
from typing import Any

from .hf_to_mcore import McoreItem, atomic_output, read_meta, save_mcore_checkpoint, write_meta
from .mapping import EMBED_KEY, OUTPUT_KEY, pad_vocab_rows, padded_vocab, unpad_vocab_rows
from .mcore_to_hf import McoreCheckpointReader
from .validate import check_hf_config, check_layout, compare_dims, load_hf_config


def reshard_checkpoint(mcore_dir: str, out: str, tp: int, pp: int, make_vocab_size_divisible_by: int | None = None,
                       force: bool = False, hf_dir: str | None = None) -> dict[str, Any]:
    """Write `mcore_dir` re-laid-out for (tp, pp) to `out`; returns the new metadata.

    `hf_dir` supplies the config for a checkpoint without fipo_convert.json (e.g. a training
    checkpoint); when both exist they must agree."""
    hf_config = load_hf_config(hf_dir) if hf_dir else None
    reader = McoreCheckpointReader(mcore_dir, hf_config)
    try:
        dims = reader.dims
        if hf_config is not None:
            compare_dims(dims, check_hf_config(hf_config), f"{mcore_dir} metadata", f"{hf_dir}/config.json")
        check_layout(dims, tp, pp)
        div = make_vocab_size_divisible_by or int(reader.meta.get("make_vocab_size_divisible_by") or 128)
        vp = padded_vocab(dims.vocab_size, tp, div)

        def items():
            for key, layer, t in reader.iter_mcore():
                if key in (EMBED_KEY, OUTPUT_KEY):
                    t = pad_vocab_rows(unpad_vocab_rows(t, dims.vocab_size), vp)
                yield McoreItem(key, layer, t)

        def build(tmp: str) -> None:
            dtype = save_mcore_checkpoint(tmp, items(), dims)
            write_meta(tmp, reader.hf_config, tp, pp, vp, div, dtype, os.path.abspath(mcore_dir))

        atomic_output(out, build, force)
    finally:
        reader.close()
    return read_meta(out)


reshard = reshard_checkpoint  # short alias for module-level use
