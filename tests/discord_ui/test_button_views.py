"""The buttons under a job's message: rows, labels, custom_ids, and which presses are accepted."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot.discord_ui import buttons
from bot.discord_ui.buttons import on_message, parse_custom_id, result_view, status_view


def rows(view: discord.ui.View) -> list[list[tuple[str, str, int]]]:
    """What Discord receives for the view: per action row, (label, custom_id, style) of each button."""
    return [
        [(c["label"], c["custom_id"], c["style"]) for c in row["components"]] for row in view.to_components()
    ]


def labels(view: discord.ui.View) -> list[list[str]]:
    """The labels a member sees, row by row."""
    return [[label for label, _, _ in row] for row in rows(view)]


def message_with(view: discord.ui.View) -> Any:
    """A posted message carrying `view`'s components, as discord.py parses them back."""
    return SimpleNamespace(components=[discord.ActionRow(row) for row in view.to_components()])


def test_result_view_has_reroll_edit_delete_then_upscale_and_variation_rows() -> None:
    view = result_view(31, 4)
    assert labels(view) == [
        ["Reroll", "Edit", "Delete"],
        ["U1", "U2", "U3", "U4"],
        ["V1", "V2", "V3", "V4"],
    ]
    assert [[cid for _, cid, _ in row] for row in rows(view)] == [
        ["pony:reroll:31", "pony:edit:31", "pony:del:31"],
        ["pony:up:31:1", "pony:up:31:2", "pony:up:31:3", "pony:up:31:4"],
        ["pony:var:31:1", "pony:var:31:2", "pony:var:31:3", "pony:var:31:4"],
    ]
    styles = {label: style for row in rows(view) for label, _, style in row}
    assert styles["Reroll"] == discord.ButtonStyle.primary.value
    assert styles["Delete"] == discord.ButtonStyle.danger.value
    assert styles["U1"] == styles["V4"] == styles["Edit"] == discord.ButtonStyle.secondary.value
    assert view.timeout is None  # persistent: still works after a restart


def test_result_view_for_one_image() -> None:
    assert labels(result_view(2, 1)) == [["Reroll", "Edit", "Delete"], ["U1"], ["V1"]]


def test_upscale_results_get_delete_only() -> None:
    view = result_view(9, 1, can_vary=False)
    assert rows(view) == [[("Delete", "pony:del:9", discord.ButtonStyle.danger.value)]]


def test_status_view_has_cancel() -> None:
    view = status_view(5)
    assert rows(view) == [[("Cancel", "pony:cancel:5", discord.ButtonStyle.danger.value)]]
    assert view.timeout is None


@pytest.mark.parametrize("view", [result_view(123456789012345678, 4), status_view(77)])
def test_every_custom_id_round_trips_through_parse_custom_id(view: discord.ui.View) -> None:
    for row in rows(view):
        for label, cid, _ in row:
            assert cid.startswith(buttons.CUSTOM_ID_PREFIX) and len(cid) <= 100
            parsed = parse_custom_id(cid)
            assert parsed is not None, cid
            action, job_id, index = parsed
            assert buttons.custom_id(action, job_id, index) == cid
            assert buttons.button_label(action, index) == label


def test_parse_custom_id_reads_action_job_and_image_number() -> None:
    assert parse_custom_id("pony:up:42:3") == ("up", 42, 3)
    assert parse_custom_id("pony:var:1:9") == ("var", 1, 9)
    assert parse_custom_id("pony:del:42") == ("del", 42, None)
    assert parse_custom_id("pony:cancel:999999999999999999") == ("cancel", 999999999999999999, None)


@pytest.mark.parametrize(
    "forged",
    [
        "",
        "pony:",
        "pony:reroll",
        "pony:reroll:",
        "pony:nuke:1",
        "pony:REROLL:1",
        "pony:up:1:0",  # image numbers start at 1
        "pony:up:1:10",  # at most 9
        "pony:up:1:",
        "pony:del:1:2:3",
        "pony:reroll:-1",
        "pony:reroll:1e3",
        "pony:reroll:1234567890123456789",  # 19 digits: longer than any snowflake
        "pony:reroll:1 ",
        " pony:reroll:1",
        "pony:reroll:1\n",
        "xpony:reroll:1",
        "ponyreroll:1",
        "pony:reroll:١٢",  # Arabic-Indic digits are not ASCII digits
        "other:reroll:1",
    ],
)
def test_malformed_or_forged_custom_ids_are_rejected(forged: str) -> None:
    assert parse_custom_id(forged) is None


def test_on_message_accepts_only_custom_ids_that_are_on_the_message() -> None:
    message = message_with(result_view(8, 2))
    for cid in ("pony:reroll:8", "pony:edit:8", "pony:del:8", "pony:up:8:2", "pony:var:8:1"):
        assert on_message(message, cid), cid
    # well-formed, but not on this message: another job, a third image, a Cancel never shown
    for cid in ("pony:reroll:9", "pony:up:8:3", "pony:cancel:8", "pony:del:80"):
        assert not on_message(message, cid), cid


def test_on_message_refuses_variations_on_an_upscale_and_presses_without_a_message() -> None:
    upscale = message_with(result_view(4, 1, can_vary=False))
    assert on_message(upscale, "pony:del:4")
    assert not on_message(upscale, "pony:var:4:1")
    assert not on_message(upscale, "pony:reroll:4")
    assert not on_message(message_with(status_view(4)), "pony:del:4")
    assert not on_message(None, "pony:del:4")
    assert not on_message(SimpleNamespace(components=[]), "pony:del:4")
