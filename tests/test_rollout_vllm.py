"""vLLM adapters: the server adapter against a local stand-in server (it stands in for `vllm serve`
with VLLM_SERVER_DEV_MODE=1, answering with the documented response shapes), the in-process adapter
against a stand-in `vllm` module, and a real-engine test marked gpu (the CPU real-engine tests are
tests/test_rollout_vllm_server.py and tests/test_rollout_vllm_inprocess.py, marked engine)."""
import json
import os
import sys
import threading
import time
import types

import pytest
import torch

from fipo_megatron.rollout import EngineError, SamplingParams, make_engine
from fipo_megatron.rollout.vllm_engine import VLLMServerEngine
from fipo_megatron.rollout.weight_sync import NcclSyncConfig

from test_rollout_http import StandInServer


class FakeVLLMServer(StandInServer):
    """k-th response token = last prompt token + k (+100 * choice index); log-prob -0.1 * k."""

    def __init__(self, version="0.11.0", token_ids_field=True, start_finish=True):
        super().__init__()
        self.token_ids_field = token_ids_field
        r = self.routes
        r[("GET", "/version")] = lambda b: (200, {"version": version})
        r[("GET", "/v1/models")] = lambda b: (200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        r[("GET", "/health")] = lambda b: (200, None)
        r[("POST", "/v1/completions")] = self.complete
        for p in ("/pause", "/resume", "/init_weight_transfer_engine", "/update_weights", "/collective_rpc",
                  "/reset_prefix_cache"):
            r[("POST", p)] = lambda b: (200, None)
        if start_finish:
            r[("POST", "/start_weight_update")] = lambda b: (200, None)
            r[("POST", "/finish_weight_update")] = lambda b: (200, None)

    def complete(self, body):
        last = body["prompt"][-1]
        choices = []
        for i in range(body["n"]):
            toks, reason = [], "length"
            for k in range(1, body["max_tokens"] + 1):
                toks.append(last + k + 100 * i)
                if toks[-1] in body.get("stop_token_ids", []):
                    reason = "stop"
                    break
            c = {"index": i, "text": "", "finish_reason": reason, "stop_reason": toks[-1] if reason == "stop" else None,
                 "logprobs": {"tokens": [f"token_id:{t}" for t in toks],
                              "token_logprobs": [-0.1 * (j + 1) for j in range(len(toks))],
                              "top_logprobs": None, "text_offset": [0] * len(toks)}}
            if self.token_ids_field:
                c["token_ids"] = toks
            choices.append(c)
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices[::-1]}


@pytest.fixture
def fake():
    srv = FakeVLLMServer()
    yield srv
    srv.close()


@pytest.mark.parametrize("token_ids_field", [True, False])
def test_completion_bodies_and_parsing(token_ids_field):
    srv = FakeVLLMServer(token_ids_field=token_ids_field)
    try:
        eng = VLLMServerEngine(srv.url)
        assert eng.model == "tiny" and eng.server_versions == ["0.11.0"]
        outs = eng.generate([[5, 6], [20]], SamplingParams(n=2, max_new_tokens=3, stop_token_ids=[8], seed=4))
        sent = sorted(srv.bodies("/v1/completions"), key=json.dumps)
        common = {"model": "tiny", "n": 2, "max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                  "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
                  "skip_special_tokens": False, "stop_token_ids": [8]}
        assert sent == sorted([dict(common, prompt=[5, 6], seed=4), dict(common, prompt=[20], seed=6)], key=json.dumps)
        assert [o.prompt_ids for o in outs] == [[5, 6], [5, 6], [20], [20]]
        assert outs[0].response_ids == [7, 8] and outs[0].finish_reason == "stop"
        assert outs[1].response_ids == [107, 108, 109] and outs[1].finish_reason == "length"
        assert outs[2].response_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    finally:
        srv.close()


