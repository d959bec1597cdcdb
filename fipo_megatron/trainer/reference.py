"""The frozen reference policy for the KL penalty (``--kl-coef > 0``).

Contract:
- :func:`build_reference` builds this rank's chunks of the same architecture and parallel layout as
  the policy, NOT wrapped in DDP and never given to an optimizer: parameters have
  ``requires_grad=False``, chunks stay in eval mode, only forward passes run on them (one extra set
  of model weights in memory, no gradients, no optimizer state). Its weights are uninitialised
  until :func:`load_reference` fills them.
- The reference is the INITIAL policy: the weights the run started from, never updated.
  :func:`reference_source` decides where they come from (first match):
    1. ``--ref-load DIR`` when given (a model-only torch_dist checkpoint, a training checkpoint root
       whose latest step is used, or one ``iter_XXXXXXX`` directory);
    2. on resume (a training checkpoint was loaded): the source recorded in that checkpoint's trainer
       state (``reference_init``), written by the run that started from it; it is NOT the resumed
       policy checkpoint (the recipes pass ``--load SAVE_DIR`` when resuming, so ``--load`` is no
       guide then). A checkpoint without the record (written with ``--kl-coef 0``) needs ``--ref-load``;
    3. on a fresh start: the directory the policy itself was initialised from (the model-only
       ``--load`` checkpoint, or ``OUTPUT_DIR/init_mcore`` converted from ``--hf-model-dir``).
  The trainer records the resolved absolute path in every checkpoint it saves.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fipo_megatron.trainer.config import TrainConfig


def build_reference(cfg: TrainConfig, hf_config: dict) -> list[torch.nn.Module]:
    """Frozen forward-only chunks shaped like the policy (weights to be loaded by :func:`load_reference`)."""
    from fipo_megatron.megatron.qwen import build_model

    chunks = build_model(hf_config, params_dtype=torch.bfloat16 if cfg.parallel.bf16 else torch.float32,
                         wrap_ddp=False, seq_length=cfg.seq_length, perform_initialization=False)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


def model_weights_dir(path: str) -> str:
    """The model-weights directory named by ``path``: itself when it holds a torch_dist checkpoint
    (``metadata.json``), else the latest step of a training checkpoint root (``FileNotFoundError`` if neither)."""
    from fipo_megatron.megatron.checkpoint import checkpoint_dir, read_latest_step

    if os.path.isfile(os.path.join(path, "metadata.json")):
        return os.path.abspath(path)
    step = read_latest_step(path) if os.path.isdir(path) else None
    if step is not None:
        return os.path.abspath(checkpoint_dir(path, step))
    raise FileNotFoundError(f"{path}: neither a torch_dist model checkpoint (metadata.json) nor a training "
                            "checkpoint root (latest_checkpointed_iteration.txt)")


def reference_source(cfg: TrainConfig, *, resumed_state: Optional[dict], policy_init_dir: Optional[str]) -> str:
    """Where the reference's weights come from (module docstring, rules 1-3)."""
    if cfg.checkpoint.ref_load:
        return model_weights_dir(cfg.checkpoint.ref_load)
    if resumed_state is not None:
        recorded = resumed_state.get("reference_init")
        if not recorded:
            raise ValueError("--kl-coef > 0: the resumed checkpoint does not record the reference (initial) weights "
                             "(it was written with --kl-coef 0); pass --ref-load with the run's initial weights")
        if not os.path.isfile(os.path.join(recorded, "metadata.json")):
            raise FileNotFoundError(f"--kl-coef > 0: the reference weights recorded in the checkpoint, {recorded}, are "
                                    "gone; pass --ref-load with the run's initial weights")
        return recorded
    if policy_init_dir is None:
        raise ValueError("--kl-coef > 0: no initial weights to build the reference from; pass --ref-load")
    return model_weights_dir(policy_init_dir)


def load_reference(chunks: list[torch.nn.Module], path: str) -> None:
    """Load model weights from ``path`` (a torch_dist model directory) into the reference chunks (collective)."""
    from fipo_megatron.megatron.checkpoint import load_model_weights

    load_model_weights(path, chunks)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
