"""vLLM adapters: the server adapter against a local stand-in server (it stands in for `vllm serve`
with VLLM_SERVER_DEV_MODE=1, answering with the documented response shapes), the in-process adapter
against a stand-in `vllm` module, and real-engine tests marked gpu."""
import json
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
        for p in ("/pause", "/resume", "/init_weight_transfer_engine", "/update_weights"):
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


def test_version_warning_and_bad_response(fake):
    old = FakeVLLMServer(version="0.6.3")
    try:
        with pytest.warns(UserWarning, match="vllm version 0.6.3 is outside"):
            VLLMServerEngine(old.url)
    finally:
        old.close()
    eng = VLLMServerEngine(fake.url, model="m")
    fake.routes[("POST", "/v1/completions")] = lambda b: (200, {"choices": [{"index": 0, "finish_reason": "abort",
                                                                             "logprobs": {"tokens": [], "token_logprobs": []}}]})
    with pytest.raises(EngineError, match="finish_reason 'abort'"):
        eng.generate([[1]], SamplingParams())
    with pytest.raises(EngineError, match="need nccl"):
        eng.update_weights([("a", torch.zeros(1))], version=1)


@pytest.mark.parametrize("start_finish", [True, False])
def test_nccl_weight_transfer_sequence(start_finish):
    srv = FakeVLLMServer(start_finish=start_finish)
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
        assert srv.bodies("/init_weight_transfer_engine") == [
            {"init_info": {"master_address": "10.1.1.1", "master_port": 12345, "rank_offset": 1, "world_size": 5}}]
        assert srv.bodies("/update_weights") == [
            {"update_info": {"names": ["a", "b"], "dtype_names": ["float32", "bfloat16"], "shapes": [[5], [5]],
                             "packed": False}},
            {"update_info": {"names": ["c"], "dtype_names": ["float32"], "shapes": [[3, 2]], "packed": False}}]
        paths = [p for m, p in srv.paths()]
        assert paths == ["/init_weight_transfer_engine", "/pause", "/start_weight_update", "/update_weights",
                         "/update_weights", "/finish_weight_update", "/resume"]
        assert events == [("group", 5), ("send", ("a", "b"), "G", "cpu"), ("send", ("c",), "G", "cpu")]
        assert eng.health()
    finally:
        srv.close()


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

        def collective_rpc(self, fn, args=()):
            self.rpc.append((fn, args))

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


def test_inprocess_adapter_uses_driver_worker_load_weights(monkeypatch):
    loaded = []
    model = types.SimpleNamespace(load_weights=lambda weights: loaded.append([n for n, _ in weights]))
    install_fake_vllm(monkeypatch, driver_model=model)
    eng = make_engine("vllm", model_path="/m", bucket_bytes=16)
    eng.update_weights([("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(1))], version=3)
    assert loaded == [["a", "b"], ["c"]] and eng.weight_version == 3


@pytest.mark.gpu
def test_real_vllm_inprocess_logprobs_and_update(tmp_path):
    """Runs where vLLM is installed: tiny random Qwen2 dir; log-probs vs an HF forward, before and after update."""
    pytest.importorskip("vllm")
    from test_rollout_hf import reference_logprobs, tiny_model

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    eng = make_engine("vllm", model_path=str(tmp_path / "m"), dtype="float32", gpu_memory_utilization=0.2,
                      enforce_eager=True, skip_tokenizer_init=True)
    outs = eng.generate([[5, 6, 7], [9]], SamplingParams(n=2, max_new_tokens=8, seed=0))
    for o in outs:
        assert torch.allclose(torch.tensor(o.response_logprobs), reference_logprobs(model, o.prompt_ids, o.response_ids), atol=2e-2)
    target = tiny_model(seed=1)
    eng.update_weights(target.state_dict().items(), version=1)
    outs = eng.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8, seed=0))
    for o in outs:
        assert torch.allclose(torch.tensor(o.response_logprobs), reference_logprobs(target, o.prompt_ids, o.response_ids), atol=2e-2)
    eng.shutdown()
