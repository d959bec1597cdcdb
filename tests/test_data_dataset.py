"""load_prompt_dataset: verl/DAPO schema from parquet and JSONL; malformed rows skipped and reported."""

import json
import logging

import pytest

from fipo_megatron.data import (
    CHATML_TEMPLATE,
    build_char_tokenizer,
    load_prompt_dataset,
    make_math_prompt,
    make_prompt_row,
    write_prompt_dataset,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def chatml(messages):
    # hand-written expectation of the template with the generation prompt
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def good_row(i, q="What is 1+1?", gt="2", src="math_dapo"):
    return {
        "data_source": src,
        "prompt": [{"role": "user", "content": q}],
        "ability": "MATH",
        "reward_model": {"ground_truth": gt, "style": "rule-lax"},
        "extra_info": {"index": 100 + i},
    }


BAD_ROWS = {
    1: ({"data_source": "math_dapo", "reward_model": {"ground_truth": "2"}}, "missing field|'prompt'"),
    2: ({**good_row(2), "prompt": "just a string"}, "list of"),
    3: ({**good_row(3), "reward_model": {"style": "x"}}, "reward_model.ground_truth"),
    4: ({**good_row(4), "prompt": []}, "empty message list"),
    5: ({**good_row(5), "prompt": [{"role": "user", "content": "   "}]}, "empty message contents"),
    6: ({**good_row(6), "prompt": [{"role": "user", "content": "x" * 300}]}, "max_prompt_length"),
    7: ({**good_row(7), "reward_model": {"ground_truth": ["2"]}}, "must be a string"),
    8: ({**good_row(8), "prompt": [{"role": "user", "content": 5}]}, "content must be a string"),
    9: ({**good_row(9), "reward_model": {"ground_truth": ""}}, "is empty"),
}


def rows_with_bad():
    rows = []
    for i in range(12):
        rows.append(BAD_ROWS[i][0] if i in BAD_ROWS else good_row(i, q=f"What is {i}+1?", gt=str(i + 1)))
    return rows


def check_report(ds, tok):
    assert len(ds) == 3 and ds.num_rows == 12
    assert [e.row for e in ds] == [0, 10, 11]
    assert [e.index for e in ds] == [100, 110, 111]
    assert [e.ground_truth for e in ds] == ["1", "11", "12"]
    assert ds[1].prompt_ids == tok.encode(chatml([{"role": "user", "content": "What is 10+1?"}]),
                                          add_special_tokens=False)
    assert [s.row for s in ds.skipped] == sorted(BAD_ROWS)
    import re

    for s in ds.skipped:
        assert re.search(BAD_ROWS[s.row][1], s.reason), (s.row, s.reason)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_malformed_rows_are_skipped_and_reported(tmp_path, tok, ext, caplog):
    rows = rows_with_bad()
    if ext == "parquet":
        # parquet needs one schema: keep only rows pyarrow can put in one table, mark the rest by hand
        rows = [r for i, r in enumerate(rows) if i not in (2, 7, 8)]
        path = write_prompt_dataset(tmp_path / "d.parquet", rows)
        with caplog.at_level(logging.WARNING):
            ds = load_prompt_dataset(path, tok, max_prompt_length=120)
        assert len(ds) == 3 and ds.num_rows == 9
        assert [e.index for e in ds] == [100, 110, 111]
        assert [s.row for s in ds.skipped] == [1, 2, 3, 4, 5, 6]  # record numbers after the removal
    else:
        path = write_prompt_dataset(tmp_path / "d.jsonl", rows)
        with caplog.at_level(logging.WARNING):
            ds = load_prompt_dataset(path, tok, max_prompt_length=120)
        check_report(ds, tok)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "\n" not in msg and str(path) in msg and f"skipped {len(ds.skipped)} of" in msg


def test_parquet_and_jsonl_give_the_same_examples(tmp_path, tok):
    rows = [make_prompt_row(make_math_prompt(f"Compute {i}*3."), str(3 * i), index=i, system="Be brief.")
            for i in range(5)]
    a = load_prompt_dataset(write_prompt_dataset(tmp_path / "a.parquet", rows), tok, max_prompt_length=1000)
    b = load_prompt_dataset(write_prompt_dataset(tmp_path / "b.jsonl", rows), tok, max_prompt_length=1000)
    assert [(e.index, e.prompt_ids, e.ground_truth, e.data_source) for e in a] == \
           [(e.index, e.prompt_ids, e.ground_truth, e.data_source) for e in b]
    assert a[2].prompt_ids == tok.encode(chatml(rows[2]["prompt"]), add_special_tokens=False)
    assert a[2].raw["reward_model"]["ground_truth"] == "6"
    assert not a.skipped and a.data_sources == ["math_dapo"]


def test_bad_json_lines_blank_lines_and_non_objects(tmp_path, tok, caplog):
    path = tmp_path / "x.jsonl"
    lines = [json.dumps(good_row(0)), "", "{not json", "[1, 2]", json.dumps(good_row(4))]
    path.write_text("\n".join(lines) + "\n")
    ds = load_prompt_dataset(path, tok, max_prompt_length=200)
    assert [e.row for e in ds] == [0, 4]
    assert [(s.row, s.reason.split(":")[0]) for s in ds.skipped] == [(2, "invalid JSON on line 3"),
                                                                     (3, "row must be an object, got list")]


def test_json_array_file_and_defaults(tmp_path, tok):
    row = good_row(0)
    del row["data_source"], row["extra_info"]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": 1}, row, {**row, "reward_model": {"ground_truth": 7}}]))
    with pytest.raises(ValueError, match="no usable prompt.*missing field 'data_source'"):
        load_prompt_dataset(path, tok, max_prompt_length=200)
    ds = load_prompt_dataset(path, tok, max_prompt_length=200, default_data_source="aime")
    assert [e.index for e in ds] == [1, 2]  # row numbers when extra_info.index is absent
    assert [e.ground_truth for e in ds] == ["2", "7"]
    assert ds[0].data_source == "aime"
    assert ds[0].prompt_ids is ds[1].prompt_ids  # identical prompts are tokenised once


def test_file_errors_name_the_path(tmp_path, tok):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_prompt_dataset(missing, tok, max_prompt_length=10)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        load_prompt_dataset(broken, tok, max_prompt_length=10)
    weird = tmp_path / "data.csv"
    weird.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        load_prompt_dataset(weird, tok, max_prompt_length=10)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable prompt in .*empty.jsonl"):
        load_prompt_dataset(empty, tok, max_prompt_length=10)
    with pytest.raises(ValueError, match="unsupported"):
        write_prompt_dataset(tmp_path / "x.txt", [good_row(0)])


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path, tok):
    path = write_prompt_dataset(tmp_path / "d.jsonl", [good_row(0)])
    bare = build_char_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        load_prompt_dataset(path, bare, max_prompt_length=100)
    ds = load_prompt_dataset(path, bare, max_prompt_length=100, chat_template=CHATML_TEMPLATE)
    assert ds[0].prompt_ids == tok.encode(chatml(good_row(0)["prompt"]), add_special_tokens=False)


