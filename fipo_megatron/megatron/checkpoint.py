"""Training checkpoints: model + optimizer (Megatron dist_checkpointing), scheduler, RNG, trainer state.

Layout of `save_dir` (Megatron-LM style):
    latest_checkpointed_iteration.txt      the step of the newest COMPLETE checkpoint
    iter_0000012/                          one checkpoint
        (dist_checkpointing files)         model chunk(s) + optimizer, sharded (torch_dist)
        trainer_state.pt                   step, scheduler state, trainer_state, layout
        rng/rank_00003.pt                  per global rank: python, numpy, torch CPU (+ CUDA)
                                           RNG states and Megatron's RNG-tracker states

Atomicity: everything is written into `iter_XXXXXXX.tmp/`; after all ranks finished (barrier)
rank 0 fsyncs every file and directory of it, renames it to `iter_XXXXXXX/` and only then replaces
the pointer file (written to a temporary file, fsynced, `os.replace`). A crash leaves at most a
`.tmp` directory, never a pointer to an incomplete checkpoint. A failed write (a full disk: torch
reports it as e.g. `[enforce fail at inline_container.cc:672] unexpected pos`) raises
`CheckpointWriteError` saying "no space left on device, checkpoint N not written, the previous
checkpoint M is intact" (the `.tmp` directory is removed). All functions are collective (call them
on every rank), except `prune_checkpoints` / `damaged_checkpoint_files` (file operations, one rank).

Damaged checkpoints: `load_checkpoint` checks the chosen directory's files first (every shard byte
that the DCP metadata references must be present: `dcp_files.damaged_files`; trainer_state.pt,
metadata.json). Loading the LATEST checkpoint falls back AUTOMATICALLY to the newest older complete
checkpoint, with a loud warning naming the damaged files (a later save of the same step replaces the
damaged directory); a pointer to a directory that does not exist at all stays an error; when no complete
checkpoint is left, or a specific `step` was asked for, it
raises `RuntimeError` naming the damaged files.

Resume: `load_checkpoint` at the same layout restores everything, so the following training
steps are bit-identical to an uninterrupted run. At a different TP/PP/DP layout the model and
optimizer still load (dist_checkpointing reshards the model; the distributed optimizer state
reshards across DP, and across TP/PP too when saved with `fully_reshardable=True`), the RNG states of
ranks are not restored (a warning says so).

`dist_checkpointing.save` needs `psutil` and may start helper processes: the calling script must
be import-safe (`if __name__ == "__main__":`).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from fipo_megatron.megatron.qwen import unwrap_model

TRACKER_FILE = "latest_checkpointed_iteration.txt"

def _opt_meta(fully_reshardable: bool) -> dict:
    # 'dp_reshardable': fully parallel, reshardable across DP only (Megatron-LM's default);
    # 'fully_reshardable': gathers optimizer state per parameter, loadable at any TP/PP/DP.
    return {"distrib_optim_sharding_type": "fully_reshardable" if fully_reshardable else "dp_reshardable"}

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_dir", "read_latest_step",
           "save_model_weights", "load_model_weights", "get_rng_state", "set_rng_state", "CheckpointWriteError",
           "prune_checkpoints", "checkpoint_steps", "damaged_checkpoint_files", "fsync_tree"]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says which step and that the previous one is intact."""


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{int(step):07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}
    out = {}
    for i, chunk in enumerate(model_chunks):
        out[f"model{i}"] = unwrap_model(chunk).sharded_state_dict()
    return out


def _load_strict(module: torch.nn.Module, sd: dict) -> None:
    """`load_state_dict(strict=True)`, except that missing `_extra_state` entries are allowed: Transformer
    Engine modules (e.g. TEDotProductAttention's core attention) have a torch `_extra_state` that Megatron
    leaves out of `sharded_state_dict`, so dist_checkpointing never returns it (Megatron-LM falls back to
    strict=False for the same reason). Any other missing or unexpected key still raises."""
    res = module.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"error loading the model state: missing keys {missing}, "
                           f"unexpected keys {list(res.unexpected_keys)}")


