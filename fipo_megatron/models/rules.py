"""Model-shape rules of a Megatron layout: vocabulary padding, sequence padding, TP/PP divisibility.

The ONE copy of these rules; `plan.layout`, `megatron.qwen_config` and `convert.validate` call
them and raise their own error types (LayoutError / ValueError / ConversionError) with the
messages. Pure Python (no Megatron, no torch).
"""
from __future__ import annotations


#: Tokens per fp32 chunk in the vocab-parallel log-prob code (megatron.logprobs.token_log_probs); the
#: planner's logits term uses the same number.
LOGPROB_CHUNK_TOKENS = 4096


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Vocabulary padded up to a multiple of make_vocab_size_divisible_by * tp (Megatron-LM rule).

    Raises ValueError when any argument is < 1.
    """
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tp < 1:
        raise ValueError(f"invalid vocab padding arguments: vocab={vocab_size}, "
                         f"divisible_by={make_vocab_size_divisible_by}, tp={tp}")
    multiple = make_vocab_size_divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (>= 1)."""
    return ((n + multiple - 1) // multiple) * multiple


def sequence_pad_multiple(cp: int, tp: int) -> int:
    """Each packed (THD) sequence is padded to a multiple of this: 2*CP*TP when CP > 1 (the
    load-balanced CP split cuts it into 2*CP equal chunks, each divisible by TP for sequence
    parallelism), else TP."""
    if cp < 1 or tp < 1:
        raise ValueError(f"cp and tp must be >= 1, got cp={cp}, tp={tp}")
    return 2 * cp * tp if cp > 1 else tp


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(*, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int,
                    num_hidden_layers: int, tp: int = 1, pp: int = 1, vpp: int | None = None,
                    model: str = "") -> list[str]:
    """Every broken model-shape rule of a TP/PP(/virtual PP) layout, as messages ([] = fine).

    Rules, in this order (arguments are the HF config.json fields; every message says the rule
    in words, then names the field: "TP=4 must divide ...: tp=4 does not divide num_key_value_heads=2"):
    - tp, pp >= 1 and vpp (None or 0 = no virtual stages) >= 0; otherwise that is the only
      problem returned;
    - num_attention_heads divisible by num_key_value_heads (GQA groups);
    - TP divides the heads AND the KV groups (megatron-core 0.16 splits linear_qkv by whole
      groups, `num_query_groups % TP == 0`); only when it does: TP divides intermediate_size;
    - PP * VPP divides num_hidden_layers (uniform stages).
    `model` (a name, optional) is quoted in the messages.
    """
    if tp < 1 or pp < 1 or (vpp or 1) < 1:
        vp = f", vpp={vpp}" if vpp else ""
        return [f"tensor/pipeline parallel sizes must be >= 1 (got tp={tp}, pp={pp}{vp})"]
    of = f" of {model}" if model else ""
    heads, groups = num_attention_heads, num_key_value_heads
    layers, inter = num_hidden_layers, intermediate_size
    problems: list[str] = []
    if heads % groups:
        problems.append(f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}{of}")
    if heads % tp or groups % tp:
        ok = [d for d in _divisors(groups) if heads % d == 0]
        bad = " and ".join(f"{k}={n}" for k, n in (("num_key_value_heads", groups), ("num_attention_heads", heads))
                           if n % tp)
        problems.append(
            f"TP={tp} must divide the attention heads ({heads}) and the KV groups ({groups}){of}: "
            f"tp={tp} does not divide {bad} (megatron-core 0.16 requires num_query_groups % TP == 0, "
            f"whole KV groups per TP rank); valid TP: {ok}")
    elif inter % tp:
        problems.append(f"TP={tp} must divide the MLP intermediate size ({inter}){of}: "
                        f"tp={tp} does not divide intermediate_size={inter}")
    v = vpp or 1
    if layers % (pp * v):
        stages, small = (f"PP={pp} x VPP={vpp}", f"pp={pp} x vpp={vpp}") if vpp else (f"PP={pp}", f"pp={pp}")
        ok = [d for d in _divisors(layers) if layers % (d * v) == 0]
        problems.append(f"{stages} must divide the number of layers ({layers}){of}: "
                        f"{small} does not divide num_hidden_layers={layers}; valid PP: {ok}")
    return problems
