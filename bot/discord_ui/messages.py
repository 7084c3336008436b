"""What ponybot's messages say: status, progress, result and failure embeds (no I/O here)."""

from __future__ import annotations

from typing import NamedTuple

import discord

from bot.jobs.models import Job, JobKind, JobStatus
from bot.policy.text import escape_for_discord, format_duration
from generator.errors import InvalidParams
from generator.params import GenerationParams
from generator.prompt_syntax import parse_prompt, prompt_notes
from generator.samplers import SCHEDULES

PROMPT_ECHO_LIMIT = 1000
NEGATIVE_ECHO_LIMIT = 300
COLOR_WAITING = discord.Colour.blurple()
COLOR_DONE = discord.Colour.green()
COLOR_FAILED = discord.Colour.red()
COLOR_CANCELLED = discord.Colour.dark_grey()

_KIND_TITLES = {JobKind.TXT2IMG: "Image", JobKind.UPSCALE: "Upscale", JobKind.VARIATION: "Variations"}


def footer_text(job_id: int) -> str:
    """The footer that names the job; delivery finds its own messages by it."""
    return f"ponybot job #{job_id}"


def names_job(message: discord.Message, job_id: int) -> bool:
    """True when one of the message's embeds has the job's footer (`footer_text`)."""
    footer = footer_text(job_id)
    return any(embed.footer.text == footer for embed in message.embeds)


def _base(job: Job, title: str, colour: discord.Colour) -> discord.Embed:
    params = GenerationParams.from_dict(job.params)
    embed = discord.Embed(
        title=title,
        description=escape_for_discord(params.prompt, PROMPT_ECHO_LIMIT),
        colour=colour,
    )
    embed.set_footer(text=footer_text(job.id))
    return embed


def queued_embed(job: Job, position: int | None, eta_s: float | None) -> discord.Embed:
    """The public status message while the job waits."""
    embed = _base(job, f"{_KIND_TITLES[JobKind(job.kind)]} queued", COLOR_WAITING)
    where = f"#{position} in the queue" if position else "waiting"
    embed.add_field(name="Queue", value=f"{where}, about {format_duration(eta_s)}")
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    return embed


def progress_embed(job: Job, step: int, total: int, has_preview: bool = False) -> discord.Embed:
    """The status message while generating: step n of N."""
    embed = _base(job, f"{_KIND_TITLES[JobKind(job.kind)]}: generating", COLOR_WAITING)
    bar_len = 20
    filled = round(bar_len * step / max(total, 1))
    embed.add_field(
        name="Progress", value=f"`{'█' * filled}{'░' * (bar_len - filled)}` step {step} of {total}"
    )
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    if has_preview:
        embed.set_image(url="attachment://preview.jpg")
    return embed


def result_embed(job: Job, image_size: tuple[int, int] | None = None) -> discord.Embed:
    """The final message: prompt, negative, seeds, steps, sampler, size, time and requester."""
    params = GenerationParams.from_dict(job.params)
    embed = _base(job, _KIND_TITLES[JobKind(job.kind)], COLOR_DONE)
    if params.negative:
        embed.add_field(
            name="Negative", value=escape_for_discord(params.negative, NEGATIVE_ECHO_LIMIT), inline=False
        )
    seeds = ", ".join(str(s) for s in job.seeds) or str(params.seed)
    embed.add_field(name="Seed" + ("s" if len(job.seeds) > 1 else ""), value=seeds)
    embed.add_field(name="Steps", value=str(params.steps))
    schedule = SCHEDULES.get(params.schedule, params.schedule)
    sampler = params.sampler if params.schedule == "automatic" else f"{params.sampler} ({schedule})"
    embed.add_field(name="Sampler", value=sampler)
    embed.add_field(name="Guidance", value=f"{params.guidance:g}")
    if params.clip_skip > 1:
        embed.add_field(name="Clip skip", value=str(params.clip_skip))
    hires = job.params.get("hires")
    if isinstance(hires, dict) and hires.get("scale"):
        embed.add_field(
            name="Hires fix", value=f"{float(hires['scale']):g}x, strength {float(hires['strength']):g}"
        )
    if job.params.get("source") and job.params.get("strength") is not None:
        embed.add_field(name="Source", value=f"uploaded image, strength {float(job.params['strength']):g}")
    syntax = _prompt_syntax(params)
    if syntax.loras:
        loras = ", ".join(f"{name} {weight:g}" for name, weight in syntax.loras)
        embed.add_field(name="LoRA", value=escape_for_discord(loras, 500))
    if syntax.notes:
        embed.add_field(name="Note", value=escape_for_discord("; ".join(syntax.notes), 500), inline=False)
    size = image_size or (params.width, params.height)
    embed.add_field(name="Size", value=f"{size[0]}x{size[1]}")
    embed.add_field(name="Time", value=format_duration(job.gen_seconds) if job.gen_seconds else "-")
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    return embed


class _Syntax(NamedTuple):
    loras: tuple[tuple[str, float], ...]
    notes: list[str]


def _prompt_syntax(params: GenerationParams) -> _Syntax:
    """The LoRAs a request used and what the generator ignored in its prompts ("ignored: AND")."""
    try:
        return _Syntax(parse_prompt(params.prompt).loras, prompt_notes(params.prompt, params.negative))
    except InvalidParams:  # validated before queueing; an old row must still show its result
        return _Syntax((), [])


def failure_embed(job: Job) -> discord.Embed:
    """The final message of a job that failed, died or was cancelled."""
    if job.status == JobStatus.CANCELLED:
        embed = _base(job, "Cancelled", COLOR_CANCELLED)
        embed.add_field(name="Reason", value=job.error or "Cancelled.")
    else:
        embed = _base(job, "Failed", COLOR_FAILED)
        embed.add_field(name="Reason", value=escape_for_discord(job.error or "Unknown error.", 500))
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    return embed


def requeued_embed(job: Job) -> discord.Embed:
    """The status message of a job that will be retried."""
    embed = _base(job, "Retrying soon", COLOR_WAITING)
    embed.add_field(name="Why", value=escape_for_discord(job.error or "A temporary problem.", 500))
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    return embed
