"""Prompt text and chat templates.

- :data:`DAPO_MATH_TEMPLATE` / :func:`make_math_prompt`: the DAPO-Math user-message text
  (the template the DAPO-Math-17K and FIPO data use), with ``{problem}`` filled in.
- :data:`CHATML_TEMPLATE`: a minimal Qwen-style ChatML Jinja template (system/user/assistant turns
  wrapped in ``<|im_start|>role\\n ... <|im_end|>\\n``; the generation prompt is
  ``<|im_start|>assistant\\n``), for tokenizers that ship without one (tests, the CPU demo).
- :func:`encode_chat`: messages -> prompt token ids through the tokenizer's chat template with
  ``add_generation_prompt=True``, never adding extra special tokens (BOS) on top of the template.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["CHATML_TEMPLATE", "DAPO_MATH_TEMPLATE", "encode_chat", "make_math_prompt", "render_chat"]

DAPO_MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_math_prompt(problem: str) -> str:
    """The DAPO-Math user message for ``problem`` (plain ``str.replace``, so braces in it are safe)."""
    if not isinstance(problem, str):
        raise TypeError(f"make_math_prompt: problem must be str, got {type(problem).__name__}")
    return DAPO_MATH_TEMPLATE.replace("{problem}", problem)


def render_chat(tokenizer: Any, messages: Sequence[dict], *, chat_template: str | None = None) -> str:
    """Chat-template text of ``messages`` followed by the generation prompt.

    Uses ``chat_template`` when given, else the tokenizer's own; raises ``ValueError`` when neither
    exists (set ``tokenizer.chat_template`` or pass ``chat_template=CHATML_TEMPLATE``).
    """
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template or "
            "pass chat_template= (e.g. fipo_megatron.data.chat.CHATML_TEMPLATE)"
        )
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def encode_chat(tokenizer: Any, messages: Sequence[dict], *, chat_template: str | None = None) -> list[int]:
    """Token ids of :func:`render_chat` (``add_special_tokens=False``: the template owns special tokens)."""
    text = render_chat(tokenizer, messages, chat_template=chat_template)
    return list(tokenizer.encode(text, add_special_tokens=False))
