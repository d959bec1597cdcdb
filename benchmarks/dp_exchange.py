"""Bytes exchanged between data-parallel ranks for one step's old log-probs, before and after (DP=2, CPU).

Before: ``Actor.compute_log_probs`` (what the loop used): each DP rank computes its share and every
rank's log-probs are all-gathered as pickled Python floats, so every rank receives the whole batch's.
After: ``Actor.fill_log_probs`` (what the loop uses): each rank keeps its share's log-probs; only metric
sums, counts and maxima cross ranks.

The bytes are counted where they are sent, in this process, by wrapping ``dist.all_gather_object``
(pickled payload) and ``dist.all_reduce`` / ``dist.all_gather`` (tensor bytes), on a tiny Qwen2 with
many response tokens (the payload is per token; the model size does not matter).

    python benchmarks/dp_exchange.py [--samples 64] [--response 256]
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CFG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
           vocab_size=64, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False, max_position_embeddings=512)


def _worker(rank: int, world: int, n: int, resp: int) -> dict:
    import torch
    import torch.distributed as dist

    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.parallel.packing import RLSample
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    initialize_parallel(1, 1, 1, seed=0)
    cfg = parse_args(["--max-prompt-length", "16", "--max-response-length", str(resp),
                      "--max-tokens-per-micro-batch", "4096", "--output-dir", "/tmp/dp_exchange"], validate=False)
    actor = Actor(cfg, CFG)
    g = torch.Generator().manual_seed(0)
    samples = [RLSample(torch.randint(1, 64, (16,), generator=g).tolist(),
                        torch.randint(1, 64, (resp,), generator=g).tolist(), advantage=1.0,
                        engine_log_prob=[-1.0] * resp) for _ in range(n)]
    sent = {"bytes": 0}
    real = {name: getattr(dist, name) for name in ("all_gather_object", "all_reduce", "all_gather")}

    def gather_object(out, obj, group=None):
        sent["bytes"] += len(pickle.dumps(obj))
        return real["all_gather_object"](out, obj, group=group)

    def reduce(t, *a, **k):
        sent["bytes"] += t.numel() * t.element_size()
        return real["all_reduce"](t, *a, **k)

    def gather(out, t, *a, **k):
        sent["bytes"] += t.numel() * t.element_size()
        return real["all_gather"](out, t, *a, **k)

    dist.all_gather_object, dist.all_reduce, dist.all_gather = gather_object, reduce, gather
    try:
        actor.compute_log_probs(samples)
        before = sent["bytes"]
        sent["bytes"] = 0
        actor.fill_log_probs(samples, n // 2)
        after = sent["bytes"]
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return {"before": before, "after": after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    args = ap.parse_args(argv)
    from fipo_megatron.testing.distributed import run_distributed

    res = run_distributed(_worker, 2, args.samples, args.response)
    tokens = args.samples * args.response
    b = sum(r["before"] for r in res)
    a = sum(r["after"] for r in res)
    print(f"DP=2, {args.samples} responses x {args.response} tokens = {tokens} response tokens per step")
    print(f"  before (all-gathered pickled log-probs): {b:,} bytes sent by the 2 ranks ({b / tokens:.1f} B/token)")
    print(f"  after  (each rank keeps its share):      {a:,} bytes sent by the 2 ranks")
    print(f"  ratio: {b / max(a, 1):,.0f}x less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
