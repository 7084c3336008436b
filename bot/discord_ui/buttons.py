"""Persistent buttons: one DynamicItem class whose state lives in its custom_id.

custom_id: `pony:<action>:<job id>[:<image number>]`. Registered in `setup_hook`, so buttons on
messages posted before a restart keep working. The custom_id is untrusted input: the job is
looked up in the database and every action re-checks who may do it.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import discord

log = logging.getLogger(__name__)


class ButtonAction(enum.StrEnum):
    """What a job button does; the value is its part of the custom_id (never change one: buttons
    on messages posted long ago carry it)."""

    REROLL = "reroll"
    EDIT = "edit"
    UPSCALE = "up"
    VARIATION = "var"
    DELETE = "del"
    CANCEL = "cancel"


CUSTOM_ID_PREFIX = "pony:"
TEMPLATE = rf"pony:(?P<action>{'|'.join(ButtonAction)}):(?P<job>[0-9]{{1,18}})(?::(?P<index>[1-9]))?"

_STYLES = {
    ButtonAction.REROLL: discord.ButtonStyle.primary,
    ButtonAction.EDIT: discord.ButtonStyle.secondary,
    ButtonAction.UPSCALE: discord.ButtonStyle.secondary,
    ButtonAction.VARIATION: discord.ButtonStyle.secondary,
    ButtonAction.DELETE: discord.ButtonStyle.danger,
    ButtonAction.CANCEL: discord.ButtonStyle.danger,
}


def button_label(action: ButtonAction, index: int | None) -> str:
    """What the user sees on the button: Reroll, Edit, U1, V2, Delete, Cancel."""
    match action:
        case ButtonAction.REROLL:
            return "Reroll"
        case ButtonAction.EDIT:
            return "Edit"
        case ButtonAction.UPSCALE:
            return f"U{index}"
        case ButtonAction.VARIATION:
            return f"V{index}"
        case ButtonAction.DELETE:
            return "Delete"
        case ButtonAction.CANCEL:
            return "Cancel"


def custom_id(action: ButtonAction, job_id: int, index: int | None = None) -> str:
    """The custom_id for a button (<= 100 characters): `pony:<action>:<job id>[:<image number>]`."""
    return f"pony:{action.value}:{job_id}" + (f":{index}" if index is not None else "")


def parse_custom_id(value: str) -> tuple[ButtonAction, int, int | None] | None:
    """(action, job id, image number) or None when the id is not a valid ponybot button."""
    match = re.fullmatch(TEMPLATE, value)
    if match is None:
        return None
    index = match["index"]
    return ButtonAction(match["action"]), int(match["job"]), int(index) if index else None


def interaction_custom_id(interaction: discord.Interaction) -> str:
    """The custom_id of a pressed component or a submitted modal ("" for other interactions)."""
    data: Mapping[str, object] = interaction.data or {}
    return str(data.get("custom_id", ""))


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


@runtime_checkable
class JobButtonHandler(Protocol):
    """The client that answers job button presses (bot.discord_ui.client.PonyBot)."""

    async def job_button_pressed(self, interaction: discord.Interaction, button: JobButton) -> None:
        """Do what the pressed button says."""
        ...


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    """Reroll, Edit, U<n>, V<n>, Delete and Cancel on a job's message."""

    def __init__(
        self, action: ButtonAction, job_id: int, index: int | None = None, *, row: int | None = None
    ):
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
        return cls(ButtonAction(match["action"]), int(match["job"]), int(index) if index else None)

    async def callback(self, interaction: discord.Interaction) -> None:
        """Hand the press to the client (`JobButtonHandler`)."""
        client = interaction.client
        if isinstance(client, JobButtonHandler):
            await client.job_button_pressed(interaction, self)
        else:
            log.error("job button pressed on a client that can't answer it: %s", type(client).__name__)


def result_view(job_id: int, image_count: int, *, can_vary: bool = True) -> discord.ui.View:
    """Buttons under a result: [Reroll, Edit, Delete], [U1..Un], [V1..Vn] (upscales get Delete only).

    At most 3 rows of 4 buttons (count <= 4), within Discord's 5 x 5.
    """
    view = discord.ui.View(timeout=None)
    if can_vary:
        view.add_item(JobButton(ButtonAction.REROLL, job_id, row=0))
        view.add_item(JobButton(ButtonAction.EDIT, job_id, row=0))
    view.add_item(JobButton(ButtonAction.DELETE, job_id, row=0))
    if can_vary:
        for n in range(1, image_count + 1):
            view.add_item(JobButton(ButtonAction.UPSCALE, job_id, n, row=1))
        for n in range(1, image_count + 1):
            view.add_item(JobButton(ButtonAction.VARIATION, job_id, n, row=2))
    return view


def status_view(job_id: int) -> discord.ui.View:
    """The Cancel button under a status message."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton(ButtonAction.CANCEL, job_id))
    return view
