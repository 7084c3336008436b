"""/pony through the running bot: the queued row is exactly what the member asked for, and the
status message and answer say where it stands (tests/e2e pins the flow, not the row's contents)."""

from __future__ import annotations

import re

import pytest
from loopback_harness import FakeDiscord, job_messages, wait_until

pytestmark = pytest.mark.usefixtures("loopback")


async def test_pony_options_become_the_queued_row(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False)
    bot.worker.pause()
    options = {
        "prompt": "  a   pony\u200b in a field ",
        "negative": "blurry",
        "seed": 1234,
        "steps": 4,
        "guidance": 5.5,
        "count": 1,
        "aspect": "landscape",
        "sampler": "Euler",
        "schedule": "karras",
        "clip_skip": 2,
    }
    interaction = await fake.slash("pony", options)
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral and interaction.errors == []
    assert re.fullmatch(r"Queued as job #1: position 1, about \d+ s\.(\n.+)?", reply.content or ""), (
        reply.content
    )

    job = await bot.queue.get(1)
    assert job is not None
    assert job.status == "queued" and job.kind == "txt2img" and job.user_id == fake.alice.id
    assert job.channel_id == fake.channel_id and job.interaction_id == int(interaction.id)
    assert job.parent_id is None and job.reply_to_message_id is None
    params = job.params
    assert params["prompt"] == "a pony in a field"  # invisible characters and extra spaces dropped
    assert params["negative"].startswith("blurry")
    assert (params["seed"], params["steps"], params["guidance"], params["count"]) == (1234, 4, 5.5, 1)
    assert (params["sampler"], params["schedule"], params["clip_skip"]) == ("Euler", "karras", 2)
    assert params["width"] > params["height"]  # landscape

    status = (await wait_until(lambda: job_messages(fake, 1), 10, "status message"))[0]
    embed = status.embeds[0]
    assert embed["title"] == "Image queued" and embed["description"] == "a pony in a field"
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Queue"].startswith("#1 in the queue, about ")
    assert fields["Requested by"] == f"<@{fake.alice.id}>"
    assert status.buttons() == [("Cancel", "pony:cancel:1")]
    assert (await bot.queue.get(1)).status_message_id == status.id  # type: ignore[union-attr]


async def test_defaults_come_from_the_settings(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False, PONY_DEFAULT_STEPS="5", PONY_DEFAULT_COUNT="3")
    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "a pony"})
    assert (await interaction.wait_followup(timeout=20)).content.startswith("Queued as job #1:")
    job = await bot.queue.get(1)
    assert job is not None
    assert (job.params["steps"], job.params["count"]) == (5, 3)
    assert (job.params["width"], job.params["height"]) == (64, 64)  # square at PONY_BASE_RESOLUTION
    assert job.params["schedule"] == "automatic" and job.params["clip_skip"] == 1
