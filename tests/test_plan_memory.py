"""Memory formula of fipo_megatron.plan vs independent counts.

The parameter count is checked against transformers' Qwen2ForCausalLM built on the meta device
(no weights allocated); the per-GPU bytes of a tiny config against a hand computation.
"""

import pytest
import torch

from fipo_megatron.plan import RunShape, estimate_memory, param_count, validate_layout
from fipo_megatron.plan.memory import activation_bytes, padded_vocab, stage_params
from fipo_megatron.plan.models import PRESETS, ModelShape, get_preset

import transformers  # a hard dependency: a broken install must fail, never skip

TINY = ModelShape("tiny", hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=False,
                  max_position_embeddings=4096, rope_theta=1e6)


def _hf_params(m: ModelShape) -> int:
    cfg = transformers.Qwen2Config(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, vocab_size=m.vocab_size,
        tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=m.max_position_embeddings)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["qwen2.5-32b", "qwen2.5-7b", "qwen2.5-0.5b"])
def test_param_count_matches_transformers(name):
    assert param_count(PRESETS[name]) == _hf_params(PRESETS[name])


def test_param_count_tiny_tied_and_untied():
    assert param_count(TINY) == _hf_params(TINY)
    tied = ModelShape(**{**TINY.to_dict(), "tie_word_embeddings": True})
    assert param_count(tied) == _hf_params(tied)
    assert param_count(TINY) - param_count(tied) == 512 * 64


def test_published_sizes():
    assert round(param_count(PRESETS["qwen2.5-32b"]) / 1e9, 2) == 32.76
    assert round(param_count(PRESETS["qwen2.5-7b"]) / 1e9, 2) == 7.62


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (8, 2)])
def test_stage_params_sum_to_model(tp, pp):
    """Summed over all TP ranks and PP stages, the shards give the HF count (padded vocab),
    plus the RMSNorm weights that every TP rank replicates."""
    m = PRESETS["qwen2.5-32b"]
    lay = validate_layout(m, nodes=pp * tp, gpus_per_node=1, tp=tp, pp=pp, cp=1,
                          run=RunShape(2048, 20480, 512, 64, 16, 24576))
    total = sum(stage_params(m, lay, s) for s in range(pp)) * tp
    replicated = (tp - 1) * (2 * m.hidden_size * m.num_layers + m.hidden_size)
    vp = padded_vocab(m, tp)
    assert total - replicated == pytest.approx(param_count(m, padded_vocab=vp), rel=0, abs=1e-3)
    assert vp % (128 * tp) == 0 and vp >= m.vocab_size


def test_tiny_bytes_by_hand():
    # TINY: h=64, d=16, g=2, I=128, V=512 (already a multiple of 128), L=4.
    # P = 4 * (64*64+64 + 2*(64*32+32) + 64*64 + 3*64*128 + 2*64) + 2*512*64 + 64
    P = 4 * (4160 + 4160 + 4096 + 24576 + 128) + 65536 + 64
    assert P == param_count(TINY) == 214080
    run = RunShape(64, 64, 8, 4, 2, 256)   # T = 256 tokens per micro-batch
    lay = validate_layout(TINY, nodes=1, gpus_per_node=2, tp=1, pp=1, cp=1, run=run)  # DP=2
    mem = estimate_memory(TINY, lay, run, recompute="none", overhead_gib=0.0)
    assert mem.weights == 2 * P and mem.gradients == 4 * P
    assert mem.optimizer == 12 * P / 2
    # A = 12h + 4gd + 6I + 4a = 768 + 128 + 768 + 16 = 1680 bytes per token per layer
    assert mem.activations == 4 * 256 * 1680
    # logits: bf16 output + its bf16 gradient for all 256 tokens (4 bytes), two fp32 chunk buffers of
    # min(256, 4096) tokens (8 bytes), final norm 256 * 4 * 64
    assert mem.logits == 256 * 512 * 4 + 256 * 512 * 8 + 256 * 256
    # an fp32 copy of the output and its fp32 gradient: 8 more bytes per logit
    fp32 = estimate_memory(TINY, lay, run, recompute="none", overhead_gib=0.0, fp32_logits=True)
    assert fp32.logits - mem.logits == 256 * 512 * 8
    # local attention: rows of 64 + 64 = 128 tokens, 4 heads: 4 bytes * 4 heads * 128 per token per layer,
    # 4 stored layers without recompute, one (the recomputed one) with selective recompute
    assert mem.attention_scores == 0.0
    local = estimate_memory(TINY, lay, run, recompute="none", overhead_gib=0.0, attention="local")
    assert local.attention_scores == 4 * 256 * 4 * 4 * 128
    sel = estimate_memory(TINY, lay, run, recompute="selective", overhead_gib=0.0, attention="local")
    assert sel.attention_scores == 256 * 4 * 4 * 128
    full = estimate_memory(TINY, lay, run, recompute="full", overhead_gib=0.0)
    assert full.activations == 4 * 256 * 2 * 64 + 256 * 1680
    assert full.total < mem.total


