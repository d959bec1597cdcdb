"""Trainer flags -> rollout engine arguments (setup.build_engine), with make_engine captured, and the
routable NCCL master address."""
import pytest

from fipo_megatron.rollout.weight_sync import outward_address
from fipo_megatron.trainer import parse_args
from fipo_megatron.trainer import setup


@pytest.fixture
def built(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text("{}\n")
    calls = []
    monkeypatch.setattr(setup.dist, "get_rank", lambda: 0)
    import fipo_megatron.rollout.base as base

    monkeypatch.setattr(base, "make_engine", lambda kind, **kw: calls.append((kind, kw)) or "ENGINE")

    def build(*flags):
        cfg = parse_args(["--hf-model-dir", str(tmp_path / "hf"), "--train-data", str(tmp_path / "t.jsonl"),
                          "--output-dir", str(tmp_path / "out"), *flags], world_size=1)
        assert setup.build_engine(cfg, seed=0) == "ENGINE"
        return calls[-1]

    build.hf = str(tmp_path / "hf")
    build.out = str(tmp_path / "out")
    return build


def test_inprocess_vllm_gets_low_memory_share_and_disk_reload(built):
    kind, kw = built("--rollout-engine", "vllm")
    assert kind == "vllm" and kw["gpu_memory_utilization"] == 0.3 and "urls" not in kw
    assert kw["disk_root"] == built.out + "/weight_sync" and kw["template_dir"] == built.hf
    kind, kw = built("--rollout-engine", "vllm", "--rollout-gpu-memory-utilization", "0.2")
    assert kw["gpu_memory_utilization"] == 0.2


def test_vllm_server_disk_sync_and_limits(built):
    kind, kw = built("--rollout-engine", "vllm", "--rollout-urls", "http://10.0.0.5:8000", "--weight-sync", "disk",
                     "--weight-sync-dir", "/shared/ws", "--rollout-skip-version-check")
    assert kind == "vllm-server" and kw["urls"] == ["http://10.0.0.5:8000"] and kw["weight_sync"] == "disk"
    assert kw["disk_root"] == "/shared/ws" and kw["nccl"] is None and kw["check_version"] is False
    assert kw["max_in_flight_per_server"] == 512


def test_nccl_master_address_is_routable_or_given(built):
    kind, kw = built("--rollout-engine", "sglang", "--rollout-urls", "http://127.0.0.1:30000",
                     "--rollout-gpus-per-server", "2", "--rollout-max-in-flight-per-server", "64")
    nccl = kw["nccl"]
    assert nccl.master_address == "127.0.0.1" and nccl.workers_per_server == [2] and kw["check_version"] is True
    assert kw["max_in_flight_per_server"] == 64
    kind, kw = built("--rollout-engine", "sglang", "--rollout-urls", "http://127.0.0.1:30000",
                     "--rollout-gpus-per-server", "2", "--weight-sync-master-addr", "10.9.8.7")
    assert kw["nccl"].master_address == "10.9.8.7"


def test_outward_address():
    assert outward_address("http://127.0.0.1:8000") == "127.0.0.1"
    assert outward_address("localhost:30000") == "127.0.0.1"
    with pytest.raises(ValueError, match="--weight-sync-master-addr"):
        outward_address("http://:80")


@pytest.mark.parametrize("flag,value,msg", [("--rollout-max-in-flight-per-server", "0", "must be >= 1"),
                                            ("--rollout-gpu-memory-utilization", "1.5", "must be in"),
                                            ("--rollout-gpu-memory-utilization", "0", "must be in")])
def test_bad_rollout_limits_are_refused(tmp_path, flag, value, msg):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=f"{flag} {msg}"):
        parse_args(["--hf-model-dir", str(tmp_path / "hf"), "--train-data", str(tmp_path / "t.jsonl"), flag, value],
                   world_size=1)
