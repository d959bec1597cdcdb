"""The project's GPU check (driven by tools/gpu_check.sh): correctness of the GPU configuration and its figures.

Sub-commands (each prints one JSON line starting with ``GPU_CHECK`` that the shell script collects):

  demo-verdict DIR [--on-policy-tol T]    read a demo run's metrics.jsonl: train accuracy must rise
                                          (mean of the last third of steps > mean of the first third) and
                                          every step's first mini-batch must be on-policy
                                          (|actor/on_policy_ppo_kl| <= T).
  resume-verdict FULL RESUMED STEP        the step STEP metrics of an uninterrupted run (FULL) and of a
                                          run resumed from a checkpoint (RESUMED) must agree.
  throughput                              (under torchrun, one GPU) actor forward (old log-probs) and
                                          update throughput, MFU and peak memory of Qwen2.5-0.5B- and
                                          1.5B-shaped random models, bf16, 16 samples of 1.3k-4.1k tokens.
  kernels                                 Future-KL (blockwise vs the paper's chunked algorithm vs a
                                          one-pass reverse cumsum) and FIPO-vs-DAPO loss fwd+bwd timings.

Nothing is downloaded and nothing is installed: models, tokenizer and data are made locally.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peak (no sparsity), per GPU; FIPO_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def emit(kind: str, **fields) -> None:
    print("GPU_CHECK " + json.dumps({"check": kind, **fields}), flush=True)


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def demo_verdict(out_dir: str, tol: float) -> int:
    steps = _rows(os.path.join(out_dir, "metrics.jsonl"))
    acc = [s["accuracy"] for s in steps]
    third = max(1, len(acc) // 3)
    first, last = sum(acc[:third]) / third, sum(acc[-third:]) / third
    on_policy = [abs(s.get("actor/on_policy_ppo_kl", math.nan)) for s in steps]
    worst = max(on_policy) if on_policy else math.nan
    ok = last > first and worst <= tol
    emit("demo", dir=out_dir, steps=len(steps), acc_first=round(first, 4), acc_last=round(last, 4),
         on_policy_ppo_kl_max=worst, tol=tol, ok=ok)
    return 0 if ok else 1


def resume_verdict(full_dir: str, resumed_dir: str, step: int) -> int:
    full = {s["step"]: s for s in _rows(os.path.join(full_dir, "metrics.jsonl"))}[step]
    res = {s["step"]: s for s in _rows(os.path.join(resumed_dir, "metrics.jsonl"))}[step]
    keys = [k for k in full if k in res and not k.startswith("time/") and isinstance(full[k], (int, float))]
    rel = {k: abs(full[k] - res[k]) / max(abs(full[k]), 1e-6) for k in keys}
    # The rollout (sampling) is identical when the resumed weights, RNG and data position are; the GPU's
    # non-deterministic reductions may move the actor metrics in their last digits only.
    rollout_same = all(full[k] == res[k] for k in ("accuracy", "prompts_consumed") if k in full)
    worst = max(rel.values()) if rel else math.nan
    ok = rollout_same and worst <= 1e-3
    emit("resume", step=step, rollout_identical=rollout_same, max_rel_diff=worst,
         worst_key=max(rel, key=rel.get) if rel else None, ok=ok)
    return 0 if ok else 1


# ----------------------------------------------------------------------------- throughput
def _model_flops_per_token(cfg: dict, seq: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 x matmul parameters (embedding
    lookup excluded, output layer included) + causal attention 6 x 2 x L x h x seq / 2."""
    h, L, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter
    matmul_params = L * per_layer + h * cfg["vocab_size"]
    return 6.0 * matmul_params + 6.0 * L * h * seq


def _peak_flops(name: str) -> float:
    if os.environ.get("FIPO_PEAK_TFLOPS"):
        return float(os.environ["FIPO_PEAK_TFLOPS"]) * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return math.nan


