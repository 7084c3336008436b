"""/pony-stats and /pony-about through the running bot, for what tests/e2e/test_ops.py leaves open:
the statistics of an empty queue and of a failed job, the answer when the chart can't be drawn,
and the about text of a local model and of pony-diffusion."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from loopback_harness import FakeDiscord, FakeMessage, is_result, wait_for_status
from PIL import Image

import bot.ops.stats
from bot.discord_ui.commands.info import CHART_FILENAME
from bot.discord_ui.services import Services
from bot.ops.about import LICENCE_URL, PONY_DIFFUSION_CREDITS, USE_RESTRICTIONS, bot_version
from bot.policy.text import format_duration

pytestmark = pytest.mark.usefixtures("loopback")

PURPLE = 0x9B59B6  # discord.Colour.purple()
FOOTER = f"ponybot {bot_version()} · bars: jobs per hour · line: median wait"


async def stats_reply(fake: FakeDiscord) -> FakeMessage:
    """Run /pony-stats as alice: deferred ephemerally, then one ephemeral followup."""
    interaction = await fake.slash("pony-stats", user=fake.alice)
    response = await interaction.wait_response()
    assert response.type == 5 and response.ephemeral
    reply = await interaction.wait_followup(timeout=20)
    assert reply.ephemeral and interaction.errors == []
    return reply


def chart_of(reply: FakeMessage) -> Image.Image:
    """The one attachment, a PNG chart that the embed shows."""
    assert [a.filename for a in reply.attachments] == [CHART_FILENAME]
    assert reply.embeds[0]["image"]["url"].endswith(f"/{CHART_FILENAME}")
    chart = Image.open(io.BytesIO(reply.attachments[0].data))
    chart.load()
    assert chart.format == "PNG"
    return chart


async def about_embed(fake: FakeDiscord) -> dict:
    """Run /pony-about as alice: answered at once, ephemerally, with one embed."""
    interaction = await fake.slash("pony-about", user=fake.alice)
    response = await interaction.wait_response()
    assert response.type == 4 and response.ephemeral and interaction.errors == []
    assert response.data is not None
    (embed,) = response.data["embeds"]
    assert embed["title"] == "About ponybot" and embed["color"] == PURPLE
    return embed


async def test_pony_stats_of_an_empty_queue(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    await start_bot(wait_model=False)
    reply = await stats_reply(fake)
    embed = reply.embeds[0]
    assert embed["title"] == "ponybot statistics" and embed["color"] == PURPLE
    assert embed["footer"]["text"] == FOOTER
    assert embed["description"].splitlines() == [
        "**Last 24 h:** 0 jobs, 0 images",
        "**Last 7 days:** 0 jobs, 0 images",
        "**Wait (7 d):** median n/a · p95 n/a",
        "**Run time (7 d):** median n/a · p95 n/a",
        "**Top samplers (7 d):** none yet",
        "**Outcomes (7 d):** done 0 · failed 0 · dead 0 · cancelled 0",
    ]
    assert chart_of(reply).size == (800, 400)
    assert fake.channel_messages(fake.channel_id, include_ephemeral=False) == [], "nothing in the channel"


async def test_pony_stats_counts_a_finished_and_a_failed_job(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    pony = await start_bot()
    interaction = await fake.slash("pony", {"prompt": "fine", "count": 2, "sampler": "Euler a"})
    await interaction.wait_followup(timeout=20)
    await fake.wait_for_message(is_result, timeout=30)
    await wait_for_status(pony, 1, "done", 10)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug in generation")

    generator = pony.engine.generator
    for name in ("txt2img", "txt2img_batch"):
        setattr(generator, name, broken)
    interaction = await fake.slash("pony", {"prompt": "broken", "count": 1}, user=fake.bob)
    await interaction.wait_followup(timeout=20)
    await wait_for_status(pony, 2, "failed", 10)

    reply = await stats_reply(fake)
    embed = reply.embeds[0]
    waits, run = await _waits_and_run(pony)
    assert len(waits) == 2, "both jobs started"
    median_wait = format_duration(sum(waits) / 2, precise=True)
    lines = embed["description"].splitlines()
    assert lines[:2] == ["**Last 24 h:** 2 jobs, 2 images", "**Last 7 days:** 2 jobs, 2 images"]
    assert lines[2].startswith(f"**Wait (7 d):** median {median_wait} · p95 ")
    precise_run = format_duration(run, precise=True)
    assert lines[3] == f"**Run time (7 d):** median {precise_run} · p95 {precise_run}", (
        "the failed job has none"
    )
    assert lines[4] == "**Top samplers (7 d):** DDIM (1), Euler a (1)"
    assert lines[5] == "**Outcomes (7 d):** done 1 · failed 1 · dead 0 · cancelled 0"
    assert chart_of(reply).size == (800, 400)


async def _waits_and_run(pony: Services) -> tuple[list[float], float]:
    """The jobs' waits, and the one run time, straight from the jobs table."""
    with sqlite3.connect(pony.settings.db_path) as db:
        rows = db.execute(
            "SELECT status, created_at, started_at, generated_at, result_files FROM jobs"
        ).fetchall()
    assert [(status, len(json.loads(files or "[]"))) for status, *_, files in rows] == [
        ("done", 2),
        ("failed", 0),
    ]
    waits = [started - created for _, created, started, _, _ in rows if started is not None]
    (run,) = [generated - started for _, _, started, generated, _ in rows if generated is not None]
    return waits, run


async def test_pony_stats_says_so_when_the_chart_cannot_be_drawn(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = discord_server
    await start_bot(wait_model=False)

    def no_chart(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(bot.ops.stats, "render_chart", no_chart)
    reply = await stats_reply(fake)
    assert reply.content == "I couldn't read the statistics right now."
    assert reply.embeds == [] and reply.attachments == []

    monkeypatch.undo()
    assert chart_of(await stats_reply(fake)).size == (800, 400), "the next one works again"


async def test_pony_about_of_a_local_model(discord_server: FakeDiscord, start_bot, tiny_model: Path) -> None:
    fake = discord_server
    await start_bot(wait_model=False)
    description = (await about_embed(fake))["description"]
    lines = description.splitlines()
    assert lines[0] == f"**ponybot** {bot_version()}: a self-hosted image bot."
    assert lines[1] == "**Model:** `tiny-sd` (a Stable Diffusion v1.x model)"
    assert lines[2] == f"**Licence:** [CreativeML Open RAIL-M]({LICENCE_URL})"
    assert "See the model's own card for its authors and training data." in lines
    assert "**By using this bot you agree not to use it or its images to:**" in lines
    assert [line for line in lines if line.startswith("- ")] == [f"- {item}" for item in USE_RESTRICTIONS]
    assert lines[-1].endswith(f"Full terms: {LICENCE_URL}")
    assert str(tiny_model.parent) not in description, "no server paths in Discord"
    assert "AstraliteHeart" not in description and len(description) <= 4096


async def test_pony_about_credits_pony_diffusion(
    discord_server: FakeDiscord, start_bot, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    model = tmp_path / "models" / "pony-diffusion-v2"
    model.parent.mkdir()
    model.symlink_to(tiny_model, target_is_directory=True)
    await start_bot(wait_model=False, PONY_MODEL=str(model))
    description = (await about_embed(fake))["description"]
    assert "**Model:** `pony-diffusion-v2` (a Stable Diffusion v1.x model)" in description.splitlines()
    assert PONY_DIFFUSION_CREDITS in description
    assert "See the model's own card" not in description and str(tmp_path) not in description
