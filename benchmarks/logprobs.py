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

Method: each variant runs in its own fresh subprocess (naive first, then chunked; never concurrently).
The worker builds the inputs, warms up on a small slice, records its RSS as the baseline and samples RSS
in a background thread every ~1 ms (torch ops release the GIL) while it runs forward + backward
`--repeats` times (grads dropped between repetitions). Peak memory = peak RSS - baseline RSS: everything
the computation allocates, including the bf16 gradient of the logits (T*V*2 bytes, needed by both).
Time = best repetition, wall clock (single torch thread by default), with its user/sys CPU split: on
CPU, first-touch page faults of large fresh allocations are a big share (the sys part), paid by both
variants (the chunked one re-allocates its fp32 chunk temporaries every chunk); a GPU caching allocator
does not pay this, so treat the times as indicative and the memory as the figure of merit. The naive
worker dumps its log-probs and gradients (to /dev/shm when available); the chunked worker compares
against them (max abs difference) and checks both against float64 on the first `--ref-rows` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16).normal_(0.0, scale, generator=g)
    labels = torch.randint(0, true_vocab, (tokens,), generator=g)
    weights = torch.randn(tokens, generator=g, dtype=torch.float32)
    return logits, labels, weights


def naive_log_probs(logits, labels, true_vocab: int):
    import torch

    x = logits.float()
    if true_vocab < x.shape[-1]:
        x = x.masked_fill(torch.arange(x.shape[-1]) >= true_vocab, float("-inf"))
    return torch.log_softmax(x, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def _paths(tmp: str, variant: str) -> tuple[str, str]:
    return os.path.join(tmp, f"{variant}_logp.bin"), os.path.join(tmp, f"{variant}_grad.bin")


def _compare(args, logits, labels, weights, logp, grad) -> dict:
    """Chunked results (this process) vs the naive worker's saved ones, and both vs float64 on a few rows."""
    import torch

    lp_path, g_path = _paths(args.tmp, "naive")
    T, V = logits.shape
    n_logp = torch.from_file(lp_path, size=T, dtype=torch.float32)
    n_grad = torch.from_file(g_path, size=T * V, dtype=torch.bfloat16).view(T, V)
    gdiff = 0.0
    for i in range(0, T, 1024):
        gdiff = max(gdiff, (grad[i:i + 1024].float() - n_grad[i:i + 1024].float()).abs().max().item())
    res = {"logp_diff": (logp - n_logp).abs().max().item(), "grad_diff": gdiff,
           "max_abs_logp": n_logp.abs().max().item(), "max_abs_grad": n_grad.abs().max().item()}
    r = min(args.ref_rows, T)
    x = logits.detach()[:r].double().requires_grad_(True)
    xm = x.masked_fill(torch.arange(V) >= args.true_vocab, float("-inf")) if args.true_vocab < V else x
    ref = torch.log_softmax(xm, -1).gather(-1, labels[:r, None]).squeeze(-1)
    (ref * weights[:r].double()).sum().backward()
    res["ref_rows"] = r
    for name, lp, g in (("chunked", logp, grad), ("naive", n_logp, n_grad)):
        res[f"{name}_ref_logp_err"] = (lp[:r].double() - ref.detach()).abs().max().item()
        res[f"{name}_ref_grad_err"] = (g[:r].double() - x.grad).abs().max().item()
    return res


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
    n_warm = min(args.tokens, 2 * args.chunk_tokens, 1024)
    xw = logits.detach()[:n_warm].clone().requires_grad_(True)
    (fn(xw, labels[:n_warm]) * weights[:n_warm]).sum().backward()
    del xw

    times, cpu, peak, base = [], [], 0, 0
    logp = None
    for _ in range(args.repeats):
        logits.grad = None
        logp = None
        base = _rss_bytes()
        with PeakRSS(args.sample_interval) as mon:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            logp = fn(logits, labels)
            (logp * weights).sum().backward()
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            times.append(t1 - t0)
            cpu.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
        peak = max(peak, mon.peak - base)
    logp, grad = logp.detach(), logits.grad
    out = {"times": times, "cpu": cpu, "peak": peak, "base_rss": base}
    if args.worker == "naive":  # raw dumps (to /dev/shm when available) for the chunked worker to compare
        lp_path, g_path = _paths(args.tmp, "naive")
        logp.numpy().tofile(lp_path)
        grad.view(torch.int16).numpy().tofile(g_path)
    else:
        out.update(_compare(args, logits, labels, weights, logp, grad))
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------- parent

def run_variant(variant: str, args, tmp: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--tmp", tmp,
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--true-vocab", str(args.true_vocab),
           "--chunk-tokens", str(args.chunk_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--scale", str(args.scale), "--seed", str(args.seed),
           "--sample-interval", str(args.sample_interval), "--ref-rows", str(args.ref_rows)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"{variant} worker failed (rc={res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: T=8192")
    p.add_argument("--tokens", type=int, default=None, help="T (default 16384; 8192 with --quick)")
    p.add_argument("--vocab", type=int, default=32768, help="V: vocab shard width of the logits")
    p.add_argument("--true-vocab", type=int, default=None,
                   help="true vocabulary size (<= V; default V, i.e. no padded ids)")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=1, help="timed fwd+bwd repetitions per variant (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers")
    p.add_argument("--scale", type=float, default=3.0, help="logits = scale * N(0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-rows", type=int, default=256, help="rows checked against a float64 reference")
    p.add_argument("--sample-interval", type=float, default=0.001, help="RSS sampling period (s)")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = 8192 if args.quick else 16384
    if args.true_vocab is None:
        args.true_vocab = args.vocab
    if not 0 < args.true_vocab <= args.vocab:
        p.error("--true-vocab must be in (0, vocab]")

    if args.worker:
        worker(args)
        return

    t_all = time.perf_counter()
    T, V = args.tokens, args.vocab
    print("token_log_probs vs naive fp32 log_softmax+gather, fwd+bwd, TP=1 (tp_group=None, no process group)")
    print(f"T={T} V={V} true_vocab={args.true_vocab} bf16 logits {T * V * 2 / GIB:.2f} GiB "
          f"(fp32 [T,V] = {T * V * 4 / GIB:.2f} GiB), chunk_tokens={args.chunk_tokens}, threads={args.threads}, "
          f"repeats={args.repeats}")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bench_logprobs_", dir=shm) as tmp:
        res = {v: run_variant(v, args, tmp) for v in ("naive", "chunked")}  # naive first: chunked compares
    print(f"{'variant':8s} {'best wall (s)':>14s} {'all wall (s)':>18s} {'CPU user+sys (s), best':>24s} "
          f"{'peak RSS - base (GiB)':>22s}")
    for v in ("chunked", "naive"):
        r = res[v]
        b = min(range(len(r["times"])), key=r["times"].__getitem__)
        u, k = r["cpu"][b]
        print(f"{v:8s} {r['times'][b]:14.3f} {' '.join(f'{t:.2f}' for t in r['times']):>18s} "
              f"{f'{u:.2f} + {k:.2f}':>24s} {r['peak'] / GIB:22.2f}")
    tc, tn = min(res["chunked"]["times"]), min(res["naive"]["times"])
    mc, mn = res["chunked"]["peak"], res["naive"]["peak"]
    print(f"ratios (chunked / naive): time {tc / tn:.2f}x, peak memory {mc / mn:.3f}x "
          f"(naive uses {mn / max(mc, 1):.2f}x the memory; {(mn - mc) / GIB:.2f} GiB saved)")
    c = res["chunked"]
    print(f"max |logp_chunked - logp_naive|        = {c['logp_diff']:.3e}   (max |logp| = {c['max_abs_logp']:.2f})")
    print(f"max |grad_chunked - grad_naive| (bf16) = {c['grad_diff']:.3e}   (max |grad| = {c['max_abs_grad']:.2f}; "
          f"bf16 ulp at 1 = {2 ** -7:.1e})")
    for name in ("chunked", "naive"):
        print(f"vs float64 on {c['ref_rows']} rows: {name:8s} logp err {c[name + '_ref_logp_err']:.3e}, "
              f"grad err {c[name + '_ref_grad_err']:.3e}")
    print(f"total wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
