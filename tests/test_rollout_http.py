"""Shared HTTP client against a local stand-in server (it stands in for an SGLang/vLLM server:
it records every request body and answers from scripted handlers). Also imported by the
SGLang/vLLM adapter tests (`from test_rollout_http import StandInServer`)."""
import socket
import threading
import time

import pytest

from fipo_megatron.rollout import EngineError
from fipo_megatron.rollout.http_client import HttpClient
from fipo_megatron.testing.json_server import JsonServer


class StandInServer:
    """Local HTTP server on 127.0.0.1:<free port>. `routes[(method, path)] = fn(body) -> (status, obj)`.
    Every request is recorded as (method, path, body) in `self.requests`."""

    def __init__(self, routes=None):
        self.routes = dict(routes or {})
        self.requests = []
        self.lock = threading.Lock()
        self._server = JsonServer(self._handle)
        self.url = self._server.url

    def _handle(self, method, path, body):
        with self.lock:
            self.requests.append((method, path, body))
        fn = self.routes.get((method, path))
        return (404, {"error": f"no route {method} {path}"}) if fn is None else fn(body)

    def bodies(self, path, method="POST"):
        with self.lock:
            return [b for m, p, b in self.requests if p == path and m == method]

    def paths(self):
        with self.lock:
            return [(m, p) for m, p, _ in self.requests]

    def close(self):
        self._server.close()


def free_dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def server():
    srv = StandInServer()
    yield srv
    srv.close()


def test_retries_with_exponential_backoff(server):
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        return (503, {"error": "warming up"}) if calls["n"] <= 2 else (200, {"ok": body["x"]})

    server.routes[("POST", "/echo")] = flaky
    sleeps = []
    client = HttpClient(server.url, name="t", max_retries=3, backoff_s=0.5, sleep=sleeps.append)
    assert client.post("/echo", {"x": 7}) == {"ok": 7}
    assert calls["n"] == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 0.55 and 1.0 <= sleeps[1] <= 1.1
    assert server.bodies("/echo") == [{"x": 7}] * 3


def test_server_staying_down_names_url():
    dead = free_dead_url()
    sleeps = []
    client = HttpClient([dead], name="sglang", max_retries=2, backoff_s=0.1, connect_timeout_s=1, sleep=sleeps.append)
    with pytest.raises(EngineError, match=f"sglang: POST /generate failed after 3 attempt.*{dead}"):
        client.post("/generate", {})
    assert len(sleeps) == 2


def test_failing_5xx_exhausts_and_4xx_fails_fast(server):
    server.routes[("POST", "/bad")] = lambda b: (400, {"error": "bad input"})
    server.routes[("POST", "/down")] = lambda b: (500, {"error": "boom"})
    client = HttpClient(server.url, name="t", max_retries=2, sleep=lambda s: None)
    with pytest.raises(EngineError, match=r"HTTP 400.*bad input"):
        client.post("/bad", {})
    assert len(server.bodies("/bad")) == 1
    with pytest.raises(EngineError, match=r"after 3 attempt.*HTTP 500"):
        client.post("/down", {})


def test_failover_to_live_server(server):
    server.routes[("POST", "/g")] = lambda b: (200, {"i": b["i"]})
    dead = free_dead_url()
    client = HttpClient([dead, server.url], name="t", max_retries=1, connect_timeout_s=1, sleep=lambda s: None)
    out = client.map_post("/g", [{"i": i} for i in range(6)])
    assert out == [{"i": i} for i in range(6)]


def test_bounded_in_flight_and_spread_over_servers():
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(body):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return 200, {"i": body["i"]}

    a, b = StandInServer({("POST", "/g"): slow}), StandInServer({("POST", "/g"): slow})
    try:
        client = HttpClient([a.url, b.url], name="t", max_in_flight=3)
        out = client.map_post("/g", [{"i": i} for i in range(12)])
        assert out == [{"i": i} for i in range(12)]
        assert state["peak"] == 3 and client.peak_in_flight == 3
        assert len(a.bodies("/g")) >= 4 and len(b.bodies("/g")) >= 4
        assert client.post_all("/g", {"i": 99}) == [{"i": 99}, {"i": 99}]
        client.close()
    finally:
        a.close()
        b.close()


def test_per_server_in_flight_limit():
    """Each server sees at most max_in_flight_per_server requests at once; together they use all slots."""
    now, peak, lock = {}, {}, threading.Lock()

    def slow_for(tag):
        def slow(body):
            with lock:
                now[tag] = now.get(tag, 0) + 1
                peak[tag] = max(peak.get(tag, 0), now[tag])
            time.sleep(0.05)
            with lock:
                now[tag] -= 1
            return 200, {"i": body["i"]}
        return slow

    a, b = StandInServer({("POST", "/g"): slow_for("a")}), StandInServer({("POST", "/g"): slow_for("b")})
    try:
        client = HttpClient([a.url, b.url], name="t", max_in_flight_per_server=2)
        assert client.max_in_flight == 4
        out = client.map_post("/g", [{"i": i} for i in range(16)])
        assert out == [{"i": i} for i in range(16)]
        assert peak == {"a": 2, "b": 2} and client.peak_in_flight == 4
        client.close()
        with pytest.raises(ValueError, match="max_in_flight_per_server must be >= 1"):
            HttpClient([a.url], max_in_flight_per_server=0)
    finally:
        a.close()
        b.close()
