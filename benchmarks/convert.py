"""Conversion benchmark: throughput (GB/s) and peak memory of fipo-convert on a synthetic checkpoint.

    python benchmarks/convert.py --size-gb 2.5 [--workdir /tmp/fipo-bench] [--keep]

1. Writes a synthetic Qwen2-shaped HF checkpoint (Qwen2.5-3B widths: hidden 2048, 16 heads,
   2 KV groups, ffn 11008, vocab 151936, tied; the number of layers is chosen to reach --size-gb)
   with random bf16 data, streamed tensor by tensor into 1 GB shards + index.
2. Runs `fipo-convert hf-to-mcore --tp 1` and `fipo-convert mcore-to-hf` as child processes and
   samples, every 20 ms, the resident memory of the child and all its descendants
   (dist_checkpointing writes from forked helpers): total RSS and its anonymous part (RssAnon,
   i.e. memory that is not clean, droppable file cache such as the memory-mapped staging file).
3. Checks a few tensors of the round trip bit for bit and prints GB/s (checkpoint bytes / wall time
   of the child, interpreter start and imports included) and the peak memories, also as a fraction
   of the checkpoint size and of the largest single tensor.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fipo_megatron.convert.mapping import QwenDims, expected_hf_shapes  # noqa: E402
from fipo_megatron.convert.mcore_to_hf import hf_name_order  # noqa: E402
from fipo_megatron.convert.safetensors_io import SafetensorsIndex, ShardedSafetensorsWriter  # noqa: E402

from fipo_megatron.models.qwen25 import QWEN25_PRESETS  # noqa: E402

# Qwen2.5-3B widths from the ONE preset table; the number of layers is chosen by make_config.
BASE = {k: v for k, v in QWEN25_PRESETS["3B"].items() if k != "num_hidden_layers"}


def make_config(size_gb: float) -> dict:
    one = expected_hf_shapes(QwenDims.from_hf_config({**BASE, "num_hidden_layers": 1}))
    per_layer = sum(torch.Size(s).numel() for n, s in one.items() if n.startswith("model.layers.")) * 2
    fixed = sum(torch.Size(s).numel() for n, s in one.items() if not n.startswith("model.layers.")) * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return {**BASE, "num_hidden_layers": layers}


def write_synthetic(hf_dir: str, cfg: dict) -> int:
    import json

    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    dims = QwenDims.from_hf_config(cfg)
    shapes = expected_hf_shapes(dims)
    specs = [(n, shapes[n], torch.bfloat16) for n in hf_name_order(dims)]
    w = ShardedSafetensorsWriter(hf_dir, specs, max_shard_bytes=10**9)
    g = torch.Generator().manual_seed(0)
    for name, shape, _ in specs:
        w.write(name, torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16))
    w.close()
    return w.total_size


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; sample RSS / RssAnon of its process tree every 20 ms."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0, "rss_one": 0, "anon_one": 0}
    stop = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = [p.memory_info().rss for p in procs]
                peak["rss"] = max(peak["rss"], sum(rss))
                peak["rss_one"] = max(peak["rss_one"], max(rss))
                anon = [_anon_kb(p.pid) * 1024 for p in procs]
                peak["anon"] = max(peak["anon"], sum(anon))
                peak["anon_one"] = max(peak["anon_one"], max(anon))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {**peak, "wall": time.time() - t0, "log": out.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.5, help="synthetic checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="fipo-convert-bench-")
    os.makedirs(work, exist_ok=True)
    hf, mc, hf2 = (os.path.join(work, n) for n in ("hf", "mcore", "hf2"))
    for p in (hf, mc, hf2):
        shutil.rmtree(p, ignore_errors=True)
    try:
        cfg = make_config(args.size_gb)
        t = time.time()
        nbytes = write_synthetic(hf, cfg)
        gb = nbytes / 1e9
        largest = max(torch.Size(s).numel() for s in expected_hf_shapes(QwenDims.from_hf_config(cfg)).values()) * 2
        print(f"synthetic checkpoint: {cfg['num_hidden_layers']} layers, {gb:.2f} GB bf16, largest tensor "
              f"{largest / 1e9:.2f} GB, written in {time.time() - t:.1f}s")
        cli = [sys.executable, "-m", "fipo_megatron.tools_cli"]
        runs = {
            "hf-to-mcore (tp=1)": run_measured(cli + ["hf-to-mcore", "--hf-dir", hf, "--out", mc, "--tp", "1"]),
            "mcore-to-hf": run_measured(cli + ["mcore-to-hf", "--mcore-dir", mc, "--out", hf2, "--hf-dir", hf,
                                               "--max-shard-size", "1GB"]),
        }
        a, b = SafetensorsIndex(hf), SafetensorsIndex(hf2)
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                     f"model.layers.{cfg['num_hidden_layers'] - 1}.mlp.up_proj.weight", "model.norm.weight"):
            assert torch.equal(a.get(name), b.get(name)), f"round trip differs in {name}"
        print("round trip: sampled tensors bit-identical")
        print(f"{'step':<20} {'wall s':>7} {'GB/s':>6} {'RSS sum':>8} {'RSS max1':>9} {'anon sum':>9} "
              f"{'anon max1':>10} {'anon/ckpt':>10}")
        for step, r in runs.items():
            print(f"{step:<20} {r['wall']:>7.1f} {gb / r['wall']:>6.2f} {r['rss'] / 1e9:>8.2f} "
                  f"{r['rss_one'] / 1e9:>9.2f} "
                  f"{r['anon'] / 1e9:>9.2f} {r['anon_one'] / 1e9:>10.2f} {r['anon'] / nbytes:>10.2f}")
            print(f"    {r['log']}")
        print("(GB; peaks sampled every 20 ms. 'sum' = all processes of the step (dist_checkpointing writes from "
              "forked helpers, whose copy-on-write pages are counted twice), 'max1' = the largest single process. "
              "anon = RSS minus clean file-backed pages (memory-mapped HF shards / staging file), which the kernel "
              "drops under pressure.)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
