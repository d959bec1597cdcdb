#!/usr/bin/env python
"""Mutation check of the core math (not run by CI): does the test suite catch realistic bugs?

Each mutant is a textual search/replace on one source file. For every mutant the repository is
copied to a fresh temporary directory (the working tree is never modified), the replacement is
applied there (the search text must occur exactly once), and the mutant's test files are run with
that copy first on PYTHONPATH. A mutant is CAUGHT when pytest fails, SURVIVED when it passes.

Usage:
    python tools/mutants.py                 # every mutant
    python tools/mutants.py -k fkl bootstrap  # mutants whose name contains any of the words
    python tools/mutants.py --list
Exit status: 0 when every mutant was caught, 1 otherwise, 2 when the unmutated tests fail (checked first).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOSSES = "fipo_megatron/algo/losses.py"
METRICS = "fipo_megatron/algo/loss_metrics.py"
FKL = "fipo_megatron/algo/future_kl.py"
ACTOR = "fipo_megatron/trainer/actor.py"
EVAL = "fipo_megatron/eval/metrics.py"
DAPO = "fipo_megatron/rewards/math_dapo.py"
RC = "fipo_megatron/algo/rollout_correction.py"

T_LOSS = ["tests/test_algo_losses.py"]
T_FKL = ["tests/test_algo_future_kl.py"]
T_CP = ["tests/test_parallel_cp_distributed.py"]
T_ACTOR = ["tests/test_trainer_actor_grad.py"]
T_EVAL = ["tests/test_eval_metrics.py"]
T_DAPO = ["tests/test_rewards_math_dapo.py"]
T_RC = ["tests/test_algo_rollout_correction.py"]


@dataclasses.dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    # ---------------------------------------------------------------- trainer normalisation
    Mutant("actor_grad_scale_per_micro_batch", ACTOR,
           "chunk.scale_gradients(1.0 / n_tok_global if n_tok_global > 0 else 0.0)",
           "chunk.scale_gradients(1.0 / len(mbs) if n_tok_global > 0 else 0.0)", T_ACTOR),
    Mutant("actor_dp_group_without_cp", ACTOR,
           "return ps.get_data_parallel_group(with_context_parallel=True)",
           "return ps.get_data_parallel_group(with_context_parallel=False)", T_ACTOR),
    # ---------------------------------------------------------------- bf16 (issue 9)
    Mutant("bf16_main_params_not_reloaded", ACTOR, "self.optimizer.reload_model_params()", "pass",
           ["tests/test_trainer_bf16.py"]),
    Mutant("bf16_fp32_logits", "fipo_megatron/megatron/qwen.py", '{"fp32_output": False}', '{"fp32_output": True}',
           ["tests/test_trainer_bf16.py"]),
    Mutant("loss_sync_free_quantile_position_float32", "fipo_megatron/algo/loss_metrics.py",
           "count = count_true(sel).to(torch.float64)", "count = count_true(sel).to(ratio.dtype)",
           ["tests/test_trainer_host_syncs.py"]),
    # ---------------------------------------------------------------- loss
    Mutant("loss_safe_fast_path_uses_clip_c", LOSSES,
           "all_safe = delta_max <= math.log(cfg.safety_threshold) - _SAFE_LOG_MARGIN",
           "all_safe = delta_max <= math.log(cfg.clip_ratio_c) - _SAFE_LOG_MARGIN", T_LOSS),
    Mutant("loss_no_clip_lower_bound_one", LOSSES,
           "return 0.0, NO_CLIP_MAX_WEIGHT", "return 1.0, NO_CLIP_MAX_WEIGHT", T_LOSS),
    Mutant("metrics_bucket_4_c_hardcoded_10", METRICS,
           '("4_c", 4.0, t.clip_ratio_c)', '("4_c", 4.0, 10.0)', T_LOSS),
    Mutant("loss_delta_clamp_upper_10", LOSSES,
           "old_log_prob.to(dtype), -DELTA_CLAMP, DELTA_CLAMP)",
           "old_log_prob.to(dtype), -DELTA_CLAMP, 10.0)", T_LOSS),
    Mutant("metrics_seq_filtered_frac_without_seq_sum", METRICS,
           "total = seq_sum(local)", "total = local", T_CP),
    Mutant("loss_participation_strict", LOSSES,
           "participates = delta <= log_c\n", "participates = delta < log_c\n", T_LOSS),
    Mutant("loss_dual_clip_counter_non_strict", LOSSES,
           "(loss_ppo.detach() > loss_dual.detach())", "(loss_ppo.detach() >= loss_dual.detach())", T_LOSS),
    # ---------------------------------------------------------------- Future-KL
    Mutant("fkl_average_carry_float32", FKL,
           "m64 = float_mask(mask, torch.float64)\n    x64 = x.to(torch.float64)",
           "m64 = float_mask(mask, torch.float32)\n    x64 = x.to(torch.float32)", T_FKL),
    # ---------------------------------------------------------------- eval
    Mutant("eval_bootstrap_alpha_not_halved", EVAL,
           "alpha = (1.0 - confidence) / 2.0", "alpha = 1.0 - confidence", T_EVAL),
    Mutant("eval_bootstrap_never_draws_last", EVAL,
           "rng.integers(0, x.size, size=(num_resamples, x.size))",
           "rng.integers(0, x.size - 1, size=(num_resamples, x.size))", T_EVAL),
    Mutant("eval_cons_all_instead_of_any", EVAL,
           "return 1.0 if any(bool(a) for p, a in zip(preds, accs) if p == winner) else 0.0",
           "return 1.0 if all(bool(a) for p, a in zip(preds, accs) if p == winner) else 0.0", T_EVAL),
    # ---------------------------------------------------------------- DAPO / Minerva normaliser
    Mutant("dapo_boxed_non_greedy", DAPO,
           r'r"(\\boxed\{)(.*)(\})"', r'r"(\\boxed\{)(.*?)(\})"', T_DAPO),
    Mutant("dapo_dollar_span_greedy", DAPO,
           r'r"(.*?)(\$)(.*?)(\$)(.*)"', r'r"(.*?)(\$)(.*)(\$)(.*)"', T_DAPO),
    Mutant("dapo_text_and_substitution_dropped", DAPO,
           '    ("\\\\text{and}", ","),\n', "", T_DAPO),
    # ---------------------------------------------------------------- extra (beyond the 16)
    Mutant("fkl_window_full_length_off_by_one", FKL,
           "if window is None or window >= x.shape[1]:", "if window is None or window >= x.shape[1] - 1:", T_FKL),
    Mutant("fkl_packed_bucket_width_from_first", FKL,
           "width = max(cu[s + 1] - cu[s] for s in segs)", "width = cu[segs[0] + 1] - cu[segs[0]]", T_FKL),
    # ---------------------------------------------------------------- rollout importance sampling (issue 11)
    Mutant("rollout_is_ratio_inverted", RC,
           "torch.clamp(old_log_prob.detach().to(dtype) - engine_log_prob.detach().to(dtype),",
           "torch.clamp(engine_log_prob.detach().to(dtype) - old_log_prob.detach().to(dtype),", T_RC),
    Mutant("rollout_is_not_truncated", RC,
           "weight = torch.exp(torch.clamp(raw, max=math.log(is_threshold)))", "weight = torch.exp(raw)", T_RC),
    Mutant("rollout_mask_geometric_is_product", RC,
           "log_r = seq_log_ratio / torch.clamp(counts, min=1.0)", "log_r = seq_log_ratio", T_RC),
    Mutant("rollout_is_sequence_without_cp_sum", RC,
           "        total = seq_sum_fn(total)", "        total = total", T_CP),
    Mutant("rollout_is_weight_not_applied", LOSSES,
           "        if correction.weight is not None:\n            token_loss = token_loss * correction.weight\n",
           "", T_RC),
]


def _copy_repo(dst: str) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "outputs")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _apply(root: str, m: Mutant) -> None:
    path = os.path.join(root, m.path)
    with open(path) as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        raise RuntimeError(f"{m.name}: search text occurs {count} times in {m.path} (expected once)")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def run_mutant(m: Mutant, timeout: int) -> tuple[str, float, str]:
    """Runs m's tests on a mutated copy; a Mutant with old == "" runs them unmutated (the baseline)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        _copy_repo(tmp)
        if m.old:
            _apply(tmp, m)
        env = dict(os.environ, PYTHONPATH=tmp, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
        start = time.time()
        try:
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *m.tests]
            proc = subprocess.run(cmd,
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", time.time() - start, ""
        verdict = "CAUGHT" if proc.returncode != 0 else "SURVIVED"
        if proc.returncode not in (0, 1):  # 2+: collection / usage errors count as caught but are flagged
            verdict = f"CAUGHT(rc={proc.returncode})"
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        return verdict, time.time() - start, (lines or tail)[0][:150]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", nargs="*", default=None, help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.k or any(w in m.name for w in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    tests = sorted({t for m in chosen for t in m.tests})
    verdict, secs, detail = run_mutant(Mutant("baseline", "", "", "", tests), args.timeout)
    print(f"baseline  {secs:6.1f}s  unmutated: {' '.join(tests)} -> {'pass' if verdict == 'SURVIVED' else detail}")
    if verdict != "SURVIVED":
        print("the unmutated tests fail: every mutant would look caught; fix that first")
        return 2
    survived = 0
    for m in chosen:
        verdict, secs, detail = run_mutant(m, args.timeout)
        survived += verdict != "CAUGHT" and not verdict.startswith("CAUGHT")
        print(f"{verdict:9s} {secs:6.1f}s  {m.name:45s} {detail}", flush=True)
    print(f"{len(chosen) - survived}/{len(chosen)} mutants caught")
    return 0 if survived == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
