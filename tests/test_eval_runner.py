"""evaluate(): a fake engine with canned responses; metrics checked against hand-computed values."""

from dataclasses import dataclass, field

import pytest

from fipo_megatron.data import build_char_tokenizer, load_prompt_dataset, make_prompt_row, write_prompt_dataset
from fipo_megatron.eval import evaluate


@dataclass
class FakeParams:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None


@dataclass
class FakeOutput:
    prompt_ids: list
    response_ids: list
    response_logprobs: list
    finish_reason: str


class FakeEngine:
    """Returns canned texts per prompt (looked up by the decoded prompt), grouped by prompt."""

    def __init__(self, tokenizer, canned):
        self.tok, self.canned, self.calls = tokenizer, canned, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params))
        outs = []
        for p in prompts:
            text = self.tok.decode(p, skip_special_tokens=True)
            key = next(q for q in self.canned if q in text)
            for resp in self.canned[key][: params.n]:
                ids = self.tok.encode(resp, add_special_tokens=False)
                reason = "length" if len(ids) >= params.max_new_tokens else "stop"
                outs.append(FakeOutput(list(p), ids, [0.0] * len(ids), reason))
        return outs


CANNED = {
    # avg 2/4, cons: "3" wins 2-1-1 -> correct, pass@4 = 1
    "1+2": ["Answer: 3", "Answer: 3", "Answer: 4", "no idea"],
    # avg 1/4, cons: "5" and "6" tie 2-2 ... "6" seen first -> wrong; pass@4 = 1
    "2+3": ["Answer: 6", "Answer: 5", "Answer: 6", "x=2\nAnswer: 5"[:9]],
    # avg 0, cons 0, pass 0 (all invalid)
    "4+4": ["hmm", "hmm", "?", "no"],
}
GT = {"1+2": "3", "2+3": "5", "4+4": "8"}
SRC = {"1+2": "alpha", "2+3": "alpha", "4+4": "beta"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_char_tokenizer()
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [make_prompt_row(f"What is {q}?", GT[q], index=i, data_source=SRC[q]) for i, q in enumerate(GT)]
    write_prompt_dataset(path, rows)
    return tok, load_prompt_dataset(path, tok, max_prompt_length=200)


def _hand_pass(n, c, k):
    from math import comb

    return 1 - comb(n - c, k) / comb(n, k)


def test_metrics_match_hand_computation(setup):
    tok, ds = setup
    engine = FakeEngine(tok, CANNED)
    out = evaluate(engine, ds, tok, k=4, max_new_tokens=64, reward_fn="math_dapo", params_factory=FakeParams)
    # "x=2\nAnswer: 5"[:9] == "x=2\nAnswe" -> invalid, so problem 2 has c = 1
    assert out["avg@k"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert out["cons@k"] == pytest.approx((1 + 0 + 0) / 3)
    assert out["pass@k"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@k"])
    assert out["avg@4"] == out["avg@k"] and out["pass@4"] == out["pass@k"]
    assert out["num_problems"] == 3 and out["num_samples"] == 12 and out["k"] == 4
    lengths = [len(r) for q in CANNED for r in CANNED[q]]
    assert out["response_length_mean"] == pytest.approx(sum(lengths) / 12)
    assert out["reward_mean"] == pytest.approx((3 * 1 + 9 * -1) / 12)
    assert out["invalid_ratio"] == pytest.approx(6 / 12)
    # per data source
    assert out["alpha/avg@k"] == pytest.approx(3 / 8)
    assert out["alpha/num_problems"] == 2
    assert out["beta/avg@k"] == 0.0 and out["beta/pass@k"] == 0.0
    # the sampling parameters the engine saw
    (num_prompts, params), = engine.calls
    assert num_prompts == 3
    assert (params.n, params.temperature, params.top_p, params.max_new_tokens) == (4, 1.0, 0.7, 64)
    assert params.stop_token_ids == [tok.eos_token_id]


def test_pass_at_k_with_fewer_k_than_samples_and_batching(setup):
    tok, ds = setup
    engine = FakeEngine(tok, CANNED)
    out = evaluate(engine, ds, tok, k=2, max_new_tokens=64, batch_size=2, params_factory=FakeParams,
                   return_details=True)
    assert [c[0] for c in engine.calls] == [2, 1]
    # with n = k = 2 only the first two canned answers are used
    expected_pass = (_hand_pass(2, 2, 2) + _hand_pass(2, 1, 2) + 0) / 3
    assert out["pass@k"] == pytest.approx(expected_pass)
    assert [d["accs"] for d in out["details"]] == [[True, True], [False, True], [False, False]]


def test_overlong_penalty_and_clip_ratio(setup):
    tok, ds = setup
    engine = FakeEngine(tok, CANNED)
    # max_new_tokens = 9: every 9-character response counts as cut at the limit
    out = evaluate(engine, ds, tok, k=4, max_new_tokens=9, overlong_buffer=4, params_factory=FakeParams,
                   return_details=True)
    lengths = [n for d in out["details"] for n in d["lengths"]]
    base = [s for d in out["details"] for s in d["scores"]]
    assert out["clip_ratio"] == pytest.approx(sum(n >= 9 for n in lengths) / 12)
    # penalty: lengths above 9 - 4 = 5 lose (n - 5) / 4
    pen = [min(-(n - 5) / 4, 0.0) for n in lengths]
    accs = [a for d in out["details"] for a in d["accs"]]
    assert base == pytest.approx([(1.0 if a else -1.0) + p for a, p in zip(accs, pen)])
    assert out["avg@k"] == pytest.approx((2 / 4 + 1 / 4) / 3)  # acc is untouched by the penalty


def test_custom_reward_fn_and_bad_engine(setup):
    tok, ds = setup
    out = evaluate(FakeEngine(tok, CANNED), ds, tok, k=4, max_new_tokens=64, params_factory=FakeParams,
                   reward_fn=lambda text, gt: 1.0 if "Answer" in text else 0.0)
    assert out["avg@k"] == pytest.approx(6 / 12)

    class Short(FakeEngine):
        def generate(self, prompts, params):
            return super().generate(prompts, params)[:-1]

    with pytest.raises(RuntimeError, match="expected 12"):
        evaluate(Short(tok, CANNED), ds, tok, k=4, max_new_tokens=64, params_factory=FakeParams)
    with pytest.raises(ValueError, match="k must be"):
        evaluate(Short(tok, CANNED), ds, tok, k=0, max_new_tokens=64, params_factory=FakeParams)


def test_default_params_come_from_rollout_types(setup):
    from fipo_megatron.rollout import types  # a project module: a broken import must fail, not skip
    tok, ds = setup
    engine = FakeEngine(tok, CANNED)
    evaluate(engine, ds, tok, k=4, max_new_tokens=64)
    assert isinstance(engine.calls[0][1], types.SamplingParams)
    assert engine.calls[0][1].n == 4
