"""The one way ponybot answers an interaction privately."""

from __future__ import annotations

import logging
from typing import Any

import discord

log = logging.getLogger(__name__)

#: Discord's limit on a message's content
MAX_CONTENT = 2000


async def tell(interaction: discord.Interaction, text: str, **kwargs: Any) -> None:
    """Answer ephemerally (cut to 2000 characters): a followup once the interaction was answered or
    deferred, else the response itself. A Discord error is logged, never raised.

    `kwargs` go to `send` as they are (`embed`, `view`, `file`, ...).
    """
    content = text[:MAX_CONTENT]
    try:
        if interaction.response.is_done():
            await interaction.followup.send(content, ephemeral=True, **kwargs)
        else:
            await interaction.response.send_message(content, ephemeral=True, **kwargs)
    except discord.HTTPException as exc:
        command = interaction.command
        what = f"/{command.qualified_name}" if command is not None else "interaction"
        log.warning("could not answer %s: %s", what, exc)
