"""`/pony-stats` and `/pony-about`: usage numbers with a 24-hour chart, and model, licence, credits.

Both answer ephemerally: only the member who asked sees the answer, so they never clutter a
channel and work where the bot may not post (an ephemeral reply needs no channel permissions).

No `from __future__ import annotations` here: discord.py reads the parameter annotations.
"""

import asyncio
import io
import logging
import time

import discord
from discord import app_commands

from bot.config import Settings
from bot.jobs.contract import JobQueueContract
from bot.jobs.db import connect
from bot.jobs.pg_queue import PgJobQueue
from bot.ops.about import about_text, bot_version

log = logging.getLogger(__name__)

CHART_FILENAME = "ponybot-stats.png"
COLOUR = discord.Colour.purple()


async def _stats_message(settings: Settings, queue: JobQueueContract) -> tuple[discord.Embed, discord.File]:
    """Read the jobs table (PostgreSQL: the queue's pool; SQLite: an own short-lived connection, so
    the queue's is never held), render the chart in a thread."""
    from bot.ops.stats import compute_stats, format_stats, hourly_series, render_chart  # matplotlib: lazy

    now = time.time()
    if isinstance(queue, PgJobQueue):
        stats = await compute_stats(queue, now=now)
        series = await hourly_series(queue, now=now)
    else:
        conn = await connect(settings.db_path, busy_timeout_ms=settings.db_busy_timeout_ms)
        try:
            stats = await compute_stats(conn, now=now)
            series = await hourly_series(conn, now=now)
        finally:
            await conn.close()
    png = await asyncio.to_thread(render_chart, series)
    embed = discord.Embed(title="ponybot statistics", description=format_stats(stats), colour=COLOUR)
    embed.set_image(url=f"attachment://{CHART_FILENAME}")
    embed.set_footer(text=f"ponybot {bot_version()} · bars: jobs per hour · line: median wait")
    return embed, discord.File(io.BytesIO(png), filename=CHART_FILENAME)


def stats_command(settings: Settings, queue: JobQueueContract) -> app_commands.Command:
    """Build `/pony-stats`."""

    @app_commands.command(name="pony-stats", description="How busy ponybot has been: jobs, waits, samplers")
    async def pony_stats(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            embed, chart = await _stats_message(settings, queue)
        except Exception:
            log.exception("/pony-stats failed")
            await interaction.followup.send("I couldn't read the statistics right now.", ephemeral=True)
            return
        await interaction.followup.send(embed=embed, file=chart, ephemeral=True)

    return pony_stats


def about_command(settings: Settings) -> app_commands.Command:
    """Build `/pony-about`."""

    @app_commands.command(
        name="pony-about", description="The model, its licence and use restrictions, credits, version"
    )
    async def pony_about(interaction: discord.Interaction) -> None:
        embed = discord.Embed(title="About ponybot", description=about_text(settings.model), colour=COLOUR)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    return pony_about


def info_commands(settings: Settings, queue: JobQueueContract) -> list[app_commands.Command]:
    """The informational slash commands, for `PonyBot.setup_hook` to add to its tree."""
    return [stats_command(settings, queue), about_command(settings)]
