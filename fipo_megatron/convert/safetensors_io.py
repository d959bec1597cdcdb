"""Streaming safetensors reading and writing, one tensor at a time.

File format: 8-byte little-endian header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
buffer; offsets are relative to the buffer start and must tile it without gaps.

`SafetensorsIndex(hf_dir)` reads `model.safetensors.index.json` (or a single `model.safetensors`),
checks that every shard exists and that every header is well-formed and consistent with the file
size (a truncated file is an error naming the file and tensor). `get(name)` reads one tensor into
owned memory with a plain `readinto`; `view(name)` returns a zero-copy read-only view of a memory
map of the file (for tensors that are copied unchanged).

`ShardedSafetensorsWriter` plans shards up front from the (name, shape, dtype) list (like
`save_pretrained(max_shard_size=...)`: files `model-0000k-of-0000n.safetensors` filled in order
until the next tensor would exceed the size), writes each header first and then streams the
tensors in declared order; `close()` writes `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import torch

from .validate import ConversionError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_header(path: str) -> tuple[dict, int]:
    """Return (header without __metadata__, data start offset), validating against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, meta in header.items():
        b, e = meta["data_offsets"]
        if meta["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor '{name}' has unsupported dtype {meta['dtype']}")
        numel = 1
        for s in meta["shape"]:
            numel *= s
        if e - b != numel * DTYPES[meta["dtype"]].itemsize:
            raise ConversionError(f"{path}: tensor '{name}' byte range does not match its shape")
        if e > data_len:
            raise ConversionError(f"{path}: truncated safetensors file: tensor '{name}' ends at byte {e} "
                                  f"of the data section, the file holds only {data_len}")
    return header, 8 + n


class SafetensorsIndex:
    """All tensors of an HF checkpoint directory, read lazily one at a time."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_NAME)):
            weight_map = None
        else:
            raise ConversionError(f"{hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        self._entries: dict[str, tuple[str, dict, int]] = {}
        self._maps: dict = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.isfile(path):
                raise ConversionError(f"missing shard file {path} (listed in {INDEX_NAME})")
            header, start = _read_header(path)
            for name, meta in header.items():
                self._entries[name] = (path, meta, start)
        if weight_map:
            for name, fname in weight_map.items():
                if name not in self._entries or os.path.basename(self._entries[name][0]) != fname:
                    raise ConversionError(f"{INDEX_NAME} lists '{name}' in {fname}, but that file does not hold it")

    def names(self) -> list[str]:
        return list(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(m["shape"]) for n, (_, m, _) in self._entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name][1]["dtype"]]

    def total_bytes(self) -> int:
        return sum(m["data_offsets"][1] - m["data_offsets"][0] for _, m, _ in self._entries.values())

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy, read-only tensor over the file's bytes (a memory map; pages are clean file
        cache, read on access). Do not write to it."""
        import mmap
        import warnings

        if name not in self._entries:
            raise ConversionError(f"tensor '{name}' not found in {self.hf_dir}")
        path, meta, start = self._entries[name]
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        b, e = meta["data_offsets"]
        dtype = DTYPES[meta["dtype"]]
        if e == b:
            return torch.empty(meta["shape"], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer"
            t = torch.frombuffer(self._maps[path], dtype=dtype, count=(e - b) // dtype.itemsize, offset=start + b)
        return t.reshape(meta["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh (owned, writable) memory."""
        if name not in self._entries:
            raise ConversionError(f"tensor '{name}' not found in {self.hf_dir}")
        path, meta, start = self._entries[name]
        b, e = meta["data_offsets"]
        buf = bytearray(e - b)
        with open(path, "rb") as f:
            f.seek(start + b)
            got = f.readinto(buf)
        if got != e - b:
            raise ConversionError(f"{path}: truncated while reading tensor '{name}'")
        dtype = DTYPES[meta["dtype"]]
        if not buf:
            return torch.empty(meta["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class ShardedSafetensorsWriter:
    """Write a planned list of tensors as HF-style shards, streaming tensor by tensor."""

    def __init__(self, out_dir: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in specs:
            nb = _nbytes(spec[1], spec[2])
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nb
        self._shards = shards
        n = len(shards)
        self._files = ([SINGLE_NAME] if n == 1 else
                       [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self._order = [(k, spec) for k, shard in enumerate(shards) for spec in shard]
        self._pos = 0
        self._fh = None
        self._cur = -1
        self.total_size = sum(_nbytes(s[1], s[2]) for s in specs)

    def _open(self, k: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self._shards[k]:
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(os.path.join(self.out_dir, self._files[k]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._cur = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the next planned (name, shape, dtype)."""
        if self._pos >= len(self._order):
            raise ConversionError(f"unplanned tensor '{name}' written after all planned tensors")
        k, (pname, shape, dtype) = self._order[self._pos]
        if name != pname or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(f"tensor '{name}' {tuple(tensor.shape)} {tensor.dtype} written where "
                                  f"'{pname}' {tuple(shape)} {dtype} was planned")
        if k != self._cur:
            self._open(k)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._fh.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self._pos += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the shard file names."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            raise ConversionError(f"tensor '{missing}' was never written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self._files) > 1:
            weight_map = {name: self._files[k] for k, (name, _, _) in self._order}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)
        return list(self._files)
