"""What keeps a run from being lost or doubled: worker lifetime, the run lock, start-up checks of
``--save``, and rank-0 failures that stop every rank.

Contract:
- :func:`tie_to_launcher`: in a torchrun worker (``TORCHELASTIC_RUN_ID`` set), the worker gets SIGKILL
  when its parent (the torchrun agent) dies (Linux ``PR_SET_PDEATHSIG``), so ``kill -9`` of the launcher
  cannot leave workers training. When the worker leads its own process group (torchrun starts each
  worker in a new session), a small sentinel process kills that group when the worker dies, so helper
  processes the worker started (checkpoint writers, tokenizer / multiprocessing helpers) do not outlive
  a worker killed alone. No-op outside torchrun or off Linux.
- :class:`RunLock`: an exclusive lock on each run directory (``--output-dir``, ``--save``): a
  ``.fipo-run.lock`` file held with ``flock`` for the run's lifetime and holding the holder's pid, host,
  start time and command (removed when the run ends cleanly). A second run fails at once with
  :class:`RunLockedError` naming the holder.
  The kernel drops the lock when its process dies, so a lock left by a dead process is taken over
  (with a message naming it). Taking the lock also proves the directory is writable.
- :func:`check_writable`, :func:`check_free_space`, :func:`checkpoint_size_estimate`: the start-up check
  of ``--save`` (writability, free space against the estimated checkpoint size).
- :func:`raise_on_all_ranks`: run a function on global rank 0 and make its exception stop every rank
  (broadcast of the error text) instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional, Sequence

LOCK_NAME = ".fipo-run.lock"
_PR_SET_PDEATHSIG = 1


def tie_to_launcher() -> bool:
    """Die with the torchrun agent, and take this worker's helper processes along (module docstring).
    Returns True when it took effect (a torchrun worker on Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    if not _set_parent_death_signal(signal.SIGKILL):
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before the call above
        os._exit(1)
    if os.getpgid(0) == os.getpid():
        _start_group_sentinel()
    return True


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) for this process; False when unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_group_sentinel() -> None:
    """Fork a process that waits for this process (its parent) to die, then SIGKILLs this process group
    (the worker's helpers). It waits on a pidfd (no CPU), or polls its parent pid twice a second."""
    worker = os.getpid()
    pid = os.fork()
    if pid != 0:
        return
    try:  # the sentinel: plain os calls only, no Python cleanup
        os.closerange(3, 65536)  # hold nothing of the worker's (sockets, lock files)
        try:
            import select

            fd = os.pidfd_open(worker)
            select.select([fd], [], [])
        except (AttributeError, OSError):
            while os.getppid() == worker:
                time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(0)


class SaveDirError(OSError):
    """``--save`` is unwritable or too full for a checkpoint (start-up check)."""


class RunLockedError(RuntimeError):
    """Another live run holds a run directory's lock."""


