"""Text hygiene for prompts: invisible characters, normalisation for matching, safe echoing."""

from __future__ import annotations

import re
import unicodedata

import discord

#: zero-width characters and bidirectional controls: invisible, used to dodge filters or flip text
INVISIBLE_CHARS = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f"
    "\u3164\ufeff\uffa0"
)
_INVISIBLE = re.compile(f"[{re.escape(INVISIBLE_CHARS)}]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Drop invisible and control characters and collapse whitespace (what the model gets)."""
    text = _CONTROL.sub(" ", _INVISIBLE.sub("", text))
    return _SPACES.sub(" ", text).strip()


def normalize_for_matching(text: str) -> str:
    """NFKC, case-folded, invisible characters removed, whitespace collapsed: for term filters."""
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
    text = _INVISIBLE.sub("", text).casefold()
    return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()


def escape_for_discord(text: str, limit: int) -> str:
    """Markdown and mentions escaped, capped at `limit` characters with an ellipsis."""
    text = clean_prompt(text)
    text = discord.utils.escape_mentions(discord.utils.escape_markdown(text))
    if len(text) > limit:
        text = text[: limit - 1].rstrip("\\") + "…"
    return text
