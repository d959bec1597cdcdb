"""Peak memory of one bf16 micro-batch through the real model wrapper, fp32 logits vs bf16 logits (CPU).

A Qwen2-shaped model with Qwen2.5's vocabulary (151,936; hidden 64, 2 layers so that the logits
dominate) is built by the trainer's own ``build_model`` in bf16 (Megatron's ``Float16Module`` + DDP), and
one micro-batch of T tokens runs forward + backward through the trainer's log-prob code
(``token_log_probs`` with entropy, fp32 work in 4,096-token chunks):

  before: ``model(..., fp32_output=True)`` (Megatron's default): the whole [T, V] output is upcast to fp32;
  after:  ``forward_logits`` (what the trainer calls): ``fp32_output=False``, bf16 logits.

Each variant runs in its own process (RSS does not shrink reliably); the peak is the process RSS sampled
every millisecond, minus the RSS just before the forward. Prints both and their ratio.

    python benchmarks/bf16_logits.py [--tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 1024 ** 3
HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
          vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
          max_position_embeddings=32768)


def worker(variant: str, tokens: int) -> dict:
    import torch
    import torch.distributed as dist

    from logprobs import PeakRSS, _rss_bytes
    from fipo_megatron.megatron.logprobs import token_log_probs
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.megatron.qwen import build_model, forward_logits

    store = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    initialize_parallel(1, 1, 1, seed=0)
    model = build_model(HF, params_dtype=torch.bfloat16, wrap_ddp=True, seq_length=tokens)[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, HF["vocab_size"], (1, tokens), generator=gen)
    labels = torch.roll(ids, -1, 1)
    pos = torch.arange(tokens)[None]
    base = _rss_bytes()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        if variant == "before":
            mask = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1)[None, None]
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, fp32_output=True)
        else:
            logits = forward_logits(model, ids, pos)
        logp, ent = token_log_probs(logits, labels, true_vocab_size=HF["vocab_size"], with_entropy=True)
        (-logp.sum() / tokens).backward()
    return {"variant": variant, "logits_dtype": str(logits.dtype), "peak_gib": (peak.peak - base) / GIB,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(worker(args.variant, args.tokens)), flush=True)
        return 0
    res = {}
    for variant in ("before", "after"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True).stdout
        res[variant] = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    logits_gib = args.tokens * HF["vocab_size"] * 2 / GIB
    print(f"T={args.tokens} tokens x V={HF['vocab_size']}: bf16 logits alone {logits_gib:.2f} GiB")
    for v in ("before", "after"):
        r = res[v]
        print(f"  {v:<6} ({r['logits_dtype']:>14} logits): peak +{r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s")
    print(f"  after / before peak: {res['after']['peak_gib'] / res['before']['peak_gib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
