"""vLLM server engine, weight-sync additions, against the stand-in vLLM server of test_rollout_vllm:
packed transfer bodies, the group probe and rebuild after a server restart, disk shards from two stage
senders, and the one-sender rule for NCCL."""
import json
import os

import pytest
import torch

from fipo_megatron.rollout.vllm_engine import VLLMServerEngine
from fipo_megatron.rollout.weight_sync import NcclSyncConfig

from test_rollout_vllm import FakeVLLMServer


def test_packed_init_info_and_update_info():
    srv = FakeVLLMServer(version="0.32.0")
    sent = []
    try:
        eng = VLLMServerEngine(srv.url, nccl=NcclSyncConfig("10.1.1.1", 12345, workers_per_server=[2], device="cpu"),
                               packed=True, bucket_bytes=64, group_factory=lambda c: "G",
                               send_fn=lambda b, g, d: sent.append([n for n, _ in b]))
        eng.update_weights([("a", torch.zeros(4)), ("b", torch.zeros(2, 2))], version=1)
        assert srv.bodies("/init_weight_transfer_engine") == [{"init_info": {
            "master_address": "10.1.1.1", "master_port": 12345, "rank_offset": 1, "world_size": 3, "packed": True,
            "packed_buffer_size_bytes": 64, "packed_num_buffers": 2}}]
        assert srv.bodies("/update_weights") == [{"update_info": {"names": ["a", "b"], "dtype_names": ["float32"] * 2,
                                                                  "shapes": [[4], [2, 2]]}}]
        assert sent == [["a", "b"]] and not eng.supports_stage_senders
    finally:
        srv.close()
    legacy = FakeVLLMServer(version="0.24.0")
    try:
        eng = VLLMServerEngine(legacy.url, nccl=NcclSyncConfig("h", 1, workers_per_server=[1], device="cpu"),
                               packed=True, group_factory=lambda c: "G", send_fn=lambda b, g, d: None)
        eng.update_weights([("a", torch.zeros(1))], version=1)
        assert legacy.bodies("/init_weight_transfer_engine")[0]["init_info"].get("packed") is None
        assert legacy.bodies("/update_weights")[0]["update_info"]["packed"] is True
    finally:
        legacy.close()


def test_restarted_server_is_probed_and_the_group_rebuilt_on_the_next_port():
    srv = FakeVLLMServer(version="0.32.0")
    state = {"initialised": False}

    def init(body):
        state["initialised"] = True
        return 200, None

    def update(body):  # vLLM: receive_weights before init_transfer_engine raises -> HTTP 500
        if not state["initialised"]:
            return 500, {"error": "NCCL weight transfer not initialized. Call init_transfer_engine() first."}
        return 200, None

    srv.routes[("POST", "/init_weight_transfer_engine")] = init
    srv.routes[("POST", "/update_weights")] = update
    groups = []
    try:
        eng = VLLMServerEngine(srv.url, nccl=NcclSyncConfig("h", 40000, workers_per_server=[1], device="cpu"),
                               group_factory=lambda c: groups.append(c.master_port) or f"G{len(groups)}",
                               send_fn=lambda b, g, d: None, max_retries=0)
        eng.update_weights([("a", torch.zeros(1))], version=1)
        eng.update_weights([("a", torch.zeros(1))], version=2)  # probe answered: no rebuild
        assert groups == [40000] and eng.group_rebuilds == 0
        probes = [b for b in srv.bodies("/update_weights") if not b["update_info"]["names"]]
        assert probes == [{"update_info": {"names": [], "dtype_names": [], "shapes": []}}]
        state["initialised"] = False  # the server restarted
        eng.update_weights([("a", torch.zeros(1))], version=3)
        assert groups == [40000, 40001] and eng.group_rebuilds == 1 and "not initialized" in eng.last_rebuild_reason
        ports = [b["init_info"]["master_port"] for b in srv.bodies("/init_weight_transfer_engine")]
        assert ports == [40000, 40001] and eng.health() and eng.weight_version == 3
    finally:
        srv.close()


def test_disk_shards_from_two_stage_senders_make_one_version(tmp_path):
    """Two engines stand for two stages' senders: the leader begins, each writes its shards, the leader
    finishes (index of both) and reloads; the directory loads back to every tensor."""
    from safetensors.torch import load_file

    srv = FakeVLLMServer(version="0.32.0")
    try:
        leader = VLLMServerEngine(srv.url, weight_sync="disk", disk_root=str(tmp_path), stage=0, bucket_bytes=16)
        other = VLLMServerEngine(srv.url, weight_sync="disk", disk_root=str(tmp_path), stage=1, bucket_bytes=16)
        assert leader.supports_stage_senders and other.supports_stage_senders
        srv.requests.clear()
        v = leader.begin_update(5)
        r0 = leader.send_buckets([[("a", torch.arange(4.0))], [("b", torch.ones(2))]], v)
        r1 = other.send_buckets([[("c", torch.full((3,), 2.0))]], v)
        leader.end_update(v, [r0, r1])
        assert [p for m, p in srv.paths()] == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/resume"]
        path = tmp_path / "v5"
        index = json.load(open(path / "model.safetensors.index.json"))
        assert index["weight_map"] == {"a": "model-pp0-00000.safetensors", "b": "model-pp0-00001.safetensors",
                                       "c": "model-pp1-00000.safetensors"}
        assert index["metadata"]["total_size"] == 16 + 8 + 12
        loaded = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                loaded.update(load_file(os.path.join(path, f)))
        assert torch.equal(loaded["a"], torch.arange(4.0)) and torch.equal(loaded["c"], torch.full((3,), 2.0))
        assert leader.weight_version == 5 and leader.health()
        with pytest.raises(ValueError, match="written by two writers"):
            leader.disk_writer.begin(6)
            leader.disk_writer.finish(6, [r0["weight_map"], r0["weight_map"]])
    finally:
        srv.close()


def test_servers_that_refuse_empty_probes_cost_one_rebuild_then_no_more_probes():
    srv = FakeVLLMServer(version="0.32.0")
    srv.routes[("POST", "/update_weights")] = lambda b: ((400, {"error": "names must not be empty"})
                                                         if not b["update_info"]["names"] else (200, None))
    groups = []
    try:
        eng = VLLMServerEngine(srv.url, nccl=NcclSyncConfig("h", 40000, workers_per_server=[1], device="cpu"),
                               group_factory=lambda c: groups.append(c.master_port) or "G",
                               send_fn=lambda b, g, d: None, max_retries=0)
        eng.update_weights([("a", torch.zeros(1))], version=1)
        with pytest.warns(UserWarning, match="refuse the empty group probe even on a new group"):
            eng.update_weights([("a", torch.zeros(1))], version=2)
        eng.update_weights([("a", torch.zeros(1))], version=3)
        assert groups == [40000, 40001] and eng.group_rebuilds == 1 and not eng.probe_group
        assert sum(not b["update_info"]["names"] for b in srv.bodies("/update_weights")) == 2
        assert eng.health() and eng.weight_version == 3
    finally:
        srv.close()