def vllm_sample_seeds(request_seeds, n):
    """Independent model of vLLM's parallel sampling: choice j of a request seeded s uses s + j."""
    return [s + j for s in request_seeds for j in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_repeated_prompts_get_distinct_sample_seeds(fake, n):
    """DAPO repeats prompts in a batch: every (prompt, sample) must get its own seed on the server."""
    eng = VLLMServerEngine(fake.url)
    prompts = [[3, 4]] * 4 + [[9]] * 3
    eng.generate(prompts, SamplingParams(n=n, max_new_tokens=1, seed=11))
    seeds = [b["seed"] for b in fake.bodies("/v1/completions")]
    samples = vllm_sample_seeds(seeds, n)
    assert len(samples) == len(prompts) * n and len(set(samples)) == len(samples)
    assert min(samples) == 11 and max(samples) == 11 + len(prompts) * n - 1


def test_greedy_n_gt_1_sends_one_request_per_sample(fake):
    eng = VLLMServerEngine(fake.url)
    outs = eng.generate([[5], [20]], SamplingParams(n=3, temperature=0.0, max_new_tokens=2))
    bodies = fake.bodies("/v1/completions")
    assert len(bodies) == 6 and all(b["n"] == 1 and b["temperature"] == 0.0 for b in bodies)
    assert sorted(b["prompt"][0] for b in bodies) == [5, 5, 5, 20, 20, 20]
    assert [o.prompt_ids for o in outs] == [[5]] * 3 + [[20]] * 3
    assert [o.response_ids for o in outs] == [[6, 7]] * 3 + [[21, 22]] * 3


@pytest.mark.parametrize("version", ["0.10.1", "0.6.3", "0.33.0", "1.0.0", None])
def test_version_outside_window_is_a_clear_error_unless_overridden(version):
    srv = FakeVLLMServer(version=version)
    try:
        with pytest.raises(EngineError, match=rf"vllm at {srv.url}: .* outside the supported window "
                                              r"0\.10\.2 <= version < 0\.33\.0"):
            VLLMServerEngine(srv.url)
        with pytest.warns(UserWarning, match="outside the supported window"):
            VLLMServerEngine(srv.url, check_version=False)
    finally:
        srv.close()


def test_bad_response_and_missing_sync_config(fake):
    eng = VLLMServerEngine(fake.url, model="m")
    aborted = {"choices": [{"index": 0, "finish_reason": "abort", "logprobs": {"tokens": [], "token_logprobs": []}}]}
    fake.routes[("POST", "/v1/completions")] = lambda b: (200, aborted)
    with pytest.raises(EngineError, match="finish_reason 'abort'"):
        eng.generate([[1]], SamplingParams())
    with pytest.raises(EngineError, match="weight_sync='nccl' needs nccl"):
        eng.update_weights([("a", torch.zeros(1))], version=1)
    with pytest.raises(EngineError, match="weight_sync='disk' needs disk_writer or disk_root"):
        VLLMServerEngine(fake.url, weight_sync="disk").update_weights([("a", torch.zeros(1))], version=1)
    assert eng.health()


def test_nccl_sync_needs_vllm_0_17():
    srv = FakeVLLMServer(version="0.16.0")
    try:
        eng = VLLMServerEngine(srv.url, nccl=NcclSyncConfig("h", 1, workers_per_server=[1], device="cpu"))
        with pytest.raises(EngineError, match="exists from 0.17.0; use --weight-sync disk"):
            eng.update_weights([("a", torch.zeros(1))], version=1)
    finally:
        srv.close()


def test_disk_weight_sync_sequence(tmp_path):
    srv = FakeVLLMServer(version="0.32.0")
    try:
        eng = VLLMServerEngine(srv.url, weight_sync="disk", disk_root=str(tmp_path), bucket_bytes=16)
        srv.requests.clear()
        named = [("a", torch.arange(4.0)), ("b", torch.ones(2, 2)), ("c", torch.zeros(1))]
        eng.update_weights(iter(named), version=3)
        assert [p for m, p in srv.paths()] == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/resume"]
        path = str(tmp_path / "v3")
        assert srv.bodies("/collective_rpc") == [{"method": "reload_weights", "kwargs": {"weights_path": path}}]
        from safetensors.torch import load_file
        loaded = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                loaded.update(load_file(os.path.join(path, f)))
        assert set(loaded) == {"a", "b", "c"} and torch.equal(loaded["a"], torch.arange(4.0))
        assert eng.weight_version == 3 and eng.health()
    finally:
        srv.close()


def test_failed_disk_reload_stays_paused_and_refuses_to_generate(tmp_path):
    srv = FakeVLLMServer(version="0.32.0")
    srv.routes[("POST", "/collective_rpc")] = lambda b: (500, {"error": "size mismatch for lm_head"})
    try:
        eng = VLLMServerEngine(srv.url, weight_sync="disk", disk_root=str(tmp_path), max_retries=0)
        with pytest.raises(EngineError, match="servers stay paused.*size mismatch"):
            eng.update_weights([("a", torch.zeros(1))], version=1)
        assert "/resume" not in [p for m, p in srv.paths()]
        assert not eng.health() and eng.weight_version == 0
        with pytest.raises(EngineError, match="failed midway"):
            eng.generate([[1]], SamplingParams())
        srv.routes[("POST", "/collective_rpc")] = lambda b: (200, None)
        eng.update_weights([("a", torch.zeros(1))], version=1)
        assert srv.paths()[-1] == ("POST", "/resume") and eng.health()
    finally:
        srv.close()


# version -> (trainer API, /start_weight_update + /finish_weight_update sent)
NCCL_CASES = {"0.20.0": ("legacy", False), "0.24.0": ("legacy", True), "0.32.0": ("engine", True)}


@pytest.mark.parametrize("version", sorted(NCCL_CASES))
def test_nccl_weight_transfer_sequence(version):
    api, start_finish = NCCL_CASES[version]
    srv = FakeVLLMServer(version=version)
    sent, events = [], []

    def update(body):
        names = body["update_info"]["names"]
        t0 = time.time()
        while not all(n in sent for n in names):  # blocks like the receiving collective
            if time.time() - t0 > 5:
                return 500, {"error": "broadcast never came"}
            time.sleep(0.002)
        return 200, None

    srv.routes[("POST", "/update_weights")] = update
    joined = threading.Event()

    def init(body):
        joined.set()
        return 200, None

    srv.routes[("POST", "/init_weight_transfer_engine")] = init

    def group_factory(cfg):
        assert joined.wait(5), "trainer created its side before the server joined"
        events.append(("group", cfg.world_size))
        return "G"

    def send_fn(bucket, group, device):
        names = [n for n, _ in bucket]
        t0 = time.time()
        while not any(b["update_info"]["names"] == names for b in srv.bodies("/update_weights")):
            assert time.time() - t0 < 5, "sent a bucket before announcing it"
            time.sleep(0.002)
        events.append(("send", tuple(names), group, device))
        sent.extend(names)

    cfg = NcclSyncConfig("10.1.1.1", 12345, workers_per_server=[4], device="cpu")
    try:
        eng = VLLMServerEngine(srv.url, nccl=cfg, bucket_bytes=40, group_factory=group_factory, send_fn=send_fn)
        srv.requests.clear()
        named = [("a", torch.zeros(5)), ("b", torch.zeros(5, dtype=torch.bfloat16)), ("c", torch.zeros(3, 2))]
        eng.update_weights(iter(named), version=2)
        assert eng.weight_version == 2
        init_info = {"master_address": "10.1.1.1", "master_port": 12345, "rank_offset": 1, "world_size": 5}
        if api == "engine":
            init_info["packed"] = False  # >= 0.28: on the init info, no longer on update_info
        assert srv.bodies("/init_weight_transfer_engine") == [{"init_info": init_info}]
        packed = {"packed": False} if api == "legacy" else {}
        assert srv.bodies("/update_weights") == [
            {"update_info": {"names": ["a", "b"], "dtype_names": ["float32", "bfloat16"], "shapes": [[5], [5]],
                             **packed}},
            {"update_info": {"names": ["c"], "dtype_names": ["float32"], "shapes": [[3, 2]], **packed}}]
        start, finish = (["/start_weight_update"], ["/finish_weight_update"]) if start_finish else ([], [])
        paths = [p for m, p in srv.paths()]
        assert paths == (["/pause", "/init_weight_transfer_engine"] + start + ["/update_weights"] * 2 + finish
                         + ["/resume"])
        assert events == [("group", 5), ("send", ("a", "b"), "G", "cpu"), ("send", ("c",), "G", "cpu")]
        assert eng.health()
    finally:
        srv.close()


def test_refused_bucket_fails_fast_finishes_protocol_and_stays_paused():
    """vLLM 0.32 refusing /update_weights (as it did for the removed `packed` field) while the
    trainer's broadcast would wait forever: raised within seconds, /finish_weight_update ends the
    protocol, /resume is NOT sent (the server may hold partly loaded weights), the group is dropped."""
    srv = FakeVLLMServer(version="0.32.0")
    srv.routes[("POST", "/update_weights")] = lambda b: (400, {"error": "unexpected keyword argument 'packed'"})
    never = threading.Event()
    cfg = NcclSyncConfig("10.1.1.1", 12345, workers_per_server=[1], device="cpu")
    try:
        eng = VLLMServerEngine(srv.url, nccl=cfg, group_factory=lambda c: "G",
                               send_fn=lambda b, g, d: never.wait(60))
        t0 = time.time()
        with pytest.raises(EngineError, match="servers stay paused.*unexpected keyword argument 'packed'"):
            eng.update_weights([("a", torch.zeros(1))], version=1)
        assert time.time() - t0 < 10
        paths = [p for m, p in srv.paths()]
        assert paths[-2:] == ["/update_weights", "/finish_weight_update"] and "/resume" not in paths
        assert eng._group is None and not eng.health()
    finally:
        never.set()
        srv.close()


def test_make_engine_passes_disk_sync(fake, tmp_path):
    eng = make_engine("vllm-server", urls=[fake.url], weight_sync="disk", disk_root=str(tmp_path))
    assert isinstance(eng, VLLMServerEngine) and eng.weight_sync == "disk"


# ------------------------------------------------------------------ in-process, stand-in vllm module
def install_fake_vllm(monkeypatch, driver_model=None):
    """A stand-in `vllm` module with LLM / SamplingParams / inputs.TokensPrompt / Logprob shapes."""
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.11.0"
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    mod.inputs = inputs

    class SP:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, **kw):
            self.model, self.kw, self.calls, self.rpc = model, kw, [], []
            if driver_model is not None:
                self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(worker=types.SimpleNamespace(
                        model_runner=types.SimpleNamespace(model=driver_model)))))

        def generate(self, prompts, sps, use_tqdm=True):
            self.calls.append((prompts, [s.kw for s in sps]))
            res = []
            for p, s in zip(prompts, sps):
                comps = []
                for i in range(s.kw["n"]):
                    ids = [p["prompt_token_ids"][-1] + 1 + i]
                    comps.append(types.SimpleNamespace(index=i, token_ids=ids, finish_reason="length",
                                                       logprobs=[{ids[0]: types.SimpleNamespace(logprob=-0.5 - i)}]))
                res.append(types.SimpleNamespace(outputs=comps[::-1]))
            return res

        def collective_rpc(self, fn, args=(), kwargs=None):
            self.rpc.append((fn, args) if kwargs is None else (fn, kwargs))

        def reset_prefix_cache(self):
            self.rpc.append(("reset", ()))

    mod.LLM, mod.SamplingParams = LLM, SP
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return mod


