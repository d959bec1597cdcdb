"""``fipo-plot RUN_DIR [--out DIR]``: paper-style training curves from a run's JSONL files.

Reads ``RUN_DIR/metrics.jsonl`` (one object per step) and ``RUN_DIR/eval.jsonl`` (one per
evaluation) and writes PNG files (default into ``RUN_DIR/plots``):

- ``response_length.png``  mean response length with the q25-q75 band and min/max (paper fig. 3)
- ``accuracy.png``         train reward and accuracy per step, eval avg@k / pass@k per evaluation
- ``influence_weights.png`` FIPO influence-weight mean/min/max and Future-KL mean (fipo runs)
- ``clip_fractions.png``   PPO clip fraction, dual-clip fraction, influence-bound fractions
- ``kl.png``               policy KL (actor/ppo_kl) and train-vs-engine log-prob mismatch
- ``entropy.png``          policy entropy
- ``advantage.png``        the length-weighted mean advantage and the number of generation batches

Several run dirs may be given; their curves are overlaid (e.g. ``fipo-plot runs/fipo runs/dapo``),
labelled by directory name. A figure whose metrics no run has is skipped. Prints the written paths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("step", len(xs)))
            ys.append(float(v))
    return xs, ys


# figure name -> (title, [(source, key, label)], y label)
FIGURES = {
    "response_length": ("Response length", [("m", "response_length_mean", "mean"), ("m", "response_length_max", "max"),
                                            ("m", "response_length_min", "min")], "tokens"),
    "accuracy": ("Reward and accuracy", [("m", "accuracy", "train accuracy"), ("m", "reward_mean", "train reward"),
                                         ("e", "avg@k", "eval avg@k"), ("e", "pass@k", "eval pass@k")], ""),
    "influence_weights": ("FIPO influence weights", [("m", "actor/influence_weight_mean", "weight mean"),
                                                     ("m", "actor/influence_weight_max", "weight max"),
                                                     ("m", "actor/influence_weight_min", "weight min"),
                                                     ("m", "actor/future_kl_mean", "Future-KL mean")], ""),
    "clip_fractions": ("Clip fractions", [("m", "actor/pg_clipfrac", "PPO clip"),
                                          ("m", "actor/pg_clipfrac_lower", "dual clip"),
                                          ("m", "actor/influence_frac_upper", "weight at upper bound"),
                                          ("m", "actor/influence_frac_lower", "weight at lower bound")], "fraction"),
    "kl": ("Policy KL", [("m", "actor/ppo_kl", "policy KL (ppo_kl)"),
                         ("m", "rollout/logprob_abs_diff_mean", "|train - engine| log-prob")], ""),
    "entropy": ("Entropy", [("m", "actor/entropy", "policy entropy")], "nats"),
    "advantage": ("Advantage and sampling", [("m", "batch/length_weighted_mean_advantage",
                                              "length-weighted mean advantage"),
                                             ("m", "num_gen_batches", "generation batches")], ""),
}


def plot_runs(run_dirs: Sequence[str], out_dir: Optional[str] = None) -> list[str]:
    """Write the figures for ``run_dirs`` into ``out_dir`` (default: first run's ``plots/``); return paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        m = read_jsonl(os.path.join(d, "metrics.jsonl"))
        e = read_jsonl(os.path.join(d, "eval.jsonl"))
        if not m and not e:
            raise FileNotFoundError(f"{d}: no metrics.jsonl or eval.jsonl")
        runs.append((os.path.basename(os.path.normpath(d)), m, e))
    out_dir = out_dir or os.path.join(run_dirs[0], "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (title, curves, ylabel) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for run_name, m, e in runs:
            prefix = f"{run_name}: " if len(runs) > 1 else ""
            for src, key, label in curves:
                xs, ys = _series(m if src == "m" else e, key)
                if not xs:
                    continue
                style = "o-" if src == "e" else "-"
                ax.plot(xs, ys, style, label=prefix + label, markersize=3)
                drawn += 1
            if name == "response_length":
                xs, lo = _series(m, "response_length_q25")
                _, hi = _series(m, "response_length_q75")
                if xs and len(lo) == len(hi):
                    ax.fill_between(xs, lo, hi, alpha=0.2, label=prefix + "q25-q75")
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fipo-plot", description="Plot a FIPO run's metrics.jsonl / eval.jsonl to PNGs.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (OUTPUT_DIR of fipo-train); several are overlaid")
    ap.add_argument("--out", default=None, help="output directory (default: FIRST_RUN/plots)")
    args = ap.parse_args(argv)
    try:
        paths = plot_runs(args.run_dirs, args.out)
    except FileNotFoundError as exc:
        print(f"fipo-plot: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
