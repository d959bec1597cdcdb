"""A stand-in SGLang server whose one "worker" really receives the weight broadcasts (gloo, CPU).

It stands in for `python -m sglang.launch_server` in the weight-sync tests and benchmark: the HTTP
routes and bodies SGLang documents, and a receiving side built like SGLang's worker
(`init_custom_process_group`: TCPStore rendezvous + PrefixStore(group_name)), so a trainer-side
broadcast that does not match what the server announced fails or hangs here as it would there.

- POST /init_weights_update_group: joins group `group_name` as rank `rank_offset` (one worker).
- POST /update_weights_from_distributed: for each announced tensor an empty tensor of that
  dtype/shape, broadcast from rank 0 of the named group (or, with load_format "flattened_bucket",
  ONE buffer per request: a single dtype, sum of numels, split into views). Refused (HTTP 400) for
  a group it does not know (as after a restart) and, from version 0.5.21, outside
  /begin_weight_update ... /end_weight_update. Empty names: nothing received (the trainer's probe).
- POST /update_weights_from_disk: reads every tensor of the directory's index.
- Weight requests run one at a time (SGLang's scheduler is one loop).
- Test routes: POST /standin/dump {"path"} saves {"received", "log", "groups", "paused"} with
  torch.save; POST /standin/restart forgets every group and session (a restarted server);
  GET /standin/stats -> {"bytes", "tensors", "requests"}.
- With `model_dir` (an HF directory) it also generates: POST /generate (SGLang's body: input_ids,
  sampling_params with sampling_seed, return_logprob) from a `transformers` copy of the model
  (`rollout.HFEngine`: raw log-probs), one request at a time, refused while paused; the weights received
  during an update are loaded into it when generation continues, and answers carry that update's
  weight_version. So a trainer run against it checks the whole loop: the engine's log-probs equal the
  trainer's only if every stage's weights arrived.
`keep=False` only counts what arrives (benchmarks). `python -m fipo_megatron.testing.standin_sglang
--port-file F [--version V] [--no-keep] [--model DIR]` serves until killed, writing its URL to F.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

import torch

from fipo_megatron.rollout.buckets import unflatten
from fipo_megatron.testing.json_server import JsonServer


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


class StandInSGLang:
    def __init__(self, version: str = "0.5.21", keep: bool = True, host: str = "127.0.0.1", port: int = 0,
                 group_timeout_s: float = 60.0, model_dir: str | None = None) -> None:
        self.version = version
        self.keep = keep
        self.group_timeout_s = group_timeout_s
        self.session_needed = _version_tuple(version) >= (0, 5, 21)
        self.groups: dict[str, Any] = {}
        self.received: dict[str, torch.Tensor] = {}
        self.log: list[tuple[str, str, list[str]]] = []  # (path, group name, names)
        self.paused = False
        self.session = False
        self.bytes = 0
        self.tensors = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.engine = None
        if model_dir is not None:
            from fipo_megatron.rollout.hf_engine import HFEngine

            self.engine = HFEngine(model_path=model_dir, device="cpu")
        self.pending: dict[str, torch.Tensor] = {}  # received, not yet loaded into the generating model
        self.pending_version: str | None = None
        self.served_version: str | None = None
        self._server = JsonServer(self.handle, host=host, port=port)
        self.url = self._server.url

    # ------------------------------------------------------------------ routes
    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        ok = {"success": True, "message": ""}
        if method == "GET":
            if path in ("/get_server_info", "/server_info"):
                return 200, {"version": self.version, "tp_size": 1, "dp_size": 1}
            if path == "/health":
                return 200, None
            if path == "/standin/stats":
                return 200, {"bytes": self.bytes, "tensors": self.tensors, "requests": self.requests}
            return 404, {"error": f"no route {path}"}
        if path == "/pause_generation":
            self.paused = True
            return 200, ok
        if path == "/continue_generation":
            with self.lock:
                self._load_pending()
                self.paused = False
            return 200, ok
        if path == "/generate":
            return self._generate(body)
        if path == "/flush_cache":
            return 200, None
        if path == "/standin/restart":
            with self.lock:
                self.groups.clear()
                self.session = self.paused = False
            return 200, ok
        if path == "/standin/dump":
            torch.save({"received": self.received, "log": self.log, "groups": sorted(self.groups),
                        "paused": self.paused}, body["path"])
            return 200, ok
        with self.lock:  # weight requests: one at a time
            self.requests += 1
            if path == "/begin_weight_update":
                self.session = True
                return 200, ok
            if path == "/end_weight_update":
                self.session = False
                return 200, ok
            if path == "/init_weights_update_group":
                return self._init_group(body)
            if path == "/destroy_weights_update_group":
                self.groups.pop(body["group_name"], None)
                return 200, ok
            if path == "/update_weights_from_distributed":
                return self._receive(body)
            if path == "/update_weights_from_disk":
                return self._from_disk(body)
        return 404, {"error": f"no route {path}"}

    def _init_group(self, body: dict) -> tuple[int, Any]:
        from fipo_megatron.rollout.weight_sync import init_custom_process_group

        name = body["group_name"]
        self.groups[name] = init_custom_process_group(
            body["master_address"], int(body["master_port"]), int(body["rank_offset"]), int(body["world_size"]),
            name, backend=body.get("backend", "gloo"), timeout_s=self.group_timeout_s)
        return 200, {"success": True, "message": ""}

    def _receive(self, body: dict) -> tuple[int, Any]:
        name = body["group_name"]
        if name not in self.groups:
            return 400, {"success": False, "message": f"Group {name} not in {sorted(self.groups)}. Please call "
                                                      f"`init_weights_update_group` first."}
        if self.session_needed and not self.session:
            return 400, {"success": False, "message": "no weight update session is open (begin_weight_update)"}
        group = self.groups[name]
        names, shapes = body["names"], body["shapes"]
        dtypes = [getattr(torch, d) for d in body["dtypes"]]
        self.log.append(("/update_weights_from_distributed", name, list(names)))
        if names:
            self.pending_version = body.get("weight_version")
        if not names:
            return 200, {"success": True, "message": "nothing to update"}
        if body.get("load_format") == "flattened_bucket":
            if len(set(dtypes)) != 1:
                return 400, {"success": False, "message": "flattened_bucket needs one dtype per request"}
            flat = torch.empty(sum(int(torch.Size(s).numel()) for s in shapes), dtype=dtypes[0])
            torch.distributed.broadcast(flat, src=0, group=group)
            tensors = unflatten(flat, shapes)
        else:
            tensors = []
            for shape, dtype in zip(shapes, dtypes):
                t = torch.empty(shape, dtype=dtype)
                torch.distributed.broadcast(t, src=0, group=group)
                tensors.append(t)
        for n, t in zip(names, tensors):
            self._store(n, t)
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _from_disk(self, body: dict) -> tuple[int, Any]:
        from safetensors.torch import load_file

        path = body["model_path"]
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        self.log.append(("/update_weights_from_disk", path, sorted(weight_map)))
        self.pending_version = body.get("weight_version")
        for shard in sorted(set(weight_map.values())):
            for n, t in load_file(os.path.join(path, shard)).items():
                self._store(n, t)
        return 200, {"success": True, "message": ""}

    def _store(self, name: str, t: torch.Tensor) -> None:
        self.bytes += t.numel() * t.element_size()
        self.tensors += 1
        if self.keep:
            self.received[name] = t.clone()
        if self.engine is not None:
            self.pending[name] = t.clone()

    def _load_pending(self) -> None:
        if self.engine is None or not self.pending:
            return
        names = {n for n, _ in self.engine.model.named_parameters()}  # tied weights appear once
        if set(self.pending) != names:  # a real server would serve a model missing layers: refuse instead
            missing = sorted(names - set(self.pending))[:3]
            raise RuntimeError(f"update incomplete: {len(names - set(self.pending))} weights missing, e.g. {missing}")
        self.engine.update_weights(self.pending.items(), version=self.engine.weight_version + 1)
        self.pending = {}
        self.served_version = self.pending_version

    def _generate(self, body: dict) -> tuple[int, Any]:
        from fipo_megatron.rollout.types import SamplingParams

        if self.engine is None:
            return 404, {"error": "this stand-in was started without a model"}
        if self.paused:
            return 400, {"success": False, "message": "generation is paused"}
        sp = body["sampling_params"]
        params = SamplingParams(n=1, temperature=sp["temperature"], top_p=sp["top_p"], top_k=sp["top_k"],
                                max_new_tokens=sp["max_new_tokens"], stop_token_ids=sp.get("stop_token_ids", []),
                                seed=sp.get("sampling_seed"))
        with self.lock:
            out = self.engine.generate([list(body["input_ids"])], params)[0]
        pairs = [[lp, tok, None] for lp, tok in zip(out.response_logprobs, out.response_ids)]
        meta = {"output_token_logprobs": pairs, "finish_reason": {"type": out.finish_reason}}
        if self.served_version is not None:
            meta["weight_version"] = self.served_version
        return 200, {"output_ids": list(out.response_ids), "meta_info": meta}

    def close(self) -> None:
        self._server.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--version", default="0.5.21")
    ap.add_argument("--no-keep", action="store_true")
    ap.add_argument("--model", default=None, help="HF model directory: also serve /generate from it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    srv = StandInSGLang(version=args.version, keep=not args.no_keep, model_dir=args.model)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(srv.url)
    os.replace(tmp, args.port_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