def test_inprocess_adapter_with_stand_in_module(monkeypatch):
    install_fake_vllm(monkeypatch)
    eng = make_engine("vllm", model_path="/m", tensor_parallel_size=1)
    outs = eng.generate([[3], [9]], SamplingParams(n=2, max_new_tokens=5, seed=1, top_k=0))
    prompts, sps = eng.llm.calls[0]
    assert prompts == [{"prompt_token_ids": [3]}, {"prompt_token_ids": [9]}]
    assert sps[0] == dict(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=5, stop_token_ids=[], logprobs=0,
                          skip_special_tokens=False, seed=1)
    assert sps[1]["seed"] == 3
    assert [(o.prompt_ids, o.response_ids, o.response_logprobs) for o in outs] == [
        ([3], [4], [-0.5]), ([3], [5], [-1.5]), ([9], [10], [-0.5]), ([9], [11], [-1.5])]
    eng.update_weights([("x", torch.zeros(2))], version=1)  # no driver worker -> collective_rpc
    (fn, args), reset = eng.llm.rpc
    assert fn.__name__ == "_worker_load_weights" and args[0][0][0] == "x" and reset[0] == "reset"


def test_inprocess_adapter_reloads_from_disk_by_method_name(monkeypatch, tmp_path):
    """With disk_root: safetensors written, then collective_rpc("reload_weights", weights_path) (nothing pickled)."""
    install_fake_vllm(monkeypatch)
    eng = make_engine("vllm", model_path="/m", disk_root=str(tmp_path), gpu_memory_utilization=0.3)
    assert eng.llm.kw["gpu_memory_utilization"] == 0.3
    eng.update_weights([("x", torch.ones(2))], version=4)
    assert eng.llm.rpc == [("reload_weights", {"weights_path": str(tmp_path / "v4")}), ("reset", ())]
    assert (tmp_path / "v4" / "model.safetensors.index.json").exists() and eng.weight_version == 4


