"""vLLM rollout engines: `VLLMServerEngine` (OpenAI-compatible HTTP servers) and `VLLMEngine`
(in-process `vllm.LLM`, single node). vLLM is imported lazily, only by `VLLMEngine` and by the
default NCCL transport of `VLLMServerEngine`.

Written against the vLLM documentation (docs.vllm.ai: "OpenAI-Compatible Server" and its extra
sampling parameters, "Weight Transfer" and examples/rl/rlhf_http_nccl.py, `LLM.generate`,
`LLM.collective_rpc`, `TokensPrompt`) for vLLM 0.10 - 0.x (V1 engine); NOT exercised against a
real vLLM here (CUDA-only; see the gpu tests).

LOG-PROBS: vLLM V1 returns log-probs of the RAW model distribution by default
(`logprobs_mode="raw_logprobs"`: before temperature / top-p / top-k), the same convention as
HFEngine; `logprobs=0` returns only the sampled token's log-prob. Response token ids include the
EOS / stop token that ended generation (finish_reason "stop").

Server requests (the CPU tests assert these exact bodies):
- POST /v1/completions {"model", "prompt": [token ids], "n", "max_tokens", "temperature", "top_p",
  "top_k", "logprobs": 0, "return_tokens_as_token_ids": true, "return_token_ids": true,
  "skip_special_tokens": false, "stop_token_ids"?, "seed"?}; one request per prompt, n choices;
  ids from choice["token_ids"] when present (newer vLLM) else from "token_id:<id>" logprob tokens.
- GET /version -> {"version"}; GET /health; GET /v1/models (served model name if not given).
- Weight transfer (server started with VLLM_SERVER_DEV_MODE=1 --weight-transfer-config
  '{"backend": "nccl"}'): POST /init_weight_transfer_engine {"init_info": {master_address,
  master_port, rank_offset, world_size}} while the trainer joins (vLLM's
  NCCLWeightTransferEngine.trainer_init); per update POST /pause, POST /start_weight_update
  {"is_checkpoint_format": true}, per bucket POST /update_weights {"update_info": {"names",
  "dtype_names", "shapes", "packed": false}} while the trainer sends the bucket
  (NCCLWeightTransferEngine.trainer_send_weights), POST /finish_weight_update {}, POST /resume.
  start/finish_weight_update do not exist in earlier versions of this API: a 404 there is skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor

from .base import BaseEngine
from .server_engine import ServerEngine
from .types import EngineError, GenerationOutput, SamplingParams
from .versions import check_version as _check_version
from .weight_sync import DEFAULT_BUCKET_BYTES, Bucket, NcclSyncConfig, bucketize, dtype_name


def _import_vllm():
    try:
        import vllm  # type: ignore
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise EngineError("vllm: the `vllm` package is not installed (it needs a CUDA machine)") from exc
    return vllm


def _vllm_trainer_init(cfg: NcclSyncConfig) -> Any:
    """Trainer side of vLLM's NCCL weight transfer (vllm.distributed.weight_transfer.nccl_engine)."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine  # type: ignore

    return NCCLWeightTransferEngine.trainer_init(
        dict(master_address=cfg.master_address, master_port=int(cfg.master_port), world_size=cfg.world_size)
    )


