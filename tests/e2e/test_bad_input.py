"""Bad input through the loopback Discord: each gets a short ephemeral answer and no job (or a
cleaned-up job where that is kinder). Out-of-range options are sent the way a modified client
would (`validate=False`), since the real client enforces the command schema."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from conftest import embed_footer, is_result, job_messages, wait_until
from fake_discord import FakeDiscord, FakeInteraction

from bot.policy.guard import BLOCKED
from generator.params import ASPECTS, MAX_SEED
from generator.samplers import SAMPLER_NAMES


async def job_total(bot: Any) -> int:
    """Jobs in the database, any status."""
    return sum((await bot.queue.counts()).values())


async def answer(fake: FakeDiscord, options: dict[str, Any], **kwargs: Any) -> str:
    """Run /pony and return the ephemeral answer's text."""
    interaction = await fake.slash("pony", options, **kwargs)
    return await followup_text(interaction)


async def followup_text(interaction: FakeInteraction) -> str:
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral, reply.content
    assert interaction.errors == []
    return reply.content


async def test_out_of_range_options_are_refused_without_a_job(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    steps_range = f"Steps must be between 1 and {bot.settings.max_steps}."
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": ""}, "The prompt is empty."),
        ({"prompt": "   "}, "The prompt is empty."),
        ({"prompt": "\u200b\u200d\u2060 \ufeff\u200b"}, "The prompt is empty."),
        ({"prompt": "\u202e\u202c"}, "The prompt is empty."),
        ({"prompt": "x" * 6000}, "The prompt is too long (6000 characters; at most 2000)."),
        (
            {"prompt": "ok", "negative": "y" * 6000},
            "The negative prompt is too long (at most 2000 characters).",
        ),
        ({"prompt": "ok", "seed": -5}, f"Seed must be between 0 and {MAX_SEED}."),
        ({"prompt": "ok", "seed": 2**40}, f"Seed must be between 0 and {MAX_SEED}."),
        ({"prompt": "ok", "steps": 0}, steps_range),
        ({"prompt": "ok", "steps": 10_000}, steps_range),
        ({"prompt": "ok", "guidance": 0.5}, "Guidance must be between 1 and 30."),
        ({"prompt": "ok", "guidance": 1e9}, "Guidance must be between 1 and 30."),
        ({"prompt": "ok", "count": 0}, "Count must be between 1 and 4."),
        ({"prompt": "ok", "count": 5}, "Count must be between 1 and 4."),
        ({"prompt": "ok", "aspect": "huge"}, f"Unknown aspect 'huge'; choose one of: {', '.join(ASPECTS)}."),
        (
            {"prompt": "ok", "sampler": "Nope"},
            f"Unknown sampler 'Nope'; choose one of: {', '.join(SAMPLER_NAMES)}.",
        ),
    ]
    for options, expected in cases:
        assert await answer(fake, options, validate=False) == expected, options
    assert await job_total(bot) == 0
    assert fake.channel_messages(fake.channel_id, include_ephemeral=False) == [], (
        "nothing was posted in the channel"
    )


