"""Benchmark: blockwise Future-KL and the FIPO loss vs the paper's chunked O(L^2) algorithm and DAPO.

    python benchmarks/future_kl.py            # B=8, L in {2048, 8192, 20480}
    python benchmarks/future_kl.py --quick    # B=8, L in {512, 2048}

Everything runs in one process. Times are the best of several repetitions (the thread's CPU time with
the default single torch thread, else wall time; forward + backward for the losses; FIPO and DAPO
interleaved); peak memory is the peak of live tensor bytes allocated during one call, from the torch
profiler's allocation events. Targets (issue 2): Future-KL >= 100x faster than the chunked baseline at
L=20480, FIPO loss <= 1.15x the DAPO loss there.

The FIPO / DAPO comparison is like for like: both are the same ``policy_loss`` call (validation, loss,
backward) and each computes every metric it reports: DAPO the clip fractions, policy KL, negative-
advantage ratio buckets and ratio extrema / quantiles; FIPO all of those plus Future-KL, the influence
weights and their metrics (mean / min / max, raw and clipped, fractions at the bounds) and the sequence
filter. Besides the ratio of the best times, the median of the per-round ratios (FIPO and DAPO run back to
back in each round, so they share the machine's load) is printed as a second, load-robust estimate.

The chunked baseline follows the paper's appendix G (and the official code): for each chunk of C=128
key positions j, build the [L, C] decay block gamma^(j - i) * [j >= i] over all query positions i and
add kl[:, chunk] @ block^T to every position: O(B*L*C) memory per chunk, O(B*L^2) time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fipo_megatron.algo import PolicyLossConfig, future_kl, policy_loss  # noqa: E402


def chunked_baseline_future_kl(delta: torch.Tensor, mask: torch.Tensor, decay_rate: float,
                               chunk: int = 128) -> torch.Tensor:
    """The paper's chunked algorithm (appendix G), O(B*L^2) work."""
    batch, length = delta.shape
    gamma = torch.tensor(2.0 ** (-1.0 / decay_rate), dtype=delta.dtype)
    kl = torch.where(mask, delta, 0.0)
    out = torch.zeros_like(kl)
    query = torch.arange(length).unsqueeze(1)  # [L, 1]
    for start in range(0, length, chunk):
        keys = torch.arange(start, min(length, start + chunk)).unsqueeze(0)  # [1, C]
        distance = keys - query  # [L, C]
        block = torch.pow(gamma, distance.clamp(min=0)) * (distance >= 0).to(delta.dtype)
        out += kl[:, start:start + chunk] @ block.t()
    return out


CLOCK = time.perf_counter  # main() switches to the thread's CPU time when torch runs single-threaded


def best_times(fns, repeats: int, warmup: int = 1, samples: list | None = None) -> list[float]:
    """Best-of-``repeats`` time of each function, the functions interleaved so that a burst of load
    from other processes hits them alike (the minimum is the least noisy estimate on a shared machine).
    ``samples``, if given, receives one list of the functions' times per round."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        times = []
        for i, fn in enumerate(fns):
            begin = CLOCK()
            fn()
            times.append(CLOCK() - begin)
            best[i] = min(best[i], times[-1])
        if samples is not None:
            samples.append(times)
    return best


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated during fn (allocations minus frees, in time order)."""
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def make_inputs(batch: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    log_prob = torch.randn(batch, length, generator=gen) * 0.3 - 1.0
    old = log_prob + torch.randn(batch, length, generator=gen) * 0.1
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length).contiguous()
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return log_prob, old, adv, mask


def loss_step(log_prob, old, adv, mask, cfg, future_kl_fn=None):
    lp = log_prob.clone().requires_grad_(True)
    out = policy_loss(lp, old, adv, mask, cfg, future_kl_fn=future_kl_fn)
    out.loss.backward()
    return out


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.2f} ms"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run: L in {512, 2048}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (best of)")
    parser.add_argument("--baseline-rows", type=int, default=None,
                        help="time the chunked baseline on this many rows and scale linearly to --batch "
                             "(overstates the baseline a little: its decay blocks are shared by all rows)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: stable timings on a shared machine; "
                             "0 = torch's default)")
    args = parser.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    # With one torch thread all the work runs on this thread, so its CPU time excludes the waiting that
    # other processes' load adds to wall time; with more threads only wall time is meaningful.
    CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    clock_name = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    lengths = args.lengths or ([512, 2048] if args.quick else [2048, 8192, 20480])
    repeats = args.repeats or (5 if args.quick else 10)
    batch = args.batch
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, B={batch}, decay_rate={args.decay_rate}, "
          f"{clock_name}, best of {repeats} runs (losses: {4 * repeats}, interleaved), "
          f"load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    fipo_cfg = PolicyLossConfig(kind="fipo", decay_rate=args.decay_rate)
    dapo_cfg = PolicyLossConfig(kind="dapo")
    for length in lengths:
        log_prob, old, adv, mask = make_inputs(batch, length)
        delta = (log_prob - old).clamp(-20, 20)
        rows = min(batch, args.baseline_rows or batch)
        ours = lambda: future_kl(delta, mask, args.decay_rate)  # noqa: E731
        base = lambda: chunked_baseline_future_kl(delta[:rows], mask[:rows], args.decay_rate)  # noqa: E731
        error = (ours()[:rows].double() - base().double()).norm() / base().double().norm()
        (t_ours,) = best_times([ours], repeats)
        (t_base,) = best_times([base], max(1, repeats // 5) if length <= 8192 else 1, warmup=0)
        t_base *= batch / rows
        scaled = f" (timed on {rows} rows, scaled x{batch / rows:g})" if rows < batch else ""
        print(f"\nL={length}")
        print(f"  future_kl blockwise        {fmt_ms(t_ours)}   peak {peak_bytes(ours) / 2**20:8.2f} MiB")
        print(f"  future_kl chunked baseline {fmt_ms(t_base)}   peak {peak_bytes(base) * batch / rows / 2**20:8.2f} MiB"
              f"{scaled}")
        print(f"  -> speed-up {t_base / t_ours:8.1f}x   (rel. error vs baseline {float(error):.1e})")

        fipo = lambda: loss_step(log_prob, old, adv, mask, fipo_cfg)  # noqa: E731
        dapo = lambda: loss_step(log_prob, old, adv, mask, dapo_cfg)  # noqa: E731
        fipo_base = lambda: loss_step(log_prob[:rows], old[:rows], adv[:rows], mask[:rows], fipo_cfg,  # noqa: E731
                                      future_kl_fn=lambda d, m: chunked_baseline_future_kl(d, m, args.decay_rate))
        rounds: list[list[float]] = []
        t_fipo, t_dapo = best_times([fipo, dapo], 4 * repeats, samples=rounds)
        paired = sorted(f / d for f, d in rounds)[len(rounds) // 2]
        (t_fipo_base,) = best_times([fipo_base], 1, warmup=0)
        t_fipo_base *= batch / rows
        print(f"  DAPO loss fwd+bwd          {fmt_ms(t_dapo)}   peak {peak_bytes(dapo) / 2**20:8.2f} MiB")
        print(f"  FIPO loss fwd+bwd          {fmt_ms(t_fipo)}   peak {peak_bytes(fipo) / 2**20:8.2f} MiB")
        print(f"  FIPO loss, chunked FKL     {fmt_ms(t_fipo_base)}{scaled}")
        print(f"  -> FIPO / DAPO = {t_fipo / t_dapo:.3f}x (median of per-round ratios {paired:.3f}x)   "
              f"FIPO(chunked) / FIPO = {t_fipo_base / t_fipo:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
