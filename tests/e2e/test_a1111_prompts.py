"""What members paste from A1111 and Civitai (issue #13), through the loopback Discord: LoRA tags
and the `lora` option's autocomplete, Schedule type and Clip skip options, notes on what is ignored."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from conftest import is_result, job_messages
from fake_discord import FakeDiscord
from PIL import Image
from test_bad_input import answer
from test_faults import field, final_message

from generator.metadata import parse_parameters
from generator.tiny import write_random_lora


@pytest.fixture
def lora_dir(tmp_path: Path, tiny_model: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    write_random_lora(tiny_model, folder / "add_detail.safetensors", seed=1)
    write_random_lora(tiny_model, folder / "pony_style.safetensors", seed=2)
    return folder


def png_parameters(fake: FakeDiscord, job_id: int) -> dict[str, Any]:
    [message] = job_messages(fake, job_id)
    attachment = message.attachments[0]
    with Image.open(io.BytesIO(attachment.data)) as image:
        return parse_parameters(image.info["parameters"])


async def test_an_unknown_lora_is_refused_privately_with_the_names_that_exist(
    discord_server: FakeDiscord, start_bot, lora_dir: Path
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_LORA_DIR=lora_dir)
    text = await answer(fake, {"prompt": "a pony <lora:nope:0.7>"})
    assert text == 'Unknown LoRA "nope". Available: add_detail, pony_style.'
    assert await bot.queue.counts() == {s: 0 for s in await bot.queue.counts()}, "nothing queued"


async def test_autocomplete_offers_the_loras_and_a_tag_is_applied_and_recorded(
    discord_server: FakeDiscord, start_bot, lora_dir: Path
) -> None:
    fake = discord_server
    await start_bot(PONY_LORA_DIR=lora_dir, PONY_DEFAULT_COUNT=1)
    choices = await fake.autocomplete("pony", "lora", "", {"prompt": "a pony"})
    assert [c["value"] for c in choices] == ["add_detail", "pony_style"]
    assert [c["value"] for c in await fake.autocomplete("pony", "lora", "STY")] == ["pony_style"]

    assert (await answer(fake, {"prompt": "a pony", "seed": 5, "lora": "add_detail"})).startswith("Queued")
    with_lora = await final_message(fake, 1, "Image")
    assert field(with_lora, "LoRA") == "add\\_detail 1"  # markdown-escaped: shows as add_detail 1
    assert (await answer(fake, {"prompt": "a pony", "seed": 5}, user=fake.bob)).startswith("Queued")
    assert is_result(await final_message(fake, 2, "Image"))
    meta = png_parameters(fake, 1)
    name, _, digest = meta["extra"]["Lora hashes"].partition(": ")
    assert name == "add_detail" and len(digest) == 12 and int(digest, 16) >= 0
    assert "Lora hashes" not in png_parameters(fake, 2)["extra"]
    image_1 = job_messages(fake, 1)[0].attachments[0].data
    image_2 = job_messages(fake, 2)[0].attachments[0].data
    assert image_1 != image_2, "the LoRA changes the picture"


async def test_schedule_clip_skip_and_ignored_syntax_show_on_the_result(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    await start_bot(PONY_DEFAULT_COUNT=1)
    options = {
        "prompt": "a pony AND a dragon <hypernet:fluffy:1>",
        "sampler": "DPM++ 2M",
        "schedule": "karras",
        "clip_skip": 2,
    }
    assert (await answer(fake, options)).startswith("Queued as job #1:")
    result = await final_message(fake, 1, "Image")
    assert field(result, "Sampler") == "DPM++ 2M (Karras)"
    assert field(result, "Clip skip") == "2"
    note = field(result, "Note") or ""
    assert "ignored: AND" in note and "hypernet" in note
    meta = png_parameters(fake, 1)
    assert (meta["schedule"], meta["clip_skip"]) == ("karras", 2)  # "Schedule type: Karras, Clip skip: 2"


async def test_schedule_a_sampler_cannot_use_is_refused(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    text = await answer(fake, {"prompt": "a pony", "sampler": "DDIM", "schedule": "karras"})
    assert "Karras" in text and "DDIM" in text
    assert (await bot.queue.counts())["queued"] == 0
