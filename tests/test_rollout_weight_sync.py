"""Weight sync: bucketing, streaming, push_weights routing, safetensors writer, custom group."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fipo_megatron.rollout import bucketize, push_weights
from fipo_megatron.rollout.hf_engine import HFEngine
from fipo_megatron.rollout.weight_sync import SafetensorsDirWriter, dtype_name, tensor_nbytes


def named(sizes):
    return [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]


def test_bucketize_sizes_order_and_big_tensor_alone():
    items = named([10, 10, 10, 100, 5, 5, 30])  # float32: 40, 40, 40, 400, 20, 20, 120 bytes
    buckets = list(bucketize(items, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    for b in buckets:
        assert len(b) == 1 or sum(tensor_nbytes(t) for _, t in b) <= 100
    assert [n for b in buckets for n, _ in b] == [n for n, _ in items]
    assert list(bucketize([], 10)) == []
    with pytest.raises(ValueError):
        list(bucketize(items, 0))


def test_bucketize_is_streaming():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield f"t{i}", torch.zeros(25)  # 100 bytes each

    it = bucketize(gen(), bucket_bytes=300)
    first = next(it)
    assert len(first) == 3
    assert len(pulled) == 4  # only one tensor beyond the first bucket was read


class BucketRecorder:
    def __init__(self):
        self.calls = []

    def update_weights_buckets(self, buckets, version):
        self.calls.append((version, [[n for n, _ in b] for b in buckets]))


def test_push_weights_routes_buckets_and_drains_on_non_source():
    rec = BucketRecorder()
    stats = push_weights(rec, iter(named([25] * 7)), version=3, bucket_bytes=200)
    assert rec.calls == [(3, [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]])]
    assert (stats.num_tensors, stats.num_bytes, stats.num_buckets) == (7, 700, 4)

    consumed = []
    gen = ((consumed.append(n) or (n, t)) for n, t in named([1, 2, 3]))
    stats = push_weights(rec, gen, version=4, is_source=False)
    assert consumed == ["t0", "t1", "t2"] and len(rec.calls) == 1 and stats.num_tensors == 3
    assert push_weights(None, iter(named([4])), version=5).num_tensors == 1


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def test_push_weights_into_hf_engine():
    eng = HFEngine(model=tiny_model(0))
    target = tiny_model(1)
    stats = push_weights(eng, target.state_dict().items(), version=1, bucket_bytes=1024)
    assert eng.weight_version == 1 and stats.num_tensors == len(target.state_dict())
    for k, v in target.state_dict().items():
        assert torch.equal(eng.model.state_dict()[k], v), k


def test_safetensors_writer_is_loadable_and_prunes(tmp_path):
    src = tiny_model(2)
    tmpl = tmp_path / "tmpl"
    src.save_pretrained(tmpl)
    writer = SafetensorsDirWriter(str(tmp_path / "sync"), template_dir=str(tmpl), keep=2)
    for v in (1, 2, 3):
        path = writer(bucketize(src.state_dict().items(), 4096), v)
    assert path == str(tmp_path / "sync" / "v3")
    assert sorted(os.listdir(tmp_path / "sync")) == ["v2", "v3"]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"

