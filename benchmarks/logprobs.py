"""Benchmark: chunked `token_log_probs` vs the naive fp32 log_softmax + gather (forward + backward).

    python benchmarks/logprobs.py            # T=16384 tokens, V=32768 (a ~1/4.6 shard of Qwen2.5's 152k vocab)
    python benchmarks/logprobs.py --quick    # T=8192, V=32768
    python benchmarks/logprobs.py --tokens 32768 --vocab 38016 --chunk-tokens 2048

TP=1 in one process per variant: `token_log_probs(..., tp_group=None)` needs no torch.distributed
(without an initialised Megatron parallel state it does no communication). Inputs are bf16 logits
[T, V] (leaf, requires_grad) and labels [T]; the loss is sum(w * log p(label)) with fixed random
weights w, so both variants get the same non-trivial upstream gradient.

Naive baseline: torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]) -- what
materialises fp32 [tokens, vocab] tensors (the 58-61 GiB allocations seen on long sequences).

Method: each variant runs in its own fresh subprocess (sequentially, never concurrently). The worker
builds the inputs, warms up on a small slice, then records its RSS as the baseline and samples RSS in a
background thread every ~1 ms (torch ops release the GIL) while it runs forward + backward `--repeats`
times (grads dropped between repetitions). Peak memory = peak RSS - baseline RSS, i.e. everything the
computation allocates including the bf16 gradient of the logits (T*V*2 bytes, needed by both). Time = best
repetition (wall clock; single torch thread by default). The worker then saves log-probs and gradients,
and the parent compares the two variants (max abs difference) and, on the first `--ref-rows` tokens,
each one against a float64 reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------- worker

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS every `interval` seconds in a daemon thread; `.peak` is the max seen."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            r = _rss_bytes()
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def make_inputs(tokens: int, vocab: int, true_vocab: int, scale: float, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g, dtype=torch.bfloat16).mul_(scale)
    labels = torch.randint(0, true_vocab, (tokens,), generator=g)
    weights = torch.randn(tokens, generator=g, dtype=torch.float32)
    return logits, labels, weights


def naive_log_probs(logits, labels, true_vocab: int):
    import torch

    x = logits.float()
    if true_vocab < x.shape[-1]:
        x = x.masked_fill(torch.arange(x.shape[-1]) >= true_vocab, float("-inf"))
    return torch.log_softmax(x, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from fipo_megatron.megatron.logprobs import token_log_probs

    if args.worker == "chunked":
        def fn(x, y):
            return token_log_probs(x, y, true_vocab_size=args.true_vocab, tp_group=None,
                                   chunk_tokens=args.chunk_tokens)
    else:
        def fn(x, y):
            return naive_log_probs(x, y, args.true_vocab)

    logits, labels, weights = make_inputs(args.tokens, args.vocab, args.true_vocab, args.scale, args.seed)
    logits.requires_grad_(True)

    # Warm up (imports, kernels, Megatron parallel-state lookup) on a small slice, then drop everything.
    n_warm = min(args.tokens, 2 * args.chunk_tokens)
    xw = logits.detach()[:n_warm].clone().requires_grad_(True)
    (fn(xw, labels[:n_warm]) * weights[:n_warm]).sum().backward()
    del xw

    times, peak, base = [], 0, 0
    logp = grad = None
    for _ in range(args.repeats):
        logits.grad = None
        logp = None
        base = _rss_bytes()
        with PeakRSS(args.sample_interval) as mon:
            t0 = time.perf_counter()
            logp = fn(logits, labels)
            (logp * weights).sum().backward()
            times.append(time.perf_counter() - t0)
        peak = max(peak, mon.peak - base)
    grad = logits.grad
    torch.save({"logp": logp.detach(), "grad": grad.view(torch.int16)}, args.out)  # int16 view: compact
    print(json.dumps({"times": times, "peak": peak, "base_rss": base}))


# --------------------------------------------------------------------------------------------- parent

def run_variant(variant: str, args, out: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--out", out,
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--true-vocab", str(args.true_vocab),
           "--chunk-tokens", str(args.chunk_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--scale", str(args.scale), "--seed", str(args.seed),
           "--sample-interval", str(args.sample_interval)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"{variant} worker failed (rc={res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(args, out_chunked: str, out_naive: str) -> None:
    import torch

    a, b = torch.load(out_chunked), torch.load(out_naive)
    ga, gb = a["grad"].view(torch.bfloat16), b["grad"].view(torch.bfloat16)
    print(f"max |logp_chunked - logp_naive|          = {(a['logp'] - b['logp']).abs().max().item():.3e}"
          f"   (max |logp| = {b['logp'].abs().max().item():.2f})")
    print(f"max |grad_chunked - grad_naive| (bf16)   = {(ga.float() - gb.float()).abs().max().item():.3e}"
          f"   (bf16 ulp at 1 = {2 ** -7:.1e}; max |grad| = {gb.abs().max().item():.2f})")
    del b
    # float64 reference on the first rows (same inputs, regenerated deterministically)
    logits, labels, weights = make_inputs(args.tokens, args.vocab, args.true_vocab, args.scale, args.seed)
    r = min(args.ref_rows, args.tokens)
    x = logits[:r].double().requires_grad_(True)
    xm = x.masked_fill(torch.arange(args.vocab) >= args.true_vocab, float("-inf")) \
        if args.true_vocab < args.vocab else x
    ref = torch.log_softmax(xm, -1).gather(-1, labels[:r, None]).squeeze(-1)
    (ref * weights[:r].double()).sum().backward()
    for name, lp, g in (("chunked", a["logp"], ga), ("naive", torch.load(out_naive)["logp"], gb)):
        print(f"vs float64 on {r} rows: {name:8s} logp err {(lp[:r].double() - ref).abs().max().item():.3e}"
              f", grad err {(g[:r].double() - x.grad).abs().max().item():.3e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: T=8192, 1 repetition")
    p.add_argument("--tokens", type=int, default=None, help="T (default 16384; 8192 with --quick)")
    p.add_argument("--vocab", type=int, default=32768, help="V: vocab shard width of the logits")
    p.add_argument("--true-vocab", type=int, default=None,
                   help="true vocabulary size (<= V; default V, i.e. no padded ids)")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd repetitions (best of; default 2, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers")
    p.add_argument("--scale", type=float, default=3.0, help="logits = scale * N(0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-rows", type=int, default=256, help="rows checked against a float64 reference")
    p.add_argument("--sample-interval", type=float, default=0.001, help="RSS sampling period (s)")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = 8192 if args.quick else 16384
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.true_vocab is None:
        args.true_vocab = args.vocab
    if not 0 < args.true_vocab <= args.vocab:
        p.error("--true-vocab must be in (0, vocab]")

    if args.worker:
        worker(args)
        return

    t_all = time.perf_counter()
    T, V = args.tokens, args.vocab
    print(f"token_log_probs vs naive fp32 log_softmax+gather, fwd+bwd, TP=1 (tp_group=None, no process group)")
    print(f"T={T} V={V} true_vocab={args.true_vocab} bf16 logits {T * V * 2 / GIB:.2f} GiB "
          f"(fp32 [T,V] = {T * V * 4 / GIB:.2f} GiB), chunk_tokens={args.chunk_tokens}, threads={args.threads}, "
          f"repeats={args.repeats}")
    with tempfile.TemporaryDirectory(prefix="bench_logprobs_") as tmp:
        outs = {v: os.path.join(tmp, f"{v}.pt") for v in ("chunked", "naive")}
        res = {v: run_variant(v, args, outs[v]) for v in ("chunked", "naive")}
        print(f"{'variant':8s} {'best time (s)':>14s} {'all times (s)':>22s} {'peak RSS - base (GiB)':>22s}")
        for v in ("chunked", "naive"):
            r = res[v]
            print(f"{v:8s} {min(r['times']):14.3f} {' '.join(f'{t:.2f}' for t in r['times']):>22s} "
                  f"{r['peak'] / GIB:22.2f}")
        tc, tn = min(res["chunked"]["times"]), min(res["naive"]["times"])
        mc, mn = res["chunked"]["peak"], res["naive"]["peak"]
        print(f"ratios (chunked / naive): time {tc / tn:.2f}x, peak memory {mc / mn:.3f}x "
              f"(naive uses {mn / max(mc, 1):.1f}x the memory; {(mn - mc) / GIB:.2f} GiB saved)")
        compare(args, outs["chunked"], outs["naive"])
    print(f"total wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
