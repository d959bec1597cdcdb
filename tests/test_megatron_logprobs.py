"""token_log_probs: TP=2 (gloo) and chunked single-rank results vs a float64 log-softmax reference,
for values, entropy and gradients, with padded vocabulary ids masked out."""
import torch

from fipo_megatron.megatron.logprobs import token_log_probs
from fipo_megatron.megatron.qwen import mask_padded_vocab_logits
from fipo_megatron.testing.distributed import run_distributed

TRUE_V, PAD_V, S, B = 200, 256, 7, 3


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, B, PAD_V, generator=g, dtype=torch.float64) * 3
    logits[..., TRUE_V:] = 50.0  # padded ids carry large garbage: must not leak into results
    labels = torch.randint(0, TRUE_V, (S, B), generator=g)
    w = torch.randn(S, B, generator=g, dtype=torch.float64)
    return logits, labels, w


def _reference():
    logits, labels, w = _data()
    x = logits[..., :TRUE_V].clone().requires_grad_(True)
    lsm = torch.log_softmax(x, dim=-1)
    logp = lsm.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (logp * w).sum().backward()
    grad = torch.zeros_like(logits)
    grad[..., :TRUE_V] = x.grad
    return logp.detach(), ent.detach(), grad


def _tp_worker(rank, world):
    logits, labels, w = _data()
    shard = logits[..., rank * PAD_V // 2:(rank + 1) * PAD_V // 2].float().clone().requires_grad_(True)
    group = torch.distributed.group.WORLD
    logp, ent = token_log_probs(shard, labels, true_vocab_size=TRUE_V, tp_group=group, chunk_tokens=4,
                                with_entropy=True)
    (logp.double() * w).sum().backward()
    masked = mask_padded_vocab_logits(shard.detach(), TRUE_V, tp_rank=rank, tp_size=world)
    return logp.detach(), ent, shard.grad, masked


def test_tp2_matches_float64_reference():
    ref_logp, ref_ent, ref_grad = _reference()
    res = run_distributed(_tp_worker, 2)
    logp = res[0][0]
    assert torch.allclose(res[1][0], logp)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=0)
    torch.testing.assert_close(res[0][1].double(), ref_ent, atol=2e-5, rtol=0)
    grad = torch.cat([res[0][2], res[1][2]], dim=-1).double()
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=0)
    assert torch.all(grad[..., TRUE_V:] == 0)
    # mask_padded_vocab_logits: rank 1 holds ids 128..255, of which 200.. are padding -> -inf
    assert torch.isinf(res[1][3][..., TRUE_V - 128:]).all() and torch.isfinite(res[1][3][..., :TRUE_V - 128]).all()
    assert torch.isfinite(res[0][3]).all()


def test_single_rank_chunked_bf16_and_layouts():
    ref_logp, ref_ent, ref_grad = _reference()
    logits, labels, w = _data()
    for chunk in (1, 5, 4096):
        x = logits.float().clone().requires_grad_(True)
        logp = token_log_probs(x, labels, true_vocab_size=TRUE_V, chunk_tokens=chunk)
        (logp.double() * w).sum().backward()
        torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=0)
        torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-6, rtol=0)
    # [b, s, V] transposed view (GPTModel's output layout) and a flat [tokens, V] layout
    xt = logits.float().transpose(0, 1)
    torch.testing.assert_close(token_log_probs(xt, labels.T, true_vocab_size=TRUE_V).double(), ref_logp.T,
                               atol=2e-5, rtol=0)
    flat = token_log_probs(logits.float().reshape(-1, PAD_V), labels.reshape(-1), true_vocab_size=TRUE_V)
    torch.testing.assert_close(flat.double(), ref_logp.reshape(-1), atol=2e-5, rtol=0)
    # bf16 logits: result fp32, gradient bf16, close to the reference of the rounded logits
    xb = logits.bfloat16().requires_grad_(True)
    lb, eb = token_log_probs(xb, labels, true_vocab_size=TRUE_V, chunk_tokens=4, with_entropy=True)
    assert lb.dtype == torch.float32 and not eb.requires_grad
    lb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    ref_b = torch.log_softmax(xb.detach().double()[..., :TRUE_V], -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(lb.double(), ref_b, atol=1e-5, rtol=0)


def test_bad_inputs():
    logits, labels, _ = _data()
    import pytest

    with pytest.raises(ValueError, match="labels must lie"):
        token_log_probs(logits.float(), labels + TRUE_V, true_vocab_size=TRUE_V)
    with pytest.raises(ValueError, match="does not match"):
        token_log_probs(logits.float(), labels[:-1], true_vocab_size=TRUE_V)
    with pytest.raises(ValueError, match="fewer than"):
        token_log_probs(logits.float()[..., :100], labels, true_vocab_size=TRUE_V)
