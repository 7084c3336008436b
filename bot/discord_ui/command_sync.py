"""Slash-command registration and sync: send the command schema to Discord only when it changed.

`add_commands` puts every ponybot command on a `CommandTree`, bound to the bot's `Services`.
`sync_commands` hashes the payload that `CommandTree.sync` would send (the same `to_dict` per
command, translated when the tree has a translator) and compares it with the hash stored in
`app_state` after the last successful sync of the same application and scope (global, or one
guild); only a changed schema (or `force=True`: `ponybot sync`, `bot.app.sync_now`) is sent. A
sync that Discord refuses raises `CommandSyncRefused` with one line that names the command and
the field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands

from bot.discord_ui.commands.admin import admin_group
from bot.discord_ui.commands.info import info_commands
from bot.discord_ui.commands.member import member_commands
from bot.discord_ui.commands.pony import pony_command
from bot.discord_ui.member_images import recreate_command
from bot.discord_ui.services import Services
from bot.jobs.app_state import AppState

__all__ = [
    "CommandSyncRefused",
    "SyncResult",
    "add_commands",
    "command_payload",
    "describe_sync_failure",
    "schema_hash",
    "sync_commands",
    "sync_key",
]


class CommandSyncRefused(Exception):
    """Discord refused the command schema (400, 50035); `str()` is one line for the operator."""


@dataclass(frozen=True)
class SyncResult:
    """What `sync_commands` did."""

    synced: bool  # False: the schema was unchanged, nothing was sent
    count: int  # commands in the schema
    where: str  # "globally" or "to guild <id>"


def add_commands(tree: app_commands.CommandTree, services: Services) -> discord.Object | None:
    """Add every ponybot command to `tree`, served by `services`; returns the guild to sync to
    (DISCORD_GUILD_ID), if any, after copying the global commands to it."""
    settings = services.settings
    tree.add_command(pony_command(settings, services.actions))
    tree.add_command(recreate_command(services.member_images))  # message command: Re-create with ponybot
    tree.add_command(admin_group(services))
    for command in [*member_commands(services), *info_commands(settings, services.queue)]:
        tree.add_command(command)
    if not settings.discord_guild_id:
        return None
    guild = discord.Object(id=settings.discord_guild_id)
    tree.copy_global_to(guild=guild)
    return guild


async def command_payload(tree: app_commands.CommandTree, guild: discord.abc.Snowflake | None) -> list[Any]:
    """The JSON that `tree.sync(guild=guild)` sends (see discord.py's `CommandTree.sync`)."""
    commands = tree.get_commands(guild=guild)
    if tree.translator:
        return [await command.get_translated_payload(tree, tree.translator) for command in commands]
    return [command.to_dict(tree) for command in commands]


def schema_hash(payload: list[Any]) -> str:
    """A stable hash of a command payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sync_key(application_id: int, guild_id: int | None) -> str:
    """The `app_state` key of the last synced schema for one application and scope."""
    return f"commands_synced:{application_id}:" + (f"guild:{guild_id}" if guild_id else "global")


def _where(guild_id: int | None) -> str:
    return f"to guild {guild_id}" if guild_id else "globally"


async def sync_commands(
    tree: app_commands.CommandTree,
    state: AppState,
    *,
    application_id: int,
    guild: discord.abc.Snowflake | None = None,
    force: bool = False,
) -> SyncResult:
    """Sync `tree`'s commands for `guild` (None: global) unless the schema is the one last synced.

    Raises `CommandSyncRefused` when Discord refuses the schema, `discord.HTTPException` otherwise.
    """
    guild_id = guild.id if guild is not None else None
    payload = await command_payload(tree, guild)
    digest = schema_hash(payload)
    key = sync_key(application_id, guild_id)
    if not force and await state.get(key) == digest:
        return SyncResult(False, len(payload), _where(guild_id))
    try:
        synced = await tree.sync(guild=guild)
    except app_commands.CommandSyncFailure as exc:
        raise CommandSyncRefused(describe_sync_failure(exc, payload)) from None
    await state.set(key, digest)
    return SyncResult(True, len(synced), _where(guild_id))


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """(path, message) of every `_errors` list in a Discord form-error tree."""
    if not isinstance(node, dict):
        return [(path, str(node))]
    found: list[tuple[tuple[str, ...], str]] = []
    for key, value in node.items():
        if key == "_errors" and isinstance(value, list):
            text = " ".join(
                str(e.get("message") or e.get("code") or "") for e in value if isinstance(e, dict)
            )
            found.append((path, text.strip().rstrip(".")))
        else:
            found.extend(_leaves(value, (*path, str(key))))
    return found


def _option_names(command: Any, path: tuple[str, ...]) -> list[str]:
    """The names of the (nested) options that an `options.N...` path goes through."""
    names: list[str] = []
    node = command
    for first, second in itertools.pairwise(path):
        if first != "options" or not second.isdigit() or not isinstance(node, dict):
            continue
        options = node.get("options") or []
        if int(second) >= len(options):
            break
        node = options[int(second)]
        names.append(str(node.get("name")))
    return names


def describe_sync_failure(exc: discord.HTTPException, payload: list[Any]) -> str:
    """One line naming each refused command and field, e.g. ``/pony-info: options.0.max_value
    (option job): int value should be less than or equal to 9007199254740991``."""
    errors: Any = getattr(exc, "_errors", None) or {}
    parts: list[str] = []
    for path, message in _leaves(errors):
        if path and path[0].isdigit() and int(path[0]) < len(payload):
            command = payload[int(path[0])]
            field = ".".join(path[1:]) or "(the command)"
            names = _option_names(command, path[1:])
            option = f" (option {' '.join(names)})" if names else ""
            parts.append(f"/{command.get('name')}: {field}{option}: {message}")
        else:
            parts.append(f"{'.'.join(path) or 'commands'}: {message}")
    detail = "; ".join(parts) or exc.text or "no details"
    line = f"Discord refused the slash commands (HTTP {exc.status}, code {exc.code}): {detail}"
    return " ".join(line.split())
