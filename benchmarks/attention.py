"""Benchmark: core attention forward + backward on CPU, Megatron's local `DotProductAttention` vs
`fipo_megatron.megatron.attention.SDPAttention` (torch SDPA), at several sequence lengths.

    python benchmarks/attention.py                 # s = 512, 1024, 2048, 4096
    python benchmarks/attention.py --quick         # s = 256, 512, 1024
    python benchmarks/attention.py --seqlens 8192 --heads 28 --groups 4

Shapes are one TP rank of a GQA model (default 16 query heads, 2 K/V groups, head dim 128, fp32,
like Qwen2.5-7B's 28:4 at TP ~2). Two layouts per length s:
- bshd: one causal sequence of s tokens. Local: Megatron's explicit [1, 1, s, s] boolean mask
  (what it needs); SDPA: no mask (``is_causal``).
- thd: 8 uneven sequences totalling s tokens. SDPA: packed THD (one stream, per-sequence causal
  kernel calls); local: the same sequences right-padded to a [8, max_len] BSHD batch with a causal
  mask (the only way the local attention can run them).

Method: every (variant, layout, s) runs in its own fresh subprocess (one torch thread, glibc
`MALLOC_MMAP_THRESHOLD_` fixed at 128 KiB so freed large buffers go back to the OS). The worker
builds q / k / v (leaf tensors), runs one warm-up forward + backward, records its RSS, then samples
RSS every ~1 ms in a thread while it runs `--repeats` forward + backward passes (loss = sum(out * w)).
Peak = peak RSS - the RSS before the timed passes: what attention allocates (scores, probabilities,
their gradients, mask, outputs, q/k/v gradients). Time = best repetition. Each worker also reports
the checksum sum(out * w) so the two variants can be compared (relative difference printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lengths(total: int, n: int = 8) -> list[int]:
    """n uneven lengths (ratios 1..n) summing to `total`."""
    w = list(range(1, n + 1))
    out = [total * x // sum(w) for x in w]
    out[-1] += total - sum(out)
    return out


def worker(variant: str, layout: str, s: int, heads: int, groups: int, dim: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fipo_megatron.megatron.attention import SDPAttention
    from fipo_megatron.megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, 1, seed=0)
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
                            use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
                            masked_softmax_fusion=False)
    cls = SDPAttention if variant == "sdpa" else DotProductAttention
    attn = cls(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(0)
    lens = _lengths(s) if layout == "thd" else [s]
    # the same values for both variants: a packed stream [s, ...], laid out as [max_len, n, ...] for BSHD
    q0, w0 = torch.randn(s, heads, dim, generator=g), torch.randn(s, heads * dim, generator=g)
    k0, v0 = torch.randn(s, groups, dim, generator=g), torch.randn(s, groups, dim, generator=g)
    kw: dict = {}
    mask = None
    if layout == "thd" and variant == "sdpa":
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        kw["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                  cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                                                  max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    else:
        m = max(lens)
        if variant == "local":
            mask = torch.triu(torch.ones(m, m, dtype=torch.bool), 1)[None, None]

        def to_bshd(x):  # right-pad every sequence to m (padding: zeros, weight 0)
            out = x.new_zeros((m, len(lens)) + tuple(x.shape[1:]))
            for i, piece in enumerate(x.split(lens)):
                out[:piece.shape[0], i] = piece
            return out

        q0, k0, v0, w0 = (to_bshd(x) for x in (q0, k0, v0, w0))
    q, k, v = (x.requires_grad_(True) for x in (q0, k0, v0))
    w = w0

    def step() -> float:
        out = attn(q, k, v, mask, **kw)
        loss = (out * w).sum()
        loss.backward()
        for t in (q, k, v):
            t.grad = None
        return float(loss)

    step()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times, check = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        check = step()
        times.append(time.perf_counter() - t0)
    stop.set()
    th.join()
    dist.destroy_process_group()
    return {"time_s": min(times), "peak_mib": (peak[0] - base) / 2**20, "check": check}


def run_one(variant: str, layout: str, s: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(
        [variant, layout, s, args.heads, args.groups, args.dim, args.repeats])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{variant}/{layout}/s={s} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--quick", action="store_true", help="s = 256, 512, 1024")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", nargs="+", default=["bshd", "thd"], choices=["bshd", "thd"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.quick:
        args.seqlens = [256, 512, 1024]
    import torch

    print(f"torch {torch.__version__}, CPU, 1 thread, fp32; heads {args.heads}, K/V groups {args.groups}, "
          f"head dim {args.dim}; forward + backward, best of {args.repeats}")
    print(f"{'layout':6} {'s':>6} | {'local ms':>9} {'sdpa ms':>9} {'speedup':>8} | {'local MiB':>10} "
          f"{'sdpa MiB':>9} {'mem ratio':>9} | rel diff")
    for layout in args.layouts:
        for s in args.seqlens:
            a, b = run_one("local", layout, s, args), run_one("sdpa", layout, s, args)
            diff = abs(a["check"] - b["check"]) / max(abs(a["check"]), 1e-30)
            print(f"{layout:6} {s:6d} | {a['time_s'] * 1e3:9.1f} {b['time_s'] * 1e3:9.1f} "
                  f"{a['time_s'] / b['time_s']:7.2f}x | {a['peak_mib']:10.1f} {b['peak_mib']:9.1f} "
                  f"{a['peak_mib'] / max(b['peak_mib'], 1e-3):8.1f}x | {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
