"""Qwen2.5 presets, HF config -> TransformerConfig mapping, vocab padding and layout validation
(in-process; no process group, no CPU-compat patches)."""
import json

import pytest
import torch
import torch.nn.functional as F

from fipo_megatron.megatron.qwen import (
    QWEN25_PRESETS, build_model, causal_attention_mask, load_hf_config, padded_vocab_size,
    transformer_config_from_hf, validate_layout,
)


def test_presets_hold_published_numbers():
    p = QWEN25_PRESETS
    assert set(p) >= {"0.5B", "1.5B", "3B", "7B", "14B", "32B", "7B-Math", "tiny"}
    assert (p["0.5B"]["hidden_size"], p["0.5B"]["num_hidden_layers"], p["0.5B"]["num_key_value_heads"]) == (896, 24, 2)
    assert p["0.5B"]["tie_word_embeddings"] and p["3B"]["tie_word_embeddings"]
    assert not p["7B"]["tie_word_embeddings"] and p["7B"]["vocab_size"] == 152064
    assert p["1.5B"]["vocab_size"] == 151936 and p["32B"]["intermediate_size"] == 27648
    assert p["32B"]["rms_norm_eps"] == 1e-5 and p["7B"]["rms_norm_eps"] == 1e-6
    assert p["7B-Math"]["rope_theta"] == 10000.0 and p["7B-Math"]["max_position_embeddings"] == 4096
    assert p["7B"]["rope_theta"] == 1e6


def test_transformer_config_mapping():
    cfg = transformer_config_from_hf("32B", tp=8, pp=4, params_dtype=torch.bfloat16, on_cpu=True)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (64, 5120, 40, 8)
    assert cfg.ffn_hidden_size == 27648 and cfg.kv_channels == 128
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.bf16 and not cfg.fp16 and cfg.params_dtype == torch.bfloat16
    assert cfg.tensor_model_parallel_size == 8 and cfg.pipeline_model_parallel_size == 4
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.use_cpu_initialization and not cfg.masked_softmax_fusion and not cfg.apply_rope_fusion
    assert not cfg.gradient_accumulation_fusion and not cfg.bias_dropout_fusion


def test_config_sources_agree(tmp_path):
    import transformers  # a hard dependency: fail, never skip
    fields = dict(QWEN25_PRESETS["tiny"], rope_theta=12345.0, rms_norm_eps=3e-6)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    hf = transformers.Qwen2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    for src in (fields, str(tmp_path), str(tmp_path / "config.json"), hf):
        c = load_hf_config(src)
        assert c["rope_theta"] == 12345.0 and c["rms_norm_eps"] == 3e-6 and c["num_key_value_heads"] == 2
        assert transformer_config_from_hf(src, on_cpu=True).layernorm_epsilon == 3e-6
    with pytest.raises(FileNotFoundError, match="not a Qwen2.5 preset"):
        load_hf_config(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="missing required fields"):
        load_hf_config({"hidden_size": 8})


def test_vocab_padding_and_layout_validation():
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 2) == 152064
    assert padded_vocab_size(152064, 128, 4) == 152064 and padded_vocab_size(152064, 128, 8) == 152576
    assert padded_vocab_size(200, 128, 2) == 256
    validate_layout(QWEN25_PRESETS["0.5B"], tp=2, pp=4)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        validate_layout(QWEN25_PRESETS["0.5B"], tp=4)
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        validate_layout(QWEN25_PRESETS["7B"], tp=8)
    validate_layout(QWEN25_PRESETS["32B"], tp=8, pp=8)
    with pytest.raises(ValueError, match="num_hidden_layers=28"):
        validate_layout(QWEN25_PRESETS["7B"], pp=3)
    with pytest.raises(ValueError, match="intermediate_size=129"):
        validate_layout(dict(QWEN25_PRESETS["tiny"], intermediate_size=129), tp=2)
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads"):
        validate_layout(dict(QWEN25_PRESETS["tiny"], num_key_value_heads=3), tp=1)
    with pytest.raises(RuntimeError, match="initialize_parallel"):
        build_model("tiny")


def test_causal_mask():
    m = causal_attention_mask(4)
    assert m.shape == (1, 1, 4, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[False, True, True, True], [False, False, True, True],
                                [False, False, False, True], [False, False, False, False]]
