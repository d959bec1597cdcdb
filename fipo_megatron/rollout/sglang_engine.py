"""SGLang rollout engine: drives one or more SGLang servers over their native HTTP API.

Written against the SGLang documentation ("SGLang Native APIs", "Sampling Parameters",
"SGLang for RL Systems", docs.sglang.io) and checked against SGLang's own source, read from the
wheels of 0.5.2, 0.5.3, 0.5.20, 0.5.21, 0.5.22 and 0.5.23 (`tools/audit_engine_fields.py`):
supported window 0.5.3 - 0.5.23 (`versions.py`), checked at connect. Every body below is validated
against that version's request models (io_struct.py, sampling_params.py, the /generate JSON contract
of >= 0.5.22) by `tests/test_rollout_engine_fields.py` (audited field lists; the installed package's
own classes where `sglang` imports), and was constructed with SGLang's own classes from the wheels
(`--construct-with`, CPU-only). NOT exercised against a real server here (CUDA-only; see the gpu test).
A failed weight update is answered with HTTP 400 {"success": false, "message"}; the client raises it.

SEEDS: one request per (prompt, sample), each with its own `sampling_seed` (seed + row). SGLang
IGNORES `sampling_seed` unless the server runs with `--enable-deterministic-inference`: without it
rollouts are not reproducible (do not claim they are).

Requests used (JSON bodies; the CPU tests assert these exact bodies):
- POST /generate {"input_ids": [int], "sampling_params": {...}, "return_logprob": true}
  -> {"output_ids": [...], "meta_info": {"output_token_logprobs": [[logprob, token_id, text], ...],
      "finish_reason": {"type": "stop"|"length"|"abort", "matched": ...}, "weight_version": str?}}
  One request per (prompt, sample); many in flight (bounded). Response tokens are taken from
  output_token_logprobs, which include the EOS/stop token that ended the response.
  LOG-PROBS: SGLang returns log-probs AFTER temperature scaling unless the server runs with
  SGLANG_RETURN_ORIGINAL_LOGPROB=1 (0.5.4+; RETURN_ORIGINAL_LOGPROB=1 on 0.5.2 - 0.5.3; older
  versions always scale). At temperature 1.0 (training) both are the raw model log-probs; for
  other temperatures set that variable in the recipe.
- POST /pause_generation {} ; POST /continue_generation {} ; POST /flush_cache (HTTP 400 while
  requests still run: retried with backoff, up to `flush_retries` times, as slime does)
- POST /update_weights_from_disk {"model_path": dir, "weight_version": "7"}
- POST /init_weights_update_group {"master_address", "master_port", "rank_offset", "world_size",
  "group_name", "backend"}
- POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name",
  "flush_cache": false, "weight_version": "7"}; the trainer broadcasts each tensor (in `names`
  order) from rank 0 of the group WHILE the request is pending (the server blocks receiving).
  From SGLang 0.5.21 (chosen from the server's reported version) the buckets sit between
  POST /begin_weight_update {} and POST /end_weight_update {}.
- A failed NCCL update (no rollback on the server) ends the update session (/end_weight_update where
  begun), leaves generation PAUSED, drops the group, and the engine refuses to generate until a full
  update succeeds. A failed /update_weights_from_disk (SGLang reloads the previous weights itself)
  continues generation; the engine still refuses to generate until a full update succeeds.
- GET /health ; GET /get_server_info (or /server_info on newer versions) -> {"version": ...}
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor

from .server_engine import ServerEngine
from .types import EngineError, GenerationOutput, SamplingParams
from .versions import one_server_version
from .versions import sglang_needs_update_session
from .weight_sync import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    NcclSyncConfig,
    SafetensorsDirWriter,
    default_broadcast,
    dtype_name,
    init_custom_process_group,
)


class SGLangEngine(ServerEngine):
    """`SGLangEngine(urls, *, weight_sync="disk"|"nccl", bucket_bytes=512MB, disk_writer=None,
    disk_root=None, template_dir=None, nccl=None, broadcast_fn=None, group_factory=None,
    max_in_flight_per_server=512, timeout_s=3600, max_retries=3, backoff_s=1.0, check_version=True,
    pause=True, flush_retries=60, connect=True)`.

    weight_sync="disk": each version is written by `disk_writer(buckets, version) -> dir`
    (default: SafetensorsDirWriter(disk_root, template_dir), on a filesystem the servers see),
    then one /update_weights_from_disk per server. weight_sync="nccl": see NcclSyncConfig.
    `broadcast_fn(tensor, group)` and `group_factory(master_address, master_port, rank,
    world_size, group_name, backend)` are injectable (tests; custom transports).
    """

    name = "sglang"

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        weight_sync: str = "disk",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        disk_writer: Optional[Callable[[Iterable[Bucket], int], str]] = None,
        disk_root: Optional[str] = None,
        template_dir: Optional[str] = None,
        nccl: Optional[NcclSyncConfig] = None,
        broadcast_fn: Optional[Callable[[Tensor, Any], None]] = None,
        group_factory: Optional[Callable[..., Any]] = None,
        max_in_flight_per_server: int = 512,
        timeout_s: float = 3600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        check_version: bool = True,
        pause: bool = True,
        flush_retries: int = 60,
        connect: bool = True,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> None:
        if weight_sync not in ("disk", "nccl"):
            raise ValueError(f"sglang: weight_sync must be 'disk' or 'nccl', got {weight_sync!r}")
        super().__init__(urls, max_in_flight_per_server=max_in_flight_per_server, timeout_s=timeout_s,
                         max_retries=max_retries, backoff_s=backoff_s, sleep=sleep)
        self.flush_retries = int(flush_retries)
        self.weight_sync = weight_sync
        self.bucket_bytes = int(bucket_bytes)
        if weight_sync == "disk" and disk_writer is None and disk_root is not None:
            disk_writer = SafetensorsDirWriter(disk_root, template_dir=template_dir)
        self.disk_writer = disk_writer  # None: generation only; update_weights raises a clear error
        if weight_sync == "nccl":
            self._check_nccl(nccl)
        self.nccl = nccl
        self.broadcast_fn = broadcast_fn or default_broadcast
        self.group_factory = group_factory or init_custom_process_group
        self.pause = pause
        self._updated_once = False
        self.server_versions: list[Optional[str]] = []
        self.server_version: Optional[str] = None
        if connect:
            self._connect(check_version)

    def _connect(self, check: bool) -> None:
        """Read and check every server's version (inside the window, all equal)."""
        versions = {u: self._server_version(u) for u in self.client.urls}
        self.server_versions = [versions[u] for u in self.client.urls]
        self.server_version = one_server_version("sglang", versions, check=check)

    # ---------------------------------------------------------------- info
    def _server_version(self, url: str) -> Optional[str]:
        for path in ("/get_server_info", "/server_info"):
            try:
                info = self.client.get(path, url=url)
            except EngineError as exc:
                if "HTTP 404" in str(exc):
                    continue
                raise
            if isinstance(info, dict):
                return info.get("version") or (info.get("internal_states") or [{}])[0].get("version")
        return None

    # ------------------------------------------------------------ generate
    @staticmethod
    def sampling_body(params: SamplingParams, row: int) -> dict:
        sp: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "skip_special_tokens": False,
        }
        if params.stop_token_ids:
            sp["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            sp["sampling_seed"] = int(params.seed) + row
        return sp

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        if not self._consistent:
            raise EngineError("sglang: a previous weight update failed midway; push a full set of weights first")
        prompts = self._check_prompts(prompts)
        rows = [p for p in prompts for _ in range(params.n)]
        bodies = [
            {"input_ids": r, "sampling_params": self.sampling_body(params, i), "return_logprob": True}
            for i, r in enumerate(rows)
        ]
        responses = self.client.map_post("/generate", bodies)
        return [self._parse(r, row) for r, row in zip(responses, rows)]

    def _parse(self, resp: Any, prompt: list[int]) -> GenerationOutput:
        if isinstance(resp, list) and len(resp) == 1:
            resp = resp[0]
        try:
            meta = resp["meta_info"]
            pairs = meta["output_token_logprobs"]
            ids = [int(p[1]) for p in pairs]
            lps = [float(p[0]) for p in pairs]
            fr = meta.get("finish_reason") or {}
            kind = fr.get("type") if isinstance(fr, dict) else fr
        except (KeyError, TypeError, IndexError) as exc:
            raise EngineError(f"sglang: unexpected /generate response ({exc!r}): {str(resp)[:300]}") from exc
        if "output_ids" in resp and [int(t) for t in resp["output_ids"]] != ids:
            raise EngineError("sglang: output_ids and output_token_logprobs disagree")
        if kind not in ("stop", "length"):
            raise EngineError(f"sglang: generation ended with finish_reason {fr!r}")
        served = meta.get("weight_version")
        if self._updated_once and served is not None and str(served) != str(self.weight_version):
            raise EngineError(f"sglang: server answered with weight_version {served!r}, expected {self.weight_version}")
        return GenerationOutput(prompt_ids=list(prompt), response_ids=ids, response_logprobs=lps, finish_reason=kind)

    # ------------------------------------------------------------- weights
    def update_weights_buckets(self, buckets: Iterable[Bucket], version: int) -> None:
        """pause -> (disk | nccl buckets) -> flush_cache -> continue. On failure the engine refuses
        to generate until a later full update succeeds; generation is continued in any case."""
        version = self._check_version(version)
        if self.weight_sync == "disk" and self.disk_writer is None:
            raise EngineError("sglang: weight_sync='disk' needs disk_writer or disk_root (a directory every server "
                              "can read, plus template_dir with config.json)")
        if self.weight_sync == "nccl" and self.nccl is None:
            raise EngineError("sglang: weight_sync='nccl' needs nccl=NcclSyncConfig(master_address, master_port, "
                              "workers_per_server)")
        if self.pause:
            self.client.post_all("/pause_generation", {})
        self._consistent = False
        intact = True  # the servers still hold a complete set of weights (old or new)
        try:
            if self.weight_sync == "disk":
                path = self.disk_writer(buckets, version)
                body = {"model_path": path, "weight_version": str(version)}
                self._check_ok(self.client.post_all("/update_weights_from_disk", body), "update_weights_from_disk")
            else:
                intact = False
                self._nccl_update(buckets, version)
                intact = True
            self.flush_cache()
            self._consistent = True
            self.weight_version = version
            self._updated_once = True
        finally:
            if self.pause and intact:
                self.client.post_all("/continue_generation", {})

    def _nccl_update(self, buckets: Iterable[Bucket], version: int) -> None:
        """Group (once), then the buckets, inside /begin_weight_update ... /end_weight_update on >= 0.5.21."""
        self._ensure_group()
        session = sglang_needs_update_session(self.server_version)
        if session:
            self.client.post_all("/begin_weight_update", {})
        try:
            for bucket in buckets:
                self._send_bucket(bucket, version)
        except BaseException as exc:
            self._group = None  # a broken collective cannot be reused
            if session:
                try:
                    self.client.post_all("/end_weight_update", {}, timeout_s=30)
                except EngineError:
                    pass
            raise EngineError(f"sglang: weight update to version {version} failed; generation stays paused (the "
                              f"servers may hold partly loaded weights) until a full update succeeds: {exc}") from exc
        if session:
            self.client.post_all("/end_weight_update", {})

    def flush_cache(self) -> None:
        """POST /flush_cache to every server; HTTP 400 (requests still running) is retried with
        the client's exponential backoff up to `flush_retries` times (other errors at once)."""
        for u in self.client.urls:
            for attempt in range(self.flush_retries + 1):
                try:
                    self.client.post("/flush_cache", None, url=u)
                    break
                except EngineError as exc:
                    if "HTTP 400" not in str(exc) or attempt == self.flush_retries:
                        raise EngineError(f"sglang: /flush_cache on {u} still refused after {attempt + 1} "
                                          f"attempt(s): {exc}") from exc
                    self.client.wait_before_retry(attempt)

    @staticmethod
    def _check_ok(results: list[Any], what: str) -> None:
        for r in results:
            if isinstance(r, dict) and r.get("success") is False:
                raise EngineError(f"sglang: {what} failed: {r.get('message')}")

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        cfg = self.nccl
        bodies = [
            {"master_address": cfg.master_address, "master_port": int(cfg.master_port), "rank_offset": off,
             "world_size": cfg.world_size, "group_name": cfg.group_name, "backend": cfg.backend}
            for off in cfg.rank_offsets()
        ]
        # servers join the rendezvous while we create our side
        res, group = self._post_each_beside(
            "/init_weights_update_group", bodies, thread_name="sglang-init-group",
            local=lambda: self.group_factory(cfg.master_address, cfg.master_port, 0, cfg.world_size,
                                             cfg.group_name, cfg.backend))
        self._check_ok(res, "init_weights_update_group")
        self._group = group

    def _send_bucket(self, bucket: Bucket, version: int) -> None:
        cfg = self.nccl
        body = {
            "names": [n for n, _ in bucket],
            "dtypes": [dtype_name(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": cfg.group_name,
            "flush_cache": False,
            "weight_version": str(version),
        }

        def broadcast() -> None:
            for _, tensor in bucket:
                self.broadcast_fn(tensor.detach().to(cfg.device).contiguous(), self._group)

        results, _ = self._post_each_beside("/update_weights_from_distributed", [body] * len(self.client.urls),
                                            broadcast, thread_name="sglang-update-bucket")
        self._check_ok(results, "update_weights_from_distributed")

    def shutdown(self) -> None:
        if self._group is not None:
            try:
                self.client.post_all("/destroy_weights_update_group", {"group_name": self.nccl.group_name})
            except EngineError:
                pass
            self._group = None
        self.client.close()
