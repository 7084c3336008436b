"""Slash-command sync: only a changed schema is sent; `ponybot sync` always sends it; a sync or login
that Discord refuses ends `ponybot run` with one line and a non-zero exit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import discord
import pytest
from conftest import PONYBOT_SCRIPT, bot_env
from discord import app_commands
from fake_discord import FakeDiscord

from bot.discord_ui.command_sync import CommandSyncRefused, sync_commands
from bot.jobs.app_state import AppState
from bot.jobs.models import QueueLimits
from bot.jobs.queue import JobQueue

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_PUT = r"^/applications/\d+/commands/?$"
GUILD_PUT = r"^/applications/\d+/guilds/\d+/commands/?$"


def cli_env(fake: FakeDiscord, tmp_path: Path, model: Path, **extra: Any) -> dict[str, str]:
    """This machine's environment minus ponybot settings, plus the test bot's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PONY_", "DISCORD_"))}
    python_path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
    return {**base, **bot_env(fake, tmp_path / "data", model, **extra), "PYTHONPATH": python_path}


async def ponybot(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    """Run the console script; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(PONYBOT_SCRIPT),
        *args,
        env=env,
        cwd=cwd,  # no stray .env from the repository
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


def command_puts(fake: FakeDiscord) -> int:
    return len(fake.requests_matching("PUT", GLOBAL_PUT)) + len(fake.requests_matching("PUT", GUILD_PUT))


async def test_unchanged_schema_is_not_synced_again(
    discord_server: FakeDiscord, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    await start_bot(wait_model=False)
    assert command_puts(fake) == 1
    names = sorted(c["name"] for c in fake.commands)
    await start_bot.runners[0].stop()  # type: ignore[attr-defined]

    await start_bot(wait_model=False)  # same database, same schema
    assert command_puts(fake) == 1
    assert sorted(c["name"] for c in fake.commands) == names
    interaction = await fake.slash("pony-about")  # the commands Discord kept still work
    assert (await interaction.wait_response(timeout=10)).ephemeral


async def test_changed_schema_is_synced(discord_server: FakeDiscord, start_bot: Callable[..., Any]) -> None:
    fake = discord_server
    await start_bot(wait_model=False, PONY_MAX_STEPS="50")
    await start_bot.runners[0].stop()  # type: ignore[attr-defined]
    await start_bot(wait_model=False, PONY_MAX_STEPS="40")  # /pony's steps option now tops out at 40
    assert command_puts(fake) == 2
    pony = fake.find_command("pony")
    assert pony is not None
    [steps] = [o for o in pony["options"] if o["name"] == "steps"]
    assert steps["max_value"] == 40
    await start_bot.runners[1].stop()  # type: ignore[attr-defined]

    # a guild scope is its own key: the first guild sync is sent even though the schema is known
    await start_bot(wait_model=False, PONY_MAX_STEPS="40", DISCORD_GUILD_ID=str(fake.guild_id))
    assert len(fake.requests_matching("PUT", GUILD_PUT)) == 1


async def test_ponybot_sync_always_syncs_over_rest_only(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    env = cli_env(fake, tmp_path, tiny_model)
    for expected_puts in (1, 2):
        rc, out, err = await ponybot("sync", env=env, cwd=tmp_path)
        assert rc == 0, err
        assert out == f"synced {len(fake.commands)} slash commands globally\n"
        assert command_puts(fake) == expected_puts
    assert fake.identify_count == 0  # no gateway
    assert "Traceback" not in err

    await start_bot(wait_model=False)  # `ponybot sync` stored the schema: `run` does not send it again
    assert command_puts(fake) == 2

    guild_env = cli_env(fake, tmp_path, tiny_model, DISCORD_GUILD_ID=str(fake.guild_id))
    rc, out, err = await ponybot("sync", env=guild_env, cwd=tmp_path)
    assert rc == 0, err
    assert (
        out == f"synced {len(fake.guild_commands[fake.guild_id])} slash commands to guild {fake.guild_id}\n"
    )
    assert len(fake.requests_matching("PUT", GUILD_PUT)) == 1


async def test_refused_sync_ends_run_with_one_line(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    error = {
        "_errors": [{"code": "NUMBER_TYPE_MAX", "message": "int value should be less than or equal to 9."}]
    }
    fake.fail_next(
        "PUT",
        GLOBAL_PUT,
        400,
        body={
            "code": 50035,
            "message": "Invalid Form Body",
            "errors": {"0": {"options": {"2": {"max_value": error}}}},
        },
    )
    rc, out, err = await ponybot("run", env=cli_env(fake, tmp_path, tiny_model), cwd=tmp_path)
    assert rc == 3
    assert "Traceback" not in err + out
    refused = [line for line in err.splitlines() if "refused" in line]
    assert refused == [
        "Discord refused the slash commands (HTTP 400, code 50035): /pony: options.2.max_value (option seed):"
        " int value should be less than or equal to 9. Nothing was synced; fix that command's definition."
    ]
    assert err.splitlines()[-1] == refused[0]
    assert fake.commands == []


async def test_wrong_api_base_ends_run_with_one_line(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    base = f"{fake.api_base}/nope"  # answers 404 to GET /users/@me
    rc, out, err = await ponybot(
        "run", env=cli_env(fake, tmp_path, tiny_model, DISCORD_API_BASE=base), cwd=tmp_path
    )
    assert rc == 3
    assert "Traceback" not in err + out
    assert err.splitlines()[-1] == (
        f"Discord at {base} answered HTTP 404 to GET /nope/api/v10/users/@me (code 0: 404: Not Found)."
        " Check DISCORD_API_BASE (leave it unset for discord.com)."
    )
    assert fake.identify_count == 0


async def test_a_bad_command_is_refused_naming_command_and_field(
    discord_server: FakeDiscord, tmp_path: Path
) -> None:
    """The spec check of the loopback Discord refuses it, as Discord does; nothing is remembered."""
    fake = discord_server
    client = discord.Client(intents=discord.Intents.none())
    tree: app_commands.CommandTree = app_commands.CommandTree(client)

    @tree.command(description="Pick a number")
    async def pick(interaction: discord.Interaction, n: app_commands.Range[int, 1, 2**53]) -> None:
        raise AssertionError("never called")

    queue = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits())
    try:
        with fake.patch_discord_py():
            async with client:
                await client.login(fake.bot_token)
                with pytest.raises(CommandSyncRefused) as caught:
                    await sync_commands(tree, AppState(queue), application_id=fake.application_id)
        assert str(caught.value) == (
            "Discord refused the slash commands (HTTP 400, code 50035): /pick: options.0.max_value (option n):"
            " 9007199254740992 is greater than the maximum of 9007199254740991"
        )
        assert await AppState(queue).get(f"commands_synced:{fake.application_id}:global") is None
    finally:
        await queue.close()
    assert [v.dotted for v in fake.spec_violations] == ["0.options.0.max_value"]
    fake.spec_violations.clear()  # expected here
