"""A character-level tokenizer built locally with the ``tokenizers`` library (nothing downloaded).

``build_char_tokenizer(alphabet)`` returns a ``transformers.PreTrainedTokenizerFast`` where every
character of ``alphabet`` (plus ``"\\n"`` and ``" "``) is one token, the ChatML markers
``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` are single special tokens, unknown characters
map to ``<unk>``, and ``decode`` concatenates characters (no spaces inserted). Its ``chat_template``
is :data:`fipo_megatron.data.chat.CHATML_TEMPLATE`; ``eos_token`` is ``<|im_end|>`` and ``pad_token``
``<|endoftext|>``. Used by tests and by the CPU demo (``save_pretrained`` works as usual).
"""

from __future__ import annotations

from .chat import CHATML_TEMPLATE

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
DEFAULT_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \n.,:;!?+-*/=()[]{}<>$\\^_'\"|&%#@~`"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, chat_template: str = CHATML_TEMPLATE):
    """Character-level ``PreTrainedTokenizerFast``; ids: special tokens 0..3, then ``alphabet`` order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars: list[str] = []
    for ch in alphabet + " \n":
        if ch not in chars:
            chars.append(ch)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = chat_template
    return hf
