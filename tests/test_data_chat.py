"""The DAPO prompt text, the ChatML template and the local character tokenizer."""

from fipo_megatron.data import CHATML_TEMPLATE, build_char_tokenizer, encode_chat, make_math_prompt


def test_make_math_prompt_is_the_dapo_template():
    expected = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "What is {x} + 1?\n\n"
        "Remember to put your answer on its own line after \"Answer:\"."
    )
    assert make_math_prompt("What is {x} + 1?") == expected


def test_char_tokenizer_round_trip_and_specials():
    tok = build_char_tokenizer()
    text = "Answer: 12\n(3+4)*5 = 35"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.encode("<|im_start|>a<|im_end|>", add_special_tokens=False) == [
        tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("a"), tok.eos_token_id]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.chat_template == CHATML_TEMPLATE


def test_encode_chat_adds_generation_prompt_and_no_bos():
    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz")
    ids = encode_chat(tok, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
    text = "<|im_start|>system\na<|im_end|>\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == text
    assert ids == tok.encode(text, add_special_tokens=False)
