"""Real processes: torchrun workers die with their launcher (kill -9 of its process group), a worker
killed alone takes its helper processes along, and a run directory is locked against a second run
(named holder; a dead holder's lock is taken over)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fipo_megatron.trainer.reliability import LOCK_NAME, RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

# A torchrun worker running the real entry point (fipo_megatron.train.main) whose training is replaced by
# a helper process + a wait: what matters is what the entry point does to the process before training.
WORKER = textwrap.dedent("""
    import os, subprocess, sys, time
    import fipo_megatron.trainer.loop as loop

    def fake_train(cfg):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.environ["PIDS_FILE"], "w") as fh:
            fh.write(f"{os.getpid()} {helper.pid}")
        time.sleep(120)

    loop.train = fake_train
    from fipo_megatron.train import main
    sys.exit(main(sys.argv[1:]))
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _launch(tmp_path, tag: str):
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    pids = tmp_path / f"pids_{tag}"
    env = dict(os.environ, PIDS_FILE=str(pids), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([TORCHRUN, "--nproc-per-node", "1", "--master-port", "0", str(script),
                             "--hf-model-dir", str(hf), "--train-data", str(data),
                             "--output-dir", str(tmp_path / "out")],
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert _wait(lambda: pids.exists() and len(pids.read_text().split()) == 2, 25), "worker did not start"
    worker, helper = map(int, pids.read_text().split())
    return proc, worker, helper


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_and_helpers_die_with_the_launcher_or_alone(tmp_path):
    proc, worker, helper = _launch(tmp_path, "a")
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the launcher's process group
        proc.wait()
        assert _wait(lambda: not _alive(worker) and not _alive(helper), 5), "worker / helper survived the launcher"
    finally:
        for pid in (worker, helper):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    proc, worker, helper = _launch(tmp_path, "b")
    try:
        os.kill(worker, signal.SIGKILL)  # the worker killed alone
        assert _wait(lambda: not _alive(helper), 5), "the killed worker's helper process survived"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if _alive(helper):
            os.kill(helper, signal.SIGKILL)


HOLDER = textwrap.dedent("""
    import sys, time
    from fipo_megatron.trainer.reliability import RunLock
    with RunLock([sys.argv[1], sys.argv[2]]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_second_run_on_a_locked_directory_fails_naming_the_holder(tmp_path, capsys):
    out, save = str(tmp_path / "out"), str(tmp_path / "out" / "ckpt")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out, save], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=f"{out} is in use by another run: pid {holder.pid} on host"):
            with RunLock([out, save]):
                pass
        assert time.monotonic() - t0 < 1.0  # at once, no waiting
        # the train entry point turns it into one line and exit status 1
        from fipo_megatron.train import main

        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        (tmp_path / "t.jsonl").write_text("{}\n")
        rc = main(["--hf-model-dir", str(hf), "--train-data", str(tmp_path / "t.jsonl"), "--output-dir", out])
        assert rc == 1 and f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its record is still there, the lock is taken over
    assert json.loads(open(os.path.join(out, LOCK_NAME)).read())["pid"] == holder.pid
    with RunLock([out, save]):
        assert json.loads(open(os.path.join(save, LOCK_NAME)).read())["pid"] == os.getpid()
    assert f"taking over the stale lock {os.path.join(out, LOCK_NAME)} of pid {holder.pid}" in capsys.readouterr().out
    with RunLock([out, save]):  # released cleanly: no stale message the next time
        pass
    assert "stale" not in capsys.readouterr().out
