"""Buckets of HF-named tensors for the weight push: cutting a stream into buckets, flattening one
bucket into contiguous buffers, and sending buckets on a background thread.

- `bucketize(stream, bucket_bytes)`: lists of (name, tensor) of at most `bucket_bytes` each (a larger
  tensor alone), order kept, streaming (at most one bucket held).
- `flatten_by_dtype(bucket)`: one contiguous 1-D buffer per dtype, the tensors of that dtype in bucket
  order (SGLang's `load_format="flattened_bucket"` receives one such buffer per request and rebuilds
  the tensors as views by numel offsets); `unflatten` is the receiving side.
- `packed_chunks(bucket, buffer_bytes)`: vLLM's packed NCCL wire format (>= 0.28, `packed` in the
  init info): each tensor as raw bytes, concatenated; a chunk is closed as soon as its size EXCEEDS
  `buffer_bytes` (so it ends with the tensor that crossed the limit), the rest is the last chunk.
  vLLM's receiver (`packed_nccl_broadcast_consumer`) cuts the announced (name, shape, dtype) list by
  the same rule, so both sides agree on every chunk's size without sending it.
- `send_overlapped(buckets, send, overlap=True)`: `send(bucket)` for each bucket, bucket k on one
  background thread while the caller's thread builds bucket k+1 (the stream's collectives, TP
  gather and HF conversion, stay on the caller's thread). At most two buckets are alive: the one
  being sent and the one being built; the builder waits for the previous send before handing over.
  The first send error stops sending and is raised once the in-flight send returned.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from .device_threads import start_daemon

NamedTensors = Iterable[tuple[str, Tensor]]
Bucket = list[tuple[str, Tensor]]


def tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def bucketize(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[Bucket]:
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


def flatten_by_dtype(bucket: Bucket, device: str | torch.device = "cpu") -> list[tuple[Bucket, Tensor]]:
    """[(the bucket's tensors of one dtype, in order; their concatenated flat buffer on `device`)],
    dtypes in order of first appearance. The buffer has that dtype and sum(numel) elements."""
    groups: dict[torch.dtype, Bucket] = {}
    for name, t in bucket:
        groups.setdefault(t.dtype, []).append((name, t))
    out = []
    for items in groups.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for _, t in items])
        out.append((items, flat))
    return out


def unflatten(flat: Tensor, shapes: list[list[int]]) -> list[Tensor]:
    """Views of `flat` with the given shapes, in order (the receiving side of `flatten_by_dtype`)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat buffer has {flat.numel()} elements, the shapes need {sum(sizes)}")
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]


def packed_chunks(bucket: Bucket, buffer_bytes: int,
                  device: str | torch.device = "cpu") -> list[tuple[list[str], Tensor]]:
    """[(names, uint8 buffer)] cut like vLLM's packed receiver (see the module docstring)."""
    if buffer_bytes <= 0:
        raise ValueError(f"buffer_bytes must be > 0, got {buffer_bytes}")
    chunks: list[tuple[list[str], Tensor]] = []
    names: list[str] = []
    parts: list[Tensor] = []
    total = 0
    for name, t in bucket:
        raw = t.detach().to(device).contiguous().view(-1).view(torch.uint8)
        names.append(name)
        parts.append(raw)
        total += raw.numel()
        if total > buffer_bytes:
            chunks.append((names, torch.cat(parts)))
            names, parts, total = [], [], 0
    if parts:
        chunks.append((names, torch.cat(parts)))
    return chunks


def send_overlapped(buckets: Iterable[Bucket], send: Callable[[Bucket], None], *, overlap: bool = True,
                    thread_name: str = "weight-send") -> int:
    """Call `send(bucket)` for every bucket (see the module docstring); returns the number sent."""
    if not overlap:
        n = 0
        for bucket in buckets:
            send(bucket)
            n += 1
            del bucket  # not held while the next bucket is built
        return n
    state: dict = {}
    done = threading.Event()
    done.set()
    count = 0

    def run(b: Bucket) -> None:
        try:
            send(b)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            state["error"] = exc
        finally:
            done.set()

    def wait_previous() -> None:
        done.wait()
        if "error" in state:
            raise state["error"]

    try:
        for bucket in buckets:
            wait_previous()
            done.clear()
            start_daemon(run, bucket, name=thread_name)
            count += 1
            del bucket  # the sender thread holds the only reference: freed as soon as it is sent
        wait_previous()
    except BaseException:
        done.wait()  # never leave a send running behind the caller's error handling
        raise
    return count
