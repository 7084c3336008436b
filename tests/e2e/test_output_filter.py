"""The optional output image filter (PONY_NSFW_CLASSIFIER) end to end."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import is_result, job_messages, wait_until
from fake_discord import FakeDiscord, FakeMessage
from PIL import Image
from test_bad_input import answer

from generator.safety import NOTICE_COLOUR, write_tiny_classifier


def corner(message: FakeMessage) -> tuple[int, ...]:
    return Image.open(io.BytesIO(message.attachments[0].data)).convert("RGB").getpixel((0, 0))


async def result_of(fake: FakeDiscord, job_id: int, channel_id: int) -> FakeMessage:
    found = await wait_until(
        lambda: [m for m in job_messages(fake, job_id, channel_id) if is_result(m)], 60, f"job {job_id}"
    )
    return found[0]


async def test_flagged_images_are_replaced_outside_age_restricted_channels(
    discord_server: FakeDiscord, start_bot, tmp_path: Path
) -> None:
    fake = discord_server
    classifier = write_tiny_classifier(tmp_path / "flags-all", flags_everything=True)
    bot = await start_bot(PONY_NSFW_CLASSIFIER=classifier, PONY_DEFAULT_COUNT=1)
    assert (await answer(fake, {"prompt": "a pony"})).startswith("Queued as job #1:")
    hidden = await result_of(fake, 1, fake.channel_id)
    assert corner(hidden) == NOTICE_COLOUR
    saved = Image.open(bot.settings.images_dir / "1" / "ponybot-1-1.png").convert("RGB")
    assert saved.getpixel((0, 0)) == NOTICE_COLOUR, "only the notice is kept, so /pony-info and U/V see it"

    ack = await answer(fake, {"prompt": "a pony"}, channel_id=fake.nsfw_channel_id)
    assert ack.startswith("Queued as job #2:")
    shown = await result_of(fake, 2, fake.nsfw_channel_id)
    assert corner(shown) != NOTICE_COLOUR, "age-restricted channels are not filtered"


async def test_a_classifier_that_cannot_load_hides_everything(
    discord_server: FakeDiscord, start_bot, tmp_path: Path
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_NSFW_CLASSIFIER=tmp_path / "missing", PONY_DEFAULT_COUNT=1)
    assert (await answer(fake, {"prompt": "a pony"})).startswith("Queued as job #1:")
    assert corner(await result_of(fake, 1, fake.channel_id)) == NOTICE_COLOUR
    assert "no such folder" in (bot.worker.screen.__self__.error or "")
