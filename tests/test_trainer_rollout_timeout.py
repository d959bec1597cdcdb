"""A hung rollout server: --rollout-timeout bounds each request, a stalled rollout prints a progress line,
and when the engine gives up EVERY rank stops with the engine's error (2 gloo ranks, a local fake
SGLang server whose /generate never answers)."""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fipo_megatron.testing.distributed import run_distributed


class _Hang(BaseHTTPRequestHandler):
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server API
        body = json.dumps({"version": "0.5.3"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.release.wait(30)  # /generate hangs

    def log_message(self, *a):
        pass


@pytest.fixture
def hung_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hang)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Hang.release.set()
    srv.shutdown()
    srv.server_close()


def _ranks(rank, world, url, root):
    from fipo_megatron.rollout.types import SamplingParams
    from fipo_megatron.trainer import parse_args
    from fipo_megatron.trainer.loop import RolloutError, rollout_everywhere
    from fipo_megatron.trainer.setup import build_engine

    cfg = parse_args(["--hf-model-dir", os.path.join(root, "hf"), "--train-data", os.path.join(root, "t.jsonl"),
                      "--rollout-engine", "sglang", "--rollout-urls", url, "--weight-sync", "disk",
                      "--rollout-timeout", "0.4", "--output-dir", os.path.join(root, "out")], world_size=world)
    engine = build_engine(cfg, seed=0)
    lines = []
    t0 = time.monotonic()
    try:
        rollout_everywhere(lambda tick: engine.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=4)), 7,
                           is_rank0=rank == 0, log_info=lines.append, total=4, detail="engine sglang",
                           stall_interval_s=1.0)
    except RolloutError as exc:
        return {"error": str(exc), "lines": lines, "seconds": time.monotonic() - t0,
                "timeout": engine.client.timeout_s if engine is not None else None}
    return {"error": None}


def test_hung_server_stops_every_rank_with_the_engine_error(tmp_path, hung_server):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text("{}\n")
    r0, r1 = run_distributed(_ranks, 2, hung_server, str(tmp_path))
    assert r0["timeout"] == 0.4  # --rollout-timeout reached the engine's HTTP client
    for r in (r0, r1):  # both ranks stop with rank 0's engine error, within the retries' time
        assert r["error"].startswith("step 7: rollout failed: EngineError: sglang: POST /generate failed after 4 "
                                     f"attempt(s) on {hung_server}")
        assert "ReadTimeout" in r["error"] and r["seconds"] < 30
    assert any(line.startswith("rollout 7: no progress for 1 s (0/4 done; engine sglang)") for line in r0["lines"])
