"""The buttons under results and status messages: Reroll, U1, V1, Delete, Cancel."""

from __future__ import annotations

import io

from conftest import (
    is_result,
    job_messages,
    job_status,
    slow_down_generation,
    wait_for_status,
    wait_until,
)
from fake_discord import FakeDiscord, FakeMessage
from PIL import Image


async def make_result(fake: FakeDiscord, user=None, **options) -> FakeMessage:
    """Run /pony and return its result message."""
    before = set(fake.messages)
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 7, **options}, user=user)
    await interaction.wait_followup()
    return await fake.wait_for_message(
        lambda m: is_result(m) and not m.deleted and m.id not in before, timeout=60
    )


def button_id(message: FakeMessage, label: str) -> str:
    return next(cid for lab, cid in message.buttons() if lab == label)


async def test_reroll_makes_a_new_job_for_the_clicker_as_a_reply(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    original = await make_result(fake)
    click = await fake.click(original.id, button_id(original, "Reroll"), user=fake.bob)
    ack = await click.wait_followup()
    assert ack.ephemeral and ack.content.startswith("Queued as job #2")
    reroll = await fake.wait_for_message(lambda m: is_result(m) and m.id != original.id, timeout=60)
    assert reroll.reference_id == original.id
    job = await bot.queue.get(2)
    assert job.user_id == fake.bob.id and job.parent_id == 1 and job.kind == "txt2img"
    assert job.params["prompt"] == "a pony" and job.seeds != [7, 8]
    fields = {f["name"]: f["value"] for f in reroll.embeds[0]["fields"]}
    assert fields["Requested by"] == f"<@{fake.bob.id}>"


async def test_upscale_and_variation_buttons(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    original = await make_result(fake)

    click = await fake.click(original.id, button_id(original, "U2"))
    await click.wait_followup()
    upscale = await fake.wait_for_message(
        lambda m: is_result(m) and m.embeds[0]["title"] == "Upscale", timeout=60
    )
    assert upscale.reference_id == original.id
    assert [a.filename for a in upscale.attachments] == ["ponybot-2-1.png"]
    assert Image.open(io.BytesIO(upscale.attachments[0].data)).size == (128, 128)  # hires fix: 2x
    assert [label for label, _ in upscale.buttons()] == ["Delete"]
    job = await bot.queue.get(2)
    assert job.kind == "upscale" and job.image_index == 1 and job.params["seed"] == 8

    click = await fake.click(original.id, button_id(original, "V1"))
    await click.wait_followup()
    variation = await fake.wait_for_message(
        lambda m: is_result(m) and m.embeds[0]["title"] == "Variations", timeout=60
    )
    assert variation.reference_id == original.id
    assert len(variation.attachments) == 2
    assert all(Image.open(io.BytesIO(a.data)).size == (64, 64) for a in variation.attachments)
    assert [label for label, _ in variation.buttons()] == ["Reroll", "Edit", "Delete", "U1", "U2", "V1", "V2"]


async def test_delete_by_requester_moderator_and_others(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    await start_bot()
    mine = await make_result(fake)

    click = await fake.click(mine.id, button_id(mine, "Delete"), user=fake.bob)
    answer = await click.wait_followup()
    assert answer.ephemeral and answer.content == "Only the requester or a moderator can delete this."
    assert not fake.messages[mine.id].deleted

    click = await fake.click(mine.id, button_id(mine, "Delete"), user=fake.alice)
    assert (await click.wait_followup()).content == "Deleted."
    assert fake.messages[mine.id].deleted

    bobs = await make_result(fake, user=fake.bob)
    click = await fake.click(bobs.id, button_id(bobs, "Delete"), user=fake.mod)
    assert (await click.wait_followup()).content == "Deleted."
    assert fake.messages[bobs.id].deleted


async def test_cancel_while_queued(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "wait for me"})
    await interaction.wait_followup()
    status = (await wait_until(lambda: job_messages(fake, 1), 10, "status message"))[0]

    other = await fake.click(status.id, button_id(status, "Cancel"), user=fake.bob)
    assert (await other.wait_followup()).content == "Only the person who asked for this job can cancel it."
    assert await job_status(bot, 1) == "queued"

    click = await fake.click(status.id, button_id(status, "Cancel"))
    assert (await click.wait_followup()).content == "Job #1 cancelled."
    assert await job_status(bot, 1) == "cancelled"
    cancelled = await wait_until(
        lambda: fake.messages[status.id].embeds[0]["title"] == "Cancelled" and fake.messages[status.id],
        10,
        "notice",
    )
    assert cancelled.buttons() == []
    bot.worker.resume()
    await bot.worker._idle()  # one poll cycle: nothing to claim
    assert job_messages(fake, 1) == [cancelled] and not is_result(cancelled)


async def test_cancel_while_running(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    slow_down_generation(bot, 0.3)
    interaction = await fake.slash("pony", {"prompt": "long one", "steps": 30})
    await interaction.wait_followup()
    await wait_for_status(bot, 1, "running", 20)
    status = job_messages(fake, 1)[0]
    click = await fake.click(status.id, button_id(status, "Cancel"))
    assert (await click.wait_followup()).content == "Stopping job #1…"
    await wait_for_status(bot, 1, "cancelled", 30)
    message = await wait_until(
        lambda: fake.messages[status.id].embeds[0]["title"] == "Cancelled" and fake.messages[status.id],
        10,
        "notice",
    )
    assert not message.attachments
    assert job_messages(fake, 1) == [message]

    # the worker goes on with the next job
    slow_down_generation(bot, 0.0)
    await make_result(fake, user=fake.bob)
