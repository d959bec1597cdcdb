"""End to end at PP=2 against an SGLang stand-in: the trainer's loop with one weight sender per stage.

The stand-in (``testing.standin_sglang`` with ``--model``) is a separate process speaking SGLang's HTTP
API: it generates with a `transformers` copy of the model and loads whatever weights the trainer pushes
(over a gloo group per stage in place of NCCL, or from per-stage safetensors shards on disk). ``train()``
runs 3 RL steps at TP=1 x PP=2 on 2 gloo processes, so every step's rollouts come from the weights the
two stage senders pushed after the previous step. Reference: the trainer's own recomputed log-probs of
those rollouts; the train-vs-engine mismatch (``rollout/logprob_abs_diff_max``) is ~0 only if both
stages' layers arrived intact (a missing or stale stage leaves the engine on other weights).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_rollout_stage_sync import start_standin
from test_trainer_e2e import _argv, tiny  # noqa: F401 - the fixture is used by name

from fipo_megatron.testing.distributed import run_distributed


def _worker(rank: int, world: int, t: dict, url: str, out: str, mode: str) -> None:
    import functools

    from fipo_megatron.rollout import weight_sync
    from fipo_megatron.trainer import parse_args, train

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reward fn's module
    # gloo on CPU in place of NCCL on both sides of the update groups
    weight_sync.NcclSyncConfig = functools.partial(weight_sync.NcclSyncConfig, backend="gloo", device="cpu")
    argv = _argv(dict(t, mcore=t["mcore"] + "_tp1"), out, 3,
                 ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                  "--rollout-engine", "sglang", "--rollout-urls", url, "--weight-sync", mode,
                  "--rollout-gpus-per-server", "1", "--weight-sync-master-addr", "127.0.0.1",
                  "--weight-sync-master-port", str(29900 + (7 if mode == "disk" else 0)),
                  "--weight-sync-bucket-mb", "1"])
    train(parse_args(argv, world_size=world))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["nccl", "disk"])
def test_pp2_stage_senders_keep_the_engine_on_the_trainers_weights(tiny, tmp_path, mode):  # noqa: F811
    proc, url = start_standin(tmp_path, "--version", "0.5.21", "--model", tiny["hf"])
    try:
        out = str(tmp_path / "run")
        run_distributed(_worker, 2, tiny, url, out, mode)
        dump = str(tmp_path / "dump.pt")
        import requests

        requests.post(url + "/standin/dump", json={"path": dump}, timeout=60).raise_for_status()
    finally:
        proc.kill()
        proc.wait()
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:  # the engine served exactly the weights the trainer had at every step
        assert m["rollout/logprob_abs_diff_max"] < 1e-4, (m["step"], m["rollout/logprob_abs_diff_max"])
    state = torch.load(dump, weights_only=False)
    assert not state["paused"]
    updates = [entry for entry in state["log"] if entry[2]]
    if mode == "nccl":  # each stage sent over its own group, and only its own layers
        by_group: dict[str, set[str]] = {}
        for _, group, names in updates:
            by_group.setdefault(group, set()).update(names)
        # stage 0 keeps the configured group name, stage s > 0 adds "_pp<s>"
        stage_of = {g: int(g.rsplit("_pp", 1)[1].split("_")[0]) if "_pp" in g else 0 for g in by_group}
        assert sorted(set(stage_of.values())) == [0, 1], sorted(by_group)
        for group, names in by_group.items():
            layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
            assert layers == ({0} if stage_of[group] == 0 else {1}), (group, sorted(layers))
    else:  # one reload per sync, each from a directory holding both stages' shards
        assert len(updates) == 4  # the initial sync and 3 steps
        shards = {f for f in os.listdir(updates[-1][1]) if f.endswith(".safetensors")}
        assert any("pp0" in f for f in shards) and any("pp1" in f for f in shards), sorted(shards)
    # the trainer's final weights (synced after step 3) are what the engine received
    final_names = {n for _, _, names in updates for n in names}
    assert final_names >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
