"""Trainer flags -> who sends weights: per_stage_sync, sync_role and build_engine on each rank of a
TP=2 x PP=2 x DP=2 layout (Megatron's parallel_state and make_engine stubbed: no process group)."""
import pytest

from fipo_megatron.trainer import parse_args, setup


@pytest.fixture
def cfg_for(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text("{}\n")

    def make(*flags, world=8):
        return parse_args(["--hf-model-dir", str(tmp_path / "hf"), "--train-data", str(tmp_path / "t.jsonl"),
                           "--output-dir", str(tmp_path / "out"), *flags], world_size=world)

    return make


SGLANG = ["--rollout-engine", "sglang", "--rollout-urls", "http://127.0.0.1:30000", "--rollout-gpus-per-server", "2"]
PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def test_per_stage_sync_decision(cfg_for):
    assert setup.per_stage_sync(cfg_for(*SGLANG, *PP2))
    assert not setup.per_stage_sync(cfg_for(*SGLANG, "--tensor-model-parallel-size", "2"))  # PP = 1
    assert not setup.per_stage_sync(cfg_for(*SGLANG, *PP2, "--weight-sync-through-rank0"))
    vllm = ["--rollout-engine", "vllm", "--rollout-urls", "http://127.0.0.1:8000"]
    assert setup.per_stage_sync(cfg_for(*vllm, *PP2, "--weight-sync", "disk"))
    assert not setup.per_stage_sync(cfg_for(*vllm, *PP2))  # vLLM NCCL: one group per server
    assert not setup.per_stage_sync(cfg_for(*PP2))  # in-process hf engine


def layout(rank):
    """Megatron's default order tp-cp-dp-pp for TP=2, DP=2, PP=2 (8 ranks): rank = tp + 2 dp + 4 pp."""
    return {"tp": rank % 2, "dp": (rank // 2) % 2, "pp": rank // 4}


@pytest.fixture
def on_rank(monkeypatch):
    import megatron.core.parallel_state as ps

    import fipo_megatron.rollout.base as base

    calls = []
    monkeypatch.setattr(base, "make_engine", lambda kind, **kw: calls.append((kind, kw)) or "ENGINE")

    def at(rank):
        lay = layout(rank)
        monkeypatch.setattr(setup.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: lay["tp"])
        monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda: lay["pp"])
        monkeypatch.setattr(ps, "get_data_parallel_rank", lambda with_context_parallel=False: lay["dp"])
        calls.clear()
        return calls

    return at


def test_roles_and_engines_per_rank(cfg_for, on_rank):
    cfg = cfg_for(*SGLANG, *PP2)
    roles = {}
    for rank in range(8):
        calls = on_rank(rank)
        roles[rank] = setup.sync_role(True)
        engine = setup.build_engine(cfg, seed=0)
        assert (engine == "ENGINE") == roles[rank][1], rank
        if calls:
            kind, kw = calls[0]
            stage = layout(rank)["pp"]
            assert kind == "sglang" and kw["stage"] == stage
            name, port = kw["nccl"].group_for(0)
            assert (name, port) == ("fipo_weight_update" + ("_pp1" if stage else ""), 29700 + stage)
    assert [r for r in range(8) if roles[r][1]] == [0, 4]  # the first rank of each stage
    assert [r for r in range(8) if roles[r][2]] == [0, 1, 4, 5]  # dp = 0: its stage's TP ranks iterate
    assert roles[0][0] and not any(roles[r][0] for r in range(1, 8))
    on_rank(4)
    assert setup.sync_role(False) == (False, False, True)  # through rank 0: everyone iterates, rank 0 sends


def test_flatten_flag_picks_each_engines_option(cfg_for, on_rank):
    calls = on_rank(0)
    setup.build_engine(cfg_for(*SGLANG, "--weight-sync-flatten", world=1), seed=0)
    assert calls[-1][1]["flatten"] is True and "stage" not in calls[-1][1]
    setup.build_engine(cfg_for("--rollout-engine", "vllm", "--rollout-urls", "http://127.0.0.1:8000",
                               "--rollout-gpus-per-server", "1", "--weight-sync-flatten", world=1), seed=0)
    assert calls[-1][0] == "vllm-server" and calls[-1][1]["packed"] is True
