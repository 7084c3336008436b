"""/pony end to end through the loopback Discord: acknowledgement, status, progress, result."""

from __future__ import annotations

import io

from conftest import is_result, job_messages, wait_until, wait_until_async
from fake_discord import FakeDiscord
from PIL import Image

from generator.metadata import parse_parameters, read_parameters


async def test_pony_posts_status_progress_and_result(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    command = fake.find_command("pony")
    assert command is not None
    option_names = [o["name"] for o in command["options"]]
    assert option_names[:1] == ["prompt"]
    assert {"negative", "seed", "steps", "guidance", "count", "aspect", "sampler"} <= set(option_names)
    steps_option = next(o for o in command["options"] if o["name"] == "steps")
    assert steps_option["max_value"] == bot.settings.max_steps

    interaction = await fake.slash(
        "pony", {"prompt": "a **bold** pony @everyone", "seed": 1234, "count": 2, "negative": "blurry"}
    )
    first = await interaction.wait_response()
    assert first.type == 5 and first.ephemeral  # deferred, ephemeral
    ack = await interaction.wait_followup()
    assert ack.ephemeral
    assert ack.content.startswith("Queued as job #1")

    result = await fake.wait_for_message(lambda m: is_result(m), timeout=60)
    messages = job_messages(fake, 1)
    assert messages == [result], "one message per job in the end"
    assert result.author_id == fake.bot_user_id
    assert result.interaction_id is None and result.webhook_id is None, "posted as the bot, not the webhook"
    progress_edits = [
        snap
        for snap in result.history
        if any("step" in str(f.get("value")) for f in snap.embeds[0].get("fields", []))
    ]
    assert progress_edits, "progress was shown on the status message"

    names = [a.filename for a in result.attachments]
    assert names == ["ponybot-1-1.png", "ponybot-1-2.png"]
    embed = result.embeds[0]
    assert "\\*\\*bold\\*\\*" in embed["description"], "markdown echoed escaped"
    assert "@everyone" not in embed["description"].replace("@\u200beveryone", "")
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Seeds"] == "1234, 1235"
    assert fields["Steps"] == "3"
    assert fields["Sampler"] == "DDIM"
    assert fields["Size"] == "64x64"
    assert fields["Requested by"] == f"<@{fake.alice.id}>"
    assert fields["Negative"].startswith("blurry")
    assert "Time" in fields
    assert [label for label, _ in result.buttons()] == ["Reroll", "Edit", "Delete", "U1", "U2", "V1", "V2"]

    for index, attachment in enumerate(result.attachments):
        image = Image.open(io.BytesIO(attachment.data))
        assert image.format == "PNG" and image.size == (64, 64)
        parsed = parse_parameters(read_parameters(image))
        assert parsed["seed"] == 1234 + index
        assert parsed["prompt"] == "a **bold** pony @everyone"
        assert parsed["steps"] == 3

    async def job_done() -> bool:
        job = await bot.queue.get(1)
        return job.status == "done" and job.result_message_id == result.id

    await wait_until_async(job_done, 10, "job marked done")
    # nobody was pinged: the client-wide allowed mentions are "none"
    posts = fake.requests_matching("POST", r"/channels/\d+/messages")
    assert posts and all((r.json or {}).get("allowed_mentions", {}).get("parse") == [] for r in posts)


async def test_queue_position_is_told_when_waiting(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    first = await fake.slash("pony", {"prompt": "one"})
    await first.wait_followup()
    second = await fake.slash("pony", {"prompt": "two"}, user=fake.bob)
    ack = await second.wait_followup()
    assert "job #2" in ack.content and "position 2" in ack.content
    status = await wait_until(lambda: job_messages(fake, 2), 10, "status message")
    fields = {f["name"]: f["value"] for f in status[0].embeds[0]["fields"]}
    assert fields["Queue"].startswith("#2 in the queue")
    assert [label for label, _ in status[0].buttons()] == ["Cancel"]
    bot.worker.resume()
    await wait_until(
        lambda: all(is_result(m) for m in job_messages(fake, 1) + job_messages(fake, 2)), 60, "both"
    )


async def test_results_over_the_upload_limit_are_reencoded_not_dropped(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    fake.attachment_limit = 6000
    await start_bot(PONY_BASE_RESOLUTION=128)
    interaction = await fake.slash("pony", {"prompt": "a detailed pony", "count": 2})
    await interaction.wait_followup()
    result = await fake.wait_for_message(lambda m: is_result(m), timeout=60)
    assert [a.filename for a in result.attachments] == ["ponybot-1-1.webp", "ponybot-1-2.webp"]
    assert all(len(a.data) <= 6000 for a in result.attachments)
    fields = {f["name"]: f["value"] for f in result.embeds[0]["fields"]}
    assert "to fit Discord's limit" in fields["Note"]
    assert all(Image.open(io.BytesIO(a.data)).format == "WEBP" for a in result.attachments)
