"""Megatron-Core torch_dist checkpoint (any TP/PP) -> HF Qwen2 safetensors, one layer at a time.

Reading: for each layer i, one `dist_checkpointing.load` call requests, for every per-layer key,
the slice [i] of the stacked global tensor (a ShardedTensor with offset (i, L) on the prepended
layer axis), so only one layer is resident; the global tensors (embedding, final norm, output
layer) are loaded on their own. fc1 is read as the plain global [gate; up] slice (no swiglu
factory), which is the stored layout whatever TP wrote it.

Writing: HF-ordered names are planned into shards (`--max-shard-size`, like save_pretrained) and
streamed; padded vocabulary rows are dropped; tied checkpoints get no `lm_head.weight`. The
config, generation config and tokenizer files are copied from `--hf-dir`, whose config must agree
with the one recorded in the checkpoint's `fipo_convert.json`.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import torch

from .hf_to_mcore import META_NAME, atomic_output, read_meta
from .mapping import (EMBED_KEY, LAYER_RULES, QwenDims, expected_hf_shapes, expected_mcore_shapes, global_rules,
                      mcore_layer_key)
from .validate import ConversionError, check_hf_config, compare_dims, load_hf_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


class _RegionLoadPlanner:
    """A DCP load planner that reads one region (offsets + dest shape) of each requested key.

    DCP's `create_read_items_for_chunk_list` intersects the region with the stored chunks, so
    checkpoints written at any TP/PP (chunks per TP rank, per layer, fc1 gate/up halves) read alike.
    """

    def __new__(cls, regions):
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self):
                items = []
                for fqn, offsets in regions.items():
                    dest = self.state_dict[fqn]
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                    items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
                return LoadPlan(items)

            def lookup_tensor(self, index):  # dest is the region buffer itself, whatever chunk offset
                return self.state_dict[index.fqn]

        return Planner(flatten_state_dict=False, flatten_sharded_tensors=False)


class McoreCheckpointReader:
    """Read global / per-layer tensors of a torch_dist checkpoint written by fipo-convert.

    Reads go straight through torch.distributed.checkpoint (`no_dist=True`): no process group and
    no model are needed, and only the requested region is resident.
    """

    def __init__(self, mcore_dir: str, hf_config: dict | None = None):
        from torch.distributed.checkpoint import FileSystemReader

        if not os.path.isdir(mcore_dir):
            raise ConversionError(f"Megatron checkpoint directory {mcore_dir} does not exist")
        mcore_dir = resolve_checkpoint_dir(mcore_dir)
        self.dir = mcore_dir
        if os.path.isfile(os.path.join(mcore_dir, META_NAME)) or hf_config is None:
            self.meta = read_meta(mcore_dir)
        else:  # a training checkpoint (fipo_megatron.megatron.checkpoint): config from --hf-dir
            self.meta = {"hf_config": hf_config, "tp": None, "pp": None}
        self.hf_config = self.meta["hf_config"]
        self.dims = check_hf_config(self.hf_config, os.path.join(mcore_dir, META_NAME))
        if not os.path.isfile(os.path.join(mcore_dir, "metadata.json")):
            raise ConversionError(f"{mcore_dir} is not a complete dist_checkpointing checkpoint (no metadata.json)")
        from fipo_megatron.megatron.dcp_files import damaged_files

        damaged = damaged_files(mcore_dir)
        if damaged:
            raise ConversionError(f"{mcore_dir} is damaged: " + "; ".join(damaged))
        try:
            md = FileSystemReader(mcore_dir).read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 - corrupt / missing .metadata
            raise ConversionError(f"{mcore_dir}: cannot read the torch_dist metadata: {e}") from e
        self.shapes = {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}
        self.dtypes = {k: v.properties.dtype for k, v in md.items() if hasattr(v, "size")}
        if EMBED_KEY not in self.shapes:
            raise ConversionError(f"{mcore_dir}: tensor '{EMBED_KEY}' is missing from the checkpoint")
        self.padded_vocab_size = int(self.meta.get("padded_vocab_size") or self.shapes[EMBED_KEY][0])
        expected = expected_mcore_shapes(self.dims, self.padded_vocab_size)
        for key, shape in expected.items():
            if key not in self.shapes:
                raise ConversionError(f"{mcore_dir}: tensor '{key}' is missing from the checkpoint")
            if self.shapes[key] != shape:
                raise ConversionError(f"{mcore_dir}: tensor '{key}' has global shape {self.shapes[key]}, the "
                                      f"config implies {shape}")
        self.dtype = self.dtypes[EMBED_KEY]

    def _load(self, regions: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        sd = {k: torch.empty(shapes[k], dtype=self.dtypes[k]) for k in regions}
        dcp_load(sd, storage_reader=FileSystemReader(self.dir), planner=_RegionLoadPlanner(regions), no_dist=True)
        return sd

    def load_global(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        return self._load({key: (0,) * len(shape)}, {key: shape})[key]

    def load_layer(self, i: int) -> dict[str, torch.Tensor]:
        """{checkpoint key: layer i slice} for every per-layer key, in one read."""
        keys = [mcore_layer_key(r.mcore_key) for r in LAYER_RULES]
        regions = {k: (i,) + (0,) * (len(self.shapes[k]) - 1) for k in keys}
        out = self._load(regions, {k: (1,) + self.shapes[k][1:] for k in keys})
        return {k: v[0] for k, v in out.items()}

    def iter_mcore(self) -> Iterator[tuple[str, "int | None", torch.Tensor]]:
        """(key, layer or None, tensor) in the same order hf_to_mcore writes them."""
        rules = global_rules(self.dims, self.padded_vocab_size)
        yield rules[0].mcore_key, None, self.load_global(rules[0].mcore_key)
        for i in range(self.dims.num_layers):
            loaded = self.load_layer(i)
            for rule in LAYER_RULES:
                key = mcore_layer_key(rule.mcore_key)
                yield key, i, loaded.pop(key)
        for rule in rules[1:]:
            yield rule.mcore_key, None, self.load_global(rule.mcore_key)

    def iter_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, full tensor), padded vocab rows dropped, HF order."""
        rules = {r.mcore_key: r for r in global_rules(self.dims, self.padded_vocab_size)}
        rules.update({mcore_layer_key(r.mcore_key): r for r in LAYER_RULES})
        for key, layer, t in self.iter_mcore():
            rule = rules[key]
            yield from zip(rule.hf(layer), rule.to_hf(t, self.dims))

    def close(self) -> None:
        pass


