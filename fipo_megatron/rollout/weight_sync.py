"""Streaming, bucketed weight push from the trainer to a rollout engine.

Two ways the trainer feeds it (`trainer.setup.sync_weights`, `rollout.staged_sync`):
- one sender: `convert.live.iter_hf_tensors_from_model` yields the whole model on EVERY rank (TP
  gather, PP broadcast: collectives run while it is consumed, so every rank iterates it to the end)
  and only global rank 0 talks to the engine; `push_weights(..., is_source=False)` just drains it;
- one sender per pipeline stage: each stage's first rank pushes `convert.live.iter_stage_hf_tensors`
  (its own layers, TP-gathered, no PP broadcast) through the engine's update phases.

Nothing here materialises the whole model: `bucketize` holds at most one bucket of tensors (see
`buckets.py`, also for flattening and overlapped sending).

Also here: the NCCL group config (one group per stage sender, rebuilt on a new port after a server
restart), the trainer side of SGLang's `init_custom_process_group`, and a safetensors directory
writer for the `update_weights_from_disk` fallback (several writers: one per stage).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .buckets import Bucket, NamedTensors, bucketize, tensor_nbytes

__all__ = ["Bucket", "NamedTensors", "bucketize", "tensor_nbytes", "DEFAULT_BUCKET_BYTES", "PushStats", "push_weights",
           "dtype_name", "NcclSyncConfig", "outward_address", "default_broadcast", "init_custom_process_group",
           "SafetensorsDirWriter", "DiskWriter"]

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024  # what slime/verl use; per-tensor pushes are ~10x slower


@dataclass
class PushStats:
    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0


class _Counting:
    """Wrap a stream, counting tensors and bytes as they pass."""

    def __init__(self, named_tensors: NamedTensors, stats: PushStats) -> None:
        self._it = iter(named_tensors)
        self._stats = stats

    def __iter__(self):
        for name, tensor in self._it:
            self._stats.num_tensors += 1
            self._stats.num_bytes += tensor_nbytes(tensor)
            yield name, tensor


def push_weights(
    engine: Any,
    named_tensors: NamedTensors,
    version: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    is_source: bool = True,
) -> PushStats:
    """Push a full stream of HF-named tensors to `engine` as weight version `version`.

    - `is_source=False` (or engine None): drain the stream (its collectives must still run on
      every rank) and return counts; nothing is sent.
    - engines with `update_weights_buckets(buckets, version)` (SGLang, vLLM server) receive
      `bucketize(stream, bucket_bytes)`; other engines get `update_weights(stream, version)`.
    Errors from the engine propagate (EngineError); the trainer's checkpoint is unaffected.
    """
    stats = PushStats()
    t0 = time.perf_counter()
    stream = _Counting(named_tensors, stats)
    if engine is None or not is_source:
        for _ in stream:
            pass
    elif hasattr(engine, "update_weights_buckets"):

        def counted_buckets():
            for b in bucketize(stream, bucket_bytes):
                stats.num_buckets += 1
                yield b

        engine.update_weights_buckets(counted_buckets(), version)
    else:
        engine.update_weights(stream, version)
    stats.seconds = time.perf_counter() - t0
    return stats


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (SGLang resolves names with getattr(torch, name))."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------- NCCL broadcast
@dataclass
class NcclSyncConfig:
    """Where a trainer sender's weight-update group (SGLang or vLLM servers) rendezvous; sender = rank 0.

    `workers_per_server[i]` = GPUs of server i (tp * dp); server i's workers get ranks
    1 + sum(workers_per_server[:i]) ... ; world_size = 1 + sum(workers_per_server).
    `device`: where the trainer puts each tensor before broadcasting ("cuda" for NCCL).
    `stage`, `num_stages`: with one sender per pipeline stage (SGLang), stage s has its own group:
    name `group_name` + "_pp{s}" (stage 0 keeps `group_name`), port `master_port + s`. A group
    rebuilt after a server restart (generation g >= 1) gets the name suffix "_r{g}" and the port
    `master_port + s + g * num_stages`, so it never meets the old group's store (`group_for`).
    """

    master_address: str
    master_port: int
    workers_per_server: Sequence[int]
    group_name: str = "fipo_weight_update"
    backend: str = "nccl"
    device: str = "cuda"
    stage: int = 0
    num_stages: int = 1

    @property
    def world_size(self) -> int:
        return 1 + sum(int(w) for w in self.workers_per_server)

    def rank_offsets(self) -> list[int]:
        offs, acc = [], 1
        for w in self.workers_per_server:
            offs.append(acc)
            acc += int(w)
        return offs

    def group_for(self, generation: int = 0) -> tuple[str, int]:
        """(group name, master port) of this stage's group, rebuilt `generation` times."""
        name = self.group_name + (f"_pp{self.stage}" if self.stage else "") + (f"_r{generation}" if generation else "")
        return name, int(self.master_port) + int(self.stage) + int(generation) * max(1, int(self.num_stages))

    def for_stage(self, stage: int, num_stages: int, master_address: Optional[str] = None) -> "NcclSyncConfig":
        """This config for pipeline stage `stage` of `num_stages` (its sender's address if given)."""
        import dataclasses

        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
        return dataclasses.replace(self, stage=int(stage), num_stages=int(num_stages),
                                   master_address=master_address or self.master_address)


