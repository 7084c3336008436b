"""/pony-info and /pony-queue through the running bot, for what tests/e2e leaves open: a result
whose images are gone from disk, and the states /pony-queue words."""

from __future__ import annotations

import shutil

import pytest
from loopback_harness import FakeDiscord, is_result, wait_for_status

pytestmark = pytest.mark.usefixtures("loopback")


async def test_pony_info_of_a_result_whose_images_are_gone(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 3, "count": 1})
    await interaction.wait_followup(timeout=20)
    await fake.wait_for_message(is_result, timeout=30)
    await wait_for_status(bot, 1, "done", 10)
    job = await bot.queue.get(1)
    assert job is not None
    shutil.rmtree(bot.delivery.images_dir / "1")  # e.g. removed by hand
    before = len(fake.channel_messages(fake.channel_id, include_ephemeral=False))

    info = await fake.slash("pony-info", {"job": 1})
    reply = await info.wait_followup(timeout=20)
    assert reply.ephemeral and reply.content == (
        "The images of job #1 have expired, so they can't be posted again; "
        "/pony with the same seed draws them again."
    )
    fields = {f["name"]: f["value"] for f in reply.embeds[0]["fields"]}
    assert reply.embeds[0]["title"] == "Job #1" and fields["Status"] == "done" and fields["Seed"] == "3"
    assert len(fake.channel_messages(fake.channel_id, include_ephemeral=False)) == before  # nothing re-posted


async def test_pony_queue_words_a_job_being_generated(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    for prompt in ("first", "second"):
        interaction = await fake.slash("pony", {"prompt": prompt, "count": 1})
        await interaction.wait_followup(timeout=20)
    await bot.queue.claim("someone-else")  # job #1 is on a GPU now

    listing = await (await fake.slash("pony-queue", {})).wait_followup(timeout=20)
    lines = (listing.content or "").splitlines()
    assert lines[0] == "Your open jobs:"
    assert lines[1].startswith("**#1** generating: about ") and lines[1].endswith(" s left — first")
    assert lines[2].startswith("**#2** waiting: position 1, about ") and lines[2].endswith(" — second")
    assert [label for label, _ in listing.buttons()] == ["Cancel #1", "Cancel #2"]