def resolve_checkpoint_dir(path: str) -> str:
    """A training save dir (latest_checkpointed_iteration.txt) -> its newest iter_XXXXXXX dir."""
    latest = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(latest):
        with open(latest) as f:
            step = int(f.read().strip())
        return os.path.join(path, f"iter_{step:07d}")
    return path


def iter_hf_tensors_from_checkpoint(mcore_dir: str,
                                    hf_config: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (hf_name, tensor) from a Megatron checkpoint (fipo-convert's, or a training one
    given `hf_config`)."""
    reader = McoreCheckpointReader(mcore_dir, hf_config)
    try:
        yield from reader.iter_hf()
    finally:
        reader.close()


def hf_name_order(dims: QwenDims) -> list[str]:
    """HF names in the order `iter_hf` yields them."""
    names = ["model.embed_tokens.weight"]
    for i in range(dims.num_layers):
        for rule in LAYER_RULES:
            names += rule.hf(i)
    names.append("model.norm.weight")
    if not dims.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def copy_hf_side_files(hf_dir: str, out: str) -> list[str]:
    """Copy config, generation config and tokenizer files (everything but weights and the index)."""
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if not os.path.isfile(src) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copy2(src, os.path.join(out, name))
        copied.append(name)
    return copied


def parse_size(s: str | int) -> int:
    """'5GB', '500MB', '2GiB', 1234 -> bytes (HF's decimal GB/MB, binary GiB/MiB)."""
    if isinstance(s, int):
        return s
    t = s.strip().upper()
    for suf, mul in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                     ("B", 1)):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mul)
    return int(t)


def convert_mcore_to_hf(mcore_dir: str, out: str, hf_dir: str, max_shard_size: str | int = "5GB",
                        force: bool = False) -> list[str]:
    """Write HF safetensors shards + index + copied config/tokenizer files to `out`."""
    from .safetensors_io import ShardedSafetensorsWriter

    hf_config = load_hf_config(hf_dir)
    dims = check_hf_config(hf_config, os.path.join(hf_dir, "config.json"))
    reader = McoreCheckpointReader(mcore_dir, hf_config)
    try:
        compare_dims(reader.dims, dims, f"{mcore_dir}/{META_NAME}", f"{hf_dir}/config.json")
        shapes = expected_hf_shapes(dims)
        specs = [(n, shapes[n], reader.dtype) for n in hf_name_order(dims)]

        def build(tmp: str) -> None:
            writer = ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
            for name, t in reader.iter_hf():
                writer.write(name, t)
            writer.close()
            copy_hf_side_files(hf_dir, tmp)

        atomic_output(out, build, force)
    finally:
        reader.close()
    return sorted(os.listdir(out))
