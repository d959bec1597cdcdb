"""Building blocks of a run that the driver loop calls once: tokenizer, data, engine, weights, checkpoints.

Contract:
- :func:`load_tokenizer`: the HF dir's tokenizer. A dir whose ``tokenizer_config.json`` names the
  generic fast tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``, e.g. the CPU demo's
  character tokenizer) is loaded as exactly that class (``AutoTokenizer`` would substitute the
  model type's tokenizer class and re-normalise the text); anything else goes through ``AutoTokenizer``.
- :func:`load_datasets`: one :class:`PromptDataset` per file, named by :func:`dataset_names` (the file
  stem; files with the same stem get enough parent directories to tell them apart, e.g. ``a/train`` and
  ``b/train``; the same file given twice is an error); malformed rows are reported by the data package
  (row index + reason) and skipped; numeric ground truths converted to text are counted in one line.
- :func:`build_engine`: the rollout engine, on global rank 0 (plus, with one weight sender per pipeline
  stage, :func:`per_stage_sync`, a send-only engine on each other stage's first rank; None elsewhere): the in-process
  ``hf`` engine, the in-process ``vllm`` engine (``--rollout-gpu-memory-utilization``, weights reloaded
  from ``--weight-sync-dir``), or SGLang / vLLM servers (``--rollout-urls``, each request limited to
  ``--rollout-timeout``, at most ``--rollout-max-in-flight-per-server`` per server, versions checked
  unless ``--rollout-skip-version-check``) with weights pushed over an NCCL group rooted at rank 0
  (``--weight-sync nccl``, ``--rollout-gpus-per-server``, ``--weight-sync-master-addr`` / ``-port``)
  or through safetensors files in a shared directory (``--weight-sync disk``).
- :func:`sync_weights`: COLLECTIVE; either each pipeline stage's first rank pushes its own stage's HF
  tensors (TP-gathered by its stage, ``convert.live.iter_stage_hf_tensors``; ``rollout.staged_sync``), or
  every rank iterates the whole model's stream and rank 0 pushes it; buckets of ``--weight-sync-bucket-mb``.
- :func:`restore`: resume from ``--save`` when it already holds a checkpoint (the same run restarted,
  e.g. after preemption, with the same command line), else from ``--load``: model, optimizer, scheduler,
  RNG, step and trainer state (sampler position). A ``--load`` dir without a checkpoint pointer but with a
  model-only torch_dist checkpoint (``fipo-convert hf-to-mcore`` output) initialises the weights only. Without either,
  rank 0 converts ``--hf-model-dir`` into ``OUTPUT_DIR/init_mcore`` (in a subprocess, so the run's
  process group is not involved) and every rank loads it. With ``--kl-coef > 0`` it also fills the
  actor's frozen reference model with the run's INITIAL weights (never the resumed policy checkpoint;
  rules in :mod:`fipo_megatron.trainer.reference`); :func:`save` records their path in the checkpoint.
  A damaged latest checkpoint falls back to the previous complete one (``megatron.checkpoint``).
- :func:`check_save_dir`: start-up check of ``--save`` (writable, free space for one checkpoint).
- :func:`save`: the checkpoint, then ``--keep-last-checkpoints`` pruning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

import torch.distributed as dist

from fipo_megatron.trainer.config import TrainConfig


def load_tokenizer(hf_dir: str):
    path = os.path.join(hf_dir, "tokenizer_config.json")
    cls_name = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            cls_name = json.load(fh).get("tokenizer_class")
    if cls_name in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(hf_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def dataset_names(paths: list[str]) -> list[str]:
    """One distinct name per data file, in order: the file stem (``data/train.jsonl`` -> ``train``), or,
    when several files share a stem, the stem with as many parent directories as make the names distinct
    (``a/train.jsonl``, ``b/train.jsonl`` -> ``a/train``, ``b/train``; ``d/t.jsonl``, ``d/t.parquet`` keep
    their extensions). Raises ``ValueError`` when the same
    file is given twice (it would be trained on / evaluated twice)."""
    real = [os.path.realpath(p) for p in paths]
    dup = [p for i, p in enumerate(paths) if real[i] in real[:i]]
    if dup:
        raise ValueError(f"data file given twice: {dup[0]} (the same file as an earlier entry)")
    names = _shortest_unique_suffixes([os.path.splitext(r)[0] for r in real])
    if len(set(names)) < len(names):  # same folder and stem, other extension: keep the extensions
        names = _shortest_unique_suffixes(real)
    return names


def _shortest_unique_suffixes(paths: list[str]) -> list[str]:
    """For each path, its shortest trailing run of components that no other path ends with."""
    parts = [p.strip(os.sep).split(os.sep) for p in paths]
    names = []
    for i, pi in enumerate(parts):
        depth = 1
        while depth < len(pi) and any(j != i and pj[-depth:] == pi[-depth:] for j, pj in enumerate(parts)):
            depth += 1
        names.append("/".join(pi[-depth:]))
    return names


def load_datasets(paths: list[str], tokenizer: Any, max_prompt_length: int) -> dict[str, Any]:
    """``{name: PromptDataset}`` in the given order, one entry per file (names: :func:`dataset_names`)."""
    from fipo_megatron.data import load_prompt_dataset

    out = {}
    for name, p in zip(dataset_names(list(paths)), paths):
        ds = load_prompt_dataset(p, tokenizer, max_prompt_length=max_prompt_length, keep_raw=False)
        if ds.skipped:
            first = "; ".join(f"row {s.row}: {s.reason}" for s in ds.skipped[:5])
            print(f"[fipo] {p}: skipped {len(ds.skipped)} malformed row(s) of {ds.num_rows}: {first}", flush=True)
        if ds.numeric_ground_truths:
            print(f"[fipo] {p}: {ds.numeric_ground_truths} numeric ground truth(s) converted to integer text "
                  "(e.g. 5.0 -> \"5\")", flush=True)
        out[name] = ds
    return out


def per_stage_sync(cfg: TrainConfig) -> bool:
    """True when each pipeline stage's first rank sends its own layers (SGLang servers; vLLM servers
    with --weight-sync disk) rather than global rank 0 sending everything: pipeline parallel, a
    server engine whose sync takes several senders, and no --weight-sync-through-rank0."""
    r = cfg.rollout
    if cfg.parallel.pipeline_model_parallel_size <= 1 or r.weight_sync_through_rank0 or not r.rollout_urls:
        return False
    return r.rollout_engine == "sglang" or (r.rollout_engine == "vllm" and r.weight_sync == "disk")


def sync_role(per_stage: bool) -> tuple[bool, bool, bool]:
    """(leader, sender, iterates) of this rank. Leader = global rank 0. Per stage: the sender is the
    first rank of its pipeline stage (tp = cp = dp = 0) and its stage's TP ranks iterate the stage's
    stream; otherwise the leader is the only sender and every rank iterates the whole-model stream."""
    leader = dist.get_rank() == 0
    if not per_stage:
        return leader, leader, True
    from megatron.core import parallel_state as ps

    iterates = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    return leader, iterates and ps.get_tensor_model_parallel_rank() == 0, iterates


def build_engine(cfg: TrainConfig, seed: int):
    """The rollout engine on global rank 0; with one sender per pipeline stage (:func:`per_stage_sync`),
    also a send-only engine (same servers, ``stage=s``, stage s's own NCCL group) on each other stage's
    sender; None on every other rank."""
    per_stage = per_stage_sync(cfg)
    leader, sender, _ = sync_role(per_stage)
    if not sender:
        return None
    from fipo_megatron.rollout.base import make_engine

    r = cfg.rollout
    if r.rollout_engine == "hf":
        import torch

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        return make_engine("hf", model_path=cfg.model.hf_model_dir, max_batch_size=r.rollout_max_batch_size, seed=seed,
                           device=device)
    bucket = r.weight_sync_bucket_mb * 1024 * 1024
    disk_root = r.weight_sync_dir or os.path.join(cfg.log.output_dir, "weight_sync")
    check = not r.rollout_skip_version_check
    if r.rollout_engine == "vllm" and not r.rollout_urls:
        return make_engine("vllm", model_path=cfg.model.hf_model_dir, bucket_bytes=bucket, disk_root=disk_root,
                           template_dir=cfg.model.hf_model_dir, check_version=check,
                           gpu_memory_utilization=r.rollout_gpu_memory_utilization)
    urls = list(r.rollout_urls)
    stage, stages = 0, cfg.parallel.pipeline_model_parallel_size
    if per_stage:
        from megatron.core import parallel_state as ps

        stage = ps.get_pipeline_model_parallel_rank()
    nccl = None
    if r.weight_sync == "nccl":
        from fipo_megatron.rollout.weight_sync import NcclSyncConfig, outward_address

        # --weight-sync-master-addr is global rank 0's; other stages' senders may sit on other nodes
        addr = (r.weight_sync_master_addr if leader else None) or outward_address(urls[0])
        nccl = NcclSyncConfig(master_address=addr, master_port=r.weight_sync_master_port,
                              workers_per_server=[r.rollout_gpus_per_server or _server_gpus(u) for u in urls])
        if per_stage:
            nccl = nccl.for_stage(stage, stages)
    common = dict(urls=urls, weight_sync=r.weight_sync, bucket_bytes=bucket, nccl=nccl, disk_root=disk_root,
                  template_dir=cfg.model.hf_model_dir, timeout_s=r.rollout_timeout, check_version=check,
                  max_in_flight_per_server=r.rollout_max_in_flight_per_server)
    if per_stage:
        common["stage"] = stage
    if r.weight_sync_flatten:
        common["flatten" if r.rollout_engine == "sglang" else "packed"] = True
    return make_engine("vllm-server" if r.rollout_engine == "vllm" else r.rollout_engine, **common)


def _server_gpus(url: str) -> int:
    """GPUs behind one SGLang server: tp_size x dp_size from /get_server_info (ValueError if unknown)."""
    import requests

    for path in ("/get_server_info", "/server_info"):
        try:
            info = requests.get(url.rstrip("/") + path, timeout=30).json()
        except Exception:  # noqa: BLE001 - try the other path, then fail below
            continue
        if isinstance(info, dict) and "tp_size" in info:
            return int(info["tp_size"]) * int(info.get("dp_size", 1) or 1)
    raise ValueError(f"cannot read tp_size from {url}/get_server_info; pass --rollout-gpus-per-server")


def sync_weights(actor: Any, engine: Any, version: int, bucket_mb: int, *, per_stage: bool = False) -> dict[str, float]:
    """Push the actor's current weights to the engine (collective: every rank calls it with the engine
    :func:`build_engine` gave it). ``per_stage``: each stage's sender sends its stage's layers
    (``rollout.staged_sync.sync_by_stage``); else global rank 0 sends the whole model
    (``sync_through_leader``). A failure anywhere raises ``WeightSyncError`` on every rank.
    Returns weight-sync metrics (totals over every sender)."""
    from fipo_megatron.rollout.staged_sync import sync_by_stage, sync_through_leader

    leader, sender, iterates = sync_role(per_stage)
    bucket_bytes = bucket_mb * 1024 * 1024
    if per_stage:
        from fipo_megatron.convert.live import iter_stage_hf_tensors

        stream = iter_stage_hf_tensors(actor.model) if iterates else None
        stats = sync_by_stage(engine if sender else None, stream, version, bucket_bytes=bucket_bytes, leader=leader)
    else:
        stats = sync_through_leader(engine if leader else None, actor.hf_tensors(), version,
                                    bucket_bytes=bucket_bytes, leader=leader)
    return {"weight_sync/num_tensors": float(stats.num_tensors), "weight_sync/mbytes": stats.num_bytes / 2**20,
            "weight_sync/num_buckets": float(stats.num_buckets)}


def _convert_hf(hf_dir: str, out: str, tp: int, pp: int) -> None:
    cmd = [sys.executable, "-m", "fipo_megatron.convert.cli", "hf-to-mcore", "--hf-dir", hf_dir, "--out", out,
           "--tp", str(tp), "--pp", str(pp)]
    env = dict(os.environ)
    for k in list(env):  # a clean single-process environment (no torchrun / elastic agent store)
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE") or k.startswith("TORCHELASTIC_"):
            env.pop(k)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"converting {hf_dir} to Megatron failed:\n{res.stdout}\n{res.stderr}")


def restore(cfg: TrainConfig, actor: Any, sampler: Any) -> int:
    """Load weights / resume through the actor's state API; returns the step to continue from (0 for a
    fresh run). Collective."""
    from fipo_megatron.megatron.checkpoint import read_latest_step

    ck = cfg.checkpoint
    load = ck.load
    if ck.save and read_latest_step(ck.save) is not None:
        load = ck.save  # this run already saved: continue it (a preempted job restarted with the same command)
    if load is not None and read_latest_step(load) is not None:
        step, state = actor.load_checkpoint(load)
        if state.get("sampler") is not None:
            sampler.load_state_dict(state["sampler"])
        return step
    if load is not None:
        if not os.path.isfile(os.path.join(load, "metadata.json")):
            raise FileNotFoundError(f"--load {load}: neither a training checkpoint (latest_checkpointed_iteration.txt)"
                                    " nor a model-only torch_dist checkpoint (metadata.json)")
        actor.load_initial_weights(load)
        return 0
    init = os.path.join(cfg.log.output_dir, "init_mcore")
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(init, "metadata.json")):
        _convert_hf(cfg.model.hf_model_dir, init, cfg.parallel.tensor_model_parallel_size,
                    cfg.parallel.pipeline_model_parallel_size)
    dist.barrier()
    actor.load_initial_weights(init)
    return 0


def save(cfg: TrainConfig, actor: Any, step: int, sampler: Any, extra: Optional[dict] = None) -> str:
    """Atomic training checkpoint of ``step`` under ``--save`` (collective); then, with
    ``--keep-last-checkpoints K``, rank 0 deletes all but the K newest checkpoints. A failed write raises
    ``CheckpointWriteError`` ("no space left on device, checkpoint N not written, the previous checkpoint
    M is intact") and deletes nothing."""
    from fipo_megatron.megatron.checkpoint import prune_checkpoints

    state = {"step": step, "sampler": sampler.state_dict(), "config": cfg.to_dict(), **(extra or {})}
    path = actor.save_checkpoint(cfg.checkpoint.save, step, state)
    if dist.get_rank() == 0 and cfg.checkpoint.keep_last_checkpoints > 0:
        for old in prune_checkpoints(cfg.checkpoint.save, cfg.checkpoint.keep_last_checkpoints, step):
            print(f"[fipo] deleted old checkpoint {old} (--keep-last-checkpoints "
                  f"{cfg.checkpoint.keep_last_checkpoints})", flush=True)
    return path


def check_save_dir(cfg: TrainConfig, actor: Any, broadcast: Any) -> None:
    """Start-up check of ``--save`` (collective): writable, and enough free space for one more checkpoint
    (the size of the latest one there, else estimated from the parameter count: weights + Adam moments
    + fp32 main params with --bf16). Raises ``SaveDirError`` (an OSError) on every rank with rank 0's message."""
    from fipo_megatron.trainer.reliability import (SaveDirError, check_free_space, check_writable,
                                                   checkpoint_size_estimate, raise_on_all_ranks)

    local = sum(p.numel() for chunk in actor.model for p in chunk.parameters())
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    bytes_per_param = 4 + 8 + (4 if cfg.parallel.bf16 else 0)
    save_dir = cfg.checkpoint.save
    need = checkpoint_size_estimate(save_dir, local, bytes_per_param=bytes_per_param, dp_size=actor.dp_size(),
                                    world_numel=lambda _: sum(counts))

    def check() -> None:
        check_writable(save_dir)
        check_free_space(save_dir, need)

    raise_on_all_ranks(check, broadcast, dist.get_rank() == 0, exc_type=SaveDirError)