def test_inprocess_adapter_uses_driver_worker_load_weights(monkeypatch):
    loaded = []
    model = types.SimpleNamespace(load_weights=lambda weights: loaded.append([n for n, _ in weights]))
    install_fake_vllm(monkeypatch, driver_model=model)
    eng = make_engine("vllm", model_path="/m", bucket_bytes=16)
    eng.update_weights([("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(1))], version=3)
    assert loaded == [["a", "b"], ["c"]] and eng.weight_version == 3


@pytest.mark.gpu
def test_real_vllm_inprocess_logprobs_and_update(tmp_path):
    """Runs where vLLM is installed: tiny random Qwen2 dir; log-probs vs an HF forward, before and after an
    update through the disk path the trainer uses (CPU version: tests/test_rollout_vllm_inprocess.py)."""
    pytest.importorskip("vllm")
    from test_rollout_vllm_server import reference_logprobs, tiny_model  # head size 32

    model = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "m")
    eng = make_engine("vllm", model_path=str(tmp_path / "m"), dtype="float32", gpu_memory_utilization=0.2,
                      enforce_eager=True, skip_tokenizer_init=True, disk_root=str(tmp_path / "sync"),
                      template_dir=str(tmp_path / "m"))
    outs = eng.generate([[5, 6, 7], [9]], SamplingParams(n=2, max_new_tokens=8, seed=0))
    for o in outs:
        ref = reference_logprobs(model, o.prompt_ids, o.response_ids)
        assert torch.allclose(torch.tensor(o.response_logprobs), ref, atol=2e-2)
    target = tiny_model(seed=1)
    eng.update_weights(target.state_dict().items(), version=1)
    outs = eng.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8, seed=0))
    for o in outs:
        ref = reference_logprobs(target, o.prompt_ids, o.response_ids)
        assert torch.allclose(torch.tensor(o.response_logprobs), ref, atol=2e-2)
    started = [p.pid for p in eng._started]
    eng.shutdown()
    import psutil

    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in started), started
