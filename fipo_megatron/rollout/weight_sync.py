"""Streaming, bucketed weight push from the trainer to a rollout engine.

The trainer builds `named_tensors` with `convert.mapping.iter_hf_tensors(...)`: a generator of
(HF name, full tensor) that runs collectives (TP gather, PP broadcast) while it is consumed, so
EVERY rank must iterate it to the end, but only the rank holding the gathered tensors (the
"source", usually global rank 0 or the first rank of each PP stage) talks to the engine.
`push_weights(..., is_source=False)` therefore just drains the stream.

Nothing here materialises the whole model: `bucketize` holds at most one bucket of tensors.

Also here: the NCCL broadcast side of SGLang's `update_weights_from_distributed` (the trainer rank
is rank 0 of a process group it shares with the server's workers) and a safetensors directory
writer for the `update_weights_from_disk` fallback.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024  # what slime/verl use; per-tensor pushes are ~10x slower

NamedTensors = Iterable[tuple[str, Tensor]]
Bucket = list[tuple[str, Tensor]]


def tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def bucketize(named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """Group a stream of (name, tensor) into lists whose total bytes are <= bucket_bytes.

    Order is preserved. A tensor larger than bucket_bytes is yielded alone in its own bucket.
    Streaming: a bucket is yielded as soon as the next tensor would overflow it.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nb = tensor_nbytes(tensor)
        if bucket and size + nb > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nb
    if bucket:
        yield bucket


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
    """Where the trainer's weight-update group (SGLang or vLLM servers) rendezvous; trainer = rank 0.

    `workers_per_server[i]` = GPUs of server i (tp * dp); server i's workers get ranks
    1 + sum(workers_per_server[:i]) ... ; world_size = 1 + sum(workers_per_server).
    `device`: where the trainer puts each tensor before broadcasting ("cuda" for NCCL).
    """

    master_address: str
    master_port: int
    workers_per_server: Sequence[int]
    group_name: str = "fipo_weight_update"
    backend: str = "nccl"
    device: str = "cuda"

    @property
    def world_size(self) -> int:
        return 1 + sum(int(w) for w in self.workers_per_server)

    def rank_offsets(self) -> list[int]:
        offs, acc = [], 1
        for w in self.workers_per_server:
            offs.append(acc)
            acc += int(w)
        return offs


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

    Each bucket becomes one shard `model-{i:05d}.safetensors`; `model.safetensors.index.json`
    maps names to shards; non-weight files (config.json, tokenizer, generation_config) are copied
    from `template_dir`. Written to `root/v{version}.tmp` then renamed (a reader never sees a
    half-written version). The last `keep` versions are kept. Since `update_weights_from_disk`
    reloads the WHOLE model, the stream must hold every tensor of the model.
    """

    def __init__(self, root: str, template_dir: Optional[str] = None, keep: int = 2) -> None:
        self.root = root
        self.template_dir = template_dir
        self.keep = max(1, int(keep))

    def __call__(self, buckets: Iterable[Bucket], version: int) -> str:
        from safetensors.torch import save_file

        final = os.path.join(self.root, f"v{int(version)}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if self.template_dir:
            for fn in os.listdir(self.template_dir):
                src = os.path.join(self.template_dir, fn)
                weights = fn.endswith((".safetensors", ".bin", ".pt")) or fn == "model.safetensors.index.json"
                if os.path.isfile(src) and not weights:
                    shutil.copy2(src, os.path.join(tmp, fn))
        weight_map: dict[str, str] = {}
        total = 0
        for i, bucket in enumerate(buckets):
            shard = f"model-{i:05d}.safetensors"
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
            save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = shard
                total += tensor_nbytes(t)
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


DiskWriter = Callable[[Iterable[Bucket], int], str]
