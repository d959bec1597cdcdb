"""Unit tests of the HF <-> Megatron mapping rules, validation and streaming safetensors I/O.

No Megatron model here (see test_convert_model.py for the checks against the installed
megatron-core and transformers); these run in well under a second.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fipo_megatron.convert.mapping import (QwenDims, expected_hf_shapes, fc1_hf_to_mcore, fc1_mcore_to_hf,
                                           fc1_tp_shards_to_global, pad_vocab_rows, padded_vocab, qkv_hf_to_mcore,
                                           qkv_mcore_to_hf, unpad_vocab_rows)
from fipo_megatron.convert.safetensors_io import SafetensorsIndex, ShardedSafetensorsWriter
from fipo_megatron.convert.validate import (ConversionError, check_hf_config, check_layout, check_megatron_args,
                                            compare_dims)

CFG = dict(model_type="qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=96, vocab_size=200, rms_norm_eps=1e-6, tie_word_embeddings=False,
           rope_parameters={"rope_theta": 1e6, "rope_type": "default"})


def dims(**kw) -> QwenDims:
    return QwenDims.from_hf_config({**CFG, **kw})


def test_dims_read_every_number_from_config():
    d = dims()
    assert (d.head_dim, d.heads_per_group, d.qkv_rows, d.rope_theta, d.rms_norm_eps) == (16, 2, 128, 1e6, 1e-6)
    assert dims(rope_theta=1e4, rope_parameters=None).rope_theta == 1e4  # transformers 4 style key
    assert dims(rms_norm_eps=1e-5).rms_norm_eps == 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_is_per_group_q_heads_then_k_then_v(bias):
    d = dims()
    hd, H = d.head_dim, d.hidden_size
    shape = lambda rows: (rows,) if bias else (rows, H)  # noqa: E731
    q, k, v = torch.randn(shape(4 * hd)), torch.randn(shape(2 * hd)), torch.randn(shape(2 * hd))
    qkv = qkv_hf_to_mcore(q, k, v, d)
    # explicit construction: group j = q heads 2j, 2j+1, then k head j, then v head j
    blocks = []
    for j in range(2):
        blocks += [q[(2 * j) * hd:(2 * j + 2) * hd], k[j * hd:(j + 1) * hd], v[j * hd:(j + 1) * hd]]
    assert torch.equal(qkv, torch.cat(blocks))
    # TP=2 splits rows into whole groups: rank r's block is exactly group r
    for r, block in enumerate(torch.chunk(qkv, 2)):
        assert torch.equal(block, torch.cat(blocks[3 * r:3 * r + 3]))
    q2, k2, v2 = qkv_mcore_to_hf(qkv, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_fc1_global_and_tp_layout():
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    fc1 = fc1_hf_to_mcore(gate, up)
    assert torch.equal(fc1[:96], gate) and torch.equal(fc1[96:], up)
    g2, u2 = fc1_mcore_to_hf(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    # TP rank r holds [gate shard r; up shard r]
    shards = [torch.cat([gate[r * 48:(r + 1) * 48], up[r * 48:(r + 1) * 48]]) for r in range(2)]
    assert torch.equal(fc1_tp_shards_to_global(shards), fc1)


def test_vocab_padding_rule_and_rows():
    assert padded_vocab(151936, 1) == 151936 and padded_vocab(151936, 2) == 152064
    assert padded_vocab(200, 1) == 256 and padded_vocab(120, 2, 128) == 256 and padded_vocab(120, 1) == 128
    e = torch.randn(200, 8)
    p = pad_vocab_rows(e, 256)
    assert p.shape == (256, 8) and torch.equal(p[:200], e) and not p[200:].any()
    assert torch.equal(unpad_vocab_rows(p, 200), e)
    with pytest.raises(ValueError, match="fewer than the HF vocab_size"):
        unpad_vocab_rows(e, 300)


def test_expected_hf_names_tied_has_no_lm_head():
    assert "lm_head.weight" in expected_hf_shapes(dims())
    assert "lm_head.weight" not in expected_hf_shapes(dims(tie_word_embeddings=True))


def test_layout_validation_refuses_bad_tp_pp():
    d = dims()
    check_layout(d, 2, 2)
    with pytest.raises(ConversionError, match="tp=4 does not divide num_key_value_heads=2"):
        check_layout(d, 4, 1)
    with pytest.raises(ConversionError, match="pp=3 does not divide num_hidden_layers=2"):
        check_layout(d, 1, 3)
    with pytest.raises(ConversionError, match="num_attention_heads=6 is not divisible by num_key_value_heads=4"):
        check_hf_config({**CFG, "num_attention_heads": 6, "num_key_value_heads": 4})


def test_config_comparisons_name_the_field():
    d = dims()
    check_megatron_args(d, {"num_layers": 2, "num_query_groups": 2, "rotary_base": 1e6, "norm_epsilon": 1e-6,
                            "tie_word_embeddings": False, "hidden_size": None})
    for arg, val in (("num_query_groups", 4), ("rotary_base", 1e4), ("norm_epsilon", 1e-5), ("vocab_size", 256),
                     ("ffn_hidden_size", 128), ("tie_word_embeddings", True)):
        with pytest.raises(ConversionError, match=f"config mismatch in '{arg}'"):
            check_megatron_args(d, {arg: val})
    with pytest.raises(ConversionError, match="config mismatch in 'rope_theta'"):
        compare_dims(d, dims(rope_parameters={"rope_theta": 1e4}), "ckpt", "hf")


def test_streaming_safetensors_writer_shards_like_hf_and_reader_reads_back(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.randn(50, 40).to(torch.bfloat16) for i in range(5)}
    tensors["bias"] = torch.randn(7).to(torch.bfloat16)
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(str(tmp_path), specs, max_shard_bytes=9000)
    for n, t in tensors.items():
        w.write(n, t)
    files = w.close()
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))  # the reference reader accepts our files
    reader = SafetensorsIndex(str(tmp_path))
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t) and torch.equal(reader.get(n), t)
    with pytest.raises(ConversionError, match="was planned"):
        ShardedSafetensorsWriter(str(tmp_path / "x"), specs, 9000).write("t1", tensors["t1"])


def test_reader_single_file_and_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    idx = SafetensorsIndex(str(tmp_path))
    assert idx.shapes() == {"a": (2, 3)} and torch.equal(idx.get("a"), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ConversionError, match="tensor 'b' not found"):
        idx.get("b")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match="neither model.safetensors.index.json nor model.safetensors"):
        SafetensorsIndex(str(tmp_path))