def _vllm_trainer_send(bucket: Bucket, group: Any, device: str) -> None:
    from vllm.distributed.weight_transfer.nccl_engine import (  # type: ignore
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    NCCLWeightTransferEngine.trainer_send_weights(
        iterator=((n, t.detach().to(device).contiguous()) for n, t in bucket),
        trainer_args=NCCLTrainerSendWeightsArgs(group=group, packed=False),
    )


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
    """`VLLMServerEngine(urls, *, model=None, nccl=None, bucket_bytes=512MB, group_factory=None,
    send_fn=None, max_in_flight=256, timeout_s=3600, max_retries=3, backoff_s=1.0,
    check_version=True, strict_version=False, connect=True)`.

    `group_factory(cfg) -> group` and `send_fn(bucket, group, device)` default to vLLM's
    NCCLWeightTransferEngine (trainer needs vllm installed); injectable for tests. Without `nccl`
    the engine cannot update weights (EngineError): vLLM documents no HTTP reload-from-disk.
    """

    name = "vllm"

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        model: Optional[str] = None,
        nccl: Optional[NcclSyncConfig] = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        group_factory: Optional[Callable[[NcclSyncConfig], Any]] = None,
        send_fn: Optional[Callable[[Bucket, Any, str], None]] = None,
        max_in_flight: int = 256,
        timeout_s: float = 3600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        check_version: bool = True,
        strict_version: bool = False,
        connect: bool = True,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> None:
        super().__init__(urls, max_in_flight=max_in_flight, timeout_s=timeout_s, max_retries=max_retries,
                         backoff_s=backoff_s, sleep=sleep)
        self._check_nccl(nccl)
        self.nccl = nccl
        self.bucket_bytes = int(bucket_bytes)
        self.group_factory = group_factory or _vllm_trainer_init
        self.send_fn = send_fn or _vllm_trainer_send
        self.model = model
        self.server_versions: list[Optional[str]] = []
        if connect:
            for u in self.client.urls:
                info = self.client.get("/version", url=u)
                v = info.get("version") if isinstance(info, dict) else None
                self.server_versions.append(v)
                _check_version("vllm", v, strict=strict_version, check=check_version)
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
    def _post_optional(self, path: str, body: Any) -> None:
        try:
            self.client.post_all(path, body)
        except EngineError as exc:
            if "HTTP 404" not in str(exc):
                raise

    def update_weights_buckets(self, buckets: Iterable[Bucket], version: int) -> None:
        if self.nccl is None:
            raise EngineError("vllm: server weight updates need nccl=NcclSyncConfig(...) and servers started with "
                              "VLLM_SERVER_DEV_MODE=1 --weight-transfer-config '{\"backend\": \"nccl\"}'")
        version = self._check_version(version)
        self._ensure_group()
        self.client.post_all("/pause", None)
        self._consistent = False
        try:
            self._post_optional("/start_weight_update", {"is_checkpoint_format": True})
            for bucket in buckets:
                self._send_bucket(bucket)
            self._post_optional("/finish_weight_update", {})
            self._consistent = True
            self.weight_version = version
        finally:
            self.client.post_all("/resume", None)

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        cfg = self.nccl
        bodies = [{"init_info": {"master_address": cfg.master_address, "master_port": int(cfg.master_port),
                                 "rank_offset": off, "world_size": cfg.world_size}}
                  for off in cfg.rank_offsets()]
        _, group = self._post_each_beside("/init_weight_transfer_engine", bodies, lambda: self.group_factory(cfg),
                                          thread_name="vllm-init-transfer")
        self._group = group

    def _send_bucket(self, bucket: Bucket) -> None:
        body = {"update_info": {"names": [n for n, _ in bucket], "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
                                "shapes": [list(t.shape) for _, t in bucket], "packed": False}}
        self._post_each_beside("/update_weights", [body] * len(self.client.urls),
                               lambda: self.send_fn(bucket, self._group, self.nccl.device),
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
    check_version=True, strict_version=False, **llm_kwargs)`; llm_kwargs go to `vllm.LLM`
    (tensor_parallel_size, dtype, gpu_memory_utilization, seed, ...).

    Weight updates call each worker's `model.load_weights(weights=[(hf_name, tensor)])` (vLLM's
    HF-name loader, which stacks q/k/v and gate/up itself): directly on the in-process driver worker
    when reachable (`llm.llm_engine.model_executor.driver_worker`, V0 or V1 with
    VLLM_ENABLE_V1_MULTIPROCESSING=0), else through `llm.collective_rpc(callable, args=(bucket,))`
    (V1 multiprocess: needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to pickle the callable and
    tensors). Then the prefix cache is reset (`llm.reset_prefix_cache()`).
    """

    name = "vllm"

    def __init__(self, model_path: Optional[str] = None, *, llm: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 check_version: bool = True, strict_version: bool = False, **llm_kwargs: Any) -> None:
        super().__init__()
        self._vllm = _import_vllm()
        _check_version("vllm", getattr(self._vllm, "__version__", None), strict=strict_version, check=check_version)
        if llm is None:
            if model_path is None:
                raise ValueError("vllm: give model_path or llm")
            llm = self._vllm.LLM(model=model_path, **llm_kwargs)
        self.llm = llm
        self.bucket_bytes = int(bucket_bytes)
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

    def shutdown(self) -> None:
        self._closed = True
        self.llm = None
