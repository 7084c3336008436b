"""A1111 prompt syntax and long-prompt chunking."""

from __future__ import annotations

import pytest
import torch

from generator.pipeline import Generator
from generator.prompts import encode, encode_text, parse_prompt_attention, tokenize_chunks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a pony", [("a pony", 1.0)]),
        ("a (pony:1.5)", [("a ", 1.0), ("pony", 1.5)]),
        ("(pony)", [("pony", pytest.approx(1.1))]),
        ("((pony))", [("pony", pytest.approx(1.21))]),
        ("[pony]", [("pony", pytest.approx(1 / 1.1))]),
        ("(a [b]:2)", [("a ", 2.0), ("b", pytest.approx(2 / 1.1))]),
        (r"\(literal\)", [("(literal)", 1.0)]),
        ("unbalanced (open", [("unbalanced ", 1.0), ("open", pytest.approx(1.1))]),
        ("x BREAK y", [("x", 1.0), ("BREAK", -1.0), ("y", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_a1111_syntax(text: str, expected: list) -> None:
    assert parse_prompt_attention(text) == expected


def _long_prompt() -> str:
    """~300 prompt tokens with weights (the tiny tokenizer is byte level: a token per character)."""
    tags = [f"(tag{i}:1.2)" if i % 3 == 0 else f"[w{i}]" if i % 3 == 1 else f"t{i}" for i in range(66)]
    return ", ".join(tags)


def _token_count(tokenizer, prompt: str) -> int:
    texts = [t for t, _ in parse_prompt_attention(prompt)]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def test_long_weighted_prompt_is_not_truncated(generator: Generator) -> None:
    pipe = generator.pipe
    prompt = _long_prompt()
    tokens, mults = tokenize_chunks(pipe.tokenizer, prompt)
    assert 280 <= _token_count(pipe.tokenizer, prompt) <= 320
    assert len(tokens) == 4 and all(len(c) == 77 for c in tokens)
    assert any(m != 1.0 for chunk in mults for m in chunk)
    z = encode_text(pipe, prompt)
    assert z.shape[1] == 77 * len(tokens) > 77
    # the tail matters: changing the last tag changes the last chunk only
    z2 = encode_text(pipe, prompt[:-3] + "zzz")
    assert not torch.equal(z[:, -77:], z2[:, -77:])
    assert torch.equal(z[:, :77], z2[:, :77])


def test_weights_change_the_embedding(generator: Generator) -> None:
    pipe = generator.pipe
    plain = encode_text(pipe, "a pony, cute")
    weighted = encode_text(pipe, "a (pony:1.5), cute")
    same = encode_text(pipe, "a (pony:1.0), cute")
    assert plain.shape == weighted.shape
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain, same)


def test_comma_backtrack_moves_words_to_next_chunk(generator: Generator) -> None:
    tok = generator.pipe.tokenizer
    # 70 tokens of "a", then ", " and a 10-letter word: the word must start chunk 2
    text = "a" * 70 + ", bbbbbbbbbb"
    chunks, _ = tokenize_chunks(tok, text)
    assert len(chunks) == 2
    b = tok.convert_tokens_to_ids("b")
    assert chunks[1][1] == b  # first token after BOS
    assert b not in chunks[0]


def test_break_starts_a_chunk(generator: Generator) -> None:
    chunks, _ = tokenize_chunks(generator.pipe.tokenizer, "pony BREAK meadow")
    assert len(chunks) == 2


def test_encode_pads_positive_and_negative(generator: Generator) -> None:
    pos, neg = encode(generator.pipe, [_long_prompt(), "short"], ["ugly", ""])
    assert pos.shape == neg.shape
    assert pos.shape[0] == 2 and pos.shape[1] > 77 and pos.shape[1] % 77 == 0
    empty = encode_text(generator.pipe, "")
    # padding is the empty prompt's encoding
    assert torch.equal(neg[0, -77:], empty[0])
    with pytest.raises(ValueError):
        encode(generator.pipe, ["a"], [])