def outward_address(server_url: str) -> str:
    """This node's address on the interface that routes to `server_url`'s host (what that server
    can reach us at). A UDP socket is "connected" (no packet is sent) and its local address read;
    a loopback server gives 127.0.0.1. ValueError naming --weight-sync-master-addr if it cannot tell."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server_url if "//" in server_url else f"http://{server_url}")
    if not parts.hostname:
        raise ValueError(f"cannot read a host from rollout URL {server_url!r}; pass --weight-sync-master-addr")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(parts.hostname), parts.port or 80))
            return s.getsockname()[0]
    except OSError as exc:
        raise ValueError(f"cannot find the local interface that routes to {parts.hostname} ({exc}); "
                         f"pass --weight-sync-master-addr") from exc


def default_broadcast(tensor: Tensor, group: Any) -> None:
    """Broadcast `tensor` from rank 0 of `group` (the trainer) to the engine workers."""
    torch.distributed.broadcast(tensor, src=0, group=group)


def init_custom_process_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "nccl",
    timeout_s: float = 600.0,
) -> Any:
    """Create a process group with external processes WITHOUT touching the default group.

    Same construction as SGLang's `sglang.srt.utils.init_custom_process_group` (used by its
    test_update_weights_from_distributed and by slime/verl): a TCPStore rendezvous at
    tcp://master_address:master_port and torch's `_new_process_group_helper`. It relies on a
    private torch API (checked against torch 2.4-2.13), so it is guarded with a clear error.
    If sglang is importable its own helper is used, so both sides build the group identically; the
    fallback wraps the store in `PrefixStore(group_name, store)` exactly as SGLang's helper does.
    """
    from datetime import timedelta

    try:  # identical to what the server side does
        from sglang.srt.utils import init_custom_process_group as sgl_init  # type: ignore

        return sgl_init(
            backend=backend,
            init_method=f"tcp://{master_address}:{master_port}",
            world_size=world_size,
            rank=rank,
            group_name=group_name,
            timeout=timedelta(seconds=timeout_s),
        )
    except ImportError:
        pass
    import torch.distributed.distributed_c10d as c10d

    try:
        store, rank, world_size = next(
            c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                            timeout=timedelta(seconds=timeout_s))
        )
        store.set_timeout(timedelta(seconds=timeout_s))
        # SGLang's server side keys the group's store by its name: without the same prefix the
        # two sides never meet and the first broadcast hangs
        store = c10d.PrefixStore(group_name, store)
        helper_args = c10d._new_process_group_helper.__code__.co_varnames
        opt_key = "backend_options" if "backend_options" in helper_args else "pg_options"
        pg, _ = c10d._new_process_group_helper(
            world_size,
            rank,
            [],
            backend,
            store,
            group_name=group_name,
            **{opt_key: None},
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            f"could not create weight-update process group {group_name!r} at "
            f"{master_address}:{master_port} (rank {rank}/{world_size}, {backend}): {exc}"
        ) from exc
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


# ---------------------------------------------------------------------------- disk fallback
class SafetensorsDirWriter:
    """Write one weight version as a loadable HF directory: `root/v{version}`.

    Each bucket becomes one shard; `model.safetensors.index.json` maps names to shards; non-weight
    files (config.json, tokenizer, generation_config) are copied from `template_dir`. Written to
    `root/v{version}.tmp` then renamed (a reader never sees a half-written version). The last
    `keep` versions are kept. Since `update_weights_from_disk` reloads the WHOLE model, the
    version must hold every tensor of the model.

    One writer: `writer(buckets, version) -> dir`. Several writers (one per pipeline stage, on a
    filesystem they all see): the leader calls `begin(version)`, each stage
    `write_shards(buckets, version, stage) -> {name: shard}` (shards `model-pp{stage}-{i:05d}`),
    then the leader `finish(version, [weight maps]) -> dir` (index, rename, prune).
    """

    def __init__(self, root: str, template_dir: Optional[str] = None, keep: int = 2) -> None:
        self.root = root
        self.template_dir = template_dir
        self.keep = max(1, int(keep))

    def __call__(self, buckets: Iterable[Bucket], version: int) -> str:
        self.begin(version)
        return self.finish(version, [self.write_shards(buckets, version)])

    def _tmp(self, version: int) -> str:
        return os.path.join(self.root, f"v{int(version)}.tmp")

    def begin(self, version: int) -> str:
        """Create the (empty) temporary directory of `version` with the template files."""
        tmp = self._tmp(version)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if self.template_dir:
            for fn in os.listdir(self.template_dir):
                src = os.path.join(self.template_dir, fn)
                weights = fn.endswith((".safetensors", ".bin", ".pt")) or fn == "model.safetensors.index.json"
                if os.path.isfile(src) and not weights:
                    shutil.copy2(src, os.path.join(tmp, fn))
        return tmp

    def write_shards(self, buckets: Iterable[Bucket], version: int, stage: Optional[int] = None) -> dict[str, str]:
        """One shard per bucket into the temporary directory; returns {tensor name: shard file}."""
        from safetensors.torch import save_file

        tmp = self._tmp(version)
        if not os.path.isdir(tmp):
            raise FileNotFoundError(f"{tmp} does not exist: begin({version}) must run first (on a filesystem "
                                    f"every writer sees)")
        prefix = "model" if stage is None else f"model-pp{int(stage)}"
        weight_map: dict[str, str] = {}
        for i, bucket in enumerate(buckets):
            shard = f"{prefix}-{i:05d}.safetensors"
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
            save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
        return weight_map

    def finish(self, version: int, weight_maps: Sequence[dict[str, str]]) -> str:
        """Write the index of every writer's shards, rename to `root/v{version}`, prune; returns the dir."""
        from safetensors import safe_open

        tmp, final = self._tmp(version), os.path.join(self.root, f"v{int(version)}")
        weight_map: dict[str, str] = {}
        for wm in weight_maps:
            dup = sorted(set(wm) & set(weight_map))
            if dup:
                raise ValueError(f"tensor {dup[0]} was written by two writers")
            weight_map.update(wm)
        total = 0
        for shard in sorted(set(weight_map.values())):
            with safe_open(os.path.join(tmp, shard), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    total += int(torch.Size(sl.get_shape()).numel()) * _DTYPE_BYTES.get(sl.get_dtype(), 0)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total, "weight_version": int(version)}, "weight_map": weight_map}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._prune(int(version))
        return final

    def _prune(self, version: int) -> None:
        olds = []
        for fn in os.listdir(self.root):
            if fn.startswith("v") and fn[1:].isdigit() and int(fn[1:]) < version:
                olds.append(int(fn[1:]))
        for v in sorted(olds)[: max(0, len(olds) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, f"v{v}"), ignore_errors=True)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}

DiskWriter = Callable[[Iterable[Bucket], int], str]


def supports_stage_writers(writer: Any) -> bool:
    """True when `writer` can take several writers (begin / write_shards / finish)."""
    return all(callable(getattr(writer, m, None)) for m in ("begin", "write_shards", "finish"))