class RunLock:
    """``with RunLock([output_dir, save_dir]):`` the exclusive lock of a run (module docstring)."""

    def __init__(self, dirs: Sequence[Optional[str]]) -> None:
        seen, self.dirs = set(), []
        for d in dirs:
            if d and os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                self.dirs.append(d)
        self._fds: list[int] = []

    def __enter__(self) -> "RunLock":
        try:
            for d in self.dirs:
                self._fds.append(_acquire(d))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file, then unlock (idempotent); a clean run leaves no lock file behind."""
        for d, fd in zip(self.dirs, self._fds):
            try:
                os.unlink(os.path.join(d, LOCK_NAME))
            except FileNotFoundError:
                pass
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._fds = []


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _describe(rec: dict) -> str:
    return (f"pid {rec.get('pid')} on host {rec.get('host')} (started {rec.get('started')}, "
            f"command: {rec.get('command')})")


def _acquire(directory: str) -> int:
    """Create ``directory`` if needed and lock its lock file; returns the held file descriptor."""
    check_writable(directory, what="run directory")
    path = os.path.join(directory, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            previous = _read_record(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(f"{directory} is in use by another run: {_describe(previous)}; stop that run "
                                 f"or choose another --output-dir / --save (lock file {path})") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released (and removed) the file between our open and flock: retry
    previous = _read_record(fd)
    if previous:
        print(f"[fipo] taking over the stale lock {path} of {_describe(previous)}: that process no longer "
              "holds it", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
    os.fsync(fd)
    return fd


def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?", "command": "(unreadable lock record)"}


def check_writable(directory: str, *, what: str = "--save") -> None:
    """Create ``directory`` if needed and write + fsync + remove a probe file; ``OSError`` naming the
    directory and the reason (read-only file system, permission, no space) otherwise."""
    probe = os.path.join(directory, f".fipo-write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        os.remove(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {directory} is not writable: {os.strerror(exc.errno or 0)}") from exc


def check_free_space(directory: str, needed_bytes: int, *, what: str = "--save") -> None:
    """``OSError(ENOSPC)`` when the file system of ``directory`` has less than ``needed_bytes`` free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < needed_bytes:
        raise OSError(errno.ENOSPC, f"{what} {directory}: {free / 2**30:.2f} GiB free, but one checkpoint needs "
                      f"about {needed_bytes / 2**30:.2f} GiB (no space left on device for the first save); free "
                      "space or choose another --save")


def checkpoint_size_estimate(save_dir: Optional[str], local_numel: int, *, bytes_per_param: int, dp_size: int,
                             world_numel: Callable[[int], int]) -> int:
    """Bytes one checkpoint takes: the size of the latest checkpoint already in ``save_dir`` when there is
    one, else the parameter count (``world_numel(local_numel)`` sums over ranks; divided by the DP
    replicas) times ``bytes_per_param`` (weights + optimizer state), plus 10 %."""
    from fipo_megatron.megatron.checkpoint import checkpoint_dir, read_latest_step

    step = read_latest_step(save_dir) if save_dir else None
    if step is not None and os.path.isdir(checkpoint_dir(save_dir, step)):
        total = 0
        for here, _, files in os.walk(checkpoint_dir(save_dir, step)):
            total += sum(os.path.getsize(os.path.join(here, f)) for f in files)
        return int(total * 1.1)
    return int(world_numel(local_numel) / max(dp_size, 1) * bytes_per_param * 1.1)


def raise_on_all_ranks(fn: Callable[[], Any], broadcast: Callable[[Any], Any], is_rank0: bool,
                       exc_type: type = RuntimeError) -> Any:
    """Run ``fn()`` on rank 0 (returns its value there, None elsewhere). When it raises, every rank raises
    ``exc_type`` with rank 0's error text (``broadcast`` is the run's object broadcast from rank 0)."""
    err = None
    value = None
    if is_rank0:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            err = f"{type(exc).__name__}: {exc}"
    err = broadcast(err)
    if err is not None:
        raise exc_type(err)
    return value


class ProgressWatchdog:
    """``with ProgressWatchdog(what, total, emit, interval_s=60):`` call :meth:`tick` on progress; whenever no
    tick came for ``interval_s`` seconds, a background thread emits one line saying for how long nothing
    moved and how far it got (repeated every ``interval_s`` while stalled)."""

    def __init__(self, what: str, total: int, emit: Callable[[str], None], *, interval_s: float = 60.0,
                 detail: str = "") -> None:
        import threading

        self.what, self.total, self.emit, self.interval_s, self.detail = what, total, emit, interval_s, detail
        self.done = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fipo-progress-watchdog", daemon=True)

    def tick(self, n: int = 1) -> None:
        self.done += n
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.interval_s, 5.0) / 5):
            idle = time.monotonic() - self._last
            if idle >= self.interval_s:
                self.emit(f"{self.what}: no progress for {idle:.0f} s ({self.done}/{self.total} done"
                          f"{'; ' + self.detail if self.detail else ''})")
                self._last = time.monotonic()

    def __enter__(self) -> "ProgressWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
