"""Shared JSON-over-HTTP client for engine servers (SGLang, vLLM).

- several server URLs; each request goes to the least-loaded server (fewest requests in flight,
  ties broken round-robin), or to a pinned URL (weight updates go to every server explicitly);
- a bound on requests in flight across all servers (`max_in_flight`, a semaphore), an optional bound
  per server (`max_in_flight_per_server`: a request waits for a server with a free slot; the total
  bound then defaults to it times the number of servers) and a thread pool for `map` (concurrent
  requests, results in input order);
- timeouts (connect, read), retries with exponential backoff (+ jitter) on connection errors,
  timeouts, HTTP 429/5xx; a retried unpinned request may fail over to another server;
- when retries are exhausted: `EngineError` naming the engine, the method, the URL(s) and the
  last error. Other HTTP 4xx fail at once (a bad request does not get better by retrying).

Uses `requests` (one Session per thread).
"""
from __future__ import annotations

import itertools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import requests

from .types import EngineError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HttpClient:
    """`HttpClient(urls, *, name, max_in_flight=64, max_in_flight_per_server=None, timeout_s=3600,
    connect_timeout_s=10, max_retries=3, backoff_s=0.5, backoff_max_s=30)`.

    `max_retries` = extra attempts after the first (0 = try once).
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        name: str = "http",
        max_in_flight: Optional[int] = None,
        max_in_flight_per_server: Optional[int] = None,
        timeout_s: float = 3600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        self.urls = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError(f"{name}: at least one server URL is required")
        if max_in_flight_per_server is not None and int(max_in_flight_per_server) < 1:
            raise ValueError(f"{name}: max_in_flight_per_server must be >= 1, got {max_in_flight_per_server}")
        if max_in_flight is None:
            max_in_flight = 64 if max_in_flight_per_server is None else int(max_in_flight_per_server) * len(self.urls)
        if max_in_flight < 1:
            raise ValueError(f"{name}: max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight_per_server = None if max_in_flight_per_server is None else int(max_in_flight_per_server)
        self.name = name
        self.max_in_flight = int(max_in_flight)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._in_flight = {u: 0 for u in self.urls}
        self._rr = itertools.count()
        self._local = threading.local()
        self._pool: Optional[ThreadPoolExecutor] = None
        self.peak_in_flight = 0  # observed maximum (for tests and logs)
        self._total_in_flight = 0

    # ------------------------------------------------------------------ public
    def post(self, path: str, body: Any = None, *, url: Optional[str] = None, timeout_s: Optional[float] = None,
             retries: Optional[int] = None) -> Any:
        return self.request("POST", path, body, url=url, timeout_s=timeout_s, retries=retries)

    def get(self, path: str, *, url: Optional[str] = None, timeout_s: Optional[float] = None,
            retries: Optional[int] = None) -> Any:
        return self.request("GET", path, None, url=url, timeout_s=timeout_s, retries=retries)

    def post_all(self, path: str, body: Any = None, *, timeout_s: Optional[float] = None) -> list[Any]:
        """POST the same body to every server (concurrently); results in `self.urls` order."""
        return self.run_concurrently([lambda u=u: self.post(path, body, url=u, timeout_s=timeout_s) for u in self.urls])

    def map_post(self, path: str, bodies: Sequence[Any], *, timeout_s: Optional[float] = None) -> list[Any]:
        """POST each body to the least-loaded server, at most `max_in_flight` at a time; results in order."""
        return self.run_concurrently([lambda b=b: self.post(path, b, timeout_s=timeout_s) for b in bodies])

    def wait_before_retry(self, attempt: int) -> None:
        """Sleep before retry `attempt + 1`: backoff_s * 2**attempt (at most backoff_max_s), + up to 10% jitter."""
        delay = min(self.backoff_max_s, self.backoff_s * (2**attempt))
        self._sleep(delay * (1.0 + 0.1 * random.random()))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # --------------------------------------------------------------- internals
    def run_concurrently(self, thunks: list[Callable[[], Any]]) -> list[Any]:
        """Run thunks on the client pool (each still bounded by max_in_flight); results in order,
        the first exception re-raised after all finished."""
        if len(thunks) == 1:
            return [thunks[0]()]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix=f"{self.name}-http")
        futures = [self._pool.submit(t) for t in thunks]
        results, first_error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - keep draining, re-raise the first
                results.append(None)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    def _has_slot(self, u: str) -> bool:
        return self.max_in_flight_per_server is None or self._in_flight.get(u, 0) < self.max_in_flight_per_server

    def _acquire(self, url: Optional[str], exclude: set[str]) -> str:
        """Reserve a slot on `url` (pinned) or on the least-loaded server with a free slot, preferring
        servers not in `exclude` (ties round-robin); waits while none has one. Caller holds a global slot."""
        with self._freed:
            while True:
                if url is not None:
                    target = url if self._has_slot(url) else None
                else:
                    free = [u for u in self.urls if self._has_slot(u)]
                    cands = [u for u in free if u not in exclude] or free
                    target = None
                    if cands:
                        start = next(self._rr) % len(cands)
                        target = min(cands[start:] + cands[:start], key=lambda u: self._in_flight[u])
                if target is not None:
                    self._in_flight[target] = self._in_flight.get(target, 0) + 1
                    self._total_in_flight += 1
                    self.peak_in_flight = max(self.peak_in_flight, self._total_in_flight)
                    return target
                self._freed.wait()

    def _release(self, target: str) -> None:
        with self._freed:
            self._in_flight[target] -= 1
            self._total_in_flight -= 1
            self._freed.notify_all()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def request(self, method: str, path: str, body: Any = None, *, url: Optional[str] = None,
                timeout_s: Optional[float] = None, retries: Optional[int] = None) -> Any:
        """One logical request with retries; returns the decoded JSON (or text if not JSON)."""
        retries = self.max_retries if retries is None else int(retries)
        timeout = (self.connect_timeout_s, self.timeout_s if timeout_s is None else float(timeout_s))
        tried: list[str] = []
        last_err = ""
        for attempt in range(retries + 1):
            with self._slots:
                # unpinned: fail over to untried servers
                target = self._acquire(url.rstrip("/") if url else None, set(tried))
                tried.append(target)
                try:
                    resp = self._session().request(method, target + path, json=body, timeout=timeout)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    last_err = f"{type(exc).__name__}: {exc}"
                    resp = None
                finally:
                    self._release(target)
            if resp is not None:
                if resp.status_code < 400:
                    return _decode(resp)
                last_err = f"HTTP {resp.status_code}: {resp.text[:500]}"
                if resp.status_code not in RETRY_STATUS:
                    raise EngineError(f"{self.name}: {method} {target}{path} failed: {last_err}")
            if attempt < retries:
                self.wait_before_retry(attempt)
        servers = ", ".join(dict.fromkeys(tried))
        raise EngineError(
            f"{self.name}: {method} {path} failed after {retries + 1} attempt(s) on {servers}; last error: {last_err}"
        )


def _decode(resp: requests.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except (ValueError, json.JSONDecodeError):
        return resp.text
