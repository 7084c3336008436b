"""A finished job's result post: its embed, its images fitted under the upload limits, its buttons.

Delivery posts it in place of the status message; /pony-info posts it again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import discord

from bot.discord_ui import messages
from bot.discord_ui.buttons import result_view
from bot.discord_ui.upload import fit_images
from bot.jobs.models import Job, JobKind

#: Discord's limit on all the attachments of one message together
MESSAGE_FILES_LIMIT = 25 * 1024 * 1024


@dataclass
class ResultMessage:
    """What to send: the result embed, the image files and the result buttons."""

    embed: discord.Embed
    files: list[discord.File]
    view: discord.ui.View
    #: bytes of each file as sent (to shrink under a lower limit after Discord answers 413)
    sizes: list[int]


async def build_result_message(job: Job, paths: list[Path], file_limit: int) -> ResultMessage:
    """The result post of `job` with its images at `paths`, each under `file_limit` bytes.

    Reads (and re-encodes, when too large) the images in a worker thread; raises `OSError`
    when one cannot be read.
    """
    loop = asyncio.get_running_loop()
    fitted = await loop.run_in_executor(None, fit_images, paths, file_limit, MESSAGE_FILES_LIMIT)
    embed = messages.result_embed(job, fitted.size)
    if fitted.note:
        embed.add_field(name="Note", value=fitted.note, inline=False)
    view = result_view(job.id, len(paths), can_vary=job.kind != JobKind.UPSCALE)
    return ResultMessage(embed=embed, files=fitted.files, view=view, sizes=fitted.sizes)
