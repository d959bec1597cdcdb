"""Future-KL under context parallelism: distributed reverse prefix sum vs all-gathering log-probs.

For B sequences of length L at CP in {2, 4, 8} (one gloo process per CP rank on this machine), prints
per rank:
  - payload: what the rank contributes to the collective (ours: `payload_floats_per_rank` float64
    values = 2 chunks x S sequences x (1 [+1 average] [+K window prefixes]); baseline: its T/CP
    float32 log-prob shifts, after which every rank holds the whole stream and runs future_kl on it);
  - sent: bytes the rank puts on the wire in a ring all_gather, (CP - 1) x payload;
  - time: median wall time of the whole Future-KL (local compute + collective), max over ranks.
Both results are compared (max abs difference) as a sanity check. Timings under gloo on a shared
2-core CPU measure the method's overheads, not NCCL bandwidth; the byte counts are exact.

    python benchmarks/cp_future_kl.py [--batch 8] [--length 4096] [--cp 2 4 8] [--window W] [--average]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from fipo_megatron.algo.future_kl import future_kl
from fipo_megatron.parallel.cp_future_kl import cp_future_kl, payload_floats_per_rank
from fipo_megatron.parallel.cp_shard import make_cp_layout
from fipo_megatron.testing.distributed import run_distributed


def _stream(batch, length, cp, seed=0):
    g = torch.Generator().manual_seed(seed)
    mult = 2 * cp
    plen = -(-length // mult) * mult
    cu = torch.arange(batch + 1, dtype=torch.int32) * plen
    delta = torch.randn(batch * plen, generator=g) * 0.5
    mask = torch.zeros(batch * plen, dtype=torch.bool)
    for s in range(batch):
        prompt = length // 8
        mask[s * plen + prompt:s * plen + length - 1] = torch.rand(length - 1 - prompt, generator=g) < 0.9
    return cu, delta, mask


def _bench(rank, world, batch, length, decay, window, average, repeats):
    cu, delta, mask = _stream(batch, length, world)
    layout = make_cp_layout(cu, world, rank)
    d, m = delta[layout.global_index], mask[layout.global_index]
    kw = dict(start="current", window=window, average=average)

    def ours():
        return cp_future_kl(d, m, decay, layout, None, **kw)

    where = torch.cat([make_cp_layout(cu, world, r).global_index for r in range(world)])

    def baseline():
        parts = [torch.empty_like(d) for _ in range(world)]
        dist.all_gather(parts, d)  # the current log-prob shifts; mask / old log-probs assumed resident
        full = torch.empty_like(delta)
        full[where] = torch.cat(parts)
        return future_kl(full, mask, decay, cu_seqlens=cu, **kw)[layout.global_index]

    times = {}
    for name, fn in (("ours", ours), ("allgather", baseline)):
        fn()
        ts = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        times[name] = (statistics.median(ts), out)
    diff = float((times["ours"][1] - times["allgather"][1]).abs().max())
    return {"t_ours": times["ours"][0], "t_all": times["allgather"][0], "diff": diff,
            "local_tokens": layout.num_local_tokens, "cmax": int(layout.chunk_lens.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--decay", type=float, default=32.0)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--average", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"B={a.batch} L={a.length} decay={a.decay} window={a.window} average={a.average} (gloo, CPU)")
    hdr = (f"{'CP':>3} {'method':>10} {'payload B/rank':>15} {'sent B/rank':>12} {'time ms':>9} "
           f"{'bytes ratio':>11} {'time ratio':>10} {'max|diff|':>9}")
    print(hdr)
    print("-" * len(hdr))
    for cp in a.cp:
        res = run_distributed(_bench, cp, a.batch, a.length, a.decay, a.window, a.average, a.repeats)
        ours_b = payload_floats_per_rank(a.batch, res[0]["cmax"], window=a.window, average=a.average) * 8
        all_b = res[0]["local_tokens"] * 4
        t_o = max(r["t_ours"] for r in res) * 1e3
        t_a = max(r["t_all"] for r in res) * 1e3
        diff = max(r["diff"] for r in res)
        print(f"{cp:>3} {'ours':>10} {ours_b:>15,} {(cp - 1) * ours_b:>12,} {t_o:>9.2f} "
              f"{all_b / ours_b:>10.0f}x {t_a / t_o:>9.2f}x {diff:>9.1e}")
        print(f"{cp:>3} {'allgather':>10} {all_b:>15,} {(cp - 1) * all_b:>12,} {t_a:>9.2f}")


if __name__ == "__main__":
    main()
