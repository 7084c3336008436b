"""/pony-admin end to end: who may use it, status, pause/resume, cancel, purge, bans and the
per-guild settings that /pony then follows."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import is_result, job_messages, wait_until
from fake_discord import MANAGE_GUILD, FakeDiscord
from test_bad_input import answer, followup_text, job_total

from bot.discord_ui.commands.admin import NOT_ADMIN
from bot.policy.guard import BANNED, BLOCKED


async def admin(fake: FakeDiscord, subcommand: str, options: dict[str, Any] | None = None, **kw: Any) -> str:
    """Run /pony-admin <subcommand> as the admin (or `user=`); return the ephemeral answer."""
    kw.setdefault("user", fake.admin)
    interaction = await fake.slash("pony-admin", options or {}, subcommand=subcommand, **kw)
    return await followup_text(interaction)


async def test_only_server_managers_can_use_it(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    command = fake.find_command("pony-admin")
    assert command is not None and int(command["default_member_permissions"]) == MANAGE_GUILD
    assert {o["name"] for o in command["options"]} == {
        "status",
        "pause",
        "resume",
        "cancel",
        "purge",
        "ban",
        "unban",
        "settings",
        "channels",
        "blocked",
    }
    with pytest.raises(ValueError, match="cannot see /pony-admin"):
        await fake.slash("pony-admin", {}, subcommand="pause", user=fake.alice)
    # a client that sends it anyway is refused in code
    for user in (fake.alice, fake.mod):
        assert await admin(fake, "pause", user=user, validate=False) == NOT_ADMIN
    assert await admin(fake, "ban", {"user": fake.bob}, user=fake.alice, validate=False) == NOT_ADMIN
    assert not bot.worker.paused
    assert await bot.guard.store.ban_of(fake.guild_id, fake.bob.id) is None

    text = await admin(fake, "status")
    assert text.splitlines() == [
        "**ponybot status**",
        "Worker: idle",
        "Running: nothing",
        "Queue: 0 waiting, 0 running, 0 being posted",
        f"Model: {bot.engine.describe()}",
        "GPU: none in use (CPU)",
    ]
    assert (await admin(fake, "status", user=fake.owner)).startswith("**ponybot status**")


async def test_pause_resume_cancel_and_purge(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT=1)
    assert await admin(fake, "pause") == (
        "Paused: queued jobs wait (a running job finishes). Use /pony-admin resume to go on."
    )
    assert await admin(fake, "pause") == "The worker is already paused."
    for prompt in ("one", "two"):
        assert (await answer(fake, {"prompt": prompt})).startswith("Queued as job #")
    assert (await answer(fake, {"prompt": "bob's"}, user=fake.bob)).startswith("Queued as job #3:")
    await wait_until(lambda: len(job_messages(fake, 3)) == 1, 10, "status messages")
    assert "Queue: 3 waiting, 0 running" in await admin(fake, "status")

    assert await admin(fake, "cancel", {"job": 1}) == "Job #1 cancelled."
    assert await admin(fake, "cancel", {"job": 1}) == "Job #1 has already finished."
    assert await admin(fake, "cancel", {"job": 999}) == "There is no job #999 in this server."
    await wait_until(lambda: job_messages(fake, 1)[0].embeds[0]["title"] == "Cancelled", 10, "notice")

    assert await admin(fake, "purge", {"user": fake.alice}) == f"<@{fake.alice.id}>: cancelled 1 waiting job."
    assert (await bot.queue.get(2)).status == "cancelled"
    assert (await bot.queue.get(3)).status == "queued"

    assert await admin(fake, "resume") == "Resumed: queued jobs start again."
    assert await admin(fake, "resume") == "The worker isn't paused."
    await wait_until(lambda: is_result(job_messages(fake, 3)[0]), 60, "bob's job delivered")


async def test_ban_and_unban(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "mine"}, user=fake.bob)).startswith("Queued as job #1:")
    assert await admin(fake, "ban", {"user": fake.bob, "reason": "spam"}) == (
        f"Banned <@{fake.bob.id}> from ponybot here; cancelled 1 waiting job."
    )
    assert (await bot.queue.get(1)).status == "cancelled"
    assert await answer(fake, {"prompt": "again"}, user=fake.bob) == BANNED
    assert await job_total(bot) == 1
    assert await admin(fake, "ban", {"user": fake.bob}) == (
        f"<@{fake.bob.id}> was already banned; cancelled 0 waiting jobs."
    )
    assert await admin(fake, "ban", {"user": fake.admin}) == "You can't ban yourself."
    assert f"Banned: <@{fake.bob.id}>" in await admin(fake, "settings show")
    assert (await answer(fake, {"prompt": "alice is fine"})).startswith("Queued as job #2:")

    assert await admin(fake, "unban", {"user": fake.bob}) == f"Unbanned <@{fake.bob.id}>."
    assert await admin(fake, "unban", {"user": fake.bob}) == f"<@{fake.bob.id}> isn't banned."
    assert (await answer(fake, {"prompt": "back"}, user=fake.bob)).startswith("Queued as job #3:")


async def test_guild_settings_are_kept_and_applied(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    saved = await admin(
        fake,
        "settings set",
        {"default_steps": 2, "max_steps": 4, "max_open_jobs": 1, "cooldown": 0.0, "negative": "none"},
    )
    assert saved.startswith("Saved.\n**ponybot settings in this server**")
    for line in (
        "Default steps: 2 (server)",
        "Max steps: 4 (server)",
        "Max open jobs per member: 1 (server)",
    ):
        assert line in saved
    async with bot.queue.exclusive() as conn:
        rows = await conn.execute_fetchall("SELECT default_steps, max_steps FROM guild_settings")
    assert [tuple(r) for r in rows] == [(2, 4)], "kept in SQLite"

    assert await answer(fake, {"prompt": "x", "steps": 5}) == "Steps must be between 1 and 4."
    assert (await answer(fake, {"prompt": "x", "negative": "blurry"})).startswith("Queued as job #1:")
    job = await bot.queue.get(1)
    assert (job.params["steps"], job.params["negative"]) == (2, "blurry")
    capped = await answer(fake, {"prompt": "y"})
    assert capped.startswith("You already have 1 job waiting; wait for one to finish. Your next one")
    assert await job_total(bot) == 1

    assert await admin(fake, "settings set", {"default_steps": 5}) == (
        "Default steps (5) can't be above max steps (4)."
    )
    assert await admin(fake, "settings set", {"max_open_jobs": 0}, validate=False) == (
        "Max open jobs must be between 1 and 25."
    )
    assert await admin(fake, "settings set") == "Nothing to change: give at least one option."

    assert await admin(fake, "blocked add", {"term": "Ｄｒａ\u200bgon"}) == (
        "Blocked `dragon` outside age-restricted channels."
    )
    assert await answer(fake, {"prompt": "a d.r.a.g.o.n"}, user=fake.bob) == BLOCKED
    general = fake.channels[fake.channel_id]
    assert await admin(fake, "channels allow", {"channel": general}) == (
        f"ponybot now works only in: <#{fake.channel_id}>."
    )
    assert await answer(fake, {"prompt": "z"}, user=fake.bob, channel_id=fake.nsfw_channel_id) == (
        f"ponybot isn't enabled in this channel; use <#{fake.channel_id}>."
    )
    assert await job_total(bot) == 1
    shown = await admin(fake, "settings show")
    assert f"Allowed channels: <#{fake.channel_id}>" in shown and "Blocked terms (server): `dragon`" in shown

    assert (await admin(fake, "settings reset", {"setting": "everything"})).startswith("Reset everything.")
    assert (
        await answer(fake, {"prompt": "dragon"}, user=fake.bob, channel_id=fake.nsfw_channel_id)
    ).startswith("Queued as job #2:")
    job = await bot.queue.get(2)
    assert job.params["steps"] == bot.settings.default_steps
