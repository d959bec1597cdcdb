"""A local JSON-over-HTTP server for tests and benchmarks that stand in for SGLang / vLLM servers.

`JsonServer(handle, host="127.0.0.1", port=0)` serves GET and POST on a background thread: each request
body is parsed as JSON (None when empty) and `handle(method, path, body) -> (status, obj)` answers it
(path without the query string; obj None sends an empty body). An exception in `handle` answers HTTP 500
with `{"success": false, "message": ...}`, as the engines' servers do. `.url` is where it listens;
`.close()` stops it.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Handle = Callable[[str, str, Any], tuple[int, Any]]


class JsonServer:
    def __init__(self, handle: Handle, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    status, obj = handle(method, self.path.split("?")[0], json.loads(raw) if raw else None)
                except Exception as exc:  # noqa: BLE001 - a server answers 500
                    status, obj = 500, {"success": False, "message": f"{type(exc).__name__}: {exc}"}
                data = json.dumps(obj).encode() if obj is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
