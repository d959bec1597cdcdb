"""Run a function on N local processes with a gloo process group, like torchrun would.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes (start method "spawn", so
`fn` must be importable at module level), sets the torchrun environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), initialises `torch.distributed` with gloo and
calls `fn(rank, world_size, *args)`. It returns the list of per-rank return values (which must be
picklable), and re-raises the first rank failure with that rank's traceback in the message.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, result_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    out_path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out_path)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out_path)
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return per-rank results."""
    with tempfile.TemporaryDirectory(prefix="fipo-dist-") as result_dir:
        port = free_port()
        try:
            mp.start_processes(_worker, args=(world_size, port, result_dir, fn, args), nprocs=world_size,
                               join=True, start_method="spawn")
        except Exception as exc:  # a rank died: surface the first recorded traceback
            for r in range(world_size):
                p = os.path.join(result_dir, f"rank{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        raise RuntimeError(f"rank {r} failed:\n{rec['error']}") from exc
            raise
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
