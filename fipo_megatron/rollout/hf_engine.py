"""In-process Hugging Face `transformers` rollout engine (the CPU default, tiny-GPU fallback).

Written against transformers 5.x (exercised with 5.23 on CPU); uses only the stable
`model(input_ids, attention_mask, position_ids, past_key_values, use_cache)` forward.

Sampling is our own loop with a KV cache (no `model.generate`), so that:
- left padding is explicit: attention_mask zeros on the left, position_ids = cumsum(mask) - 1,
  so a padded row computes exactly what the unpadded prompt would;
- the reported log-probs are log_softmax of the RAW logits (temperature 1, no top-p/top-k) of the
  token actually sampled, whatever the sampling temperature/top-p/top-k. This matches vLLM's default
  (`logprobs_mode="raw_logprobs"`: "before applying any logit processors like temperature") and is
  what the trainer's Megatron forward recomputes. At temperature 1.0, top-p 1.0, top-k off (the
  training setting) these are exactly the log-probs of the sampling distribution.
- a response that stopped on an EOS/stop token ends with that token (finish_reason "stop"), with
  its log-prob, so the trainer trains on it; otherwise finish_reason is "length".
- sampling draws from one `torch.Generator` seeded by `SamplingParams.seed` (else the engine's
  generator seeded at construction and advancing): same seed + same inputs -> same outputs.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .base import BaseEngine
from .types import EngineError, GenerationOutput, SamplingParams


def _as_id_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(t) for t in x]
    return [int(x)]


class HFEngine(BaseEngine):
    """`HFEngine(model=None, model_path=None, *, device="cpu", dtype=None, max_batch_size=64,
    eos_token_ids=None, pad_token_id=None, seed=0)`.

    Exactly one of `model` (a transformers causal LM object, used as is, not copied) or
    `model_path` (a local HF directory loaded with AutoModelForCausalLM) must be given.
    `eos_token_ids=None` takes the model's generation_config / config EOS ids; `[]` disables them.
    """

    name = "hf"

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        model_path: Optional[str] = None,
        *,
        device: str | torch.device = "cpu",
        dtype: Optional[torch.dtype] = None,
        max_batch_size: int = 64,
        eos_token_ids: Optional[list[int]] = None,
        pad_token_id: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (model is None) == (model_path is None):
            raise ValueError("HFEngine: give exactly one of `model` or `model_path`")
        if model is None:
            model = self._load(model_path, dtype)
        elif dtype is not None:
            model = model.to(dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if max_batch_size < 1:
            raise ValueError(f"HFEngine: max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        if eos_token_ids is None:
            gen_cfg = getattr(self.model, "generation_config", None)
            eos_token_ids = _as_id_list(getattr(gen_cfg, "eos_token_id", None)) or _as_id_list(
                getattr(self.model.config, "eos_token_id", None)
            )
        self.eos_token_ids = _as_id_list(eos_token_ids)
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))
        self._consistent = True
        self._closed = False

    @staticmethod
    def _load(model_path: str, dtype: Optional[torch.dtype]) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or torch.float32)
        except TypeError:  # transformers 4.x spells it torch_dtype
            return AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype or torch.float32)

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        self._check_usable()
        prompts = self._check_prompts(prompts)
        rows = [p for p in prompts for _ in range(params.n)]  # grouped by prompt
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(params.seed))
        else:
            gen = self._generator
        stop_ids = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        outputs: list[GenerationOutput] = []
        for start in range(0, len(rows), self.max_batch_size):
            outputs.extend(self._generate_batch(rows[start : start + self.max_batch_size], params, stop_ids, gen))
        return outputs

    @torch.inference_mode()
    def _generate_batch(
        self, rows: list[list[int]], params: SamplingParams, stop_ids: list[int], gen: torch.Generator
    ) -> list[GenerationOutput]:
        B = len(rows)
        L = max(len(r) for r in rows)
        dev = self.device
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long, device=dev)
        attn = torch.zeros((B, L), dtype=torch.long, device=dev)
        for i, r in enumerate(rows):  # left padding
            input_ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long, device=dev)
            attn[i, L - len(r) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = pos[:, -1] + 1
        stop_t = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens: list[Tensor] = []
        logps: list[Tensor] = []
        alive: list[Tensor] = []  # alive[t][i]: row i produced a token at step t
        for step in range(params.max_new_tokens):
            raw_logp = torch.log_softmax(logits, dim=-1)
            tok = sample_next_token(logits, params, gen)
            alive.append(~finished)
            tokens.append(tok)
            logps.append(raw_logp.gather(1, tok[:, None])[:, 0])
            hit = torch.isin(tok, stop_t) & ~finished if stop_ids else torch.zeros_like(finished)
            stopped |= hit
            finished |= hit
            if bool(finished.all()) or step == params.max_new_tokens - 1:
                break
            feed = tok.masked_fill(finished, self.pad_token_id)
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            out = self.model(
                input_ids=feed[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        tok_m = torch.stack(tokens, 1).tolist()
        lp_m = torch.stack(logps, 1).tolist()
        alive_m = torch.stack(alive, 1).tolist()
        stopped_l = stopped.tolist()
        results = []
        for i, r in enumerate(rows):
            n_i = sum(alive_m[i])
            results.append(
                GenerationOutput(
                    prompt_ids=list(r),
                    response_ids=tok_m[i][:n_i],
                    response_logprobs=lp_m[i][:n_i],
                    finish_reason="stop" if stopped_l[i] else "length",
                )
            )
        return results

    # ------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy HF-named tensors (any subset, any order) into the live model.

        An unknown name or a shape mismatch raises EngineError naming the tensor. Because the
        input is a stream, tensors before the bad one are already applied: the engine then
        refuses to generate (health() is False) until a later update_weights succeeds.
        """
        self._check_usable(allow_inconsistent=True)
        version = self._check_version(version)
        targets = self.model.state_dict(keep_vars=True)
        self._consistent = False
        count = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = targets.get(name)
                if target is None:
                    sample = ", ".join(sorted(targets)[:3])
                    raise EngineError(f"hf: unknown weight name {name!r} (model names look like: {sample}, ...)")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise EngineError(
                        f"hf: shape mismatch for {name!r}: engine {tuple(target.shape)}, got {tuple(tensor.shape)}"
                    )
                target.data.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
                count += 1
        self._consistent = True
        self.weight_version = version
        self.last_update_count = count

    def health(self) -> bool:
        return not self._closed and self._consistent

    def shutdown(self) -> None:
        self._closed = True

    def _check_usable(self, allow_inconsistent: bool = False) -> None:
        if self._closed:
            raise EngineError("hf: engine was shut down")
        if not self._consistent and not allow_inconsistent:
            raise EngineError("hf: a previous update_weights failed midway; push a full set of weights first")


def sample_next_token(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> Tensor:
    """Sample one token per row from float logits [B, V] with temperature, top-k, then top-p.

    temperature == 0 -> argmax. top-p keeps the smallest prefix of tokens (by probability, after
    top-k) whose mass reaches top_p; the most probable token is always kept.
    """
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    k = params.top_k_or_none
    if k is not None and k < scaled.shape[-1]:
        kth = torch.topk(scaled, k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_l, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_l, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= params.top_p  # mass before this token already enough
        drop[:, 0] = False
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_l)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