def throughput(args) -> int:
    import torch

    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.models.qwen25 import QWEN25_PRESETS, PRESET_ALIASES
    from fipo_megatron.parallel.packing import RLSample
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = _peak_flops(gpu)
    for preset in args.models:
        hf = dict(QWEN25_PRESETS[PRESET_ALIASES[preset]])
        initialize_parallel(1, 1, 1, seed=0)
        argv = ["--bf16", "--algorithm", "fipo", "--max-prompt-length", "512", "--max-response-length",
                str(args.seq_length), "--seq-length", str(args.seq_length),
                "--max-tokens-per-micro-batch", str(args.seq_length), "--sequence-packing", "auto",
                "--lr", "1e-6", "--min-lr", "1e-6", "--lr-warmup-iters", "0", "--output-dir", args.out]
        if args.recompute:
            argv.append("--recompute-activations")
        actor = Actor(parse_args(argv, validate=False), hf)
        gen = torch.Generator().manual_seed(0)
        lengths = torch.linspace(int(0.32 * args.seq_length), args.seq_length, args.samples).long().tolist()
        samples = []
        for i, n in enumerate(lengths):
            ids = torch.randint(0, hf["vocab_size"], (n,), generator=gen).tolist()
            samples.append(RLSample(ids[:256], ids[256:], advantage=(1.0, -1.0)[i % 2]))
        tokens = sum(lengths)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        timings = {}
        for phase in ("warmup", "timed"):
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t0 = time.perf_counter()
            old, _, _ = actor.compute_log_probs(samples)
            sync()
            t1 = time.perf_counter()
            for s, o in zip(samples, old):
                s.old_log_prob = o
            actor.update(samples, len(samples))
            sync()
            t2 = time.perf_counter()
            timings[phase] = (t1 - t0, t2 - t1)
        fwd, upd = timings["timed"]
        seq_mean = sum(n * n for n in lengths) / tokens  # token-weighted mean context
        flops = _model_flops_per_token(hf, seq_mean) * tokens
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan
        emit("throughput", model=preset, gpu=gpu, layout=actor.layout, tokens=tokens, recompute=args.recompute,
             forward_s=round(fwd, 3), forward_tokens_per_s=round(tokens / fwd), forward_mfu=(flops / 3) / fwd / peak,
             update_s=round(upd, 3), update_tokens_per_s=round(tokens / upd), update_mfu=flops / upd / peak,
             peak_gib=round(peak_mem, 2))
        del actor
        destroy_parallel()
    return 0


# ----------------------------------------------------------------------------- kernels
def kernels(args) -> int:
    import importlib.util

    import torch

    from fipo_megatron.algo.future_kl import future_kl
    from fipo_megatron.algo.losses import PolicyLossConfig

    spec = importlib.util.spec_from_file_location("bench_fkl", os.path.join(ROOT, "benchmarks", "future_kl.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timed(fn, repeats=20) -> float:
        fn()
        best = math.inf
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    for length in args.lengths:
        lp, old, adv, mask = (t.to(dev) for t in bench.make_inputs(8, length))
        delta = (lp - old) * mask
        t_ours = timed(lambda: future_kl(delta, mask, 32.0))
        t_chunked = timed(lambda: bench.chunked_baseline_future_kl(delta, mask, 32.0), repeats=3)
        t_cumsum = timed(lambda: torch.flip(torch.cumsum(torch.flip(delta, [1]), 1), [1]))  # gamma = 1, no decay
        fipo, dapo = PolicyLossConfig(kind="fipo"), PolicyLossConfig(kind="dapo")
        t_fipo = timed(lambda: bench.loss_step(lp, old, adv, mask, fipo))
        t_dapo = timed(lambda: bench.loss_step(lp, old, adv, mask, dapo))
        emit("kernels", device=str(dev), B=8, L=length, future_kl_ms=t_ours * 1e3, chunked_ms=t_chunked * 1e3,
             speedup_vs_chunked=t_chunked / t_ours, reverse_cumsum_ms=t_cumsum * 1e3,
             fipo_loss_ms=t_fipo * 1e3, dapo_loss_ms=t_dapo * 1e3, fipo_over_dapo=t_fipo / t_dapo)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo-verdict")
    d.add_argument("dir")
    d.add_argument("--on-policy-tol", type=float, default=1e-3)
    r = sub.add_parser("resume-verdict")
    r.add_argument("full")
    r.add_argument("resumed")
    r.add_argument("step", type=int)
    t = sub.add_parser("throughput")
    t.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    t.add_argument("--seq-length", type=int, default=4096)
    t.add_argument("--samples", type=int, default=16)
    t.add_argument("--recompute", action="store_true", help="--recompute-activations (selective)")
    t.add_argument("--out", default=os.path.join(ROOT, "outputs", "gpu_check", "throughput"))
    k = sub.add_parser("kernels")
    k.add_argument("--lengths", type=int, nargs="+", default=[2048, 20480])
    args = ap.parse_args(argv)
    if args.cmd == "demo-verdict":
        return demo_verdict(args.dir, args.on_policy_tol)
    if args.cmd == "resume-verdict":
        return resume_verdict(args.full, args.resumed, args.step)
    if args.cmd == "throughput":
        return throughput(args)
    return kernels(args)


if __name__ == "__main__":
    sys.exit(main())