async def test_mentions_markdown_and_bidi_are_cleaned_never_pinged(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()  # the status message is enough
    prompt = f"@everyone @here <@&{fake.mods_role_id}> <@{fake.bob.id}> **bold** __u__ `code` ~~s~~ ||x||"
    ack = await answer(fake, {"prompt": prompt})
    assert ack.startswith("Queued as job #1:")
    status = (await wait_until(lambda: job_messages(fake, 1), 10, "status message"))[0]
    shown = status.embeds[0]["description"]
    assert "\\*\\*bold\\*\\*" in shown and "\\`code\\`" in shown and "\\|\\|x\\|\\|" in shown
    assert not re.search(r"@(everyone|here|&?\d)", shown.replace("@\u200b", "")), shown
    assert status.content in (None, "")

    ack = await answer(fake, {"prompt": "a \u202egnirts\u202c pony \u2066x\u2069\u200f"})
    assert ack.startswith("Queued as job #2:")
    job = await bot.queue.get(2)
    assert job.params["prompt"] == "a gnirts pony x", "bidi controls removed before queueing"
    status = (await wait_until(lambda: job_messages(fake, 2), 10, "status message"))[0]
    assert not re.search("[\u202a-\u202e\u2066-\u2069\u200e\u200f]", status.embeds[0]["description"])

    sent = [
        r
        for r in fake.requests
        if r.method in ("POST", "PATCH") and re.search(r"^/(channels/\d+/messages|webhooks/)", r.path)
    ]
    assert sent and all((r.json or {}).get("allowed_mentions", {}).get("parse") == [] for r in sent), [
        r.json.get("allowed_mentions") for r in sent if r.json
    ]


async def test_blocked_terms_hidden_by_unicode_tricks(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_BLOCKED_TERMS="gore, big cat")
    bot.worker.pause()
    for prompt in (
        "a g\u200bo\u200dr\u2060e pony",  # zero-width characters
        "ｇｏｒｅ",  # full-width letters
        "GORE!!",
        "a \u202egore\u202c pony",  # bidi override
        "(g.o.r.e:1.4)",  # spelled out, A1111 weight
        "a BIG_cat",
    ):
        assert await answer(fake, {"prompt": prompt}) == BLOCKED, prompt
    assert await job_total(bot) == 0
    # age-restricted channels have no term filter and their own default negative
    ack = await answer(fake, {"prompt": "ｇｏｒｅ"}, channel_id=fake.nsfw_channel_id)
    assert ack.startswith("Queued as job #1:")
    job = await bot.queue.get(1)
    assert job.params["negative"] == bot.settings.nsfw_default_negative
    # a harmless word containing a term is fine
    assert (await answer(fake, {"prompt": "a gorest pony"})).startswith("Queued as job #2:")
    assert (await bot.queue.get(2)).params["negative"] == bot.settings.default_negative


async def test_forged_and_stale_buttons(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    ack = await answer(fake, {"prompt": "a pony", "count": 1})
    assert ack.startswith("Queued as job #1:")
    result = await fake.wait_for_message(is_result, timeout=60)
    bot.worker.pause()
    ack = await answer(fake, {"prompt": "waiting", "count": 1})
    assert ack.startswith("Queued as job #2:")
    status = (await wait_until(lambda: job_messages(fake, 2), 10, "status"))[0]
    bobs = await answer(fake, {"prompt": "bob's", "count": 1}, user=fake.bob)
    assert bobs.startswith("Queued as job #3:")

    async def press(custom_id: str, *, user: Any = fake.alice, message: Any = result) -> str:
        interaction = await fake.click(message.id, custom_id, user=user, validate=False)
        response = await interaction.wait_response()
        if response.type == 4:  # answered at once (no job looked up)
            assert response.ephemeral
            return response.content or ""
        return await followup_text(interaction)

    before = await job_total(bot)
    # custom_ids a modified client made up: an unknown job, malformed ids, someone else's job
    forged = [
        "pony:reroll:999999",
        "pony:del:123456789012345678",
        "pony:reroll:abc",
        "pony:explode:1",
        "pony:up:1:0",
        "pony:var:1:12",
        "pony:",
        "pony:del:-1",
        "pony:cancel:2",  # alice's waiting job, pressed by bob on alice's result
        "pony:del:3",  # bob's own job id on alice's message
    ]
    for custom_id in forged:
        assert await press(custom_id, user=fake.bob) == "That button isn't valid.", custom_id
    # real buttons, someone else's job
    assert await press("pony:del:1", user=fake.bob) == "Only the requester or a moderator can delete this."
    assert await press("pony:cancel:2", user=fake.bob, message=status) == (
        "Only the person who asked for this job can cancel it."
    )
    assert not fake.messages[result.id].deleted
    assert (await bot.queue.get(2)).status == "queued" and (await bot.queue.get(3)).status == "queued"
    assert await job_total(bot) == before

    # a job that no longer exists in the database (e.g. a wiped database), and a deleted message
    async with bot.queue.exclusive() as conn:
        await conn.execute("DELETE FROM jobs WHERE id = 1")
    assert await press("pony:reroll:1") == "That job no longer exists."
    assert await press("pony:up:1:1") == "That job no longer exists."
    await fake.delete_message_externally(result.id)
    assert await press("pony:var:1:1") == "That job no longer exists."
    assert await job_total(bot) == before - 1
    assert [embed_footer(m) for m in fake.channel_messages(fake.channel_id, include_ephemeral=False)] == [
        "ponybot job #2",
        "ponybot job #3",
    ]


async def test_fifty_commands_in_five_seconds(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_COOLDOWN_S=1, PONY_MAX_OPEN_JOBS_PER_USER=2, PONY_DEFAULT_COUNT=1)
    started = time.monotonic()
    floods: list[FakeInteraction] = []
    bobs: FakeInteraction | None = None
    for n in range(50):
        floods.append(await fake.slash("pony", {"prompt": f"flood {n}"}))
        if n == 25:
            bobs = await fake.slash("pony", {"prompt": "bob's turn"}, user=fake.bob)
        await asyncio.sleep(max(0.0, started + (n + 1) * 0.1 - time.monotonic()))
    assert time.monotonic() - started < 6.5
    texts = [await followup_text(i) for i in floods]
    assert bobs is not None
    bob_ack = await followup_text(bobs)
    assert bob_ack.startswith("Queued as job #")
    assert all(i.response is not None and i.response.type == 5 for i in floods), "every one deferred in time"

    queued = [t for t in texts if t.startswith("Queued as job #")]
    refused = [t for t in texts if not t.startswith("Queued as job #")]
    cooldown = re.compile(r"^Slow down: try again in 1 s\.$")
    capped = re.compile(
        r"^You already have 2 jobs waiting; wait for one to finish\."
        r"( Your next one should be done in about \d+ s\.)?$"
    )
    assert all(cooldown.match(t) or capped.match(t) for t in refused), set(refused)
    assert any(cooldown.match(t) for t in refused)
    # the cooldown allows one job a second at most (and never more than 2 open at once)
    assert 1 <= len(queued) <= 7, queued
    alice_jobs = [j for j in await bot.queue.recent_jobs(0) if j.user_id == fake.alice.id]
    assert len(alice_jobs) == len(queued)

    bob_id = int(re.match(r"Queued as job #(\d+)", bob_ack).group(1))
    await wait_until(lambda: any(is_result(m) for m in job_messages(fake, bob_id)), 60, "bob's job delivered")
    # still responsive
    probe = await fake.slash("pony-queue", {})
    assert (await probe.wait_followup(timeout=10)).ephemeral


async def test_full_queue_says_when_to_retry(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MAX_QUEUE=1)
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "first"})).startswith("Queued as job #1:")
    refused = await answer(fake, {"prompt": "second"}, user=fake.bob)
    assert re.fullmatch(r"The queue is full right now; try again in about \d+ s\.", refused), refused
    assert await job_total(bot) == 1
