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
  With `flatten=True` one request per dtype of a bucket, with "load_format": "flattened_bucket",
  and one broadcast of that dtype's concatenated buffer. An update that reuses a group first sends
  the same request with empty names/dtypes/shapes (no weight_version): a probe that a restarted
  server refuses at once (it no longer has the group), which rebuilds the group.
  From SGLang 0.5.21 (chosen from the server's reported version) the buckets (and the probe) sit
  between POST /begin_weight_update {} and POST /end_weight_update {}.
- POST /destroy_weights_update_group {"group_name"} (shutdown; after a rebuild, the old group)
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
from .versions import parse_version, sglang_needs_update_session
from .buckets import flatten_by_dtype, send_overlapped
from .weight_sync import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    NcclSyncConfig,
    SafetensorsDirWriter,
    default_broadcast,
    dtype_name,
    init_custom_process_group,
    supports_stage_writers,
)


# `load_format` on UpdateWeightsFromDistributedReqInput: absent in 0.5.3, present in 0.5.20 - 0.5.23 (the
# audited wheels, tests/engine_fields_audit.py); the versions in between were not read, so they are refused
SGLANG_FLATTENED_FROM = (0, 5, 20)


class SGLangEngine(ServerEngine):
    """`SGLangEngine(urls, *, weight_sync="disk"|"nccl", bucket_bytes=512MB, disk_writer=None,
    disk_root=None, template_dir=None, nccl=None, broadcast_fn=None, group_factory=None,
    max_in_flight_per_server=512, timeout_s=3600, max_retries=3, backoff_s=1.0, check_version=True,
    pause=True, flush_retries=60, connect=True, stage=None, flatten=False, overlap=True, probe_group=True)`.

    weight_sync="disk": each version is written by `disk_writer(buckets, version) -> dir`
    (default: SafetensorsDirWriter(disk_root, template_dir), on a filesystem the servers see),
    then one /update_weights_from_disk per server. weight_sync="nccl": see NcclSyncConfig.
    `broadcast_fn(tensor, group)` and `group_factory(master_address, master_port, rank,
    world_size, group_name, backend)` are injectable (tests; custom transports).

    Several senders (one per pipeline stage, `rollout.staged_sync`): the engine on stage s's sender
    has `stage=s` and `nccl.for_stage(s, num_stages)` (its own group: the servers' workers join every
    stage's group; SGLang serialises the stages' /update_weights_from_distributed requests itself);
    only the leader's engine (global rank 0) generates, pauses and resumes. Disk: every stage writes
    its shards into the same version directory, the leader writes the index and posts the reload.
    `flatten=True`: one /update_weights_from_distributed per dtype of a bucket with
    `load_format="flattened_bucket"` and ONE broadcast of the dtype's concatenated buffer (SGLang's
    `_update_bucketed_weights_from_distributed` / FlattenedTensorBucket; off by default: not run
    against a real server here). `overlap`: bucket k is sent while bucket k+1 is built.
    `probe_group`: before an update reuses a group, an empty request checks that every server still
    knows it; after a server restart the group is rebuilt (new name and port) and the update goes on.
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
        stage: Optional[int] = None,
        flatten: bool = False,
        overlap: bool = True,
        probe_group: bool = True,
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
        self.stage = None if stage is None else int(stage)
        self.flatten = bool(flatten)
        self.overlap = bool(overlap)
        self.probe_group = bool(probe_group)
        self._updated_once = False
        self._session_open = False
        self._generation = 0  # times this sender's group was rebuilt (NcclSyncConfig.group_for)
        self._group_fresh = False
        self.group_rebuilds = 0
        self.last_rebuild_reason: Optional[str] = None
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
    @property
    def supports_stage_senders(self) -> bool:
        """NCCL: one group per stage sender. Disk: a writer with begin / write_shards / finish."""
        return self.weight_sync == "nccl" or supports_stage_writers(self.disk_writer)

    def _check_sync_config(self) -> None:
        if self.weight_sync == "disk" and self.disk_writer is None:
            raise EngineError("sglang: weight_sync='disk' needs disk_writer or disk_root (a directory every server "
                              "can read, plus template_dir with config.json)")
        if self.weight_sync == "nccl" and self.nccl is None:
            raise EngineError("sglang: weight_sync='nccl' needs nccl=NcclSyncConfig(master_address, master_port, "
                              "workers_per_server)")

    def begin_update(self, version: int) -> int:
        """Checks, the disk version's directory (stage writers), pause; the engine refuses to generate
        from here until `end_update` succeeds."""
        version = self._check_version(version)
        self._check_sync_config()
        if self.weight_sync == "nccl" and self.flatten:
            parsed = parse_version(self.server_version)
            if parsed is None or parsed < SGLANG_FLATTENED_FROM:
                raise EngineError(f"sglang {self.server_version}: flatten=True (load_format 'flattened_bucket' on "
                                  f"/update_weights_from_distributed) needs SGLang >= "
                                  f"{'.'.join(map(str, SGLANG_FLATTENED_FROM))}; drop --weight-sync-flatten")
        if self.weight_sync == "disk" and supports_stage_writers(self.disk_writer):
            self.disk_writer.begin(version)
        if self.pause:
            self.client.post_all("/pause_generation", {})
        self._consistent = False
        return version

    def prepare_send(self, version: int) -> None:
        """NCCL: create this sender's group if it has none (the servers' workers join it)."""
        self._check_sync_config()
        if self.weight_sync == "nccl":
            self._ensure_group()

    def open_update(self, version: int) -> None:
        """POST /begin_weight_update on SGLang >= 0.5.21 (NCCL)."""
        if self.weight_sync == "nccl" and sglang_needs_update_session(self.server_version):
            self.client.post_all("/begin_weight_update", {})
            self._session_open = True

    def send_buckets(self, buckets: Iterable[Bucket], version: int) -> dict:
        """Disk: this sender's shards ({"weight_map"}) or, with a plain writer, the whole version
        ({"path"}). NCCL: the group is checked (rebuilt once if a server lost it), then one
        /update_weights_from_distributed per bucket (per dtype of a bucket with `flatten`)."""
        if self.weight_sync == "disk":
            if supports_stage_writers(self.disk_writer):
                return {"weight_map": self.disk_writer.write_shards(buckets, version, self.stage)}
            return {"path": self.disk_writer(buckets, version)}
        try:
            self._check_group_alive()
            sent = send_overlapped(buckets, lambda b: self._send_bucket(b, version), overlap=self.overlap,
                                   thread_name="sglang-send-bucket")
        except BaseException:
            self._drop_group()  # a broken collective cannot be reused
            raise
        return {"stage": self.stage, "buckets": sent}

    def end_update(self, version: int, results: Sequence[Any]) -> None:
        """Disk: the index of every sender's shards, /update_weights_from_disk. NCCL: /end_weight_update.
        Then /flush_cache and /continue_generation. On failure: `abort_update`, then EngineError."""
        try:
            if self.weight_sync == "disk":
                if len(results) == 1 and "path" in results[0]:
                    path = results[0]["path"]
                else:
                    path = self.disk_writer.finish(version, [r["weight_map"] for r in results])
                body = {"model_path": path, "weight_version": str(version)}
                self._check_ok(self.client.post_all("/update_weights_from_disk", body), "update_weights_from_disk")
            elif self._session_open:
                self.client.post_all("/end_weight_update", {})
                self._session_open = False
            self.flush_cache()
        except BaseException as exc:
            self.abort_update(version)
            self._raise_failure(version, exc)
        self._consistent = True
        self.weight_version = version
        self._updated_once = True
        if self.pause:
            self.client.post_all("/continue_generation", {})

    def abort_update(self, version: int) -> None:
        """NCCL (no rollback on the server): end the session where open, stay PAUSED. Disk (the server
        keeps or reloads complete weights itself): continue generation. The engine refuses to
        generate until a full update succeeds either way."""
        self._consistent = False
        try:
            if self.weight_sync == "nccl":
                if self._session_open:
                    self._session_open = False
                    self.client.post_all("/end_weight_update", {}, timeout_s=30)
            elif self.pause:
                self.client.post_all("/continue_generation", {})
        except EngineError:
            pass

    def failure(self, version: int, exc: BaseException) -> EngineError:
        if self.weight_sync == "nccl":
            return EngineError(f"sglang: weight update to version {version} failed; generation stays paused (the "
                               f"servers may hold partly loaded weights) until a full update succeeds: {exc}")
        return super().failure(version, exc)

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
        name, port = cfg.group_for(self._generation)
        bodies = [
            {"master_address": cfg.master_address, "master_port": port, "rank_offset": off,
             "world_size": cfg.world_size, "group_name": name, "backend": cfg.backend}
            for off in cfg.rank_offsets()
        ]
        # servers join the rendezvous while we create our side
        res, group = self._post_each_beside(
            "/init_weights_update_group", bodies, thread_name="sglang-init-group",
            local=lambda: self.group_factory(cfg.master_address, port, 0, cfg.world_size, name, cfg.backend))
        self._check_ok(res, "init_weights_update_group")
        self._group = group
        self._group_fresh = True

    def _drop_group(self) -> None:
        """Forget the group; the next one gets a new name and port (the old store may still be bound)."""
        if self._group is not None:
            self._group = None
            self._generation += 1

    def _check_group_alive(self) -> None:
        """A group made by an earlier update is probed with an empty /update_weights_from_distributed
        (no tensors: nothing to broadcast). A server that restarted no longer knows the group and
        refuses at once; the group is then rebuilt (new name and port, every server joins) before
        any tensor of this update is sent, instead of broadcasting into a group nobody receives.
        The new group is probed too: a server that refuses even that (it refuses empty updates) gets
        no more probes (a warning says so), so a probe never costs more than one rebuild."""
        if self._group is None or self._group_fresh or not self.probe_group:
            self._group_fresh = False
            self._ensure_group()
            return
        err = self._probe()
        if err is None:
            return
        self.group_rebuilds += 1
        self.last_rebuild_reason = err
        old, _ = self.nccl.group_for(self._generation)
        for u in self.client.urls:  # servers that kept the old group: free it (best effort)
            try:
                self.client.post("/destroy_weights_update_group", {"group_name": old}, url=u, retries=0, timeout_s=10)
            except EngineError:
                pass
        self._drop_group()
        self._ensure_group()
        self._group_fresh = False
        again = self._probe()
        if again is not None:
            import warnings

            self.probe_group = False
            warnings.warn(f"sglang: the servers refuse the empty group probe even on a new group ({again}); "
                          f"group probing is off for this engine", stacklevel=2)

    def _probe(self) -> Optional[str]:
        """None when every server accepts an empty update on this sender's group, else the refusal."""
        name, _ = self.nccl.group_for(self._generation)
        body = {"names": [], "dtypes": [], "shapes": [], "group_name": name, "flush_cache": False}
        try:
            self._check_ok(self.client.run_concurrently(
                [lambda u=u: self.client.post("/update_weights_from_distributed", body, url=u, retries=0,
                                              timeout_s=60) for u in self.client.urls]),
                "update_weights_from_distributed")
        except EngineError as exc:
            return str(exc)
        return None

    def _send_bucket(self, bucket: Bucket, version: int) -> None:
        """One request per bucket (tensor by tensor), or with `flatten` one per dtype of the bucket
        (`load_format="flattened_bucket"`: one broadcast of the dtype's concatenated buffer)."""
        cfg = self.nccl
        name, _ = cfg.group_for(self._generation)
        parts = flatten_by_dtype(bucket, cfg.device) if self.flatten else [(bucket, None)]
        for items, flat in parts:
            body = {
                "names": [n for n, _ in items],
                "dtypes": [dtype_name(t.dtype) for _, t in items],
                "shapes": [list(t.shape) for _, t in items],
                "group_name": name,
                "flush_cache": False,
                "weight_version": str(version),
            }
            if flat is not None:
                body["load_format"] = "flattened_bucket"

            def broadcast(items=items, flat=flat) -> None:
                if flat is not None:
                    self.broadcast_fn(flat, self._group)
                    return
                for _, tensor in items:
                    self.broadcast_fn(tensor.detach().to(cfg.device).contiguous(), self._group)

            results, _ = self._post_each_beside("/update_weights_from_distributed", [body] * len(self.client.urls),
                                                broadcast, thread_name="sglang-update-bucket")
            self._check_ok(results, "update_weights_from_distributed")

    def shutdown(self) -> None:
        if self._group is not None:
            try:
                self.client.post_all("/destroy_weights_update_group",
                                     {"group_name": self.nccl.group_for(self._generation)[0]})
            except EngineError:
                pass
            self._group = None
        self.client.close()
