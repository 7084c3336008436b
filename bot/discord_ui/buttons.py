"""Persistent buttons: one DynamicItem class whose state lives in its custom_id.

custom_id: `pony:<action>:<job id>[:<image number>]`. Registered in `setup_hook`, so buttons on
messages posted before a restart keep working. The custom_id is untrusted input: the job is
looked up in the database and every action re-checks who may do it.
"""

from __future__ import annotations

import re
from typing import Any

import discord

ACTIONS = ("reroll", "edit", "up", "var", "del", "cancel")
CUSTOM_ID_PREFIX = "pony:"
TEMPLATE = r"pony:(?P<action>reroll|edit|up|var|del|cancel):(?P<job>[0-9]{1,18})(?::(?P<index>[1-9]))?"

_STYLES = {
    "reroll": discord.ButtonStyle.primary,
    "edit": discord.ButtonStyle.secondary,
    "up": discord.ButtonStyle.secondary,
    "var": discord.ButtonStyle.secondary,
    "del": discord.ButtonStyle.danger,
    "cancel": discord.ButtonStyle.danger,
}


def button_label(action: str, index: int | None) -> str:
    """What the user sees on the button: Reroll, Edit, U1, V2, Delete, Cancel."""
    match action:
        case "reroll":
            return "Reroll"
        case "edit":
            return "Edit"
        case "up":
            return f"U{index}"
        case "var":
            return f"V{index}"
        case "del":
            return "Delete"
        case _:
            return "Cancel"


def custom_id(action: str, job_id: int, index: int | None = None) -> str:
    """The custom_id for a button (<= 100 characters)."""
    return f"pony:{action}:{job_id}" + (f":{index}" if index is not None else "")


def parse_custom_id(value: str) -> tuple[str, int, int | None] | None:
    """(action, job id, image number) or None when the id is not a valid ponybot button."""
    match = re.fullmatch(TEMPLATE, value)
    if match is None:
        return None
    index = match["index"]
    return match["action"], int(match["job"]), int(index) if index else None


def on_message(message: discord.Message | None, custom_id: str) -> bool:
    """True when the message carries a component with this custom_id (discord.py dispatches a
    DynamicItem only then; a forged press of a button that is not there gets no callback)."""
    if message is None:
        return False
    stack: list[object] = list(message.components)
    while stack:
        component = stack.pop()
        if getattr(component, "custom_id", None) == custom_id:
            return True
        stack.extend(getattr(component, "children", None) or [])
    return False


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    """Reroll, Edit, U<n>, V<n>, Delete and Cancel on a job's message."""

    def __init__(self, action: str, job_id: int, index: int | None = None, *, row: int | None = None):
        super().__init__(
            discord.ui.Button(
                label=button_label(action, index),
                style=_STYLES[action],
                custom_id=custom_id(action, job_id, index),
                row=row,
            )
        )
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        index = match["index"]
        return cls(match["action"], int(match["job"]), int(index) if index else None)

    async def callback(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        if self.action == "edit":  # answered with a modal, which can't follow a defer
            await interaction.client.images.open_edit(interaction, self.job_id)  # type: ignore[attr-defined]
            return
        await interaction.client.actions.on_button(  # type: ignore[attr-defined]
            interaction, self.action, self.job_id, self.index
        )


def result_view(job_id: int, image_count: int, *, can_vary: bool = True) -> discord.ui.View:
    """Buttons under a result: [Reroll, Edit, Delete], [U1..Un], [V1..Vn] (upscales get Delete only).

    At most 3 rows of 4 buttons (count <= 4), within Discord's 5 x 5.
    """
    view = discord.ui.View(timeout=None)
    if can_vary:
        view.add_item(JobButton("reroll", job_id, row=0))
        view.add_item(JobButton("edit", job_id, row=0))
    view.add_item(JobButton("del", job_id, row=0))
    if can_vary:
        for n in range(1, image_count + 1):
            view.add_item(JobButton("up", job_id, n, row=1))
        for n in range(1, image_count + 1):
            view.add_item(JobButton("var", job_id, n, row=2))
    return view


def status_view(job_id: int) -> discord.ui.View:
    """The Cancel button under a status message."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("cancel", job_id))
    return view
