"""The trainer's recompute flags reach Megatron's TransformerConfig with Megatron-LM's meanings
(in-process: only a TransformerConfig is built, no process group)."""
import json

import pytest

from fipo_megatron.megatron.qwen_config import transformer_config_from_hf
from fipo_megatron.models.qwen25 import QWEN25_PRESETS
from fipo_megatron.trainer.args import parse_args


@pytest.fixture
def base(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(QWEN25_PRESETS["7B"]))   # 28 layers
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    return ["--hf-model-dir", str(hf), "--train-data", str(data)]


def _tc(base, extra, pp=1):
    cfg = parse_args([*base, *extra, "--pipeline-model-parallel-size", str(pp)], world_size=8)
    return transformer_config_from_hf(QWEN25_PRESETS["7B"], pp=pp, on_cpu=True, **cfg.recompute_overrides())


@pytest.mark.parametrize("extra, pp, expected", [
    ([], 1, (None, None, None)),
    (["--recompute-activations"], 1, ("selective", None, None)),
    (["--recompute-granularity", "selective"], 2, ("selective", None, None)),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], 1,
     ("full", "uniform", 1)),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "7"], 2,
     ("full", "uniform", 7)),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "5"], 2,
     ("full", "block", 5)),
])
def test_flags_reach_transformer_config(base, extra, pp, expected):
    tc = _tc(base, extra, pp)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == expected
    if expected[0] == "selective":
        assert tc.recompute_modules == ["core_attn"]    # Megatron's selective default: core attention only


def test_what_validation_refuses_megatron_refuses_too():
    """TransformerConfig itself rejects full recompute without method / num-layers; the trainer's
    validation reports the same combinations before any process group (test_trainer_args)."""
    with pytest.raises(ValueError, match="recompute_method must be"):
        transformer_config_from_hf(QWEN25_PRESETS["7B"], on_cpu=True, recompute_granularity="full")
    with pytest.raises(ValueError, match="recompute_num_layers must be between"):
        transformer_config_from_hf(QWEN25_PRESETS["7B"], on_cpu=True, recompute_granularity="full",
                                   recompute_method="uniform")
