"""Integrity check of a torch_dist (torch.distributed.checkpoint) directory's files, without loading it.

Contract: :func:`damaged_files(ckpt_dir)` returns one line per problem, each naming the file:
the DCP ``.metadata`` missing or unreadable, a shard file (``*.distcp``) that the metadata refers to
missing, or shorter than the last byte the metadata says it holds (a truncated write: a full disk,
a killed copy). An empty list means every byte the checkpoint references is present (the bytes
themselves are not checksummed). Pure torch; no Megatron import, no process group; cheap (reads the
metadata and stats the files).
"""
from __future__ import annotations

import os

__all__ = ["damaged_files"]


def damaged_files(ckpt_dir: str) -> list[str]:
    """Problems of ``ckpt_dir``'s DCP files (see the module docstring); [] when none."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(meta_path):
        return [f"{meta_path} is missing"]
    try:
        storage = FileSystemReader(ckpt_dir).read_metadata().storage_data
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a damaged checkpoint
        return [f"{meta_path} cannot be read ({type(exc).__name__}: {exc})"]
    needed: dict[str, int] = {}
    for info in (storage or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for rel, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size < end:
            problems.append(f"{path} is truncated: {size} bytes, the checkpoint metadata needs {end}")
    return problems
