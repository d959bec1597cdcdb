"""Layout validation of fipo_megatron.plan: valid layouts derive DP; invalid ones fail clearly."""

import json
import subprocess
import sys

import pytest

from fipo_megatron.plan import LayoutError, RunShape, validate_layout
from fipo_megatron.plan.models import PRESETS

Q32 = PRESETS["qwen2.5-32b"]
Q7M = PRESETS["qwen2.5-math-7b"]
RUN32 = RunShape(2048, 20480, 512, 64, 16, 24576)


def _problems(**kw) -> str:
    with pytest.raises(LayoutError) as ei:
        validate_layout(**kw)
    return str(ei.value)


def test_valid_32b_layout_derives_dp_and_padding():
    lay = validate_layout(Q32, nodes=8, gpus_per_node=8, tp=8, pp=2, cp=2, run=RUN32)
    assert (lay.dp, lay.world_size, lay.layers_per_stage) == (2, 64, 32)
    assert lay.tp * lay.pp * lay.cp * lay.dp == lay.world_size
    assert lay.seq_pad_multiple == 32 and lay.padded_max_seq_len == 22528
    assert lay.tokens_per_gpu_per_micro_batch == 12288
    assert lay.sequences_per_mini_batch_per_dp_rank == 64 * 16 // 2


def test_tp_must_divide_kv_groups():
    # 32B has 40 heads and 8 KV groups: TP=5 divides the heads but not the groups.
    msg = _problems(model=Q32, nodes=5, gpus_per_node=8, tp=5, pp=1, cp=1, run=RUN32)
    assert "KV groups (8)" in msg and "valid TP: [1, 2, 4, 8]" in msg
    # 7B has 4 KV groups: TP=8 is refused on megatron-core 0.16.
    run7 = RunShape(2048, 1024, 512, 64, 32, 4096)
    msg = _problems(model=Q7M, nodes=1, gpus_per_node=8, tp=8, pp=1, cp=1, run=run7)
    assert "KV groups (4)" in msg and "valid TP: [1, 2, 4]" in msg


def test_pp_must_divide_layers():
    msg = _problems(model=Q32, nodes=6, gpus_per_node=8, tp=8, pp=3, cp=2, run=RUN32)
    assert "PP=3 must divide the number of layers (64)" in msg


def test_world_size_must_equal_product():
    msg = _problems(model=Q32, nodes=3, gpus_per_node=8, tp=8, pp=2, cp=1, run=RUN32)
    assert "world size 24" in msg and "TP*PP*CP = 8*2*1 = 16" in msg


def test_micro_batch_budget_rules():
    run = RunShape(2048, 20480, 512, 64, 16, 20010)
    msg = _problems(model=Q32, nodes=8, gpus_per_node=8, tp=8, pp=2, cp=2, run=run)
    assert "multiple of the sequence padding 32" in msg   # 2*CP*TP = 32; 20010 % 32 != 0
    assert "cannot hold one full-length sample" in msg  # 20010 < 22528
    msg = _problems(model=Q32, nodes=8, gpus_per_node=8, tp=8, pp=2, cp=1, run=run)
    assert "multiple of the sequence padding 8" in msg    # CP=1: padded to TP only; 20010 % 8 != 0


def test_batch_divisibility():
    run = RunShape(2048, 20480, 512, 48, 16, 24576)     # 512 % 48 != 0
    msg = _problems(model=Q32, nodes=8, gpus_per_node=8, tp=8, pp=1, cp=1, run=run)
    assert "global batch (512 prompts) must be divisible by the mini-batch (48" in msg
    run = RunShape(2048, 20480, 3, 3, 1, 24576)         # 3 sequences over DP=8
    msg = _problems(model=Q32, nodes=8, gpus_per_node=8, tp=8, pp=1, cp=1, run=run)
    assert "divisible by DP=8" in msg


