"""Prepare the CPU demo: task data, a character-level tokenizer and a tiny Qwen2 model, all local.

    python examples/tiny-cpu/prepare.py --out DIR [--seed 0] [--target-acc 0.3]

Writes (idempotent: an existing complete DIR is reused unless --force):
- DIR/data/train.jsonl, DIR/data/eval.jsonl: single-digit addition "a+b" in the verl/DAPO schema
  (`prompt` = chat messages, `reward_model.ground_truth`, `data_source`); the answer is scored by the
  DAPO-Math scorer from the response's last `Answer: N` line. The task has 100 problems; RL samples
  prompts from all of them and evaluation draws fresh samples on all of them (the demo measures how
  well the policy solves the task, not generalisation to unseen problems).
- DIR/hf: a Hugging Face dir with a character-level tokenizer (built with the `tokenizers` library,
  wrapped as `PreTrainedTokenizerFast`, ChatML chat template) and a tiny `Qwen2ForCausalLM`
  (hidden 64, 2 layers, 2 heads / 2 KV heads: head size 32, which vLLM's CPU attention serves, and
  TP=2 puts one head on each rank) supervised on "Answer: a+b" responses only until its sampled
  accuracy (temperature 1) first reaches --target-acc, i.e. a model that knows the format and part
  of the task.
- DIR/prepare.json: what was made (SFT steps, measured accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time

import torch

from fipo_megatron.data.chat import encode_chat
from fipo_megatron.data.char_tokenizer import build_char_tokenizer
from fipo_megatron.data.dataset import make_prompt_row, write_prompt_dataset
from fipo_megatron.rewards.math_dapo import compute_score

ALPHABET = "0123456789+-=: \nAnswerusitmy"  # digits, the task's symbols, and the chat-role letters
VOCAB_SIZE = 64  # >= tokenizer size, divisible by TP=2


def problems() -> list[tuple[str, str]]:
    return [(f"{a}+{b}", str(a + b)) for a in range(10) for b in range(10)]


def write_data(out: str) -> tuple[str, str]:
    rows = [make_prompt_row(q, gt, index=i, data_source="arith") for i, (q, gt) in enumerate(problems())]
    train = write_prompt_dataset(os.path.join(out, "data", "train.jsonl"), rows)
    ev = [dict(r, data_source="arith_eval") for r in rows]
    evp = write_prompt_dataset(os.path.join(out, "data", "eval.jsonl"), ev)
    return train, evp


def build_model(tok) -> "torch.nn.Module":
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert len(tok) <= VOCAB_SIZE, (len(tok), VOCAB_SIZE)
    cfg = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32")
    return Qwen2ForCausalLM(cfg)


@torch.no_grad()
def sampled_accuracy(model, tok, prompts: list[list[int]], answers: list[str], n: int = 4, seed: int = 0) -> float:
    """Mean DAPO-scorer accuracy of n temperature-1 samples per prompt (left-padded batch generate)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts]).repeat_interleave(n, 0)
    att = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    att = att.repeat_interleave(n, 0)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_p=1.0,
                         top_k=0, max_new_tokens=14, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    accs = [compute_score(t, answers[i // n])["acc"] for i, t in enumerate(texts)]
    model.train()
    return sum(accs) / len(accs)


def sft(model, tok, prompts, answers, *, target: float, seed: int, max_steps: int = 400, check_every: int = 10):
    """Supervise "Answer: N<|im_end|>" responses (loss on response tokens) until sampled acc >= target."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    seqs = []
    for p, a in zip(prompts, answers):
        resp = tok.encode(f"Answer: {a}", add_special_tokens=False) + [tok.eos_token_id]
        seqs.append((p, resp))
    acc, step = 0.0, 0
    model.train()
    for step in range(1, max_steps + 1):
        batch = rng.sample(seqs, 32)
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            s = p + r
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, len(p):len(s)] = torch.tensor(r)
            att[i, :len(s)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            acc = sampled_accuracy(model, tok, prompts, answers, seed=seed + step)
            print(f"  sft step {step:4d}  loss {loss.item():.3f}  sampled acc {acc:.2f}", flush=True)
            if acc >= target:
                break
    return step, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output dir (data/, hf/, prepare.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed for init and SFT")
    ap.add_argument("--target-acc", type=float, default=0.3, help="stop SFT at this sampled accuracy")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR/prepare.json exists")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 threads thrash on a shared 2-core machine
    done = os.path.join(args.out, "prepare.json")
    if os.path.exists(done) and not args.force:
        print(f"reusing {args.out} ({open(done).read().strip()})")
        return
    t0 = time.time()
    shutil.rmtree(os.path.join(args.out, "hf"), ignore_errors=True)
    train_path, eval_path = write_data(args.out)
    tok = build_char_tokenizer(ALPHABET)
    probs = problems()
    prompts = [encode_chat(tok, [{"role": "user", "content": q}]) for q, _ in probs]
    answers = [a for _, a in probs]
    torch.manual_seed(args.seed)
    model = build_model(tok)
    steps, acc = sft(model, tok, prompts, answers, target=args.target_acc, seed=args.seed)
    hf_dir = os.path.join(args.out, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    info = {"train_data": train_path, "eval_data": eval_path, "hf_dir": hf_dir, "sft_steps": steps,
            "sft_sampled_acc": round(acc, 4), "seconds": round(time.time() - t0, 1),
            "num_params": sum(p.numel() for p in model.parameters()), "vocab_used": len(tok)}
    with open(done, "w") as fh:
        json.dump(info, fh)
    print(f"prepared {args.out}: {info}")


if __name__ == "__main__":
    main()