def _load_model_state(model_chunks: list[torch.nn.Module], state: dict) -> None:
    if len(model_chunks) == 1:
        _load_strict(unwrap_model(model_chunks[0]), state["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            _load_strict(unwrap_model(chunk), state[f"model{i}"])


def _torch_adam_params(optimizer: Any) -> Iterator[tuple[torch.optim.Optimizer, dict, torch.Tensor]]:
    """(torch Adam/AdamW, param group, parameter) for every parameter of every torch Adam/AdamW
    wrapped by `optimizer` (a Megatron optimizer, or a ChainedOptimizer of them); others skipped."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                yield inner, group, p


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of a torch Adam inside `optimizer` an explicit zero state (step 0).

    Megatron's DistributedOptimizer.state_dict() (torch-optimizer fallback used without Apex/TE,
    e.g. on CPU) asserts that every parameter has a 'step'; a fresh optimizer has none, so loading
    into it (or saving before the first step) would fail. Zero moments with step 0 are exactly
    what torch Adam creates lazily on its first step, so training is unchanged.
    """
    for inner, _, p in _torch_adam_params(optimizer):
        st = inner.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _restore_adam_steps(optimizer: Any) -> None:
    """Give each parameter its own Adam 'step' tensor holding the checkpoint's step.

    On the torch-optimizer fallback (no Apex/TE, e.g. CPU) Megatron 0.16's
    DistributedOptimizer.load_state_dict leaves the per-parameter 'step' wrong (one tensor shared
    by all parameters, which torch Adam's in-place foreach increment then advances once per
    parameter, and with the stale pre-load value). The checkpoint's step is in each param group's
    'step' entry (written by DistributedOptimizer.state_dict); copy it into fresh tensors.
    """
    for inner, group, p in _torch_adam_params(optimizer):
        st = inner.state.get(p)
        if st is None or not isinstance(st.get("step"), torch.Tensor):
            continue
        value = group["step"] if "step" in group else st["step"].item()
        st["step"] = torch.tensor(float(value), dtype=st["step"].dtype)


def get_rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (if any), Megatron tracker."""
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by `get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict[str, int]:
    return {"world_size": _world(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def save_checkpoint(save_dir: str, step: int, model_chunks: list[torch.nn.Module], optimizer: Any, scheduler: Any,
                    trainer_state: dict | None = None, *, fully_reshardable: bool = False) -> str:
    """Write checkpoint `step` atomically under `save_dir`; returns its final directory.

    `optimizer`/`scheduler` may be None (then not saved). `trainer_state` (rank 0's copy is kept)
    must be picklable: rollout step, data-loader position, metrics, config...
    `fully_reshardable=True` stores the distributed optimizer's state so that it can be loaded
    at another TP/PP layout (slower: gathered per parameter); by default it reshards across DP only.
    """
    if fully_reshardable and not torch.cuda.is_available():
        raise NotImplementedError(
            "fully_reshardable optimizer checkpoints fail to load with megatron-core 0.16's torch-Adam "
            "fallback (no Apex/TE, e.g. CPU): its loader expects no 'step' in the optimizer state; "
            "use the default (DP-reshardable) format on CPU")
    rng_state = get_rng_state()  # as of the call (saving must not shift what resume sees)
    final = checkpoint_dir(save_dir, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)  # empty: dist_checkpointing.save expects a fresh directory
    _barrier()
    try:
        _write_checkpoint_files(tmp, step, model_chunks, optimizer, scheduler, trainer_state, fully_reshardable,
                                rng_state)
        _barrier()
        if _rank() == 0:
            fsync_tree(tmp)  # the shards reach the disk before the rename and the pointer make them visible
    except Exception as exc:  # noqa: BLE001 - re-raised with what happened to the checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure_text(save_dir, step, exc)) from exc
    if _rank() == 0:
        if os.path.exists(final):  # re-saving the same step: drop the old copy first
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(save_dir)
        ptr_tmp = os.path.join(save_dir, TRACKER_FILE + ".tmp")
        with open(ptr_tmp, "w") as f:
            f.write(str(int(step)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr_tmp, os.path.join(save_dir, TRACKER_FILE))
        _fsync_dir(save_dir)
    _barrier()
    return final


def _write_checkpoint_files(tmp: str, step: int, model_chunks: list[torch.nn.Module], optimizer: Any,
                            scheduler: Any, trainer_state: dict | None, fully_reshardable: bool,
                            rng_state: dict) -> None:
    """Write every file of checkpoint `step` into the fresh directory `tmp` (collective)."""
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sharded_state_dict=sharded["model"] if "model" in sharded else sharded,
            metadata=_opt_meta(fully_reshardable))
    dist_checkpointing.save(sharded_state_dict=sharded, checkpoint_dir=tmp)
    if _rank() == 0:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    _barrier()
    torch.save(rng_state, os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        meta = {"step": int(step), "scheduler": None if scheduler is None else scheduler.state_dict(),
                "trainer_state": trainer_state or {}, "layout": _layout(), "has_optimizer": optimizer is not None,
                "fully_reshardable": fully_reshardable}
        torch.save(meta, os.path.join(tmp, "trainer_state.pt"))


def _is_out_of_space(exc: BaseException, path: str) -> bool:
    """Whether `exc` (or its cause chain) is ENOSPC/EDQUOT, or the file system of `path` is full now
    (torch's zip writer reports a full disk only as `unexpected pos`)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024


def _write_failure_text(save_dir: str, step: int, exc: BaseException) -> str:
    """'no space left on device, checkpoint N not written, the previous checkpoint M is intact' (or the
    error itself when the disk is not full)."""
    try:
        prev = read_latest_step(save_dir)
    except RuntimeError:
        prev = None
    kept = (f"the previous checkpoint {prev} is intact ({checkpoint_dir(save_dir, prev)})" if prev is not None
            else f"no earlier checkpoint exists in {save_dir}")
    what = (f"no space left on device ({save_dir})" if _is_out_of_space(exc, save_dir)
            else f"writing to {save_dir} failed: {type(exc).__name__}: {exc}")
    return f"{what}, checkpoint {int(step)} not written, {kept}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under `root`, then every directory (deepest first), so that a rename of `root`
    made visible afterwards cannot expose files whose data is still only in the page cache."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def checkpoint_steps(root: str) -> list[int]:
    """Steps of the finished `iter_XXXXXXX` directories under `root` (no .tmp / .old), ascending."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            out.append(int(name[5:]))
    return sorted(out)


def prune_checkpoints(root: str, keep: int, newest_step: int) -> list[str]:
    """Delete all but the `keep` newest checkpoints of steps <= `newest_step` under `root` (call on one rank,
    after the pointer names `newest_step`); returns the deleted directories. `keep` <= 0 keeps all.
    Directories of steps above `newest_step` (a damaged checkpoint that a fallback skipped) are left
    alone: the next save of that step replaces them."""
    if keep <= 0:
        return []
    steps = [s for s in checkpoint_steps(root) if s <= newest_step]
    removed = []
    for s in steps[:-keep]:
        path = checkpoint_dir(root, s)
        shutil.rmtree(path)
        removed.append(path)
    return removed


def read_latest_step(load_dir: str) -> int | None:
    """The step named by `load_dir`'s pointer file, or None when there is none."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError as exc:
        raise RuntimeError(f"checkpoint pointer {path} does not hold a step number: {text!r}") from exc


def _check_complete(path: str) -> None:
    if not os.path.isdir(path):
        raise RuntimeError(f"checkpoint directory {path} named by {TRACKER_FILE} does not exist")
    for name in ("trainer_state.pt", "metadata.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise RuntimeError(f"checkpoint {path} is incomplete: {name} is missing")


def damaged_checkpoint_files(path: str) -> list[str]:
    """Problems of the checkpoint directory `path`, one line each naming the file ([] when complete):
    missing directory / trainer_state.pt / metadata.json, empty trainer_state.pt, and missing or
    truncated DCP shards (`dcp_files.damaged_files`)."""
    from fipo_megatron.megatron.dcp_files import damaged_files

    if not os.path.isdir(path):
        return [f"{path} does not exist"]
    problems = []
    for name in ("trainer_state.pt", "metadata.json"):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            problems.append(f"{f} is missing")
        elif os.path.getsize(f) == 0:
            problems.append(f"{f} is empty")
    return problems + damaged_files(path)


def _choose_step(load_dir: str, latest: int) -> int:
    """`latest` when its checkpoint is complete or its directory is missing altogether (not a damaged
    checkpoint but a wrong pointer / deleted directory: the caller's error names it), else the newest
    older complete one (loud warning); RuntimeError naming the damaged files when none is left."""
    if not os.path.isdir(checkpoint_dir(load_dir, latest)):
        return latest
    problems = damaged_checkpoint_files(checkpoint_dir(load_dir, latest))
    if not problems:
        return latest
    for step in reversed([s for s in checkpoint_steps(load_dir) if s < latest]):
        if not damaged_checkpoint_files(checkpoint_dir(load_dir, step)):
            msg = (f"\n{'!' * 100}\nDAMAGED CHECKPOINT: the latest checkpoint {checkpoint_dir(load_dir, latest)} "
                   f"cannot be loaded: {'; '.join(problems)}.\nFALLING BACK to the previous complete checkpoint "
                   f"{checkpoint_dir(load_dir, step)} (step {step}); the damaged directory is left for inspection and "
                   f"is replaced when step {latest} is saved again.\n{'!' * 100}")
            if _rank() == 0:
                print(msg, flush=True)
            warnings.warn(msg, stacklevel=2)
            return step
    raise RuntimeError(f"the latest checkpoint {checkpoint_dir(load_dir, latest)} is damaged: {'; '.join(problems)}; "
                       f"no older complete checkpoint in {load_dir} to fall back to (delete the damaged directory "
                       "and the pointer to start over, or pass another --load)")


def load_checkpoint(load_dir: str, model_chunks: list[torch.nn.Module], optimizer: Any = None, scheduler: Any = None,
                    *, step: int | None = None, load_rng: bool = True) -> tuple[int, dict] | None:
    """Load the latest (or `step`) checkpoint under `load_dir` into the given objects.

    Returns `(step, trainer_state)`, or None when `load_dir` holds no checkpoint pointer (and no
    `step` was asked for). A damaged latest checkpoint falls back to the newest older complete one
    (loud warning); RuntimeError naming the damaged files when none is left, or when the asked-for
    `step` is damaged.
    """
    if step is None:
        latest = read_latest_step(load_dir)
        if latest is None:
            return None
        step = _choose_step(load_dir, latest)
    path = checkpoint_dir(load_dir, step)
    _check_complete(path)
    problems = damaged_checkpoint_files(path)
    if problems:
        raise RuntimeError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    meta = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer", True):
            raise RuntimeError(f"checkpoint {path} holds no optimizer state")
        _ensure_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sharded_state_dict=sharded["model"] if "model" in sharded else sharded, is_loading=True,
            metadata=_opt_meta(meta.get("fully_reshardable", False)))
    state = dist_checkpointing.load(sharded_state_dict=sharded, checkpoint_dir=path)
    _load_model_state(model_chunks, state)
    if optimizer is not None:
        with torch.no_grad():  # the fp32 main-param shards are views of leaf parameters
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if load_rng:
        rng_path = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        if meta["layout"] == _layout() and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=False))
        else:
            warnings.warn(f"checkpoint {path} was saved with layout {meta['layout']}, now {_layout()}: "
                          "RNG states not restored", stacklevel=2)
    _barrier()
    return int(meta["step"]), meta["trainer_state"]


def save_model_weights(save_dir: str, model_chunks: list[torch.nn.Module]) -> None:
    """Model-only dist checkpoint (e.g. initial weights); loadable at any TP/PP layout."""
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
    _barrier()
    dist_checkpointing.save(sharded_state_dict=_model_sharded_state_dict(model_chunks), checkpoint_dir=save_dir)
    _barrier()


def load_model_weights(load_dir: str, model_chunks: list[torch.nn.Module]) -> None:
    """Load a `save_model_weights` (or `save_checkpoint` iter_) directory's model into the chunks."""
    state = dist_checkpointing.load(sharded_state_dict=_model_sharded_state_dict(model_chunks), checkpoint_dir=load_dir)
    _load_model_state(model_chunks, state)
