"""`/pony-queue` (my open jobs, with Cancel buttons) and `/pony-info` (a job's parameters, and the
result posted again with working buttons, like Midjourney's /show).

No `from __future__ import annotations` here: discord.py reads the parameter annotations.
"""

import logging

import discord
from discord import app_commands

from bot.discord_ui import messages
from bot.discord_ui.buttons import ButtonAction, JobButton
from bot.discord_ui.replies import tell
from bot.discord_ui.result_message import build_result_message
from bot.discord_ui.services import Services
from bot.errors import Refusal
from bot.jobs.contract import JobQueueContract
from bot.jobs.models import Job, JobStatus
from bot.policy.permissions import missing_permissions
from bot.policy.text import escape_for_discord, format_duration
from generator.params import GenerationParams

log = logging.getLogger(__name__)

#: Discord's largest integer option value: 2^53 - 1 (Int53Type in Discord's OpenAPI spec; 2^53 is refused)
MAX_JOB_ID = 2**53 - 1
#: buttons in one message: 5 rows of 5
MAX_BUTTONS = 25
QUEUE_PROMPT_CHARS = 80
INFO_COLOUR = discord.Colour.blurple()
_STATUS_WORDS = {
    JobStatus.QUEUED: "waiting",
    JobStatus.RUNNING: "generating",
    JobStatus.GENERATED: "finished, being posted",
    JobStatus.DONE: "done",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.DEAD: "failed (gave up after retries)",
}


# --- /pony-queue --------------------------------------------------------------------------------


async def queue_lines(queue: JobQueueContract, jobs: list[Job]) -> list[str]:
    """One line per open job: number, state, position or time left, prompt."""
    lines = []
    for job in jobs:
        prompt = escape_for_discord(str(job.params.get("prompt", "")), QUEUE_PROMPT_CHARS)
        if job.status is JobStatus.QUEUED:
            position = await queue.position(job.id)
            eta = await queue.eta_seconds(job.id)
            where = f"position {position}, " if position else ""
            state = f"waiting: {where}about {format_duration(eta)}"
        elif job.status is JobStatus.RUNNING:
            eta = await queue.eta_seconds(job.id)
            state = f"generating: about {format_duration(eta)} left"
        else:
            state = _STATUS_WORDS[job.status]
        lines.append(f"**#{job.id}** {state} — {prompt}")
    return lines


def cancel_view(jobs: list[Job]) -> discord.ui.View | None:
    """A "Cancel #n" button for each job that can still be cancelled (at most 25)."""
    view = discord.ui.View(timeout=None)
    for job in jobs:
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING) and len(view.children) < MAX_BUTTONS:
            button = JobButton(ButtonAction.CANCEL, job.id)
            button.item.label = f"Cancel #{job.id}"
            view.add_item(button)
    return view if view.children else None


