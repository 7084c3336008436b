"""Long and weighted prompt encoding with AUTOMATIC1111's syntax and semantics.

Syntax: `(word:1.2)` sets a weight, `(word)` multiplies by 1.1, `[word]` by 1/1.1, nesting
multiplies, `\\(` `\\)` `\\[` `\\]` are literal brackets, `BREAK` starts a new 75-token chunk.
Long prompts are not truncated: the tokens are cut into chunks of 75 (moving the words after the
last comma into the next chunk when that comma is within 20 tokens of the end, as A1111 does),
each chunk is encoded as BOS + 75 tokens + EOS (padded with EOS) and the chunk encodings are
concatenated. Weights scale the encoder's output per token, and each chunk is rescaled to its
original mean (A1111's "Original" emphasis).

Textual inversion: an embedding loaded with `pipe.load_textual_inversion(path, token=name)` adds
the tokens `name`, `name_1`, ... (one per vector) to the tokenizer. Where its name appears in the
prompt as a word (any case, as A1111 matches it), all its token ids go in, in one chunk (a chunk
without room for them is closed first, as A1111 does); diffusers' `maybe_convert_prompt` does the
same expansion for its own encoder. (One difference from A1111: the tokenizer itself splits an
added token out of a longer word, `easynegx`.)

Clip skip (A1111's `CLIP_stop_at_last_layers`): `clip_skip` 1 uses the last layer's output, n > 1
the output of the n-th layer from the end (`hidden_states[-n]`) through the final layer norm.

Why not compel: compel 2.5.1 (checked in the installed source) has no A1111 syntax mode. Its own
grammar reads `((word))` as weight 1.0 and `[word]` as literal text, and its weighting differs
(upweights lerp away from the empty prompt, downweights blend with a masked prompt) as does its
long-prompt splitting (at sentence ends). A translator to compel syntax would accept A1111 prompts
but not reproduce A1111 results, while users paste prompts and parameters from A1111/Civitai and
our PNG metadata claims A1111 format. So this module is a small port of A1111's parser
(`modules/prompt_parser.parse_prompt_attention`) and of its chunked encoder; it never raises on
odd input (unbalanced brackets are closed at the end, as A1111 does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from generator.prompt_syntax import embedding_key, embedding_pattern

CHUNK_TOKENS = 75  #: prompt tokens per chunk (plus BOS and EOS = the encoder's 77 positions)
COMMA_BACKTRACK = 20  #: A1111 `comma_padding_backtrack` default

_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_BREAK = ("BREAK", -1.0)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split A1111 prompt text into (text, weight) fragments; `("BREAK", -1)` marks a chunk break.

    >>> parse_prompt_attention("a (house:1.5) [b] \\\\(c\\\\)")
    [('a ', 1.0), ('house', 1.5), (' ', 1.0), ('b', 0.9090909090909091), (' (c)', 1.0)]
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        part = m.group(0)
        weight = m.group(1)
        value: float | None = None
        if weight is not None:
            try:
                value = float(weight)
            except ValueError:  # e.g. "(a:.)": not a number, keep it as text
                value = None
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif value is not None and round_brackets:
            multiply_range(round_brackets.pop(), value)
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_RE_BREAK.split(part)):
                if i > 0:
                    res.append(list(_BREAK))
                res.append([piece, 1.0])

    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)

    if not res:
        res = [["", 1.0]]
    # merge runs of equal weight (never merge a BREAK marker)
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1] and res[i][1] != -1.0:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


_RE_VECTOR = re.compile(r"^(.+)_(\d+)$")
_EMBEDDINGS: dict[int, tuple[int, re.Pattern[str] | None, dict[str, list[int]]]] = {}


def embedding_tokens(tokenizer: Any) -> tuple[re.Pattern[str] | None, dict[str, list[int]]]:
    """(regex of the loaded embedding names, name key -> its token ids) from `tokenizer`'s added tokens.

    Cached per tokenizer and vocabulary size (loading an embedding adds tokens).
    """
    size = len(tokenizer)
    cached = _EMBEDDINGS.get(id(tokenizer))
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    special = set(getattr(tokenizer, "all_special_tokens", []))
    added = {t: i for t, i in tokenizer.get_added_vocab().items() if t not in special}
    names = [t for t in added if not ((m := _RE_VECTOR.match(t)) and m.group(1) in added)]
    ids: dict[str, list[int]] = {}
    for name in names:
        vector_ids = [added[name]]
        while f"{name}_{len(vector_ids)}" in added:
            vector_ids.append(added[f"{name}_{len(vector_ids)}"])
        ids[embedding_key(name)] = vector_ids
    pattern = embedding_pattern(names)
    _EMBEDDINGS[id(tokenizer)] = (size, pattern, ids)
    return pattern, ids


def _units(tokenizer: Any, texts: list[str]) -> list[list[list[int]]]:
    """Per fragment: its units, each one token id or all token ids of one embedding."""
    pattern, vectors = embedding_tokens(tokenizer)
    if pattern is None:
        tokenized = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        return [[[t] for t in ids] for ids in tokenized]
    out = []
    for text in texts:
        units: list[list[int]] = []
        pos = 0
        for m in [*pattern.finditer(text), None]:
            piece = text[pos : m.start() if m else len(text)]
            if piece:
                ids = tokenizer(piece, truncation=False, add_special_tokens=False)["input_ids"]
                units.extend([t] for t in ids)
            if m is not None:
                units.append(list(vectors[embedding_key(m.group(0))])[:CHUNK_TOKENS])
                pos = m.end()
        out.append(units)
    return out


def tokenize_chunks(tokenizer: Any, text: str) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's `tokenize_line`: token ids and weights per 77-long chunk (BOS ... EOS, EOS-padded)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    parsed = parse_prompt_attention(text)
    tokenized = _units(tokenizer, [t for t, _ in parsed])

    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK_TOKENS - len(chunk.tokens)
        chunk.tokens = [bos, *chunk.tokens, *([eos] * pad), eos]
        chunk.multipliers = [1.0, *chunk.multipliers, *([1.0] * pad), 1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = _Chunk()

    for tokens, (fragment, weight) in zip(tokenized, parsed, strict=True):
        if (fragment, weight) == _BREAK:
            next_chunk()
            continue
        for unit in tokens:
            if unit == [comma]:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK
            ):
                # move the words after the last comma into the next chunk
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
            if chunk.tokens and len(chunk.tokens) + len(unit) > CHUNK_TOKENS:
                next_chunk()
            chunk.tokens.extend(unit)
            chunk.multipliers.extend([weight] * len(unit))

    if chunk.tokens or not chunks:
        next_chunk()
    return [c.tokens for c in chunks], [c.multipliers for c in chunks]


def _hidden(encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        return encoder(ids)[0]  # last hidden state (CLIP's final layer norm applied), chunk-batched
    hidden = encoder(ids, output_hidden_states=True).hidden_states
    z = hidden[-min(clip_skip, len(hidden))]
    # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it
    return getattr(encoder, "text_model", encoder).final_layer_norm(z)


@torch.no_grad()
def encode_text(pipe: Any, text: str, clip_skip: int = 1) -> torch.Tensor:
    """Encode one A1111 prompt: a (1, 77 * chunks, dim) tensor on the text encoder's device."""
    encoder = pipe.text_encoder
    tokens, multipliers = tokenize_chunks(pipe.tokenizer, text)
    ids = torch.tensor(tokens, dtype=torch.long, device=encoder.device)
    z = _hidden(encoder, ids, clip_skip).float()
    mults = torch.tensor(multipliers, dtype=torch.float32, device=z.device).unsqueeze(-1)
    if bool((mults != 1.0).any()):
        # per chunk, as A1111's process_tokens (which runs once per 77-token chunk)
        original_mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * mults
        new_mean = z.mean(dim=(1, 2), keepdim=True)
        # a ~zero mean cannot be restored: leave such a chunk unscaled
        ok = new_mean.abs() > 1e-6 * z.abs().mean(dim=(1, 2), keepdim=True)
        z = torch.where(ok, z * (original_mean / torch.where(ok, new_mean, 1.0)), z)
    return z.reshape(1, -1, z.shape[-1]).to(encoder.dtype)


def pad_to_length(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Append encodings of the empty prompt (`empty`, one 77-token chunk) until `length` tokens."""
    while embeds.shape[1] < length:
        embeds = torch.cat([embeds, empty.expand(embeds.shape[0], -1, -1)], dim=1)
    return embeds


def encode(
    pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts and negative prompts (same count) to (prompt_embeds, negative_embeds).

    Both are (len(prompts), L, dim) with one common L, a multiple of 77: shorter encodings are
    padded with the empty prompt's encoding, as A1111 does when it batches cond and uncond.
    """
    if len(prompts) != len(negatives):
        raise ValueError("encode() needs one negative prompt per prompt")
    cache: dict[str, torch.Tensor] = {}

    def one(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = encode_text(pipe, text, clip_skip)
        return cache[text]

    pos = [one(p) for p in prompts]
    neg = [one(n) for n in negatives]
    empty = one("")
    length = max(e.shape[1] for e in pos + neg)
    pos_t = torch.cat([pad_to_length(e, length, empty) for e in pos])
    neg_t = torch.cat([pad_to_length(e, length, empty) for e in neg])
    return pos_t, neg_t
