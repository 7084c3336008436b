"""Prompt hygiene: invisible characters, normalisation, escaping."""

from __future__ import annotations

import pytest

from bot.policy.text import clean_prompt, escape_for_discord, format_duration, normalize_for_matching


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


@pytest.mark.parametrize(
    ("seconds", "member_text"),
    [
        (None, "unknown"),
        (-3, "0 s"),
        (0.4, "0 s"),
        (12.4, "12 s"),
        (59.6, "1 min"),
        (80, "1 min 20 s"),
        (7322, "122 min 2 s"),
    ],
)
def test_format_duration_reads_as_an_estimate_for_members(seconds: float | None, member_text: str) -> None:
    assert format_duration(seconds) == member_text


@pytest.mark.parametrize(
    ("seconds", "table_text"),
    [
        (None, "n/a"),
        (0.04, "0.0 s"),
        (59.94, "59.9 s"),
        (61, "1 m 01 s"),
        (125, "2 m 05 s"),
        (7322, "2 h 02 m"),
    ],
)
def test_format_duration_precise_is_the_stats_table_style(seconds: float | None, table_text: str) -> None:
    assert format_duration(seconds, precise=True) == table_text
