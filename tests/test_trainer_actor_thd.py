"""The actor's THD + context-parallel bookkeeping at CP=2 against an unsharded per-sample reference.

The model is replaced by a context-free fake (logits = a learnable table indexed by the input token)
so that the test isolates what the trainer does around the model: token-budget micro-batching, THD
packing, the zigzag CP=2 split, label alignment, `cp_policy_loss` (distributed Future-KL, CP-reduced
sequence filter, the k3 KL to reference log-probs that are packed and CP-split like the old
log-probs) and the gathering of per-response log-probs. The reference computes each sample's
response log-probs on its own unpacked sequence and calls the plain `policy_loss` once on padded
rows: sums over micro-batches and CP ranks of the loss, the kept-token count and the gradient must
equal it. (The full model with the SDPA attention at CP > 1 is tested in test_megatron_attention_model.)
"""
from __future__ import annotations

import torch

from fipo_megatron.testing.distributed import run_distributed

V = 24


def _samples(seed: int):
    from fipo_megatron.parallel.packing import RLSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(7):
        P = int(torch.randint(2, 6, (1,), generator=g))
        R = int(torch.randint(3, 11, (1,), generator=g))
        prompt = torch.randint(1, V, (P,), generator=g).tolist()
        resp = torch.randint(1, V, (R,), generator=g).tolist()
        adv = float(torch.randn((), generator=g))
        out.append(RLSample(prompt, resp, advantage=adv))
    return out


def _worker(rank: int, world: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fipo_megatron.megatron.logprobs import token_log_probs
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.algo.losses import policy_loss
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    initialize_parallel(1, 1, 2, seed=0)
    torch.manual_seed(0)
    table = torch.randn(V, V) * 2.0  # identical on both ranks (same seed)
    cfg = parse_args(["--max-tokens-per-micro-batch", "24", "--max-prompt-length", "8", "--max-response-length", "12",
                      "--future-kl-decay-rate", "4", "--clip-ratio-c", "3", "--safety-threshold", "2",
                      "--kl-coef", "0.3"], validate=False)  # KL to a reference: its log-probs travel through CP too
    actor = Actor.__new__(Actor)
    actor.cfg, actor.vocab_size, actor.pad_id, actor.loss_cfg = cfg, V, 0, cfg.loss
    samples = _samples(1)

    def logits_of(tokens, weight):
        return weight[tokens]  # [..., V] from the input token only

    # old log-probs = current log-probs perturbed, so ratios differ from 1 (clips, Future-KL, filter active)
    g = torch.Generator().manual_seed(5)

    def sample_log_probs(s, w):  # the unpacked reference: one sequence, labels = next tokens
        ids = torch.tensor(list(s.prompt_ids) + list(s.response_ids))
        lp = token_log_probs(logits_of(ids[None, :-1], w), ids[None, 1:], true_vocab_size=V)[0]
        return lp[len(s.prompt_ids) - 1:]

    for s in samples:
        r = sample_log_probs(s, table)
        s.old_log_prob = (r + 0.7 * torch.randn(r.shape, generator=g)).tolist()
        s.ref_log_prob = (r + 0.5 * torch.randn(r.shape, generator=g)).tolist()

    def reference():
        w = table.clone().requires_grad_(True)
        R = max(len(s.response_ids) for s in samples)
        rows = torch.zeros(len(samples), R)
        old, ref, adv, mask = (torch.zeros(len(samples), R) for _ in range(4))
        for i, s in enumerate(samples):
            n = len(s.response_ids)
            rows = rows.index_put((torch.tensor([i] * n), torch.arange(n)), sample_log_probs(s, w))
            old[i, :n], ref[i, :n] = torch.tensor(s.old_log_prob), torch.tensor(s.ref_log_prob)
            adv[i, :n], mask[i, :n] = s.advantage, 1.0
        out = policy_loss(rows, old, adv, mask, actor.loss_cfg, ref_log_prob=ref)
        out.loss_sum.backward()
        return (float(out.loss_sum), float(out.num_tokens), w.grad,
                [rows[i, :len(s.response_ids)].detach() for i, s in enumerate(samples)], 1)

    def thd():
        w = table.clone().requires_grad_(True)
        mbs = actor._micro_batches(samples)
        loss_sum = n_tok = 0.0
        total = 0.0
        per_sample = [None] * len(samples)
        for mb in mbs:
            li = mb.loss_inputs()
            lp = token_log_probs(logits_of(mb.model_inputs()["tokens"], w), li["labels"], true_vocab_size=V)
            out = actor._policy_loss(lp, mb)
            total = total + out.loss_sum
            loss_sum += float(out.loss_sum)
            n_tok += float(out.num_tokens)
            for i, r in zip(mb.indices, mb.responses(lp.detach().reshape(-1))):
                per_sample[i] = r
        total.backward()
        return loss_sum, n_tok, w.grad, per_sample, len(mbs)

    ref = reference()
    thd = thd()
    t = torch.tensor([thd[0], thd[1]], dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_context_parallel_group())
    grad = thd[2].clone()
    dist.all_reduce(grad, group=ps.get_context_parallel_group())
    return {"ref": (ref[0], ref[1]), "thd": (float(t[0]), float(t[1])),
            "grad_err": float((grad - ref[2]).abs().max()), "grad_scale": float(ref[2].abs().max()),
            "lp_err": max(float((a - b).abs().max()) for a, b in zip(ref[3], thd[3])),
            "n_mb": thd[4]}


def test_thd_cp2_loss_grad_and_log_probs_equal_the_unsharded_reference():
    res = run_distributed(_worker, 2)
    for r in res:
        assert r["n_mb"] > 1                          # the token budget split the batch
        assert r["ref"][1] > 0 and r["ref"][0] != 0.0
        assert abs(r["thd"][0] - r["ref"][0]) < 1e-4 * max(1.0, abs(r["ref"][0]))
        assert r["thd"][1] == r["ref"][1]            # kept tokens counted once across CP ranks
        assert r["grad_err"] < 1e-5 * max(1.0, r["grad_scale"]) and r["grad_scale"] > 0
        assert r["lp_err"] < 1e-5                    # per-response log-probs reassembled from the CP shards
