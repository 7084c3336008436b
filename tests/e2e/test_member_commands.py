"""/pony-queue and /pony-info end to end."""

from __future__ import annotations

import re

from conftest import is_result, job_messages, wait_until
from fake_discord import FakeDiscord
from test_bad_input import answer, followup_text

from bot.policy.guard import NSFW_ONLY


async def test_pony_queue_lists_my_jobs_with_cancel_buttons(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    listing = await fake.slash("pony-queue", {})
    assert await followup_text(listing) == "You have no open jobs here."
    assert (await answer(fake, {"prompt": "first **one**"})).startswith("Queued as job #1:")
    assert (await answer(fake, {"prompt": "bob's"}, user=fake.bob)).startswith("Queued as job #2:")
    assert (await answer(fake, {"prompt": "second"})).startswith("Queued as job #3:")

    listing = await fake.slash("pony-queue", {})
    reply = await listing.wait_followup()
    assert reply.ephemeral
    lines = reply.content.splitlines()
    assert lines[0] == "Your open jobs:"
    assert re.fullmatch(r"\*\*#1\*\* waiting: position 1, about \d+ s — first \\\*\\\*one\\\*\\\*", lines[1])
    assert re.fullmatch(r"\*\*#3\*\* waiting: position 3, about \d+ s — second", lines[2]), lines[2]
    assert lines[3] == "Press a button below to cancel one."
    assert [label for label, _ in reply.buttons()] == ["Cancel #1", "Cancel #3"]

    click = await fake.click(reply.id, "pony:cancel:3")
    assert await followup_text(click) == "Job #3 cancelled."
    assert (await bot.queue.get(3)).status == "cancelled"
    await wait_until(lambda: job_messages(fake, 3)[0].embeds[0]["title"] == "Cancelled", 10, "notice")
    other = await fake.click(reply.id, "pony:cancel:1", user=fake.bob)
    assert await followup_text(other) == "Only the person who asked for this job can cancel it."
    # from another channel too (Cancel shows nothing of the job)
    elsewhere = await fake.slash("pony-queue", {}, channel_id=fake.nsfw_channel_id)
    reply = await elsewhere.wait_followup()
    assert [label for label, _ in reply.buttons()] == ["Cancel #1"]
    click = await fake.click(reply.id, "pony:cancel:1")
    assert await followup_text(click) == "Job #1 cancelled."


async def test_pony_info_shows_parameters_and_reposts_with_buttons(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    assert (await answer(fake, {"prompt": "a pony", "seed": 42, "negative": "blurry"})).startswith(
        "Queued as job #1:"
    )
    original = await fake.wait_for_message(is_result, timeout=60)
    await wait_until(lambda: original.embeds[0]["title"] == "Image", 10, "result")

    info = await fake.slash("pony-info", {"job": 1}, user=fake.bob)
    reply = await info.wait_followup()
    assert reply.ephemeral and reply.content == "Posted job #1 again below."
    fields = {f["name"]: f["value"] for f in reply.embeds[0]["fields"]}
    assert reply.embeds[0]["title"] == "Job #1" and reply.embeds[0]["description"] == "a pony"
    assert fields["Seeds"] == "42, 43" and fields["Steps"] == "3" and fields["Sampler"] == "DDIM"
    assert fields["Size"] == "64x64" and fields["Count"] == "2" and fields["Guidance"] == "7"
    assert fields["Negative"].startswith("blurry, ") and fields["Status"] == "done"
    assert fields["Requested by"] == f"<@{fake.alice.id}>"

    repost = await wait_until(
        lambda: [m for m in job_messages(fake, 1) if m.id != original.id], 10, "re-post"
    )
    assert len(repost) == 1 and is_result(repost[0])
    assert [a.filename for a in repost[0].attachments] == [a.filename for a in original.attachments]
    assert [a.data for a in repost[0].attachments] == [a.data for a in original.attachments]
    assert repost[0].buttons() == original.buttons()
    reroll = await fake.click(repost[0].id, "pony:reroll:1", user=fake.bob)
    assert (await followup_text(reroll)).startswith("Queued as job #2:")
    assert (await bot.queue.get(2)).parent_id == 1

    missing = await fake.slash("pony-info", {"job": 999})
    assert await followup_text(missing) == "There is no job #999 in this server."

    # a job made in an age-restricted channel is not shown in a work-safe one
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "spicy"}, channel_id=fake.nsfw_channel_id)).startswith(
        "Queued as job #3:"
    )
    refused = await fake.slash("pony-info", {"job": 3})
    assert await followup_text(refused) == NSFW_ONLY
    there = await fake.slash("pony-info", {"job": 3}, channel_id=fake.nsfw_channel_id)
    reply = await there.wait_followup()
    assert reply.content == "Job #3 is waiting; there is no result to show."
    assert reply.embeds[0]["title"] == "Job #3"