def queue_command(queue: JobQueueContract) -> app_commands.Command:
    """Build `/pony-queue`."""

    @app_commands.command(name="pony-queue", description="Your open ponybot jobs, and buttons to cancel them")
    @app_commands.guild_only()
    async def pony_queue(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = [j for j in await queue.open_jobs(interaction.user.id) if j.guild_id == interaction.guild_id]
        if not jobs:
            await tell(interaction, "You have no open jobs here.")
            return
        lines = await queue_lines(queue, jobs)
        view = cancel_view(jobs)
        text = "Your open jobs:\n" + "\n".join(lines)
        if view is not None:
            text += "\nPress a button below to cancel one."
        kwargs = {"view": view} if view is not None else {}
        await tell(interaction, text, **kwargs)

    return pony_queue


# --- /pony-info ---------------------------------------------------------------------------------


def info_embed(job: Job) -> discord.Embed:
    """Every parameter of a job, its seeds and its state."""
    params = GenerationParams.from_dict(job.params)
    embed = discord.Embed(
        title=f"Job #{job.id}",
        description=escape_for_discord(params.prompt, messages.PROMPT_ECHO_LIMIT),
        colour=INFO_COLOUR,
    )
    embed.add_field(name="Status", value=_STATUS_WORDS[job.status])
    embed.add_field(name="Kind", value=str(job.kind))
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    embed.add_field(
        name="Negative",
        value=escape_for_discord(params.negative, messages.NEGATIVE_ECHO_LIMIT) if params.negative else "-",
        inline=False,
    )
    seeds = job.seeds or [params.seed + i for i in range(params.count)]
    embed.add_field(name="Seeds" if len(seeds) > 1 else "Seed", value=", ".join(str(s) for s in seeds))
    embed.add_field(name="Steps", value=str(params.steps))
    embed.add_field(name="Guidance", value=f"{params.guidance:g}")
    embed.add_field(name="Sampler", value=params.sampler)
    embed.add_field(name="Size", value=f"{params.width}x{params.height}")
    embed.add_field(name="Count", value=str(params.count))
    embed.add_field(name="Created", value=f"<t:{int(job.created_at)}:R>")
    if job.gen_seconds:
        embed.add_field(name="Time", value=format_duration(job.gen_seconds))
    if job.parent_id:
        index = f", image {job.image_index + 1}" if job.image_index is not None else ""
        embed.add_field(name="From", value=f"job #{job.parent_id}{index}")
    if job.error and job.status is not JobStatus.DONE:
        embed.add_field(name="Reason", value=escape_for_discord(job.error, 500), inline=False)
    return embed


async def repost(services: Services, interaction: discord.Interaction, job: Job) -> str:
    """Post the job's result again in this channel; return what to tell the member."""
    if job.status is not JobStatus.DONE:
        return f"Job #{job.id} is {_STATUS_WORDS[job.status]}; there is no result to show."
    if job.pruned_at is None:  # saved on another machine: fetched from the queue first
        await services.queue.ensure_files(job.result_files)
    paths = [services.delivery.images_dir / name for name in job.result_files]
    if job.pruned_at is not None or not paths or not all(p.exists() for p in paths):
        return (
            f"The images of job #{job.id} have expired, so they can't be posted again; "
            "/pony with the same seed draws them again."
        )
    missing = missing_permissions(interaction.app_permissions)
    if missing:
        return f"I can't post it here: I'm missing {', '.join(missing)} in this channel."
    if interaction.channel_id is None:  # Discord names the channel of every interaction from a guild
        return "I can't post it here."
    post = await build_result_message(job, paths, services.delivery.file_limit(job))
    channel = services.client.get_partial_messageable(interaction.channel_id, guild_id=interaction.guild_id)
    try:
        await channel.send(embed=post.embed, files=post.files, view=post.view)
    except discord.HTTPException as exc:
        log.warning("could not re-post job %s: %s", job.id, exc, extra={"job_id": job.id})
        return "I couldn't post it here right now; try again in a moment."
    log.info("result re-posted", extra={"job_id": job.id, "user_id": interaction.user.id})
    return f"Posted job #{job.id} again below."


def info_command(services: Services) -> app_commands.Command:
    """Build `/pony-info`."""

    @app_commands.command(name="pony-info", description="A job's parameters and seeds, and its result again")
    @app_commands.describe(job="The job number (in the footer of its message)")
    @app_commands.guild_only()
    async def pony_info(
        interaction: discord.Interaction, job: app_commands.Range[int, 1, MAX_JOB_ID]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        found = await services.queue.get(job) if 1 <= job <= MAX_JOB_ID else None
        if found is None or found.guild_id != interaction.guild_id:
            await tell(interaction, f"There is no job #{job} in this server.")
            return
        guard = services.guard
        try:
            guard.check_job_access(interaction, found, get_channel=services.client.get_channel)
            policy = await guard.admit(interaction)
            guard.check_prompt(interaction.channel, str(found.params.get("prompt", "")), policy)
        except Refusal as exc:
            await tell(interaction, str(exc))
            return
        text = await repost(services, interaction, found)
        await tell(interaction, text, embed=info_embed(found))

    return pony_info


def member_commands(services: Services) -> list[app_commands.Command]:
    """The member slash commands, served by `services` (see `command_sync.add_commands`)."""
    return [queue_command(services.queue), info_command(services)]
