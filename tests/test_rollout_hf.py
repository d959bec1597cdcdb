"""HF rollout engine: log-probs against an independent forward, sampling, stop, weights update."""
import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fipo_megatron.rollout import EngineError, SamplingParams, make_engine
from fipo_megatron.rollout.hf_engine import HFEngine

VOCAB = 64
EOS = 3


def tiny_model(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=EOS, tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(cfg).eval()


def reference_logprobs(model, prompt, response):
    """Independent computation: one plain forward over prompt+response, log_softmax, gather."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


def assert_logprobs_match(model, outs, atol=1e-4):
    for o in outs:
        ref = reference_logprobs(model, o.prompt_ids, o.response_ids)
        got = torch.tensor(o.response_logprobs)
        assert torch.allclose(got, ref, atol=atol), (got - ref).abs().max()


def test_logprobs_equal_plain_forward_and_grouping():
    model = tiny_model()
    eng = HFEngine(model=model, max_batch_size=4)  # 6 rows -> 2 batches, left padding
    outs = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=1))
    assert len(outs) == 6
    for i, o in enumerate(outs):
        assert o.prompt_ids == PROMPTS[i // 2]
        assert 1 <= len(o.response_ids) <= 10
    assert_logprobs_match(model, outs)


def test_logprobs_are_raw_model_logprobs_at_other_temperatures():
    model = tiny_model()
    eng = HFEngine(model=model)
    outs = eng.generate(PROMPTS, SamplingParams(n=2, temperature=0.6, top_p=0.8, top_k=20, max_new_tokens=8, seed=3))
    assert_logprobs_match(model, outs)


def test_seed_reproducible_and_different_seeds_differ():
    eng = HFEngine(model=tiny_model())
    p = SamplingParams(n=4, max_new_tokens=12, seed=7)
    a = [o.response_ids for o in eng.generate(PROMPTS, p)]
    b = [o.response_ids for o in eng.generate(PROMPTS, p)]
    c = [o.response_ids for o in eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=8))]
    assert a == b
    assert a != c


def test_left_padding_batched_equals_unbatched_greedy():
    model = tiny_model()
    eng = HFEngine(model=model, eos_token_ids=[])
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    batched = eng.generate(PROMPTS, p)
    for prompt, ob in zip(PROMPTS, batched):
        (single,) = eng.generate([prompt], p)
        assert single.response_ids == ob.response_ids
        assert ob.finish_reason == "length" and len(ob.response_ids) == 8
    # top_k=1 sampling is greedy
    topk1 = eng.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=8, seed=0))
    assert [o.response_ids for o in topk1] == [o.response_ids for o in batched]


def test_stop_tokens_end_response_and_are_included():
    model = tiny_model()
    stop = list(range(32, 64))  # half the vocabulary: most responses stop early
    eng = HFEngine(model=model)
    outs = eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, stop_token_ids=stop, seed=0))
    stops = set(stop) | {EOS}
    reasons = {o.finish_reason for o in outs}
    assert "stop" in reasons
    for o in outs:
        if o.finish_reason == "stop":
            assert o.response_ids[-1] in stops
            assert not stops & set(o.response_ids[:-1])
        else:
            assert len(o.response_ids) == 6 and not stops & set(o.response_ids)
    assert_logprobs_match(model, outs)


def test_update_weights_serves_perturbed_model():
    model = tiny_model()
    eng = make_engine("hf", model=model)
    assert eng.health()
    target = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    sd = target.state_dict()
    names = sorted(sd)[::-1]  # any order
    eng.update_weights(((n, sd[n].clone()) for n in names), version=1)
    assert eng.weight_version == 1
    outs = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=5))
    assert_logprobs_match(target, outs)
    # the original model's log-probs are clearly different
    fresh = tiny_model()
    diffs = [(reference_logprobs(fresh, o.prompt_ids, o.response_ids) - torch.tensor(o.response_logprobs)).abs().max()
             for o in outs]
    assert max(diffs) > 1e-2


def test_update_weights_subset_and_errors():
    model = tiny_model()
    eng = HFEngine(model=model)
    w = model.model.norm.weight.detach().clone()
    eng.update_weights([("model.norm.weight", w * 2)], version=1)
    assert torch.allclose(model.model.norm.weight, w * 2)
    with pytest.raises(EngineError, match="older"):
        eng.update_weights([], version=0)
    with pytest.raises(EngineError, match="unknown weight name 'model.nope'"):
        eng.update_weights([("model.norm.weight", w), ("model.nope", w)], version=2)
    assert not eng.health()
    with pytest.raises(EngineError, match="failed midway"):
        eng.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineError, match="shape mismatch"):
        eng.update_weights([("model.norm.weight", w[:3])], version=2)
    eng.update_weights(model.state_dict().items(), version=2)
    assert eng.health() and eng.weight_version == 2
    eng.shutdown()
    assert not eng.health()


def test_load_from_dir_and_tied_embeddings(tmp_path):
    model = tiny_model(tie=True)
    model.save_pretrained(tmp_path)
    eng = make_engine("hf", model_path=str(tmp_path))
    assert eng.eos_token_ids == [EOS]
    outs = eng.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=5, seed=0))
    assert_logprobs_match(model, outs)
    emb = eng.model.model.embed_tokens.weight
    eng.update_weights([("lm_head.weight", torch.zeros_like(emb))], version=1)
    assert float(emb.detach().abs().sum()) == 0.0  # tied: lm_head and embeddings are one tensor


def test_invalid_inputs():
    eng = HFEngine(model=tiny_model())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        HFEngine()
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("tgi")
