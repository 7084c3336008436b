"""Text for members: prompt hygiene (invisible characters, normalisation for matching), safe
echoing, and durations as members read them."""

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


def format_duration(seconds: float | None, *, precise: bool = False) -> str:
    """A duration for a message: `about`-style by default, table-style with `precise`.

    Default (what members read in queue ETAs and a result's Time): whole seconds and minutes,
    `12 s`, `2 min`, `1 min 20 s`; `unknown` for None. `precise` (the /pony-stats table): one
    decimal under a minute and fixed-width parts, `4.2 s`, `3 m 05 s`, `1 h 02 m`; `n/a` for None.
    """
    if seconds is None:
        return "n/a" if precise else "unknown"
    if precise:
        if seconds < 60:
            return f"{seconds:.1f} s"
        whole = round(seconds)
        if whole < 3600:
            return f"{whole // 60} m {whole % 60:02d} s"
        return f"{whole // 3600} h {whole % 3600 // 60:02d} m"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"
