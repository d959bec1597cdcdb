"""A few optimizer steps (Megatron DDP + distributed optimizer + get_forward_backward_func, next-token
CE through fipo_megatron.megatron.schedule/optim) give the same losses, grad norms and final
weights at TP=2xDP=2, PP=2xDP=2 and TP=2xPP=2 as at TP=1/PP=1/DP=1, from identical initial weights
(a TP=1 dist checkpoint loaded at each layout). Tied embeddings, so PP>1 exercises the
embedding/output-layer gradient sync."""
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=200, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=True, max_position_embeddings=64)
N_SEQ, SEQ, STEPS = 4, 16, 3


def _data():
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, CFG["vocab_size"], (N_SEQ, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(N_SEQ, SEQ)
    mask[:, -1] = 0
    mask[1, 10:] = 0  # uneven token counts across micro-batches
    return tokens, labels, mask


def _loss_fn(batch, logits):
    from fipo_megatron.megatron.logprobs import token_log_probs

    logp = token_log_probs(logits, batch["labels"], true_vocab_size=CFG["vocab_size"], chunk_tokens=7)
    loss_sum = -(logp * batch["loss_mask"]).sum()
    return loss_sum / batch["global_tokens"], {"loss_sum": loss_sum.detach()}


def _run_layout(tp, pp, init_dir, save_init):
    import torch.distributed as dist

    from fipo_megatron.megatron import parallel
    from fipo_megatron.megatron.checkpoint import load_model_weights, save_model_weights
    from fipo_megatron.megatron.optim import build_optimizer, train_step
    from fipo_megatron.megatron.qwen import unwrap_model, build_model
    from fipo_megatron.megatron.schedule import forward_backward

    parallel.initialize_parallel(tp=tp, pp=pp, seed=7)
    chunks = build_model(CFG, wrap_ddp=True, use_distributed_optimizer=True)
    if save_init:
        save_model_weights(init_dir, chunks)
    else:
        load_model_weights(init_dir, chunks)
    opt, sched = build_optimizer(chunks, lr=3e-3, weight_decay=0.1, clip_grad=1.0)
    tokens, labels, mask = _data()
    dp, dpr = parallel.dp_size(), parallel.dp_rank()
    per = N_SEQ // dp
    gtok = float(mask.sum())
    mbs = [dict(tokens=tokens[i:i + 1], labels=labels[i:i + 1], loss_mask=mask[i:i + 1], global_tokens=gtok)
           for i in range(dpr * per, (dpr + 1) * per)]

    def total(stats):
        t = torch.stack([s["loss_sum"] for s in stats]).sum().reshape(1).double()
        dist.all_reduce(t, group=parallel.dp_group())
        return float(t) / gtok

    losses, norms = [], []
    for _ in range(STEPS):
        out = train_step(chunks, opt, sched, mbs, _loss_fn)
        losses.append(total(out["stats"]))
        norms.append(out["grad_norm"])
    losses.append(total(forward_backward(chunks, mbs, _loss_fn, forward_only=True)))
    # final weights of one TP-sharded matrix: the first layer's fc2 held by PP stage 0 (or layer 2 on stage 1)
    inner = unwrap_model(chunks[0])
    w = {}
    if parallel.pp_rank() == 0:
        w["fc2_l0"] = inner.decoder.layers[0].mlp.linear_fc2.weight.detach().clone()
    parallel.destroy_parallel()
    return dict(losses=losses, norms=norms, w=w)


def _reference(rank, world, init_dir):
    return _run_layout(1, 1, init_dir, True)


def _layouts(rank, world, init_dir):
    return [_run_layout(2, 1, init_dir, False), _run_layout(1, 2, init_dir, False), _run_layout(2, 2, init_dir, False)]


def test_optimizer_steps_match_across_tp_pp_dp(tmp_path):
    init_dir = str(tmp_path / "init")
    ref = run_distributed(_reference, 1, init_dir)[0]
    assert ref["losses"][-1] < ref["losses"][0] - 1e-3, "training did not reduce the loss"
    assert ref["norms"][0] > 1.0  # clipping is active in step 1, so the global norm matters
    res = run_distributed(_layouts, 4, init_dir)
    names = ["tp2-dp2", "pp2-dp2", "tp2-pp2"]
    for li, name in enumerate(names):
        for r in range(4):
            got = res[r][li]
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=2e-5, rtol=0,
                                       msg=lambda m: f"{name} rank {r} losses: {m}")
            torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), atol=2e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} rank {r} grad norms: {m}")
    # weights: TP=2 layout ranks 0/1 (tp ranks 0/1 of dp rank 0) hold the fc2 input-dim halves
    ref_w = ref["w"]["fc2_l0"]
    tp2 = torch.cat([res[0][0]["w"]["fc2_l0"], res[1][0]["w"]["fc2_l0"]], dim=1)
    torch.testing.assert_close(tp2, ref_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(res[0][1]["w"]["fc2_l0"], ref_w, atol=1e-5, rtol=0)
