"""The full tiny Qwen2 (GQA: 4 heads, 2 K/V groups) on packed THD sequences of uneven lengths, at
(CP, TP) in {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)} on 4 gloo ranks (one launch), with the
torch-native `SDPAttention` (`build_model`'s default without TE):

logits, the summed response log-likelihood loss and every parameter gradient (gathered over TP,
summed over CP, mapped to HF names) must equal, to 1e-5 relative in fp32,
- the unsharded Megatron model with Megatron's own local `DotProductAttention`, run one unpacked
  sequence at a time (BSHD, explicit causal mask), and
- `transformers`' Qwen2ForCausalLM with eager attention on the unpacked sequences.
One sequence (3 tokens) is shorter than 2 x CP chunks at CP=2 and CP=4.
"""
from __future__ import annotations

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

HF_CFG = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=128)
LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]  # (CP, TP); world = 4, the rest is data parallel
LENGTHS = [(4, 7), (2, 1), (6, 12), (3, 5)]  # (prompt, response): 11, 3, 18, 8 tokens
RTOL = 1e-5


def make_samples():
    from fipo_megatron.parallel.packing import RLSample

    g = torch.Generator().manual_seed(7)
    out = []
    for P, R in LENGTHS:
        ids = torch.randint(1, HF_CFG["vocab_size"], (P + R,), generator=g).tolist()
        out.append(RLSample(ids[:P], ids[P:]))
    return out


