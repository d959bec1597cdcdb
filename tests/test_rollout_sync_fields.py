"""The weight-sync requests added for per-stage senders, group probes and flattening, checked against the
engines' audited request models with the audited stand-in of test_rollout_engine_fields (every audited
version inside the supported windows): the empty-names probe, a stage sender's group (name, port),
SGLang's load_format "flattened_bucket" (>= 0.5.20, refused before any request below), and vLLM's
packed init / update info.

The audit lists every field of each model but annotates only the fields the adapters sent when it was
generated; for the three fields added here (load_format, packed_buffer_size_bytes, packed_num_buffers)
the audit proves the field exists in that version's model, and the value's type is checked here by
hand (str / int / int, as in the engines' dataclasses), not from the audit."""
import pytest
import torch

from fipo_megatron.rollout import EngineError
from fipo_megatron.rollout import versions as V
from fipo_megatron.rollout.sglang_engine import SGLANG_FLATTENED_FROM, SGLangEngine
from fipo_megatron.rollout.vllm_engine import VLLMServerEngine
from fipo_megatron.rollout.weight_sync import NcclSyncConfig

from test_rollout_engine_fields import NCCL, SGLANG_VERSIONS, VLLM_VERSIONS, AuditedServer

NEW_FIELDS = {"load_format": str, "packed_buffer_size_bytes": int, "packed_num_buffers": int}


class Audited(AuditedServer):
    """The audited stand-in; the new fields' missing annotations are replaced by the checks above."""

    def check(self, model, body):
        problems = []
        for p in super().check(model, body):
            field = next((f for f in NEW_FIELDS if f"no audited annotation for sent field '{f}'" in p), None)
            if field is None:
                problems.append(p)
            elif not isinstance(body[field], NEW_FIELDS[field]):
                problems.append(f"{model}: {field}={body[field]!r} is not {NEW_FIELDS[field].__name__}")
        return problems


NAMED = [("a", torch.zeros(2)), ("b", torch.zeros(3, dtype=torch.bfloat16)), ("c", torch.zeros(4))]


@pytest.mark.parametrize("version", SGLANG_VERSIONS)
def test_sglang_stage_sender_probe_and_flattened_bodies_fit(version):
    srv = Audited("sglang", version)
    try:
        stage1 = NcclSyncConfig(**NCCL).for_stage(1, 2)
        eng = SGLangEngine(srv.url, weight_sync="nccl", nccl=stage1, stage=1, bucket_bytes=16,
                           group_factory=lambda *a: "G", broadcast_fn=lambda t, g: None)
        for v in (1, 2):  # the second update probes the group first
            eng.update_weights(iter(NAMED), version=v)
        inits = srv.bodies("/init_weights_update_group")
        assert [(b["group_name"], b["master_port"]) for b in inits] == [("fipo_weight_update_pp1", 29501)]
        assert sum(not b["names"] for b in srv.bodies("/update_weights_from_distributed")) == 1
        flat = SGLangEngine(srv.url, weight_sync="nccl", nccl=NcclSyncConfig(**NCCL), flatten=True, bucket_bytes=16,
                            group_factory=lambda *a: "G", broadcast_fn=lambda t, g: None)
        before = len(srv.requests)
        if V.parse_version(version) >= SGLANG_FLATTENED_FROM:
            flat.update_weights(iter(NAMED), version=3)
            sent = [b for b in srv.bodies("/update_weights_from_distributed")[-3:]]
            assert [b.get("load_format") for b in sent] == ["flattened_bucket"] * 3
            assert [b["names"] for b in sent] == [["a"], ["b"], ["c"]]  # 16-byte buckets: a+b split by dtype
        else:
            with pytest.raises(EngineError, match="needs SGLang >= 0.5.20"):
                flat.update_weights(iter(NAMED), version=3)
            assert len(srv.requests) == before
        assert srv.violations == [], srv.violations
    finally:
        srv.close()


class PackedAuditedServer(Audited):
    """The audited vLLM stand-in, for a trainer that DOES send packed buffers."""

    @staticmethod
    def unpacked(info):
        return []


@pytest.mark.parametrize("version", [v for v in VLLM_VERSIONS if V.parse_version(v) >= V.VLLM_NCCL_LEGACY_FROM])
@pytest.mark.parametrize("packed", [False, True])
def test_vllm_probe_and_packed_bodies_fit(version, packed):
    srv = (PackedAuditedServer if packed else Audited)("vllm", version)
    try:
        eng = VLLMServerEngine(srv.url, nccl=NcclSyncConfig(**NCCL), packed=packed, bucket_bytes=16,
                               group_factory=lambda cfg: "G", send_fn=lambda b, g, d: None)
        for v in (1, 2):
            eng.update_weights(iter(NAMED), version=v)
        assert eng.group_rebuilds == 0 and eng.probe_group
        updates = srv.bodies("/update_weights")
        assert sum(not b["update_info"]["names"] for b in updates) == 1
        if packed:
            init = srv.bodies("/init_weight_transfer_engine")[0]["init_info"]
            if V.parse_version(version) >= V.VLLM_NCCL_ENGINE_FROM:
                assert init["packed"] is True and init["packed_buffer_size_bytes"] == 16
            else:
                assert all(b["update_info"]["packed"] is True for b in updates)
        assert srv.violations == [], srv.violations
    finally:
        srv.close()
