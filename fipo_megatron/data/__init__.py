"""Prompt data: verl/DAPO-schema datasets (parquet / JSONL), chat templates, a resumable sampler.

Public names: ``load_prompt_dataset``, ``PromptDataset``, ``PromptExample``, ``SkippedRow``,
``write_prompt_dataset``, ``make_prompt_row``, ``make_math_prompt``, ``DAPO_MATH_TEMPLATE``,
``CHATML_TEMPLATE``, ``encode_chat``, ``PromptSampler``, ``build_char_tokenizer``.
Heavy imports (transformers, pyarrow) happen only inside the functions that need them.
"""

from .char_tokenizer import build_char_tokenizer
from .chat import CHATML_TEMPLATE, DAPO_MATH_TEMPLATE, encode_chat, make_math_prompt, render_chat
from .dataset import (
    PromptDataset,
    PromptExample,
    SkippedRow,
    load_prompt_dataset,
    make_prompt_row,
    write_prompt_dataset,
)
from .sampler import PromptSampler

__all__ = [
    "CHATML_TEMPLATE",
    "DAPO_MATH_TEMPLATE",
    "PromptDataset",
    "PromptExample",
    "PromptSampler",
    "SkippedRow",
    "build_char_tokenizer",
    "encode_chat",
    "load_prompt_dataset",
    "make_math_prompt",
    "make_prompt_row",
    "render_chat",
    "write_prompt_dataset",
]
