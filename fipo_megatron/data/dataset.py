"""Prompt datasets in the verl / DAPO schema (parquet or JSONL), and a tiny writer for them.

Row schema (one row = one prompt)::

    data_source:  str                       e.g. "math_dapo", "aime24" (used to name eval metrics)
    prompt:       list[{"role": str, "content": str}]   chat messages
    ability:      str                       optional
    reward_model: {"ground_truth": str, "style": str}   ground_truth required (numbers: see below)
    extra_info:   {"index": int, ...}       optional; index defaults to the row number

:func:`load_prompt_dataset` applies the tokenizer's chat template with the generation prompt and
returns a :class:`PromptDataset` of :class:`PromptExample`. A malformed row (not an object, missing
or wrongly typed ``prompt`` / ``reward_model.ground_truth`` / ``data_source``, an empty prompt or
ground truth, a chat-template failure, or a prompt longer than ``max_prompt_length`` tokens) is
SKIPPED: it is recorded in ``dataset.skipped`` as ``SkippedRow(row, reason)`` and summarised in one
logged warning line; it never raises. Loading raises only when the file is missing or unreadable
(``FileNotFoundError`` / ``ValueError`` naming the path) or when no row at all is usable.

Numeric ground truths (JSON numbers, parquet int/float columns) become text by one rule, because the
DAPO scorer compares strings ("5" != "5.0"): an int becomes its decimal text (``5`` -> ``"5"``), an
integral finite float becomes the text of that integer (``5.0`` -> ``"5"``); any other float (``2.5``,
NaN, inf) is refused (the row is skipped with a reason telling to store the answer as a string, which
says how it should be written). The number of converted rows is ``dataset.numeric_ground_truths``;
string ground truths are passed through unchanged.

Row numbers are 0-based: the record index for parquet and JSON arrays, the line index for JSONL
(blank lines are ignored; an unparsable line is a skipped row).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .chat import encode_chat

__all__ = [
    "PromptDataset",
    "PromptExample",
    "SkippedRow",
    "load_prompt_dataset",
    "make_prompt_row",
    "write_prompt_dataset",
]

logger = logging.getLogger(__name__)

_PARQUET_EXT = (".parquet", ".pq")
_JSON_EXT = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class PromptExample:
    """One usable prompt. ``prompt_ids`` may be shared between identical prompts: treat it as read-only."""

    index: int  # extra_info.index if it is an int, else the row number
    prompt_ids: list[int]
    ground_truth: str
    data_source: str
    raw: dict | None = field(default=None, repr=False, compare=False)  # the source row (keep_raw=True)
    row: int = -1  # 0-based row number in the file


@dataclass(frozen=True)
class SkippedRow:
    row: int
    reason: str


class _RowError(Exception):
    """A malformed row; the message is the skip reason."""


class PromptDataset(Sequence[PromptExample]):
    """Indexable, immutable list of :class:`PromptExample` plus the load report."""

    def __init__(self, examples: list[PromptExample], *, path: str, num_rows: int, skipped: list[SkippedRow],
                 numeric_ground_truths: int = 0):
        self.examples = examples
        self.path = path
        self.num_rows = num_rows
        self.skipped = skipped
        self.numeric_ground_truths = numeric_ground_truths  # kept rows whose ground truth was a number

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    @property
    def data_sources(self) -> list[str]:
        """Distinct data sources in first-seen order."""
        return list(dict.fromkeys(e.data_source for e in self.examples))

    def __repr__(self) -> str:
        return f"PromptDataset({self.path!r}, {len(self)} examples, {len(self.skipped)} skipped)"


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise ValueError(f"cannot read parquet file {path}: {exc}") from exc
    row = 0
    try:
        batches = pf.iter_batches(batch_size=4096)
        for batch in batches:
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read parquet file {path} (at row {row}): {exc}") from exc


class _BadLine:
    def __init__(self, reason: str):
        self.reason = reason


def _iter_json(path: str) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {path} as UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if text.lstrip().startswith("["):  # a JSON array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} starts with '[' but is not a valid JSON array: {exc}") from exc
        yield from enumerate(rows)
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            yield i, _BadLine(f"invalid JSON on line {i + 1}: {exc.msg}")


def _iter_rows(path: str) -> Iterator[tuple[int, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext in _PARQUET_EXT:
        return _iter_parquet(path)
    if ext in _JSON_EXT:
        return _iter_json(path)
    raise ValueError(f"unsupported prompt file extension {ext!r} for {path}: use .parquet or .jsonl/.json")


def _get_field(rec: dict, dotted: str) -> Any:
    obj: Any = rec
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj or obj[part] is None:
            raise _RowError(f"missing field {dotted!r}")
        obj = obj[part]
    return obj


def _check_messages(prompt: Any, key: str) -> list[dict]:
    if not isinstance(prompt, (list, tuple)):
        raise _RowError(f"{key!r} must be a list of {{role, content}} messages, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise _RowError(f"{key!r} is an empty message list")
    messages = []
    for j, m in enumerate(prompt):
        if not isinstance(m, dict):
            raise _RowError(f"{key}[{j}] must be a {{role, content}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{key}[{j}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"{key}[{j}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise _RowError(f"{key!r} has only empty message contents")
    return messages


def numeric_ground_truth_text(value: int | float, key: str = "ground_truth") -> str:
    """The text of a numeric ground truth: an int's decimal text, an integral finite float's integer
    text (``5.0`` -> ``"5"``). Raises ``_RowError`` for any other float (fractional, NaN, inf): its
    intended written form (``2.5``? ``5/2``?) cannot be known, so it must be given as a string."""
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    raise _RowError(f"{key!r} is the non-integer number {value!r}: store it as a string in the form the "
                    f"scorer should expect (e.g. \"2.5\" or \"\\frac{{5}}{{2}}\")")


def _ground_truth(rec: dict, key: str) -> tuple[str, bool]:
    """(ground truth text, whether it was a number). Numbers follow :func:`numeric_ground_truth_text`;
    strings are returned unchanged."""
    gt = _get_field(rec, key)
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        raise _RowError(f"{key!r} must be a string, got {type(gt).__name__}")
    numeric = not isinstance(gt, str)
    if numeric:
        return numeric_ground_truth_text(gt, key), True
    if not gt.strip():
        raise _RowError(f"{key!r} is empty")
    return gt, False


def load_prompt_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    ground_truth_key: str = "reward_model.ground_truth",
    data_source_key: str = "data_source",
    default_data_source: str | None = None,
    chat_template: str | None = None,
    max_rows: int | None = None,
    keep_raw: bool = True,
) -> PromptDataset:
    """Read ``path`` (parquet or JSONL/JSON) into a :class:`PromptDataset` (see the module docstring).

    ``ground_truth_key`` is a dotted path into the row; a missing ``data_source`` falls back to
    ``default_data_source`` (when given; else the row is skipped). Identical prompts are tokenised
    once. ``max_rows`` stops after that many rows (usable or not). ``keep_raw=False`` drops the source
    rows to save memory on large files.
    """
    path = os.fspath(path)
    if max_prompt_length is None or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt dataset not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"prompt dataset path is not a file: {path}")

    examples: list[PromptExample] = []
    skipped: list[SkippedRow] = []
    cache: dict[tuple, list[int]] = {}
    num_rows = 0
    numeric = 0
    for row, rec in _iter_rows(path):
        if max_rows is not None and num_rows >= max_rows:
            break
        num_rows += 1
        try:
            if isinstance(rec, _BadLine):
                raise _RowError(rec.reason)
            if not isinstance(rec, dict):
                raise _RowError(f"row must be an object, got {type(rec).__name__}")
            messages = _check_messages(rec.get(prompt_key), prompt_key)
            gt, gt_was_number = _ground_truth(rec, ground_truth_key)
            src = rec.get(data_source_key)
            if src is None:
                if default_data_source is None:
                    raise _RowError(f"missing field {data_source_key!r}")
                src = default_data_source
            if not isinstance(src, str) or not src:
                raise _RowError(f"{data_source_key!r} must be a non-empty string, got {src!r}")
            key = tuple((m["role"], m["content"]) for m in messages)
            ids = cache.get(key)
            if ids is None:
                try:
                    ids = encode_chat(tokenizer, messages, chat_template=chat_template)
                except ValueError as exc:
                    if "chat_template" in str(exc):  # a tokenizer problem, not a row problem
                        raise
                    raise _RowError(f"chat template failed: {exc}") from exc
                except Exception as exc:  # noqa: BLE001
                    raise _RowError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
                cache[key] = ids
            if len(ids) == 0:
                raise _RowError("prompt encodes to zero tokens")
            if len(ids) > max_prompt_length:
                raise _RowError(f"prompt has {len(ids)} tokens > max_prompt_length={max_prompt_length}")
            extra = rec.get("extra_info")
            idx = extra.get("index") if isinstance(extra, dict) else None
            if isinstance(idx, bool) or not isinstance(idx, int):
                idx = row
            numeric += gt_was_number
            examples.append(
                PromptExample(
                    index=idx, prompt_ids=ids, ground_truth=gt, data_source=src,
                    raw=rec if keep_raw else None, row=row,
                )
            )
        except _RowError as exc:
            skipped.append(SkippedRow(row, str(exc)))

    if skipped:
        shown = "; ".join(f"row {s.row}: {s.reason}" for s in skipped[:3])
        more = f"; ... {len(skipped) - 3} more" if len(skipped) > 3 else ""
        logger.warning("%s: skipped %d of %d rows (%s%s)", path, len(skipped), num_rows, shown, more)
    if not examples:
        first = "; first problems: " + "; ".join(f"row {s.row}: {s.reason}" for s in skipped[:3]) if skipped else ""
        raise ValueError(f"no usable prompt in {path} ({num_rows} rows read{first})")
    if numeric:
        logger.warning("%s: %d numeric ground truth(s) converted to text (integral floats such as 5.0 -> \"5\")",
                       path, numeric)
    return PromptDataset(examples, path=path, num_rows=num_rows, skipped=skipped, numeric_ground_truths=numeric)


def make_prompt_row(
    content: str,
    ground_truth: str,
    *,
    index: int,
    data_source: str = "math_dapo",
    ability: str = "MATH",
    system: str | None = None,
    split: str | None = None,
) -> dict:
    """One row in the verl/DAPO schema with a single user message ``content`` (plus optional system)."""
    prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}
    ]
    extra: dict[str, Any] = {"index": int(index)}
    if split is not None:
        extra["split"] = split
    return {
        "data_source": data_source,
        "prompt": prompt,
        "ability": ability,
        "reward_model": {"ground_truth": str(ground_truth), "style": "rule-lax"},
        "extra_info": extra,
    }


def write_prompt_dataset(path: str | os.PathLike, rows: Iterable[dict]) -> str:
    """Write ``rows`` to ``path``: parquet for ``.parquet``/``.pq``, one JSON object per line for
    ``.jsonl``/``.json``/``.ndjson``. Parent directories are created; the file appears atomically
    (temporary file, then rename). Returns the path as a string.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    rows = list(rows)
    if ext not in _PARQUET_EXT + _JSON_EXT:
        raise ValueError(f"unsupported prompt file extension {ext!r} for {path}: use .parquet or .jsonl")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if ext in _PARQUET_EXT:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if not rows:
                raise ValueError(f"write_prompt_dataset: no rows to write to {path}")
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
