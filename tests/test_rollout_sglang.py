"""SGLang adapter against a local stand-in server (it stands in for `python -m sglang.launch_server`,
answering with the response shapes SGLang documents) + one real-engine test marked gpu."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from fipo_megatron.rollout import EngineError, SamplingParams, make_engine
from fipo_megatron.rollout.sglang_engine import NcclSyncConfig, SGLangEngine

from test_rollout_http import StandInServer, free_dead_url


class FakeSGLang(StandInServer):
    """Deterministic fake: response k-th token = last prompt token + k, log-prob -0.1 * k."""

    def __init__(self, version="0.5.3"):
        super().__init__()
        self.weight_version = "default"
        self.update_result = {"success": True, "message": "ok"}
        r = self.routes
        r[("GET", "/get_server_info")] = lambda b: (200, {"version": version})
        r[("GET", "/health")] = lambda b: (200, None)
        r[("POST", "/generate")] = self.gen
        for p in ("/pause_generation", "/continue_generation", "/flush_cache", "/destroy_weights_update_group",
                  "/begin_weight_update", "/end_weight_update"):
            r[("POST", p)] = lambda b: (200, {"status": "ok"})
        r[("POST", "/update_weights_from_disk")] = self.from_disk

    def gen(self, body):
        sp = body["sampling_params"]
        last = body["input_ids"][-1]
        toks, reason = [], {"type": "length", "length": sp["max_new_tokens"]}
        for k in range(1, sp["max_new_tokens"] + 1):
            toks.append(last + k)
            if last + k in sp.get("stop_token_ids", []):
                reason = {"type": "stop", "matched": last + k}
                break
        lps = [[-0.1 * (i + 1), t, None] for i, t in enumerate(toks)]
        meta = {"output_token_logprobs": lps, "finish_reason": reason, "weight_version": self.weight_version}
        return 200, {"text": "", "output_ids": toks, "meta_info": meta}

    def from_disk(self, body):
        if self.update_result["success"]:
            self.weight_version = body["weight_version"]
        return 200, self.update_result


@pytest.fixture
def fake():
    srv = FakeSGLang()
    yield srv
    srv.close()


def test_generate_request_bodies_and_parsing(fake):
    eng = SGLangEngine(fake.url, weight_sync="disk", disk_writer=lambda b, v: "/unused")
    outs = eng.generate([[5, 6], [10]], SamplingParams(n=2, max_new_tokens=4, stop_token_ids=[8], seed=11, top_k=5))
    sent = sorted(fake.bodies("/generate"), key=json.dumps)
    expected = [
        {"input_ids": ids, "return_logprob": True,
         "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 5,
                             "skip_special_tokens": False, "stop_token_ids": [8], "sampling_seed": 11 + row}}
        for row, ids in enumerate([[5, 6], [5, 6], [10], [10]])
    ]
    assert sent == sorted(expected, key=json.dumps)
    assert [o.prompt_ids for o in outs] == [[5, 6], [5, 6], [10], [10]]
    assert outs[0].response_ids == [7, 8] and outs[0].finish_reason == "stop"
    assert outs[0].response_logprobs == pytest.approx([-0.1, -0.2])
    assert outs[2].response_ids == [11, 12, 13, 14] and outs[2].finish_reason == "length"
    # top_k off -> -1, no seed -> no sampling_seed key, no stop ids -> no key
    body = SGLangEngine.sampling_body(SamplingParams(max_new_tokens=3), 0)
    assert body == {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "skip_special_tokens": False}


def test_repeated_prompts_get_distinct_sampling_seeds(fake):
    """One request per (prompt, sample): each carries its own sampling_seed, even for repeated prompts."""
    eng = SGLangEngine(fake.url, weight_sync="disk", disk_writer=lambda b, v: "/unused")
    eng.generate([[7]] * 3, SamplingParams(n=4, max_new_tokens=1, seed=100))
    seeds = sorted(b["sampling_params"]["sampling_seed"] for b in fake.bodies("/generate"))
    assert seeds == list(range(100, 112))


@pytest.mark.parametrize("version", ["0.5.2", "0.4.6", "0.5.24", "0.6.0", "garbage"])
def test_version_outside_window_is_a_clear_error_unless_overridden(version):
    srv = FakeSGLang(version=version)
    try:
        with pytest.raises(EngineError, match=rf"sglang at {srv.url}: .*{version}.* outside the supported window "
                                              r"0\.5\.3 <= version < 0\.5\.24"):
            SGLangEngine(srv.url, disk_root="/tmp/x")
        with pytest.warns(UserWarning, match="outside the supported window"):
            SGLangEngine(srv.url, disk_root="/tmp/x", check_version=False)
    finally:
        srv.close()


def test_servers_with_different_versions_are_refused():
    a, b = FakeSGLang(version="0.5.20"), FakeSGLang(version="0.5.21")
    try:
        with pytest.raises(EngineError, match="different versions"):
            SGLangEngine([a.url, b.url], disk_root="/tmp/x")
    finally:
        a.close()
        b.close()


def test_flush_cache_busy_400_is_retried_with_backoff(fake):
    answers = [(400, {"error": "busy"}), (400, {"error": "busy"}), (200, None)]
    fake.routes[("POST", "/flush_cache")] = lambda b: answers.pop(0)
    slept = []
    eng = SGLangEngine(fake.url, disk_writer=lambda b, v: "/p", backoff_s=0.5, sleep=slept.append)
    eng.update_weights([("a", torch.zeros(1))], version=1)
    assert not answers and len(slept) == 2 and 0.5 <= slept[0] < slept[1] <= 1.1
    answers.extend([(400, {"error": "busy"})] * 5)
    eng.flush_retries = 2
    with pytest.raises(EngineError, match="flush_cache on .* still refused after 3 attempt"):
        eng.update_weights([("a", torch.zeros(1))], version=2)


def test_server_down_at_start_names_url():
    dead = free_dead_url()
    with pytest.raises(EngineError, match=f"sglang: GET /get_server_info failed after 2 attempt.*{dead}"):
        SGLangEngine(dead, disk_root="/tmp/x", max_retries=1, backoff_s=0.01)


def test_disk_weight_update_sequence_and_version(fake):
    written = []

    def writer(buckets, version):
        written.append([[n for n, _ in b] for b in buckets])
        return f"/shared/sync/v{version}"

    eng = SGLangEngine(fake.url, weight_sync="disk", disk_writer=writer, bucket_bytes=64)
    fake.requests.clear()
    named = [(f"w{i}", torch.zeros(8)) for i in range(5)]  # 32 bytes each -> buckets of 2
    eng.update_weights(iter(named), version=1)
    assert written == [[["w0", "w1"], ["w2", "w3"], ["w4"]]]
    assert fake.paths() == [("POST", "/pause_generation"), ("POST", "/update_weights_from_disk"),
                            ("POST", "/flush_cache"), ("POST", "/continue_generation")]
    assert fake.bodies("/update_weights_from_disk") == [{"model_path": "/shared/sync/v1", "weight_version": "1"}]
    assert fake.bodies("/pause_generation") == [{}]
    assert eng.weight_version == 1 and eng.health()
    eng.generate([[1]], SamplingParams(max_new_tokens=1))  # server reports "1": fine
    fake.weight_version = "0"
    with pytest.raises(EngineError, match="weight_version '0', expected 1"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1))


def test_failed_update_blocks_generation_but_continues_server(fake):
    eng = SGLangEngine(fake.url, weight_sync="disk", disk_writer=lambda b, v: "/p")
    fake.update_result = {"success": False, "message": "shape mismatch for lm_head"}
    with pytest.raises(EngineError, match="update_weights_from_disk failed: shape mismatch"):
        eng.update_weights([("a", torch.zeros(1))], version=1)
    assert fake.paths()[-1] == ("POST", "/continue_generation")
    assert not eng.health() and eng.weight_version == 0
    with pytest.raises(EngineError, match="failed midway"):
        eng.generate([[1]], SamplingParams())
    fake.update_result = {"success": True, "message": ""}
    eng.update_weights([("a", torch.zeros(1))], version=1)
    assert eng.health()


@pytest.mark.parametrize("version", ["0.5.3", "0.5.21"])
def test_nccl_update_bodies_and_request_broadcast_interleaving(version):
    """The stand-in servers behave like SGLang's blocking receive: /init_weights_update_group waits for
    the trainer's group creation, /update_weights_from_distributed waits for the broadcast of every
    name it announced; the mocked broadcast waits until every server announced the tensor (as a
    collective would). A sequential (request-then-broadcast) client would time out here."""
    events, lock = [], threading.Lock()
    group_ready = threading.Event()
    sent = []

    def wait_until(pred, what):
        t0 = time.time()
        while not pred():
            if time.time() - t0 > 5:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.002)

    servers = [FakeSGLang(version), FakeSGLang(version)]
    session = version == "0.5.21"

    def make_routes(srv, tag):
        def init(body):
            with lock:
                events.append((tag, "init"))
            ok = group_ready.wait(5)
            return 200, {"success": ok, "message": ""}

        def update(body):
            with lock:
                events.append((tag, "update", tuple(body["names"])))
            wait_until(lambda: all(n in sent for n in body["names"]), f"broadcast of {body['names']}")
            return 200, {"success": True, "message": ""}

        srv.routes[("POST", "/init_weights_update_group")] = init
        srv.routes[("POST", "/update_weights_from_distributed")] = update

    for s, tag in zip(servers, "ab"):
        make_routes(s, tag)

    def group_factory(addr, port, rank, world, name, backend):
        wait_until(lambda: sum(e[1] == "init" for e in events) == 2, "both servers joining the group")
        with lock:
            events.append(("trainer", "group", addr, port, rank, world, name, backend))
        group_ready.set()
        return "GROUP"

    def broadcast(tensor, group):
        assert group == "GROUP" and tensor.device.type == "cpu"
        idx = len(sent)
        name = names_in_order[idx]
        wait_until(lambda: sum(1 for e in events if e[1] == "update" and name in e[2]) == 2, f"announce {name}")
        with lock:
            events.append(("trainer", "bcast", name))
        sent.append(name)

    named = [("w0", torch.zeros(4, dtype=torch.bfloat16)), ("w1", torch.zeros(2, 3)),
             ("w2", torch.zeros(16)), ("w3", torch.zeros(1, dtype=torch.float16))]
    names_in_order = [n for n, _ in named]
    cfg = NcclSyncConfig("10.0.0.1", 29999, workers_per_server=[2, 1], group_name="g", backend="nccl", device="cpu")
    try:
        eng = SGLangEngine([s.url for s in servers], weight_sync="nccl", nccl=cfg, bucket_bytes=32,
                           group_factory=group_factory, broadcast_fn=broadcast)
        eng.update_weights(iter(named), version=3)
        assert sent == names_in_order
        inits = [s.bodies("/init_weights_update_group") for s in servers]
        assert inits == [[{"master_address": "10.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 4,
                           "group_name": "g", "backend": "nccl"}],
                         [{"master_address": "10.0.0.1", "master_port": 29999, "rank_offset": 3, "world_size": 4,
                           "group_name": "g", "backend": "nccl"}]]
        expected_updates = [
            {"names": ["w0", "w1"], "dtypes": ["bfloat16", "float32"], "shapes": [[4], [2, 3]]},
            {"names": ["w2"], "dtypes": ["float32"], "shapes": [[16]]},  # 64 bytes > bucket: alone
            {"names": ["w3"], "dtypes": ["float16"], "shapes": [[1]]},
        ]
        for s in servers:
            assert s.bodies("/update_weights_from_distributed") == [
                dict(u, group_name="g", flush_cache=False, weight_version="3") for u in expected_updates]
            begin, end = (["/begin_weight_update"], ["/end_weight_update"]) if session else ([], [])
            assert [p for m, p in s.paths() if p not in ("/get_server_info",)] == [
                "/pause_generation", "/init_weights_update_group"] + begin + \
                ["/update_weights_from_distributed"] * 3 + end + ["/flush_cache", "/continue_generation"]
        trainer = [e for e in events if e[0] == "trainer"]
        assert trainer[0] == ("trainer", "group", "10.0.0.1", 29999, 0, 4, "g", "nccl")
        # each broadcast happens after both servers announced its bucket
        for i, e in enumerate(events):
            if e[:2] == ("trainer", "bcast"):
                assert sum(1 for x in events[:i] if x[1] == "update" and e[2] in x[2]) == 2
        # second update reuses the group
        again = []
        eng.broadcast_fn = lambda t, g: again.append(g)
        eng.update_weights(iter(named[:1]), version=4)
        assert again == ["GROUP"]
        assert sum(e[1] == "group" for e in events) == 1
        eng.shutdown()
        assert servers[0].bodies("/destroy_weights_update_group") == [{"group_name": "g"}]
    finally:
        for s in servers:
            s.close()


@pytest.mark.parametrize("version", ["0.5.3", "0.5.21"])
def test_refused_nccl_update_fails_fast_ends_session_and_stays_paused(version):
    """The server refuses the bucket at once while the trainer's broadcast would wait forever: the
    refusal is raised within seconds, the update session is ended, generation is NOT continued
    (no rollback on the server: it may hold partly loaded weights), the group is dropped."""
    srv = FakeSGLang(version)
    srv.routes[("POST", "/init_weights_update_group")] = lambda b: (200, {"success": True, "message": ""})
    srv.routes[("POST", "/update_weights_from_distributed")] = lambda b: (400, {"error": "unknown parameter w9"})
    never = threading.Event()
    cfg = NcclSyncConfig("10.0.0.1", 29999, workers_per_server=[1], device="cpu")
    try:
        eng = SGLangEngine(srv.url, weight_sync="nccl", nccl=cfg, group_factory=lambda *a: "G",
                           broadcast_fn=lambda t, g: never.wait(60))
        t0 = time.time()
        with pytest.raises(EngineError, match="generation stays paused.*unknown parameter w9"):
            eng.update_weights([("w9", torch.zeros(2))], version=1)
        assert time.time() - t0 < 10
        paths = [p for m, p in srv.paths()]
        assert "/continue_generation" not in paths and "/flush_cache" not in paths
        assert ("/end_weight_update" in paths) == (version == "0.5.21")
        assert eng._group is None and not eng.health()
        with pytest.raises(EngineError, match="failed midway"):
            eng.generate([[1]], SamplingParams())
    finally:
        never.set()
        srv.close()


def test_make_engine_builds_sglang(fake):
    eng = make_engine("sglang", urls=[fake.url])  # generation-only until a sync method is configured
    assert isinstance(eng, SGLangEngine) and eng.health()
    with pytest.raises(EngineError, match="needs disk_writer or disk_root"):
        eng.update_weights([("a", torch.zeros(1))], version=1)
    eng = make_engine("sglang", urls=[fake.url], weight_sync="nccl")
    with pytest.raises(EngineError, match="needs nccl=NcclSyncConfig"):
        eng.update_weights([("a", torch.zeros(1))], version=1)
    assert eng.health()  # nothing was sent, nothing is inconsistent


@pytest.mark.gpu
def test_real_sglang_server_generate_and_disk_update(tmp_path):
    """Runs where SGLang is installed with a GPU: tiny random Qwen2 dir, real server, log-probs vs HF."""
    pytest.importorskip("sglang")
    from test_rollout_hf import reference_logprobs, tiny_model


    model = tiny_model()
    model.config.torch_dtype = torch.float32
    model.save_pretrained(tmp_path / "m")
    port = int(free_dead_url().rsplit(":", 1)[1])
    env = dict(os.environ, SGLANG_RETURN_ORIGINAL_LOGPROB="1", RETURN_ORIGINAL_LOGPROB="1")
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "m"),
                             "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32",
                             "--mem-fraction-static", "0.2", "--disable-cuda-graph"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        eng = None
        for _ in range(300):
            try:
                eng = SGLangEngine(url, disk_root=str(tmp_path / "sync"), template_dir=str(tmp_path / "m"),
                                   max_retries=0)
                if eng.health():
                    break
            except EngineError:
                time.sleep(1)
        assert eng is not None and eng.health()
        outs = eng.generate([[5, 6, 7], [9]], SamplingParams(n=2, max_new_tokens=8))
        for o in outs:
            ref = reference_logprobs(model, o.prompt_ids, o.response_ids)
            assert torch.allclose(torch.tensor(o.response_logprobs), ref, atol=2e-2)
        target = tiny_model(seed=1)
        eng.update_weights(target.state_dict().items(), version=1)
        outs = eng.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8))
        for o in outs:
            ref = reference_logprobs(target, o.prompt_ids, o.response_ids)
            assert torch.allclose(torch.tensor(o.response_logprobs), ref, atol=2e-2)
        eng.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
