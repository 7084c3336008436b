"""/pony-admin through the running bot, for what tests/e2e/test_admin.py leaves open: the status
lines while a job runs and while a pause waits for it, cancelling a running and a finished job,
purge and ban counts with a running job, the settings text and rows, the channel and blocked-term
lists, refusals to members without Manage Server and out-of-range values that change nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from loopback_harness import FakeDiscord, job_messages, slow_down_generation, wait_for_status, wait_until

from bot.discord_ui.commands.admin import NOT_ADMIN, RESETTABLE
from bot.discord_ui.services import Services
from bot.policy.guard import BANNED
from bot.runtime.worker import WorkerState
from generator.params import MAX_COUNT, MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from fake_discord import FakeUser

pytestmark = pytest.mark.usefixtures("loopback")

#: seconds each generation step sleeps in the tests that act while a job runs
STEP_S = 0.4


async def admin(fake: FakeDiscord, subcommand: str, options: dict[str, Any] | None = None, **kw: Any) -> str:
    """Run /pony-admin <subcommand> as the admin (or `user=`); the ephemeral answer's text."""
    kw.setdefault("user", fake.admin)
    interaction = await fake.slash("pony-admin", options or {}, subcommand=subcommand, **kw)
    response = await interaction.wait_response()
    assert response.type == 5 and response.ephemeral, "deferred, only the admin sees it"
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral and interaction.errors == [], reply.content
    return reply.content


async def pony(fake: FakeDiscord, prompt: str, user: FakeUser | None = None, **options: Any) -> str:
    """Run /pony (one image, unless `count=`; `count=None` sends none); the ephemeral answer's text."""
    sent = {k: v for k, v in {"prompt": prompt, "count": 1, **options}.items() if v is not None}
    interaction = await fake.slash("pony", sent, user=user or fake.alice)
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral and interaction.errors == [], reply.content
    return reply.content


async def wait_running(bot: Services, job_id: int) -> None:
    """Wait until the worker is generating `job_id`."""
    await wait_until(lambda: bot.worker.current_job_ids == [job_id], 10, f"job #{job_id} generating")


async def guild_row(bot: Services) -> tuple[Any, ...] | None:
    """The guild's `guild_settings` row (every column), or None."""
    async with bot.queue.exclusive() as conn:
        rows = list(await conn.execute_fetchall("SELECT * FROM guild_settings"))
    assert len(rows) <= 1
    return tuple(rows[0]) if rows else None


async def guild_values(bot: Services, *columns: str) -> tuple[Any, ...] | None:
    """Some columns of the guild's `guild_settings` row, or None when it has none."""
    async with bot.queue.exclusive() as conn:
        rows = list(await conn.execute_fetchall(f"SELECT {', '.join(columns)} FROM guild_settings"))
    return tuple(rows[0]) if rows else None


def status_lines(text: str) -> dict[str, str]:
    """`/pony-admin status` as {label: value} ("Worker" -> "idle")."""
    lines = text.splitlines()
    assert lines[0] == "**ponybot status**"
    return dict(line.split(": ", 1) for line in lines[1:])


