"""One weight sender per pipeline stage, end to end on CPU: a live Megatron model at TP=2 x PP=2 (4 gloo
processes) pushes its weights through `staged_sync.sync_by_stage` + `SGLangEngine` to a stand-in SGLang
server (a separate process, `fipo_megatron.testing.standin_sglang`) whose worker really receives the
broadcasts over gloo groups. The reference is the HF model itself (transformers' state dict, converted to
the Megatron checkpoint by the CLI), not the code under test. Checked, in one launch:
- v1: the server holds exactly the HF tensors; each stage sent only its own layers, over its own group;
- v2 (every parameter + 1, the server "restarted" before it): every stage's probe finds its group gone,
  rebuilds it once and the server holds HF + 1;
- v3: stage 1's sender fails after its first bucket: every rank raises WeightSyncError naming stage 1 and
  rank 2 (no rank hangs), the server stays paused and the leader's engine refuses to generate;
- v4 (through the trainer's `setup.sync_weights(per_stage=True)`): a full update recovers (server
  resumed, HF + 1), the metrics are totals over both stages on every rank;
- v5 (+ 1 again) through disk: each stage writes its own shards into one version directory, rank 0 the
  index; the server reloads HF + 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from test_convert_model import make_hf_model, run_cli

from fipo_megatron.rollout.buckets import bucketize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_standin(tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    port_file = str(tmp_path / "standin.url")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "fipo_megatron.testing.standin_sglang", "--port-file", port_file,
                             *extra], env=env, cwd=REPO)
    t0 = time.time()
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() - t0 > 60:
            proc.kill()
            raise RuntimeError("the stand-in SGLang server did not start")
        time.sleep(0.1)
    return proc, open(port_file).read().strip()


def _post(url: str, path: str, body: dict) -> None:
    import requests

    requests.post(url + path, json=body, timeout=60).raise_for_status()


def _stage_worker(rank: int, world: int, root: str, url: str, port_base: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fipo_megatron.convert.live import iter_stage_hf_tensors
    from fipo_megatron.megatron.checkpoint import load_model_weights
    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.megatron.qwen import build_model
    from fipo_megatron.rollout.sglang_engine import SGLangEngine
    from fipo_megatron.rollout.staged_sync import WeightSyncError, sync_by_stage
    from fipo_megatron.rollout.weight_sync import NcclSyncConfig, init_custom_process_group
    from fipo_megatron.trainer.setup import sync_role

    initialize_parallel(tp=2, pp=2)
    out: dict = {"rank": rank}
    try:
        cfg = json.load(open(os.path.join(root, "hf", "config.json")))
        chunks = build_model(cfg)
        load_model_weights(os.path.join(root, "mcore"), chunks)
        leader, sender, iterates = sync_role(True)
        stage = ps.get_pipeline_model_parallel_rank()
        out.update(stage=stage, sender=sender, leader=leader)

        def factory(addr, port, r, w, name, backend):
            return init_custom_process_group(addr, port, r, w, name, backend=backend, timeout_s=60)

        nccl = NcclSyncConfig("127.0.0.1", port_base, [1], backend="gloo", device="cpu").for_stage(stage, 2)
        engine = disk = None
        if sender:
            engine = SGLangEngine(url, weight_sync="nccl", nccl=nccl, stage=stage, bucket_bytes=40_000,
                                  group_factory=factory)
            disk = SGLangEngine(url, weight_sync="disk", disk_root=os.path.join(root, "sync"),
                                template_dir=os.path.join(root, "hf"), stage=stage, bucket_bytes=40_000)

        def sync(version, eng):
            stream = iter_stage_hf_tensors(chunks, cfg) if iterates else None
            return sync_by_stage(eng, stream, version, bucket_bytes=40_000, leader=leader)

        def bump():
            with torch.no_grad():
                for chunk in chunks:
                    for p in chunk.parameters():
                        p.add_(1.0)

        def dump(tag):
            if leader:
                _post(url, "/standin/dump", {"path": os.path.join(root, f"{tag}.pt")})
            dist.barrier()

        stats = sync(1, engine)
        out["v1_stats"] = (stats.num_tensors, stats.num_bytes, stats.num_buckets)
        dump("v1")
        bump()
        if leader:
            _post(url, "/standin/restart", {})
        dist.barrier()
        sync(2, engine)
        out["rebuilds_v2"] = engine.group_rebuilds if sender else None
        dump("v2")
        if sender and stage == 1:
            real = engine.send_buckets

            def failing(buckets, version):
                def gen():
                    for i, b in enumerate(buckets):
                        if i == 1:
                            raise RuntimeError("injected failure on stage 1")
                        yield b
                return real(gen(), version)

            engine.send_buckets = failing
        try:
            sync(3, engine)
            out["err3"] = None
        except WeightSyncError as exc:
            out["err3"] = str(exc)
        if leader:
            out["health_after_v3"] = engine.health()
        dump("v3")
        if sender and stage == 1:
            engine.send_buckets = real
        from types import SimpleNamespace

        from fipo_megatron.trainer.setup import sync_weights

        out["v4_metrics"] = sync_weights(SimpleNamespace(model=chunks), engine, 4, 1, per_stage=True)
        if leader:
            out["health_after_v4"] = engine.health()
        dump("v4")
        bump()
        sync(5, disk)
        dump("v5")
        if sender:
            engine.shutdown()
    finally:
        destroy_parallel()
    return out


@pytest.mark.timeout(900)
def test_stage_senders_tp2_pp2_restart_failure_and_disk(tmp_path):
    from fipo_megatron.testing.distributed import free_port, run_distributed

    root = tmp_path
    ref = make_hf_model(str(root / "hf"), tie=False, seed=5, layers=4)
    proc = run_cli([["hf-to-mcore", "--hf-dir", str(root / "hf"), "--out", str(root / "mcore"), "--tp", "2",
                     "--pp", "2"]])
    assert proc.returncode == 0 and "RC 0" in proc.stdout, proc.stdout + proc.stderr
    server, url = start_standin(tmp_path)
    try:
        results = run_distributed(_stage_worker, 4, str(root), url, free_port())
    finally:
        server.kill()
        server.wait()
    by_rank = {r["rank"]: r for r in results}
    assert [by_rank[r]["sender"] for r in range(4)] == [True, False, True, False]
    assert [by_rank[r]["stage"] for r in range(4)] == [0, 0, 1, 1]

    def stage_of(name: str) -> int:  # PP=2 over 4 layers: layers 0-1 + embedding | layers 2-3 + norm + head
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) // 2
        return 0 if name == "model.embed_tokens.weight" else 1

    def check(tag, offset):
        d = torch.load(root / f"{tag}.pt", weights_only=False)
        assert set(d["received"]) == set(ref), tag
        for name, t in ref.items():
            expected = t.clone()
            for _ in range(offset):  # the model was bumped by + 1.0 `offset` times (x + 1 + 1 != x + 2 in fp32)
                expected += 1.0
            assert torch.equal(d["received"][name], expected), f"{tag}: {name}"
        return d

    v1 = check("v1", 0)
    updates = [(g, names) for path, g, names in v1["log"] if path == "/update_weights_from_distributed" and names]
    assert {g for g, _ in updates} == {"fipo_weight_update", "fipo_weight_update_pp1"}
    for g, names in updates:
        assert {stage_of(n) for n in names} == {1 if g.endswith("_pp1") else 0}, (g, names)
    assert sorted(n for _, names in updates for n in names) == sorted(ref)  # each tensor sent once
    assert len(updates) > 2  # several buckets per stage
    assert by_rank[0]["v1_stats"][:2] == (len(ref), sum(t.numel() * t.element_size() for t in ref.values()))

    v2 = check("v2", 1)
    assert by_rank[0]["rebuilds_v2"] == by_rank[2]["rebuilds_v2"] == 1
    assert {"fipo_weight_update_r1", "fipo_weight_update_pp1_r1"} <= set(v2["groups"])

    for r in range(4):  # every rank raised, naming the failing stage and rank
        assert by_rank[r]["err3"] and "stage 1 (rank 2)" in by_rank[r]["err3"], by_rank[r]["err3"]
        assert "injected failure on stage 1" in by_rank[r]["err3"]
        assert "generation stays paused" in by_rank[r]["err3"]
    assert by_rank[0]["health_after_v3"] is False
    assert torch.load(root / "v3.pt", weights_only=False)["paused"] is True

    v4 = check("v4", 1)
    assert v4["paused"] is False and by_rank[0]["health_after_v4"] is True
    nbytes = sum(t.numel() * t.element_size() for t in ref.values())
    for r in range(4):
        m = by_rank[r]["v4_metrics"]
        assert m["weight_sync/num_tensors"] == len(ref) and m["weight_sync/mbytes"] == nbytes / 2**20, m

    v5 = check("v5", 2)
    disk_loads = [names for path, _, names in v5["log"] if path == "/update_weights_from_disk"]
    assert disk_loads and sorted(disk_loads[-1]) == sorted(ref)
    vdir = root / "sync" / "v5"
    index = json.load(open(vdir / "model.safetensors.index.json"))["weight_map"]
    for name, shard in index.items():
        assert shard.startswith(f"model-pp{stage_of(name)}-"), (name, shard)
    assert (vdir / "config.json").exists()


# ---- one sender (this process) against the stand-in server ------------------------------------------

@pytest.fixture
def standin(tmp_path):
    proc, url = start_standin(tmp_path)
    yield url
    proc.kill()
    proc.wait()


def _single_engine(url, tag, **kw):
    """An SGLang engine in this (the test) process; a group name of its own per test (this process keeps
    its groups: a name may be created once)."""
    import uuid

    from fipo_megatron.rollout.sglang_engine import SGLangEngine
    from fipo_megatron.rollout.weight_sync import NcclSyncConfig, init_custom_process_group
    from fipo_megatron.testing.distributed import free_port

    nccl = NcclSyncConfig("127.0.0.1", free_port(), [1], group_name=f"{tag}_{uuid.uuid4().hex[:8]}", backend="gloo",
                          device="cpu")
    return SGLangEngine(url, weight_sync="nccl", nccl=nccl, group_factory=lambda a, p, r, w, n, b:
                        init_custom_process_group(a, p, r, w, n, backend=b, timeout_s=30), **kw)


def _dump(url, path):
    _post(url, "/standin/dump", {"path": str(path)})
    return torch.load(path, weights_only=False)


def _mixed(seed):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return [(f"w{i}", torch.randn(4 + i, 3, generator=g).to(dtypes[i % 3])) for i in range(9)]


def test_flattened_buckets_one_broadcast_per_dtype(standin, tmp_path):
    eng = _single_engine(standin, "flat", flatten=True, bucket_bytes=200)
    named = _mixed(0)
    eng.update_weights(iter(named), version=1)
    d = _dump(standin, tmp_path / "d.pt")
    for name, t in named:
        assert torch.equal(d["received"][name], t), name
    requests = [names for path, _, names in d["log"] if path == "/update_weights_from_distributed"]
    expected = []  # per bucket (<= 200 bytes, in order), one request per dtype in first-seen order
    for bucket in bucketize(named, 200):  # bucketize itself: test_rollout_weight_sync.py
        by_dtype = {}
        for n, t in bucket:
            by_dtype.setdefault(t.dtype, []).append(n)
        expected += list(by_dtype.values())
    assert requests == expected and len(requests) > len(list(bucketize(named, 200)))
    assert eng.health() and eng.weight_version == 1


@pytest.mark.parametrize("probe", [True, False])
def test_restarted_server_gets_a_new_group(standin, tmp_path, probe):
    """After the server restarts (it answers /health but has no group), an update rebuilds the group
    (new name and port) and succeeds; without the probe the first bucket is refused at once: the update
    fails fast (no hang) and the next one, on a new group, succeeds."""
    eng = _single_engine(standin, "restart", probe_group=probe)
    first = [(n, t.float()) for n, t in _mixed(1)]
    eng.update_weights(iter(first), version=1)
    _post(standin, "/standin/restart", {})
    assert eng.health()
    second = [(n, t + 1) for n, t in first]
    t0 = time.time()
    if probe:
        eng.update_weights(iter(second), version=2)
        assert eng.group_rebuilds == 1 and "init_weights_update_group" in eng.last_rebuild_reason
    else:
        from fipo_megatron.rollout import EngineError

        with pytest.raises(EngineError, match="generation stays paused.*not in"):
            eng.update_weights(iter(second), version=2)
        assert not eng.health()
        eng.update_weights(iter(second), version=2)
    assert time.time() - t0 < 20
    d = _dump(standin, tmp_path / "d.pt")
    assert all(torch.equal(d["received"][n], t) for n, t in second)
    base = eng.nccl.group_name
    assert [g for g in d["groups"]] == [f"{base}_r1"] and eng.health()
