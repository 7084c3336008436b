"""The channel permissions ponybot needs, and how to say which are missing."""

from __future__ import annotations

import discord

#: (attribute on discord.Permissions, name as Discord's UI shows it)
REQUIRED: tuple[tuple[str, str], ...] = (
    ("view_channel", "View Channel"),
    ("send_messages", "Send Messages"),
    ("attach_files", "Attach Files"),
    ("embed_links", "Embed Links"),
    ("read_message_history", "Read Message History"),
)


def required_permissions() -> discord.Permissions:
    """The bitfield to put in the invite URL."""
    return discord.Permissions(**{attr: True for attr, _ in REQUIRED})


def missing_permissions(perms: discord.Permissions) -> list[str]:
    """Names of required permissions that `perms` lacks, as Discord's UI shows them."""
    return [label for attr, label in REQUIRED if not getattr(perms, attr)]


def invite_url(application_id: int) -> str:
    """The OAuth2 URL that adds the bot with the `bot` and `applications.commands` scopes."""
    return (
        "https://discord.com/oauth2/authorize"
        f"?client_id={application_id}&scope=bot%20applications.commands"
        f"&permissions={required_permissions().value}"
    )