def make_hf_state() -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(**HF_CFG, torch_dtype="float32"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_reference(state: dict, samples) -> tuple[list, torch.Tensor, dict]:
    """Per-sample logits [n, V], loss = -sum of response log-probs, and HF-named parameter grads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fipo_megatron.parallel.packing import response_label_positions

    model = Qwen2ForCausalLM(Qwen2Config(**HF_CFG, torch_dtype="float32", attn_implementation="eager")).float()
    model.load_state_dict(state)
    logits, loss = [], torch.zeros(())
    for s in samples:
        x = torch.tensor(list(s.prompt_ids) + list(s.response_ids))
        lg = model(input_ids=x[None]).logits[0].float()
        pos = response_label_positions(len(s.prompt_ids), len(s.response_ids))
        lp = torch.log_softmax(lg[pos.start:pos.stop], -1).gather(-1, x[pos.start + 1:pos.stop + 1, None])
        loss = loss - lp.sum()
        logits.append(lg.detach())
    loss.backward()
    return logits, loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def load_hf_weights(model, state: dict) -> None:
    """Copy HF tensors into this rank's (TP-sharded) parameters via the project's mapping rules."""
    from megatron.core import parallel_state as ps

    from fipo_megatron.convert.mapping import (
        EMBED_KEY, FINAL_NORM_KEY, LAYER_PREFIX, LAYER_RULES, OUTPUT_KEY, QwenDims, global_rules, live_param_suffix,
    )

    dims = QwenDims.from_hf_config(HF_CFG)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    rules = {x.mcore_key: x for x in LAYER_RULES}
    for name, p in model.named_parameters():
        if name.startswith(LAYER_PREFIX):
            layer, rest = name[len(LAYER_PREFIX):].split(".", 1)
            rule, layer = rules[live_param_suffix(rest)], int(layer)
        else:
            assert name in (EMBED_KEY, FINAL_NORM_KEY, OUTPUT_KEY), name
            rule, layer = {x.mcore_key: x for x in global_rules(dims, p.shape[0] * tp)}[name], None
        full = rule.to_mcore([state[n] for n in rule.hf(layer)], dims)
        if rule.tp_dim is not None and tp > 1:
            if rule.kind == "fc1":  # [gate; up] -> this rank's [gate_r; up_r]
                full = torch.cat([h.chunk(tp)[r] for h in full.chunk(2)])
            else:
                full = full.chunk(tp, dim=rule.tp_dim)[r]
        with torch.no_grad():
            p.copy_(full)


def _hf_named_grads(model, cp_group) -> dict:
    """Parameter grads summed over CP (None: no CP group), as full HF-named tensors (collective over TP)."""
    import torch.distributed as dist

    from fipo_megatron.convert.live import iter_hf_tensors_from_model

    saved = {}
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if cp_group is not None:
            dist.all_reduce(g, group=cp_group)
        saved[p] = p.data
        p.data = g
    try:
        return {n: t.clone() for n, t in iter_hf_tensors_from_model([model])}
    finally:
        for p, d in saved.items():
            p.data = d


def _run_layout(cp: int, tp: int, state: dict, samples) -> dict | None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fipo_megatron.megatron.logprobs import token_log_probs
    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.megatron.qwen import build_model, forward_logits
    from fipo_megatron.parallel.cp_shard import gather_from_cp, shard_packed_batch
    from fipo_megatron.parallel.packing import pack_thd

    initialize_parallel(tp, 1, cp, seed=0)
    try:
        model = build_model(HF_CFG)[0]
        load_hf_weights(model, state)
        cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
        full = pack_thd(samples, cp_size=cp, tp_size=tp)
        batch = shard_packed_batch(full, cp, ps.get_context_parallel_rank())
        logits = forward_logits(model, batch.tokens[None], batch.position_ids[None],
                                packed_seq_params=batch.packed_seq_params())
        lp = token_log_probs(logits, batch.labels[None], true_vocab_size=HF_CFG["vocab_size"])
        loss = -(lp[0] * batch.response_mask).sum()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        parts = [torch.empty_like(logits[0]) for _ in range(tp)]
        dist.all_gather(parts, logits[0].detach().contiguous(), group=tp_group)
        stream = gather_from_cp(torch.cat(parts, -1)[:, :HF_CFG["vocab_size"]], batch.cp, cp_group)
        grads = _hf_named_grads(model, cp_group)
        if dist.get_rank() != 0:
            return None
        cup = full.cu_seqlens_padded.tolist()
        per_sample = [stream[a:a + s.length] for a, s in zip(cup, samples)]
        return {"logits": per_sample, "loss": total, "grads": grads}
    finally:
        destroy_parallel()


def _unsharded_local(state: dict, samples) -> dict | None:
    """Megatron's local DotProductAttention, one unpacked sequence at a time (CP = TP = 1)."""
    import torch.distributed as dist

    from fipo_megatron.megatron.logprobs import token_log_probs
    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.megatron.qwen import build_model, forward_logits
    from fipo_megatron.parallel.packing import response_label_positions

    initialize_parallel(1, 1, 1, seed=0)
    try:
        model = build_model(HF_CFG, core_attention="local")[0]
        load_hf_weights(model, state)
        logits, loss = [], torch.zeros(())
        for s in samples:
            x = torch.tensor(list(s.prompt_ids) + list(s.response_ids))[None]
            lg = forward_logits(model, x)  # builds the explicit causal mask the local attention needs
            pos = response_label_positions(len(s.prompt_ids), len(s.response_ids))
            lp = token_log_probs(lg[:, pos.start:pos.stop], x[:, pos.start + 1:pos.stop + 1],
                                 true_vocab_size=HF_CFG["vocab_size"])
            loss = loss - lp.sum()
            logits.append(lg[0, :, :HF_CFG["vocab_size"]].detach())
        loss.backward()
        grads = _hf_named_grads(model, None)
        return {"logits": logits, "loss": loss.detach(), "grads": grads} if dist.get_rank() == 0 else None
    finally:
        destroy_parallel()


def _worker(rank: int, world: int, state: dict, samples):
    out = {"unsharded": _unsharded_local(state, samples)}
    for cp, tp in LAYOUTS:
        out[(cp, tp)] = _run_layout(cp, tp, state, samples)
    return out


@pytest.fixture(scope="module")
def runs():
    state, samples = make_hf_state(), make_samples()
    results = run_distributed(_worker, 4, state, samples)[0]
    results["hf"] = dict(zip(("logits", "loss", "grads"), hf_reference(state, samples)))
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same(got: dict, ref: dict, what: str) -> None:
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
        assert _rel(a, b) <= RTOL, f"{what}: logits of sample {i} differ ({_rel(a, b):.2e})"
    assert abs(float(got["loss"] - ref["loss"])) <= RTOL * abs(float(ref["loss"])), \
        f"{what}: loss {float(got['loss'])} vs {float(ref['loss'])}"
    assert got["grads"].keys() == ref["grads"].keys()
    for n, g in ref["grads"].items():
        assert _rel(got["grads"][n], g) <= RTOL, f"{what}: grad of {n} differs ({_rel(got['grads'][n], g):.2e})"


def test_unsharded_local_attention_matches_transformers(runs):
    _assert_same(runs["unsharded"], runs["hf"], "local DotProductAttention vs HF")


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"cp{c}-tp{t}" for c, t in LAYOUTS])
def test_packed_model_matches_unsharded_and_transformers(runs, layout):
    _assert_same(runs[layout], runs["unsharded"], f"SDPA THD at (CP, TP)={layout} vs unsharded local")
    _assert_same(runs[layout], runs["hf"], f"SDPA THD at (CP, TP)={layout} vs HF")
