"""The button use cases through the running bot and the loopback Discord, for what tests/e2e leaves
open: Discord refusing a Delete, Cancel on a job that already ended, a Reroll of a variation, and
the queued row a Reroll makes."""

from __future__ import annotations

from typing import Any

import pytest
from loopback_harness import (
    FakeDiscord,
    FakeInteraction,
    FakeMessage,
    is_result,
    job_messages,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("loopback")


async def reply_text(interaction: FakeInteraction) -> str:
    """The ephemeral answer's text (and that Discord took every answer)."""
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral, reply.content
    assert interaction.errors == []
    return reply.content or ""


def button_id(message: FakeMessage, label: str) -> str:
    return next(cid for lab, cid in message.buttons() if lab == label)


async def finished_result(fake: FakeDiscord, **options: Any) -> FakeMessage:
    """Run /pony and return its result message."""
    before = set(fake.messages)
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 7, "count": 1, **options})
    assert (await reply_text(interaction)).startswith("Queued as job #")
    return await fake.wait_for_message(lambda m: is_result(m) and m.id not in before, timeout=30)


async def status_message(fake: FakeDiscord, job_id: int) -> FakeMessage:
    return (await wait_until(lambda: job_messages(fake, job_id), 10, "status message"))[0]


async def test_reroll_keeps_every_parameter_but_the_seed(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    original = await finished_result(fake, negative="blurry", steps=2, guidance=5.5, aspect="portrait")
    first = await bot.queue.get(1)
    assert first is not None
    bot.worker.pause()

    click = await fake.click(original.id, button_id(original, "Reroll"))
    assert (await reply_text(click)).startswith("Queued as job #2: position 1, about ")
    job = await bot.queue.get(2)
    assert job is not None and job.status == "queued" and job.kind == "txt2img"
    assert job.parent_id == 1 and job.reply_to_message_id == original.id and job.cost == first.cost
    changed = {k for k in first.params.keys() | job.params.keys() if first.params.get(k) != job.params.get(k)}
    assert changed == {"seed"}
    assert job.params["negative"].startswith("blurry") and job.params["steps"] == 2


async def test_reroll_of_a_variation_is_a_variation_of_the_same_image(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    original = await finished_result(fake)
    variation_click = await fake.click(original.id, button_id(original, "V1"))
    assert (await reply_text(variation_click)).startswith("Queued as job #2:")
    variation = await fake.wait_for_message(
        lambda m: is_result(m) and m.embeds[0]["title"] == "Variations", timeout=30
    )
    bot.worker.pause()

    click = await fake.click(variation.id, button_id(variation, "Reroll"), user=fake.bob)
    assert (await reply_text(click)).startswith("Queued as job #3: position 1, about ")
    job = await bot.queue.get(3)
    assert job is not None
    assert job.kind == "variation" and job.user_id == fake.bob.id
    assert job.parent_id == 1 and job.image_index == 0  # still image 1 of job #1, not of #2
    assert job.reply_to_message_id == variation.id
    assert job.params["prompt"] == "a pony" and job.status == "queued"
    status = await status_message(fake, 3)
    assert status.embeds[0]["title"] == "Variations queued"
    assert status.reference_id == variation.id


async def test_delete_that_discord_refuses_says_so_and_keeps_the_message(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    await start_bot()
    result = await finished_result(fake)
    fake.fail_next(
        "DELETE", rf"/channels/\d+/messages/{result.id}$", 403, body={"code": 50013, "message": "x"}
    )

    click = await fake.click(result.id, button_id(result, "Delete"))
    assert await reply_text(click) == "I can't delete that message here."
    assert not fake.messages[result.id].deleted

    again = await fake.click(result.id, button_id(result, "Delete"))
    assert await reply_text(again) == "Deleted."
    assert fake.messages[result.id].deleted


async def test_delete_of_a_message_someone_else_already_removed_still_says_deleted(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    await start_bot()
    result = await finished_result(fake)
    fake.fail_next(
        "DELETE", rf"/channels/\d+/messages/{result.id}$", 404, body={"code": 10008, "message": "x"}
    )
    click = await fake.click(result.id, button_id(result, "Delete"), user=fake.mod)
    assert await reply_text(click) == "Deleted."


async def test_cancel_from_pony_queue_after_the_job_ended(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "soon done", "count": 1})
    assert (await reply_text(interaction)).startswith("Queued as job #1:")
    listing = await (await fake.slash("pony-queue", {})).wait_followup()
    assert [label for label, _ in listing.buttons()] == ["Cancel #1"]

    bot.worker.resume()
    bot.worker.wake()
    await fake.wait_for_message(is_result, timeout=30)
    await wait_for_status(bot, 1, "done", 10)

    click = await fake.click(listing.id, "pony:cancel:1")
    assert await reply_text(click) == "Job #1 has already finished."
    assert (await bot.queue.get(1)).status == "done"  # type: ignore[union-attr]