def test_max_rows_and_keep_raw(tmp_path, tok):
    path = write_prompt_dataset(tmp_path / "d.jsonl", [good_row(i, q=f"q{i}") for i in range(6)])
    ds = load_prompt_dataset(path, tok, max_prompt_length=100, max_rows=4, keep_raw=False)
    assert len(ds) == 4 and ds[0].raw is None


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_numeric_ground_truths_follow_one_rule_and_are_counted(tmp_path, tok, ext, caplog):
    """Integral numbers become integer text (5.0 -> "5", so DAPO's string compare scores "Answer: 5" right);
    a fractional / non-finite number is refused (skipped with a reason); strings are untouched."""
    from fipo_megatron.rewards.math_dapo import compute_score

    gts = [5.0, 7, "5.0", 2.5, float("inf"), -3.0]
    rows = [good_row(i, gt=g) for i, g in enumerate(gts)]
    path = tmp_path / f"num.{ext}"
    if ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        floats = [r for r in rows if isinstance(r["reward_model"]["ground_truth"], float)]
        pq.write_table(pa.Table.from_pylist(floats), str(path))  # a float64 ground-truth column
        gts = [g for g in gts if isinstance(g, float)]
    with caplog.at_level(logging.WARNING):
        ds = load_prompt_dataset(path, tok, max_prompt_length=200)
    want = {5.0: "5", 7: "7", "5.0": "5.0", -3.0: "-3"}
    assert [e.ground_truth for e in ds] == [want[g] for g in gts if g in want]
    assert ds.numeric_ground_truths == sum(1 for g in gts if g in want and not isinstance(g, str))
    reasons = {s.row: s.reason for s in ds.skipped}
    assert "non-integer number 2.5" in reasons[gts.index(2.5)] and "as a string" in reasons[gts.index(2.5)]
    assert "non-integer number inf" in reasons[gts.index(float("inf"))]
    assert f"{ds.numeric_ground_truths} numeric ground truth(s) converted" in caplog.text
    assert compute_score("Answer: 5", ds[0].ground_truth)["score"] == 1.0
    assert compute_score("Answer: 5", "5.0")["score"] == -1.0  # the scorer itself is unchanged for strings