def hold_generation(bot: Services) -> threading.Event:
    """Make every generation wait (in the GPU thread) until the returned event is set."""
    release = threading.Event()
    generator = bot.engine.generator

    def held(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            release.wait(20)
            return original(*args, **kwargs)

        return call

    for name in ("txt2img", "txt2img_batch"):
        setattr(generator, name, held(getattr(generator, name)))
    return release


async def test_status_while_a_job_runs_and_while_a_pause_waits_for_it(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    release = hold_generation(bot)
    try:
        assert (await pony(fake, "one")).startswith("Queued as job #1:")
        await wait_running(bot, 1)
        shown = status_lines(await admin(fake, "status"))
        assert (shown["Worker"], shown["Running"]) == ("generating", "#1")
        assert shown["Queue"] == "0 waiting, 1 running, 0 being posted"
        assert shown["Model"] == bot.engine.describe() and shown["GPU"] == "none in use (CPU)"

        assert (await admin(fake, "pause")).startswith("Paused: queued jobs wait (a running job finishes).")
        assert (await pony(fake, "two")).startswith("Queued as job #2:")
        shown = status_lines(await admin(fake, "status"))
        assert shown["Worker"] == "generating (paused)", "the running job goes on"
        assert shown["Queue"] == "1 waiting, 1 running, 0 being posted"
    finally:
        release.set()

    await wait_for_status(bot, 1, "done", 20)
    await wait_until(lambda: bot.worker.state is WorkerState.PAUSED, 5, "worker paused")
    shown = status_lines(await admin(fake, "status"))
    assert (shown["Worker"], shown["Running"]) == ("paused", "nothing")
    assert shown["Queue"] == "1 waiting, 0 running, 0 being posted"
    waiting = await bot.queue.get(2)
    assert waiting is not None and waiting.status == "queued" and waiting.started_at is None

    assert await admin(fake, "resume") == "Resumed: queued jobs start again."
    await wait_for_status(bot, 2, "done", 20)
    assert status_lines(await admin(fake, "status"))["Worker"] == "idle"


async def test_cancel_of_a_running_job_and_of_a_finished_one(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    assert (await pony(fake, "quick", user=fake.bob)).startswith("Queued as job #1:")
    await wait_for_status(bot, 1, "done", 20)
    slow_down_generation(bot, STEP_S)
    assert (await pony(fake, "slow", user=fake.bob, steps=8)).startswith("Queued as job #2:")
    await wait_running(bot, 2)

    assert await admin(fake, "cancel", {"job": 2}) == "Stopping job #2…"
    await wait_for_status(bot, 2, "cancelled", 10)
    await wait_until(lambda: job_messages(fake, 2)[0].embeds[0]["title"] == "Cancelled", 10, "notice")
    assert await admin(fake, "cancel", {"job": 2}) == "Job #2 has already finished."

    assert await admin(fake, "cancel", {"job": 1}) == "Job #1 has already finished."
    done = await bot.queue.get(1)
    assert done is not None and done.status == "done" and not done.cancel_requested, "left alone"
    assert await admin(fake, "cancel", {"job": 0}, validate=False) == "There is no job #0 in this server."


async def test_purge_counts_waiting_and_running_jobs_of_that_member_only(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MAX_OPEN_JOBS_PER_USER=5)
    slow_down_generation(bot, STEP_S)
    assert (await pony(fake, "a1", steps=8)).startswith("Queued as job #1:")
    await wait_running(bot, 1)
    bot.worker.pause()
    for prompt in ("a2", "a3"):
        assert (await pony(fake, prompt)).startswith("Queued as job #")
    assert (await pony(fake, "b1", user=fake.bob)).startswith("Queued as job #4:")

    assert await admin(fake, "purge", {"user": fake.alice}) == (
        f"<@{fake.alice.id}>: cancelled 2 waiting jobs and stopping 1 running."
    )
    await wait_for_status(bot, 1, "cancelled", 10)
    assert [(await bot.queue.get(i)).status for i in (2, 3, 4)] == ["cancelled", "cancelled", "queued"]  # type: ignore[union-attr]
    assert (
        await admin(fake, "purge", {"user": fake.alice}) == f"<@{fake.alice.id}>: cancelled 0 waiting jobs."
    )
    assert (await bot.queue.get(4)).status == "queued"  # type: ignore[union-attr]


async def test_ban_stops_a_running_job_and_keeps_the_reason(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    slow_down_generation(bot, STEP_S)
    assert (await pony(fake, "mine", user=fake.bob, steps=8)).startswith("Queued as job #1:")
    await wait_running(bot, 1)

    assert await admin(fake, "ban", {"user": fake.bob, "reason": "spam"}) == (
        f"Banned <@{fake.bob.id}> from ponybot here; cancelled 0 waiting jobs and stopping 1 running."
    )
    await wait_for_status(bot, 1, "cancelled", 10)
    async with bot.queue.exclusive() as conn:
        rows = await conn.execute_fetchall("SELECT guild_id, user_id, reason, banned_by FROM bans")
    assert [tuple(r) for r in rows] == [(fake.guild_id, fake.bob.id, "spam", fake.admin.id)]
    assert await pony(fake, "again", user=fake.bob) == BANNED
    assert await bot.queue.get(2) is None, "no job for a banned member"

    assert await admin(fake, "unban", {"user": fake.bob}) == f"Unbanned <@{fake.bob.id}>."
    assert "Banned: nobody" in (await admin(fake, "settings show")).splitlines()
    async with bot.queue.exclusive() as conn:
        assert list(await conn.execute_fetchall("SELECT * FROM bans")) == []
    assert (await pony(fake, "back", user=fake.bob)).startswith("Queued as job #2:")


async def test_settings_show_set_and_reset(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(
        wait_model=False,
        PONY_DEFAULT_NEGATIVE="blurry",
        PONY_NSFW_DEFAULT_NEGATIVE="lowres",
        PONY_BLOCKED_TERMS="dragon, griffin",
    )
    bot.worker.pause()
    max_steps, max_open = bot.settings.max_steps, bot.settings.max_open_jobs_per_user
    assert (await admin(fake, "settings show")).splitlines() == [
        "**ponybot settings in this server**",
        "Default steps: 3",
        "Default count: 2",
        f"Max steps: {max_steps}",
        f"Max open jobs per member: {max_open}",
        "Cooldown: 0 s",
        "Negative: blurry",
        "NSFW negative: lowres",
        "Allowed channels: all channels",
        "Blocked terms (server): none; global: 2",
        "Banned: nobody",
    ]
    assert await guild_row(bot) is None, "showing writes nothing"

    saved = await admin(
        fake,
        "settings set",
        {"default_count": 4, "cooldown": 2.5, "negative": "none", "nsfw_negative": "  sketch  "},
    )
    lines = saved.splitlines()
    assert lines[:2] == ["Saved.", "**ponybot settings in this server**"]
    assert lines[2:9] == [
        "Default steps: 3",
        "Default count: 4 (server)",
        f"Max steps: {max_steps}",
        f"Max open jobs per member: {max_open}",
        "Cooldown: 2.5 s (server)",
        "Negative: (none) (server)",
        "NSFW negative: sketch (server)",
    ]
    columns = ("default_count", "cooldown_s", "default_negative", "nsfw_default_negative", "updated_by")
    assert await guild_values(bot, *columns) == (4, 2.5, "", "sketch", fake.admin.id)
    assert (await admin(fake, "settings show")).splitlines() == lines[1:], "show says what set saved"

    assert (await pony(fake, "counted", count=None)).startswith("Queued as job #1:")
    assert (await bot.queue.get(1)).params["count"] == 4  # type: ignore[union-attr]

    reset = (await admin(fake, "settings reset", {"setting": "cooldown"})).splitlines()
    assert reset[0] == "Reset cooldown." and "Cooldown: 0 s" in reset and "Default count: 4 (server)" in reset
    assert await guild_values(bot, *columns[:4]) == (4, None, "", "sketch")
    reset = (await admin(fake, "settings reset", {"setting": "everything"})).splitlines()
    assert reset[0] == "Reset everything." and "Default count: 2" in reset
    assert await guild_row(bot) is None


async def test_channel_and_blocked_term_lists(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False)
    general, nsfw = fake.channels[fake.channel_id], fake.channels[fake.nsfw_channel_id]
    both = f"ponybot now works only in: <#{general.id}>, <#{nsfw.id}>."
    assert (
        await admin(fake, "channels allow", {"channel": general})
        == f"ponybot now works only in: <#{general.id}>."
    )
    assert await admin(fake, "channels allow", {"channel": nsfw}) == both
    assert await admin(fake, "channels allow", {"channel": general}) == both, "listed once"
    assert await guild_values(bot, "allowed_channels") == (f"[{general.id},{nsfw.id}]",)
    assert (
        await admin(fake, "channels disallow", {"channel": general})
        == f"ponybot now works only in: <#{nsfw.id}>."
    )
    assert await admin(fake, "channels disallow", {"channel": nsfw}) == (
        "No channels are listed: ponybot works in every channel."
    )
    await admin(fake, "channels allow", {"channel": general})
    assert await admin(fake, "channels clear") == "ponybot works in every channel again."
    assert "Allowed channels: all channels" in (await admin(fake, "settings show")).splitlines()

    assert (
        await admin(fake, "blocked add", {"term": "Dragon"})
        == "Blocked `dragon` outside age-restricted channels."
    )
    assert (
        await admin(fake, "blocked add", {"term": "DRAGON"})
        == "Blocked `dragon` outside age-restricted channels."
    )
    assert await admin(fake, "blocked add", {"term": "sea  pony!"}) == (
        "Blocked `sea pony` outside age-restricted channels."
    )
    assert await guild_values(bot, "blocked_terms") == ('["dragon","sea pony"]',)
    assert (
        await admin(fake, "blocked remove", {"term": "unicorn"}) == "`unicorn` isn't blocked in this server."
    )
    assert await admin(fake, "blocked remove", {"term": "Dragon"}) == "Unblocked `dragon`."
    assert (
        "Blocked terms (server): `sea pony`; global: 0" in (await admin(fake, "settings show")).splitlines()
    )
    assert await admin(fake, "blocked clear") == (
        "Removed all of this server's blocked terms (global ones still apply)."
    )
    assert await guild_values(bot, "blocked_terms") == (None,)


async def test_members_without_manage_server_are_refused_and_nothing_changes(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False)
    bot.worker.pause()
    assert (await pony(fake, "mine")).startswith("Queued as job #1:")
    general = fake.channels[fake.channel_id]
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("status", {}),
        ("resume", {}),
        ("cancel", {"job": 1}),
        ("purge", {"user": fake.alice}),
        ("unban", {"user": fake.bob}),
        ("settings show", {}),
        ("settings set", {"max_steps": 2}),
        ("settings reset", {"setting": "everything"}),
        ("channels allow", {"channel": general}),
        ("blocked add", {"term": "pony"}),
        ("blocked clear", {}),
    ]
    for subcommand, options in attempts:
        for user in (fake.mod, fake.alice):
            answer = await admin(fake, subcommand, options, user=user, validate=False)
            assert answer == NOT_ADMIN, (subcommand, user.username, answer)
    assert bot.worker.paused
    job = await bot.queue.get(1)
    assert job is not None and job.status == "queued" and not job.cancel_requested
    assert await guild_row(bot) is None
    assert (await pony(fake, "still me")).startswith("Queued as job #2:"), "/pony itself is for everyone"


async def test_out_of_range_values_get_a_short_answer_and_change_nothing(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False)
    limit = bot.settings.max_steps
    assert (await admin(fake, "settings set", {"max_steps": 4, "default_count": 3})).startswith("Saved.")
    before = await guild_row(bot)
    assert before is not None

    steps_range = f"must be between 1 and {limit}."
    too_long = "x" * (MAX_PROMPT_CHARS + 1)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("settings set", {"default_steps": 0}, f"Default steps {steps_range}"),
        ("settings set", {"default_steps": limit + 1}, f"Default steps {steps_range}"),
        ("settings set", {"max_steps": 0}, f"Max steps {steps_range}"),
        ("settings set", {"max_steps": limit + 1}, f"Max steps {steps_range}"),
        ("settings set", {"default_count": 0}, f"Default count must be between 1 and {MAX_COUNT}."),
        (
            "settings set",
            {"default_count": MAX_COUNT + 1},
            f"Default count must be between 1 and {MAX_COUNT}.",
        ),
        ("settings set", {"max_open_jobs": 26}, "Max open jobs must be between 1 and 25."),
        ("settings set", {"cooldown": -1.0}, "Cooldown must be between 0 and 3600."),
        ("settings set", {"cooldown": 3600.5}, "Cooldown must be between 0 and 3600."),
        ("settings set", {"default_count": 2, "cooldown": -1.0}, "Cooldown must be between 0 and 3600."),
        ("settings set", {"negative": too_long}, f"Negative must be at most {MAX_PROMPT_CHARS} characters."),
        (
            "settings set",
            {"nsfw_negative": too_long},
            f"NSFW negative must be at most {MAX_PROMPT_CHARS} characters.",
        ),
        ("settings set", {"default_steps": 5}, "Default steps (5) can't be above max steps (4)."),
        (
            "settings reset",
            {"setting": "the colour"},
            f"Unknown setting; choose one of: {', '.join(RESETTABLE)}.",
        ),
        ("blocked add", {"term": "!!!"}, "A term needs 1 to 100 letters or digits."),
        ("blocked add", {"term": "a" * 101}, "A term needs 1 to 100 letters or digits."),
        ("cancel", {"job": -3}, "There is no job #-3 in this server."),
    ]
    for subcommand, options, expected in cases:
        answer = await admin(fake, subcommand, options, validate=False)
        assert answer == expected, (options, answer)
    assert await guild_row(bot) == before, "nothing saved, not even updated_at"


async def test_settings_show_with_many_blocked_terms_still_names_the_bans(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False)
    store = bot.guild_settings
    # 40 of the 500 terms a server may block, 55 characters each: about 2,400 characters listed
    terms = [f"term number {i:02d} " + "x" * 40 for i in range(40)]
    for term in terms:
        await store.add_blocked_term(fake.guild_id, fake.admin.id, term)
    await store.ban(fake.guild_id, fake.bob.id, fake.admin.id)

    shown = await admin(fake, "settings show")
    # fixed before: the reply was cut at 2,000 characters mid-term and lost the Banned line
    assert len(shown) <= 2000
    assert f"Banned: <@{fake.bob.id}>" in shown.splitlines(), shown[-120:]
    (blocked,) = [line for line in shown.splitlines() if line.startswith("Blocked terms (server): ")]
    assert f"`{terms[0]}`" in blocked and f"`{terms[-1]}`" not in blocked
    listed_count = blocked.count("`") // 2
    assert blocked.endswith(f" … and {40 - listed_count} more; global: 0") and 0 < listed_count < 40
