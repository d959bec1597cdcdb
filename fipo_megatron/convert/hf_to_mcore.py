"""HF Qwen2 safetensors -> Megatron-Core `torch_dist` checkpoint, streaming tensor by tensor.

The torch_dist checkpoint is layout-independent: it stores GLOBAL tensors (per-layer tensors
stacked under one key with a leading layer axis, fc1 as [all gate; all up]) and any TP/PP model
loads its own slices with `dist_checkpointing.load`. The target TP/PP therefore only decides the
vocabulary padding (Vp, see mapping.py) and is validated and recorded in `fipo_convert.json`.

Memory: `dist_checkpointing.save` resolves every tensor of the state dict before writing, so the
state dict must not live in anonymous memory. Tensors copied unchanged (o_proj, down_proj, norms,
the embedding when no padding is needed, and gate / up as the two pieces of fc1, which is how
Megatron's swiglu factory stores [gate; up]) are zero-copy views of memory maps of the HF files.
Tensors that need a transform (the per-group QKV interleave, vocabulary padding) are built one
layer group at a time and appended to a staging file (`<out>.tmp-<pid>.staging`), which is then
memory-mapped. Every item becomes one ShardedTensor (per-layer ones with offset (layer, L) on the
stacked axis). Resident anonymous memory stays near the largest transformed tensor; the mapped
pages are clean page cache the kernel can drop. Output goes to `<out>.tmp-<pid>` and is
renamed to `<out>` only when complete; on any error both temporary paths are removed.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from .mapping import (EXTRA_STATE_SUFFIXES, FINAL_NORM_EXTRA_STATE_KEY, LAYER_RULES, QwenDims, global_rules,
                      mcore_layer_key, expected_hf_shapes, padded_vocab)
from .validate import (ConversionError, check_layout, check_megatron_args, check_output_dir, check_tensor_shapes,
                       load_hf_config)

META_NAME = "fipo_convert.json"
FORMAT_VERSION = 1



@dataclass
class McoreItem:
    """One chunk of a checkpoint tensor: `tensor` is the full global tensor (layer is None) or
    layer `layer`'s slice of a stacked key; `frag=(axis, index, count)` marks it as piece `index`
    of `count` equal pieces along `axis` of that slice (fc1 = [gate; up] as two pieces, the way
    Megatron's swiglu factory stores it). `zero_copy`: the tensor is an immutable view (e.g. a
    memory map of the HF file) that can be handed to the writer as is, without staging."""

    key: str
    layer: int | None
    tensor: torch.Tensor
    frag: tuple[int, int, int] | None = None
    zero_copy: bool = False


def ensure_process_group() -> bool:
    """dist_checkpointing needs torch.distributed; start a 1-process gloo group if there is none.
    Returns True when this call created it (the caller should destroy it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() > 1:
            raise ConversionError("the converters write a checkpoint from ONE process (the torch_dist format is "
                                  "layout-independent); run them outside a multi-rank job")
        return False
    from fipo_megatron.testing.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not torch.cuda.is_available():
        # dist_checkpointing's writer calls torch.cuda.synchronize(); CPU-only hosts need the shim.
        from fipo_megatron.megatron.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
    return True


def _hf_rule_items(index, rule, key: str, layer: int | None, dims: QwenDims, vp: int) -> Iterator[McoreItem]:
    names = rule.hf(layer)
    if rule.kind == "plain" or (rule.kind == "vocab" and dims.vocab_size == vp):
        yield McoreItem(key, layer, index.view(names[0]), zero_copy=True)  # copied unchanged
    elif rule.kind == "fc1":  # [gate; up] stored as two pieces, each a view of the HF tensor
        for k, name in enumerate(names):
            yield McoreItem(key, layer, index.view(name), frag=(0, k, 2), zero_copy=True)
    else:  # qkv interleave, vocab padding: materialise (one layer's group) and stage
        yield McoreItem(key, layer, rule.to_mcore([index.get(n) for n in names], dims))


def hf_items(index, dims: QwenDims, padded_vocab_size: int) -> Iterator[McoreItem]:
    """Yield the Megatron checkpoint items of an HF `SafetensorsIndex`, one group at a time."""
    rules = global_rules(dims, padded_vocab_size)
    yield from _hf_rule_items(index, rules[0], rules[0].mcore_key, None, dims, padded_vocab_size)
    for i in range(dims.num_layers):
        for rule in LAYER_RULES:
            yield from _hf_rule_items(index, rule, mcore_layer_key(rule.mcore_key), i, dims, padded_vocab_size)
    for rule in rules[1:]:
        yield from _hf_rule_items(index, rule, rule.mcore_key, None, dims, padded_vocab_size)


def write_meta(path: str, hf_config: dict, tp: int, pp: int, padded_vocab_size: int, divisible_by: int,
               dtype: torch.dtype, source: str) -> None:
    meta = {"format_version": FORMAT_VERSION, "tp": tp, "pp": pp, "padded_vocab_size": padded_vocab_size,
            "make_vocab_size_divisible_by": divisible_by, "dtype": str(dtype).replace("torch.", ""),
            "source": source, "hf_config": hf_config}
    with open(os.path.join(path, META_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(mcore_dir: str) -> dict[str, Any]:
    path = os.path.join(mcore_dir, META_NAME)
    if not os.path.isdir(mcore_dir):
        raise ConversionError(f"Megatron checkpoint directory {mcore_dir} does not exist")
    if not os.path.isfile(os.path.join(mcore_dir, "metadata.json")):
        raise ConversionError(f"{mcore_dir} is not a complete dist_checkpointing checkpoint (no metadata.json)")
    if not os.path.isfile(path):
        raise ConversionError(f"{mcore_dir} has no {META_NAME} (conversion metadata written by fipo-convert)")
    with open(path) as f:
        return json.load(f)


def _sharded_tensor(item: McoreItem, t: torch.Tensor, num_layers: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = [] if item.layer is None else [(0, item.layer, num_layers)]
    if item.frag is not None:
        axis, idx, count = item.frag
        offsets.append((axis + (0 if item.layer is None else 1), idx, count))
    return ShardedTensor.from_rank_offsets(item.key, t, *offsets, replica_id=0,
                                           prepend_axis_num=0 if item.layer is None else 1)


def save_mcore_checkpoint(ckpt_dir: str, items: Iterable[McoreItem], dims: QwenDims) -> torch.dtype:
    """Stage the transformed items to disk, then `dist_checkpointing.save` everything as views
    (zero-copy items directly, staged ones over a memory map of the staging file)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    staging = ckpt_dir + ".staging"
    direct: list[McoreItem] = []
    staged: list[tuple[McoreItem, int]] = []  # (item with tensor=None, offset)
    dtype = None
    try:
        with open(staging, "wb") as f:
            off = 0
            for item in items:
                dtype = dtype or item.tensor.dtype
                if item.tensor.dtype != dtype:
                    raise ConversionError(f"tensor '{item.key}' has dtype {item.tensor.dtype}, the checkpoint "
                                          f"uses {dtype}")
                if item.zero_copy:
                    direct.append(item)
                    continue
                t = item.tensor.contiguous()
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                staged.append((McoreItem(item.key, item.layer, torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                         item.frag), off))
                off += t.numel() * t.element_size()
                del t, item
        created = ensure_process_group()
        L = dims.num_layers
        with open(staging, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only mmap -> "non-writable tensor" warning
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if off else None
            sd: dict[str, Any] = {}
            for n, item in enumerate(direct):
                sd[f"direct.{n}"] = _sharded_tensor(item, item.tensor, L)
            for n, (item, o) in enumerate(staged):
                meta = item.tensor
                t = torch.frombuffer(mm, dtype=meta.dtype, count=meta.numel(), offset=o).reshape(meta.shape)
                sd[f"staged.{n}"] = _sharded_tensor(item, t, L)
            for i in range(L):
                for suf in EXTRA_STATE_SUFFIXES:
                    key = mcore_layer_key(suf)
                    sd[f"{key}.{i}"] = ShardedObject(key, None, (L,), (i,), replica_id=0)
            sd[FINAL_NORM_EXTRA_STATE_KEY] = ShardedObject(FINAL_NORM_EXTRA_STATE_KEY, None, (1,), (0,), replica_id=0)
            dist_checkpointing.save(sharded_state_dict=sd, checkpoint_dir=ckpt_dir)
            del sd
        if created:
            torch.distributed.destroy_process_group()
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return dtype


def atomic_output(out: str, build: Callable[[str], None], force: bool = False) -> None:
    """Run `build(tmp_dir)` on `<out>.tmp-<pid>`, then rename to `out`; remove tmp on failure."""
    check_output_dir(out, force)
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        build(tmp)
        if os.path.exists(out) and force:
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, make_vocab_size_divisible_by: int = 128,
                        megatron_args: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Convert an HF Qwen2 checkpoint directory into a torch_dist checkpoint at `out`.

    Validates (before writing anything) the config, the Megatron arguments against it, the TP/PP
    layout and every HF tensor's presence and shape. Returns the written metadata."""
    from .safetensors_io import SafetensorsIndex
    from .validate import check_hf_config

    hf_config = load_hf_config(hf_dir)
    dims = check_hf_config(hf_config, os.path.join(hf_dir, "config.json"))
    check_megatron_args(dims, megatron_args)
    check_layout(dims, tp, pp)
    index = SafetensorsIndex(hf_dir)
    check_tensor_shapes(index.shapes(), expected_hf_shapes(dims), hf_dir)
    dtypes = {index.dtype(n) for n in index.names()}
    if len(dtypes) != 1:
        raise ConversionError(f"{hf_dir}: mixed tensor dtypes {sorted(map(str, dtypes))} are not supported")
    vp = padded_vocab(dims.vocab_size, tp, make_vocab_size_divisible_by)

    def build(tmp: str) -> None:
        dtype = save_mcore_checkpoint(tmp, hf_items(index, dims, vp), dims)
        write_meta(tmp, hf_config, tp, pp, vp, make_vocab_size_divisible_by, dtype, os.path.abspath(hf_dir))

    atomic_output(out, build, force)
    return read_meta(out)
