"""The CPU demo learns in the configurations users run: bf16 at TP=2, and context parallelism (TP=1 x CP=2).

Runs ``examples/tiny-cpu/run.sh --steps 20 ...`` end to end in a temporary directory (local SFT'd tiny
Qwen2, conversion, torchrun with 2 gloo processes, HF rollout engine, evaluation before and after).
Before the main-params fix the bf16 run trained the optimizer's copy of the random initialisation
(accuracy fell to 0 from step 2 on); before the SDPA attention the CP run was refused. Checks: the run
really has the asked layout / dtype; every step's first mini-batch is exactly on-policy (CPU kernels
are deterministic, so on_policy_ppo_kl is 0); train accuracy over the last 5 steps beats the first 5 by
a margin, and the final evaluation beats the first. Measured with the demo model (2 heads of size 32)
over these 20 steps: train accuracy (mean of steps 1-5 -> 16-20) 0.349 -> 0.488 in bf16 and 0.345 ->
0.486 at CP=2; eval avg@4 0.315 -> 0.492 and 0.320 -> 0.485; the margins asked for are 0.05. Both
cases together take about 100 s on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from fipo_megatron.testing.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flags, expect", [(["--bf16"], {"bf16": True, "tensor_model_parallel_size": 2}),
                                           (["--context-parallel-size", "2"],
                                            {"context_parallel_size": 2, "tensor_model_parallel_size": 1})],
                         ids=["bf16-tp2", "cp2"])
def test_cpu_demo_learns(tmp_path, flags, expect):
    out = tmp_path / "run"
    env = dict(os.environ, FIPO_DEMO_PREP=str(tmp_path / "prep"), MASTER_PORT=str(free_port()))
    res = subprocess.run(["bash", "examples/tiny-cpu/run.sh", "--steps", "20", "--output-dir", str(out), *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    config = {k: v for sec in yaml.safe_load((out / "config.yaml").read_text()).values() if isinstance(sec, dict)
              for k, v in sec.items()}
    assert {k: config[k] for k in expect} == expect
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]
    assert [s["step"] for s in steps] == list(range(1, 21))
    assert all(s["actor/on_policy_ppo_kl"] == 0.0 for s in steps), [s["actor/on_policy_ppo_kl"] for s in steps]
    acc = [s["accuracy"] for s in steps]
    first, last = sum(acc[:5]) / 5, sum(acc[-5:]) / 5
    assert last > first + 0.05, acc
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["avg@k"] > evals[0]["avg@k"] + 0.05, (evals[0]["avg@k"], evals[-1]["avg@k"])
