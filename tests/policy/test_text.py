"""Prompt hygiene: invisible characters, normalisation, escaping."""

from __future__ import annotations

from bot.policy.text import clean_prompt, escape_for_discord, normalize_for_matching


def test_clean_prompt_drops_zero_width_and_bidi_controls() -> None:
    assert clean_prompt("a\u200b pony\u202e  in\u2066 space\ufeff") == "a pony in space"
    assert clean_prompt("\u200b\u200c \u200d") == ""


def test_normalize_for_matching_folds_lookalikes() -> None:
    assert normalize_for_matching("ＰＯＮＹ") == "pony"
    assert normalize_for_matching("Po\u200bNy") == "pony"
    assert normalize_for_matching("STRASSE") == normalize_for_matching("straße")


def test_escape_for_discord_escapes_markdown_and_mentions_and_caps() -> None:
    text = escape_for_discord("**bold** @everyone <@&123> `code`", 200)
    assert "\\*\\*bold\\*\\*" in text
    assert "@everyone" not in text
    assert "\\`code\\`" in text
    capped = escape_for_discord("x" * 50, 10)
    assert len(capped) == 10 and capped.endswith("…")
