"""setup.load_datasets: one dataset per file (same file names in different folders stay apart), the
numeric ground-truth conversion reported at load time."""
import json
import os

import pytest

from fipo_megatron.data import build_char_tokenizer
from fipo_megatron.trainer.setup import dataset_names, load_datasets


def _write(path, n, gt="2"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"data_source": "d", "prompt": [{"role": "user", "content": f"q{i}"}],
                                 "reward_model": {"ground_truth": gt}}) + "\n")
    return path


def test_same_file_name_in_two_folders_gives_two_datasets(tmp_path, capsys):
    a = _write(str(tmp_path / "a" / "train.jsonl"), 3)
    b = _write(str(tmp_path / "b" / "train.jsonl"), 5, gt=5.0)
    c = _write(str(tmp_path / "c" / "other.jsonl"), 2)
    sets = load_datasets([a, b, c], build_char_tokenizer(), 200)
    assert list(sets) == ["a/train", "b/train", "other"]
    assert [len(v) for v in sets.values()] == [3, 5, 2]
    assert "5 numeric ground truth(s) converted" in capsys.readouterr().out
    assert sets["b/train"][0].ground_truth == "5"


def test_dataset_names_rules(tmp_path):
    assert dataset_names(["x/y/train.jsonl", "x/z/train.parquet", "eval.jsonl"]) == ["y/train", "z/train", "eval"]
    assert dataset_names(["p/a/t.jsonl", "q/a/t.jsonl"]) == ["p/a/t", "q/a/t"]
    assert dataset_names(["d/t.jsonl", "d/t.parquet"]) == ["t.jsonl", "t.parquet"]
    f = _write(str(tmp_path / "t.jsonl"), 1)
    with pytest.raises(ValueError, match="given twice.*t.jsonl"):
        dataset_names([f, str(tmp_path / "." / "t.jsonl")])
