"""Shared part of the engines that drive inference servers over HTTP (SGLang, vLLM server).

`ServerEngine` owns what `SGLangEngine` and `VLLMServerEngine` do alike:
- the `HttpClient` over the server URLs (named after the engine, at most `max_in_flight_per_server`
  requests per server, `sleep` injectable for tests);
- `update_weights`: the stream cut into `bucket_bytes` buckets for `update_weights_buckets`;
- the NCCL config check (one `workers_per_server` entry per server URL);
- `health()`: False after a weight update failed midway (`_consistent`), else True only when every
  server answers GET /health within 10 s (no retries); never raises;
- the weight update in phases, so that several trainer ranks (one sender per pipeline stage) can take
  part in one update (`rollout.staged_sync` drives them across ranks; `update_weights_buckets` runs
  them in sequence for a single sender):
  1. `begin_update(version)` (leader, global rank 0): checks, pause, mark the engine inconsistent;
  2. `prepare_send(version)` (every sender): create its update group if it has none;
  3. `open_update(version)` (leader): the servers' update session, where the version needs one;
  4. `send_buckets(buckets, version) -> result` (every sender): a group kept from an earlier update is
     probed first (inside the session) and rebuilt on a new name and port if a server lost it, e.g.
     after a restart (`NcclSyncConfig.group_for`); then its buckets, each sent on a background thread
     while the next is built (`buckets.send_overlapped`, `overlap=False` turns it off);
  5. `end_update(version, results)` (leader): finish (disk: the index of every sender's shards and the
     reload), flush, resume; on failure it applies the failure rules itself and raises;
  `abort_update(version)` (leader, after any failure): the failure rules (never raises).
  `supports_stage_senders` says whether senders other than the leader may take part.
- `_post_each_beside(path, bodies, local, thread_name)`: the NCCL handshake pattern. Servers block
  inside their request until the trainer side joins the collective, so the requests (bodies[i] to
  server i, concurrently, never retried: a half-received broadcast cannot be replayed) run on a
  helper thread while `local()` (create the group / broadcast the tensors) runs on the caller's.
"""
from __future__ import annotations

import threading
from abc import abstractmethod
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor

from .base import BaseEngine
from .device_threads import start_daemon
from .http_client import HttpClient
from .types import EngineError
from .weight_sync import Bucket, NcclSyncConfig, bucketize


class ServerEngine(BaseEngine):
    """Base class; subclasses set `name` and `bucket_bytes` and implement generate / update_weights_buckets."""

    bucket_bytes: int

    def __init__(self, urls: Sequence[str] | str, *, max_in_flight_per_server: int, timeout_s: float,
                 max_retries: int, backoff_s: float, sleep: Optional[Callable[[float], None]] = None) -> None:
        super().__init__()
        kw = {} if sleep is None else {"sleep": sleep}
        self.client = HttpClient(urls, name=self.name, max_in_flight_per_server=max_in_flight_per_server,
                                 timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, **kw)
        self._group: Any = None
        self._consistent = True

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        self.update_weights_buckets(bucketize(named_tensors, self.bucket_bytes), version)

    def update_weights_buckets(self, buckets: Iterable[Bucket], version: int) -> None:
        """The whole update with this engine as the only sender (phases 1-5 of the module docstring).
        Failures raise EngineError after `abort_update` applied the failure rules."""
        version = self.begin_update(version)
        try:
            self.prepare_send(version)
            self.open_update(version)
            result = self.send_buckets(buckets, version)
        except BaseException as exc:
            self.abort_update(version)
            self._raise_failure(version, exc)
        self.end_update(version, [result])

    # --------------------------------------------------------- update phases
    @property
    def supports_stage_senders(self) -> bool:
        """True when senders on other trainer ranks may send their own part of the weights."""
        return False

    @abstractmethod
    def begin_update(self, version: int) -> int:
        """Leader: check, pause; returns the checked version."""

    def prepare_send(self, version: int) -> None:
        """Every sender: make sure its update group is usable (nothing to do by default)."""

    def open_update(self, version: int) -> None:
        """Leader: open the servers' update session where needed (nothing by default)."""

    @abstractmethod
    def send_buckets(self, buckets: Iterable[Bucket], version: int) -> Any:
        """Every sender: send its buckets; returns what `end_update` needs from it (picklable)."""

    @abstractmethod
    def end_update(self, version: int, results: Sequence[Any]) -> None:
        """Leader: finish the update with every sender's result; raises EngineError on failure."""

    @abstractmethod
    def abort_update(self, version: int) -> None:
        """Leader: apply the failure rules after a failed update (never raises)."""

    def _raise_failure(self, version: int, exc: BaseException) -> None:
        err = self.failure(version, exc)
        if err is exc:
            raise exc
        raise err from exc

    def failure(self, version: int, exc: BaseException) -> EngineError:
        """The EngineError a failed update raises (subclasses say what state the servers are left in)."""
        return exc if isinstance(exc, EngineError) else EngineError(f"{self.name}: weight update to version "
                                                                    f"{version} failed: {exc}")

    def _check_nccl(self, nccl: Optional[NcclSyncConfig]) -> None:
        """ValueError unless `nccl` is None or has one workers_per_server entry per server."""
        if nccl is not None and len(nccl.workers_per_server) != len(self.client.urls):
            raise ValueError(f"{self.name}: nccl.workers_per_server has {len(nccl.workers_per_server)} entries "
                             f"for {len(self.client.urls)} servers")

    def health(self) -> bool:
        if not self._consistent:
            return False
        for u in self.client.urls:
            try:
                self.client.get("/health", url=u, timeout_s=10, retries=0)
            except EngineError:
                return False
        return True

    def _post_each_beside(self, path: str, bodies: Sequence[Any], local: Callable[[], Any],
                          thread_name: str, poll_s: float = 0.05) -> tuple[list[Any], Any]:
        """POST bodies[i] to server i (concurrently, retries=0) while `local()` runs, both on threads.

        Returns (server responses in URL order, local()'s result) once both finished. Whichever side
        fails FIRST is raised at once: a server that refuses the request (HTTP 4xx/5xx, connection
        error) raises EngineError while `local()` may still wait in its rendezvous / collective (that
        daemon thread is abandoned: the group is unusable, the caller drops it), so a refusal never
        turns into a long hang; an exception of `local()` is raised without waiting for the servers.
        """
        state: dict[str, Any] = {}
        changed = threading.Event()

        def run(key: str, fn: Callable[[], Any]) -> None:
            try:
                state[key] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                state[key + "_error"] = exc
            finally:
                changed.set()

        def request() -> list[Any]:
            return self.client.run_concurrently(
                [lambda u=u, b=b: self.client.post(path, b, url=u, retries=0)
                 for u, b in zip(self.client.urls, bodies)])

        for key, fn in (("servers", request), ("local", local)):
            start_daemon(run, key, fn, name=f"{thread_name}-{key}")  # on the caller's CUDA device
        while True:
            changed.wait(poll_s)
            changed.clear()
            if "servers_error" in state:
                exc = state["servers_error"]
                if "local" in state or "local_error" in state:
                    raise exc
                raise EngineError(f"{self.name}: the server side of {path} failed while the trainer side was "
                                  f"still waiting (abandoned): {exc}") from exc
            if "local_error" in state:
                raise state["local_error"]
            if "servers" in state and "local" in state:
                return state["servers"], state["local"]