def test_max_positions_of_math_7b():
    run = RunShape(2048, 10240, 512, 64, 32, 16384)
    msg = _problems(model=Q7M, nodes=2, gpus_per_node=8, tp=4, pp=1, cp=1, run=run)
    assert "max_position_embeddings=4096" in msg and "32768" in msg
    lay = validate_layout(Q7M.with_max_positions(32768), nodes=2, gpus_per_node=8, tp=4, pp=1,
                          cp=1, run=run)
    assert lay.dp == 4


def test_non_positive_sizes_rejected():
    msg = _problems(model=Q32, nodes=8, gpus_per_node=8, tp=0, pp=1, cp=1, run=RUN32)
    assert "tp=0 must be a positive integer" in msg


def test_every_problem_is_listed_at_once():
    err = None
    try:
        validate_layout(Q7M, nodes=2, gpus_per_node=8, tp=3, pp=5, cp=1,
                        run=RunShape(2048, 20480, 512, 100, 16, 1000))
    except LayoutError as e:
        err = e
    assert err is not None and len(err.problems) >= 5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fipo_megatron.plan", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_rejects_invalid_layout_with_exit_2():
    r = _cli("--model", "qwen2.5-32b", "--nodes", "4", "--tp", "16", "--pp", "2", "--cp", "1")
    assert r.returncode == 2
    assert "TP=16 must divide" in r.stderr


def test_cli_json_is_consistent():
    r = _cli("--model", "qwen2.5-32b", "--nodes", "8", "--tp", "8", "--pp", "2", "--cp", "2",
             "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    lay = res["layout"]
    assert res["valid"] and lay["dp"] == 2 and lay["world_size"] == 64
    assert res["memory"]["fits"] and res["memory"]["total_gib"] < 80


def test_cli_reports_oom_with_exit_3():
    r = _cli("--model", "qwen2.5-32b", "--nodes", "1", "--tp", "8", "--pp", "1", "--cp", "1",
             "--recompute", "none", "--max-tokens-per-micro-batch", "98304")
    assert r.returncode == 3 and "exceeds --gpu-memory-gib" in r.stderr


def test_cli_recompute_flags_and_json():
    base = ("--model", "qwen2.5-32b", "--nodes", "8", "--tp", "8", "--pp", "2", "--cp", "2", "--json")
    res = {}
    for extra in (("--recompute", "none"), ("--recompute", "selective"), ("--recompute", "full"),
                  ("--recompute", "full", "--recompute-method", "block", "--recompute-num-layers", "8")):
        r = _cli(*base, *extra)
        assert r.returncode == 0, r.stderr
        res[extra] = json.loads(r.stdout)["memory"]
    none, sel, full = (res[("--recompute", g)] for g in ("none", "selective", "full"))
    assert (none["recompute"], none["recompute_method"], none["recompute_num_layers"]) == ("none", None, None)
    assert (sel["recompute"], sel["recompute_method"]) == ("selective", None)
    assert (full["recompute"], full["recompute_method"], full["recompute_num_layers"]) == ("full", "uniform", 1)
    blk = res[("--recompute", "full", "--recompute-method", "block", "--recompute-num-layers", "8")]
    assert (blk["recompute_method"], blk["recompute_num_layers"]) == ("block", 8)
    assert none["activations_gib"] > sel["activations_gib"] >= full["activations_gib"]
    assert none["activations_gib"] > blk["activations_gib"] > full["activations_gib"]
    r = _cli(*base[:-1], "--recompute", "full")
    assert "selective" in r.stdout and "full (uniform, 1)" in r.stdout
    r = _cli(*base, "--recompute", "selective", "--recompute-num-layers", "2")
    assert r.returncode == 2 and "need --recompute full" in r.stderr
    r = _cli(*base, "--recompute", "full", "--recompute-method", "uniform", "--recompute-num-layers", "5")
    assert r.returncode == 2 and "must divide the layers per pipeline stage (32)" in r.stderr