def test_parallelism_scales_activations():
    m = PRESETS["qwen2.5-32b"]
    run = RunShape(2048, 20480, 512, 64, 16, 24576)
    base = validate_layout(m, nodes=8, gpus_per_node=8, tp=8, pp=1, cp=1, run=run)
    cp2 = validate_layout(m, nodes=8, gpus_per_node=8, tp=8, pp=1, cp=2, run=run)
    e1 = estimate_memory(m, base, run, recompute="none")
    e2 = estimate_memory(m, cp2, run, recompute="none")
    assert e2.activations == pytest.approx(e1.activations / 2)
    # distributed optimizer shards over DP * CP (the same 8 here), so optimizer bytes are equal
    assert e2.optimizer == pytest.approx(e1.optimizer)


def test_recompute_granularities_by_hand():
    # TINY, TP=1 PP=1: n = 4 layers/stage, one micro-batch in flight, T = 256 tokens;
    # A = 1680, softmax log-sum-exp 4a = 16, layer input 2h = 128 bytes per token per layer.
    run = RunShape(64, 64, 8, 4, 2, 256)
    lay = validate_layout(TINY, nodes=1, gpus_per_node=2, tp=1, pp=1, cp=1, run=run)
    sel = estimate_memory(TINY, lay, run, recompute="selective", overhead_gib=0.0)
    assert sel.activations == 4 * 256 * (1680 - 16) + 256 * 16
    assert (sel.recompute_method, sel.recompute_num_layers) == (None, None)
    uni2 = estimate_memory(TINY, lay, run, recompute="full", recompute_method="uniform",
                           recompute_num_layers=2, overhead_gib=0.0)
    assert uni2.activations == (4 // 2) * 256 * 128 + 2 * 256 * 1680
    blk1 = estimate_memory(TINY, lay, run, recompute="full", recompute_method="block",
                           recompute_num_layers=1, overhead_gib=0.0)
    assert blk1.activations == 256 * (1 * 128 + 3 * 1680) + 256 * 1680
    d = blk1.to_dict()
    assert (d["recompute"], d["recompute_method"], d["recompute_num_layers"]) == ("full", "block", 1)
    assert "activations_selective_recompute_gib" in d
    for bad in (dict(recompute="full", recompute_method="uniform", recompute_num_layers=3),   # 3 does not divide 4
                dict(recompute="full", recompute_method="block", recompute_num_layers=5),     # > 4 layers/stage
                dict(recompute="full", recompute_method=None, recompute_num_layers=1),
                dict(recompute="partial")):
        with pytest.raises(ValueError, match="recompute"):
            estimate_memory(TINY, lay, run, **bad)


@pytest.mark.parametrize("name, tp, pp, cp, nodes", [("qwen2.5-32b", 8, 2, 2, 8), ("qwen2.5-32b", 8, 4, 1, 8),
                                                      ("qwen2.5-math-7b", 4, 1, 1, 2)])
def test_recompute_ordering(name, tp, pp, cp, nodes):
    """Activations: none > selective >= full (uniform, 1 layer); block N sits between none and full."""
    m = PRESETS[name].with_max_positions(32768)
    run = RunShape(2048, 10240, 512, 64, 16, 16384)
    lay = validate_layout(m, nodes=nodes, gpus_per_node=8, tp=tp, pp=pp, cp=cp, run=run)
    est = {r: estimate_memory(m, lay, run, recompute=r) for r in ("none", "selective", "full")}
    assert est["none"].activations > est["selective"].activations >= est["full"].activations
    assert est["none"].total >= est["selective"].total >= est["full"].total
    for e in est.values():   # every estimate also reports all three columns for its worst stage
        assert e.activations_no_recompute > e.activations_selective_recompute >= e.activations_full_recompute
    half = lay.layers_per_stage // 2
    blk = estimate_memory(m, lay, run, recompute="full", recompute_method="block", recompute_num_layers=half)
    # the full column follows the chosen method; compare on the same (worst) stage
    uni = activation_bytes(m, lay, run.max_tokens_per_micro_batch / cp, pp - blk.stage, "full", "uniform", 1)
    assert blk.activations_no_recompute > blk.activations == blk.activations_full_recompute > uni


def test_planner_predicts_the_8k_oom_of_local_attention_and_fp32_logits():
    """Measured on one H100 (80 GB) before the SDPA attention and the bf16 logits: a Qwen2.5-0.5B
    micro-batch of 8,192 tokens without recompute did not fit. The planner, told what ran (local
    attention, fp32 logits), must say so; with flash attention and bf16 logits the same batch fits. The
    difference is the [s, s] scores (4 bytes * 14 heads * 8192 per token per layer, 24 layers) and the
    fp32 copy of [8192, 151936] logits and its gradient (8 bytes each)."""
    model = get_preset("qwen2.5-0.5b")
    run = RunShape(1024, 7168, 64, 8, 8, 8192)
    lay = validate_layout(model, nodes=1, gpus_per_node=1, tp=1, pp=1, cp=1, run=run)
    then = estimate_memory(model, lay, run, recompute="none", attention="local", fp32_logits=True)
    now = estimate_memory(model, lay, run, recompute="none")
    assert not then.fits and now.fits
    assert then.attention_scores == 24 * 8192 * 4 * 14 * 8192
    vp = 151936  # already a multiple of 128
    assert then.logits - now.logits == 8192 * vp * 8
