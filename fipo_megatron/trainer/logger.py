"""Run logging: JSONL files, TensorBoard, wandb (when configured), console lines, tqdm bars.

Contract:
- Only the logging rank (global rank 0) writes; on other ranks every method is a no-op.
- ``OUTPUT_DIR/metrics.jsonl``: one JSON object per RL step (``{"step": n, ...}``);
  ``OUTPUT_DIR/eval.jsonl``: one per evaluation (``{"step": n, "<set>/avg@k": ...}``).
  On resume from step s (:meth:`RunLogger.truncate_after`) lines with ``step > s`` are dropped, so
  the files never hold a step twice.
- TensorBoard scalars go to ``tensorboard_dir`` (default ``OUTPUT_DIR/tb``; ``"none"`` disables);
  wandb is imported only when ``wandb_project`` is set.
- Non-numeric values are kept in JSONL but skipped for TensorBoard/wandb.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Optional


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


class RunLogger:
    def __init__(self, output_dir: str, *, enabled: bool = True, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None, progress: bool = True,
                 log_interval: int = 1) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.progress = progress and enabled
        self.log_interval = log_interval
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.eval_path = os.path.join(output_dir, "eval.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        tb_dir = tensorboard_dir or os.path.join(output_dir, "tb")
        if tb_dir.lower() != "none":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tb_dir)
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                print(f"[fipo] TensorBoard disabled: {exc}", file=sys.stderr)
        if wandb_project:
            import wandb  # noqa: PLC0415 - optional dependency, only when asked for

            self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=output_dir)

    # ------------------------------------------------------------------ files
    def truncate_after(self, step: int) -> None:
        """Drop JSONL lines with step > ``step`` (call once when resuming at ``step``); a fresh run
        (``step == 0``) starts with empty files."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.eval_path):
            if not os.path.exists(path):
                continue
            if step == 0:
                os.remove(path)
                continue
            keep = []
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        continue
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                fh.writelines(keep)
            os.replace(path + ".tmp", path)

    def _append(self, path: str, record: Mapping[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def _scalars(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        nums = {prefix + k: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(nums, step=step)

    # ------------------------------------------------------------------ public
    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._append(self.metrics_path, record)
        self._scalars(step, metrics, "train/")
        if step % self.log_interval == 0:
            keys = ("reward_mean", "accuracy", "response_length_mean", "actor/pg_loss", "actor/grad_norm",
                    "num_gen_batches", "time/step")
            shown = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in keys
                              if isinstance(metrics.get(k), (int, float)))
            self.info(f"step {step}: {shown}")

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, {"step": step, **metrics})
        self._scalars(step, metrics, "eval/")
        shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and ("avg@" in k or "pass@" in k or "cons@" in k))
        self.info(f"eval @ step {step}: {shown}")

    def info(self, msg: str) -> None:
        if self.enabled:
            try:
                from tqdm import tqdm

                tqdm.write(f"[fipo] {msg}", file=sys.stdout)
            except ImportError:  # pragma: no cover
                print(f"[fipo] {msg}", flush=True)
            sys.stdout.flush()

    def bar(self, total: int, desc: str, initial: int = 0, leave: bool = True):
        """A tqdm progress bar on the logging rank (a no-op object elsewhere or when disabled; transient
        bars (``leave=False``) only on a terminal, so piped logs stay readable)."""
        if not self.progress or (not leave and not sys.stderr.isatty()):
            return _NullBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, initial=initial, leave=leave, dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
