"""Training checkpoint: train 2 steps, save, train 1 more  vs  a fresh process (different seed) that
loads the checkpoint and trains 1 step -> bit-identical loss, grad norm, lr, weights and RNG draws
(dropout on, so RNG states matter). Also: atomic layout on disk, clear errors, and
initialize_parallel's layout validation (run inside the workers, never in the pytest process)."""
import os
import random

import numpy as np
import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=200, rms_norm_eps=1e-6, rope_theta=1e6,
           tie_word_embeddings=False, max_position_embeddings=64)


def _loss_fn(batch, logits):
    from fipo_megatron.megatron.logprobs import token_log_probs

    logp = token_log_probs(logits, batch["labels"], true_vocab_size=CFG["vocab_size"])
    loss_sum = -logp.sum()
    return loss_sum / batch["global_tokens"], {"loss_sum": loss_sum.detach()}


def _setup(seed):
    from fipo_megatron.megatron import parallel
    from fipo_megatron.megatron.optim import build_optimizer
    from fipo_megatron.megatron.qwen import build_model

    parallel.initialize_parallel(tp=1, pp=1, seed=seed)  # DP=2: sharded distributed optimizer
    chunks = build_model(CFG, wrap_ddp=True, hidden_dropout=0.1, attention_dropout=0.1)
    opt, sched = build_optimizer(chunks, lr=1e-3, weight_decay=0.1, lr_warmup_steps=2, lr_schedule="cosine",
                                 min_lr=1e-4, lr_decay_steps=10)
    return chunks, opt, sched


def _batches(step):
    from fipo_megatron.megatron import parallel

    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CFG["vocab_size"], (4, 12), generator=g)
    d = parallel.dp_rank()  # DP=2: two sequences per rank, one per micro-batch
    return [dict(tokens=tokens[i:i + 1], labels=torch.roll(tokens[i:i + 1], -1, 1), global_tokens=48.0)
            for i in (2 * d, 2 * d + 1)]


def _step(chunks, opt, sched, step):
    from fipo_megatron.megatron.optim import train_step

    out = train_step(chunks, opt, sched, _batches(step), _loss_fn)
    return [float(s["loss_sum"]) for s in out["stats"]], out["grad_norm"], out["lr"]


def _snapshot(chunks):
    from fipo_megatron.megatron.qwen import unwrap_model

    params = {k: v.detach().clone() for k, v in unwrap_model(chunks[0]).state_dict().items() if "extra_state" not in k}
    return params, (random.random(), float(np.random.rand()), float(torch.rand(())))


def _first(rank, world, ckpt):
    from fipo_megatron.megatron import parallel
    from fipo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint

    chunks, opt, sched = _setup(seed=11)
    assert load_checkpoint(ckpt, chunks, opt, sched) is None  # nothing there yet
    hist = [_step(chunks, opt, sched, s) for s in (1, 2)]
    random.random(), np.random.rand(), torch.rand(3)  # advance every RNG a bit
    save_checkpoint(ckpt, 2, chunks, opt, sched, {"rollout_step": 2, "sampler": {"epoch": 0, "pos": 8}})
    step3 = _step(chunks, opt, sched, 3)
    params, draws = _snapshot(chunks)
    parallel.destroy_parallel()
    return dict(hist=hist, step3=step3, params=params, draws=draws)


def _resume(rank, world, ckpt):
    from fipo_megatron.megatron import parallel
    from fipo_megatron.megatron.checkpoint import load_checkpoint

    chunks, opt, sched = _setup(seed=99)  # different init: everything must come from the checkpoint
    step, trainer_state = load_checkpoint(ckpt, chunks, opt, sched)
    step3 = _step(chunks, opt, sched, 3)
    params, draws = _snapshot(chunks)
    errors = {}
    if rank == 0:
        with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("5")
    torch.distributed.barrier()
    try:
        load_checkpoint(ckpt, chunks, opt, sched)
    except RuntimeError as exc:
        errors["missing"] = str(exc)
    parallel.destroy_parallel()
    try:
        parallel.initialize_parallel(tp=1, pp=3)
    except ValueError as exc:
        errors["layout"] = str(exc)
    parallel.destroy_parallel()
    return dict(step=step, trainer_state=trainer_state, step3=step3, params=params, draws=draws, errors=errors)


def test_resume_is_bit_identical(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = run_distributed(_first, 2, ckpt)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    resumed = run_distributed(_resume, 2, ckpt)
    for r in range(2):
        a, b = first[r], resumed[r]
        assert b["step"] == 2 and b["trainer_state"] == {"rollout_step": 2, "sampler": {"epoch": 0, "pos": 8}}
        assert a["step3"] == b["step3"], f"rank {r}: step after resume differs {a['step3']} vs {b['step3']}"
        assert a["draws"] == b["draws"], f"rank {r}: RNG streams differ after resume"
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), f"rank {r}: parameter {k} differs after resume"
        assert "does not exist" in b["errors"]["missing"] and "iter_0000005" in b["errors"]["missing"]
        assert "not divisible" in b["errors"]["layout"]
    # warm-up then cosine: lr of steps 1, 2, 3 = 0, 5e-4, then the decay value
    lrs = [h[2] for h in first[0]["hist"]] + [first[0]["step3"][2]]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and 1e-4 < lrs[2] <= 1e-3
    assert first[0]["step3"][0] != first[0]["hist"][1][0]  # a different batch and trained weights


def test_incomplete_checkpoint_is_refused(tmp_path):
    from fipo_megatron.megatron.checkpoint import load_checkpoint

    os.makedirs(tmp_path / "iter_0000003")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(RuntimeError, match="incomplete"):
        load_checkpoint(str(tmp_path), [], None, None)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(RuntimeError, match="step number"):
        load_checkpoint(str(tmp_path), [], None, None)
