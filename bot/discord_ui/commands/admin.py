"""`/pony-admin`: status, pause/resume, cancel, purge, ban/unban and per-guild settings.

Discord shows the group only to members with Manage Server (`default_member_permissions`);
every subcommand checks that permission again, because a server can change who sees a command
and a modified client can send anything. Option ranges are checked here too, for the same reason.
Answers are ephemeral. Pause and resume act on the bot's one worker (every server it is in).

No `from __future__ import annotations` here: discord.py reads the parameter annotations.
"""

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from bot.config import Settings
from bot.discord_ui.actions import JobActions, cancel_text
from bot.discord_ui.replies import tell
from bot.discord_ui.services import Services
from bot.jobs.contract import JobQueueContract
from bot.jobs.guild_settings import Ban, GuildSettings
from bot.jobs.models import JobStatus
from bot.policy.guard import Policy, normalize_term
from bot.policy.text import escape_for_discord
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker, WorkerState
from generator.params import MAX_COUNT, MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

NOT_ADMIN = "You need the Manage Server permission to use this."
GIB = 1024**3
MAX_OPEN_JOBS = 25
MAX_COOLDOWN_S = 3600.0
MAX_TERM_CHARS = 100
MAX_TERMS = 500
MAX_CHANNELS = 100
#: what `negative`/`nsfw_negative` accept to mean "no default negative prompt"
EMPTY_WORDS = ("none", "-")

#: /pony-admin settings reset choices -> guild_settings columns (None = everything)
RESETTABLE: dict[str, str | None] = {
    "everything": None,
    "default steps": "default_steps",
    "default count": "default_count",
    "max steps": "max_steps",
    "max open jobs": "max_open_jobs_per_user",
    "cooldown": "cooldown_s",
    "negative": "default_negative",
    "nsfw negative": "nsfw_default_negative",
}


def is_admin(interaction: discord.Interaction) -> bool:
    """Manage Server (or Administrator) in a guild."""
    perms = interaction.permissions
    return interaction.guild_id is not None and (perms.manage_guild or perms.administrator)


async def _begin(interaction: discord.Interaction) -> bool:
    """Defer (ephemeral); True for an admin, else answer NOT_ADMIN and return False."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    if not is_admin(interaction):
        log.warning(
            "refused /pony-admin to a member without Manage Server", extra={"user_id": interaction.user.id}
        )
        await tell(interaction, NOT_ADMIN)
        return False
    return True


def _guild_id(interaction: discord.Interaction) -> int:
    """The guild of an admin's interaction (`_begin` checked there is one)."""
    assert interaction.guild_id is not None, "checked by is_admin"
    return interaction.guild_id


def _admin_command(
    group: app_commands.Group, name: str, description: str
) -> Callable[[Callable[..., Awaitable[str]]], app_commands.Command[app_commands.Group, ..., None]]:
    """Register `fn(interaction, **options) -> reply text` as a checked subcommand."""

    def decorate(fn: Callable[..., Awaitable[str]]) -> app_commands.Command[app_commands.Group, ..., None]:
        async def callback(interaction: discord.Interaction, **options: object) -> None:
            if await _begin(interaction):
                await tell(interaction, await fn(interaction, **options))

        # discord.py reads the options (and @describe/@choices data) from the callback: give it fn's
        functools.update_wrapper(callback, fn)
        callback.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        return group.command(name=name, description=description)(callback)

    return decorate


# --- texts --------------------------------------------------------------------------------------


#: pause/resume on a gateway that runs no worker (`ponybot run --no-worker`)
NO_LOCAL_WORKER = (
    "This process runs no worker: the `ponybot worker` processes draw the jobs."
    " Stop or start those to pause or resume."
)


async def status_text(queue: JobQueueContract, worker: Worker, engine: Engine) -> str:
    """Queue depth, running job, worker state, model and GPU memory."""
    counts = await queue.counts()
    running = ", ".join(f"#{job_id}" for job_id in worker.current_job_ids) or "nothing"
    paused = worker.paused and worker.state is not WorkerState.PAUSED  # e.g. finishing a job
    state = worker.describe() + (" (paused)" if paused else "")
    model = engine.describe() + (f": {engine.error}" if engine.error else "")
    gpu = engine.gpu_memory()
    gpu_line = (
        f"{gpu[0]}, {gpu[1] / GIB:.1f} of {gpu[2] / GIB:.1f} GiB in use" if gpu else "none in use (CPU)"
    )
    return "\n".join(
        [
            "**ponybot status**",
            f"Worker: {state}",
            f"Running: {running}",
            f"Queue: {counts['queued']} waiting, {counts['running']} running, "
            f"{counts['generated']} being posted",
            f"Model: {model}",
            f"GPU: {gpu_line}",
        ]
    )


def listed(items: list[str], budget: int) -> str:
    """`items` joined by commas, as many whole items as fit in `budget` characters, then "… and N more"."""
    shown: list[str] = []
    used = 0
    for item in items:
        if shown and used + len(item) + 2 > budget:
            return ", ".join(shown) + f" … and {len(items) - len(shown)} more"
        shown.append(item)
        used += len(item) + 2
    return ", ".join(shown)


def settings_text(settings: Settings, guild: GuildSettings, policy: Policy, bans: list[Ban]) -> str:
    """The guild's effective settings, each marked (server) when overridden here."""

    def mark(value: object) -> str:
        return " (server)" if value is not None else ""

    def shown(text: str) -> str:
        return escape_for_discord(text, 300) if text else "(none)"

    # budgets keep the whole reply under Discord's 2,000 characters, whatever the lists hold
    channels = listed([f"<#{c}>" for c in guild.allowed_channels], 250) or "all channels"
    terms = listed([f"`{t}`" for t in guild.blocked_terms], 450) or "none"
    banned = listed([f"<@{b.user_id}>" for b in bans], 200) or "nobody"
    return "\n".join(
        [
            "**ponybot settings in this server**",
            f"Default steps: {policy.default_steps}{mark(guild.default_steps)}",
            f"Default count: {policy.default_count}{mark(guild.default_count)}",
            f"Max steps: {policy.max_steps}{mark(guild.max_steps)}",
            f"Max open jobs per member: {policy.limits.max_open_per_user}{mark(guild.max_open_jobs_per_user)}",
            f"Cooldown: {policy.limits.cooldown_s:g} s{mark(guild.cooldown_s)}",
            f"Negative: {shown(policy.default_negative)}{mark(guild.default_negative)}",
            f"NSFW negative: {shown(policy.nsfw_default_negative)}{mark(guild.nsfw_default_negative)}",
            f"Allowed channels: {channels}",
            f"Blocked terms (server): {terms}; global: {len(settings.blocked_term_list)}",
            f"Banned: {banned}",
        ]
    )


def _out_of_range(name: str, value: float | None, low: float, high: float) -> str | None:
    if value is None or low <= value <= high:
        return None
    return f"{name} must be between {low:g} and {high:g}."


def _negative(value: str | None) -> str | None:
    if value is None:
        return None
    return "" if value.strip().lower() in EMPTY_WORDS else value.strip()


async def _purge(
    queue: JobQueueContract, actions: JobActions, guild_id: int, user_id: int
) -> tuple[int, int]:
    """Cancel a member's open jobs in the guild: (cancelled, stopping)."""
    cancelled = stopping = 0
    for job in await queue.open_jobs(user_id):
        if job.guild_id != guild_id or job.status is JobStatus.GENERATED:
            continue
        outcome = await actions.cancel_job(job)
        if outcome == "requested":
            stopping += 1
        elif outcome == "cancelled":
            cancelled += 1
    return cancelled, stopping


def _purged(cancelled: int, stopping: int) -> str:
    parts = [f"cancelled {cancelled} waiting job{'s' if cancelled != 1 else ''}"]
    if stopping:
        parts.append(f"stopping {stopping} running")
    return " and ".join(parts)


# --- the group ----------------------------------------------------------------------------------


def admin_group(services: Services) -> app_commands.Group:
    """Build `/pony-admin` with its subcommands, served by `services`."""
    settings = services.settings
    queue, worker, actions = services.queue, services.worker, services.actions
    store = services.guild_settings
    steps_limit = settings.max_steps
    group = app_commands.Group(
        name="pony-admin",
        description="Run ponybot in this server",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    settings_group = app_commands.Group(
        name="settings", description="This server's defaults and limits", parent=group
    )
    channels_group = app_commands.Group(
        name="channels", description="Where ponybot may be used", parent=group
    )
    blocked_group = app_commands.Group(
        name="blocked", description="This server's blocked prompt terms", parent=group
    )

    @_admin_command(group, "status", "Queue depth, running job, worker, model and GPU")
    async def status(interaction: discord.Interaction) -> str:
        return await status_text(queue, worker, services.engine)

    @_admin_command(group, "pause", "Stop starting new jobs (the running one finishes)")
    async def pause(interaction: discord.Interaction) -> str:
        if worker.state is WorkerState.ELSEWHERE:
            return NO_LOCAL_WORKER
        if worker.paused:
            return "The worker is already paused."
        worker.pause()
        log.info("worker paused by an admin", extra={"user_id": interaction.user.id})
        return "Paused: queued jobs wait (a running job finishes). Use /pony-admin resume to go on."

    @_admin_command(group, "resume", "Start jobs again after a pause")
    async def resume(interaction: discord.Interaction) -> str:
        if worker.state is WorkerState.ELSEWHERE:
            return NO_LOCAL_WORKER
        if not worker.paused:
            return "The worker isn't paused."
        worker.resume()
        log.info("worker resumed by an admin", extra={"user_id": interaction.user.id})
        return "Resumed: queued jobs start again."

    @_admin_command(group, "cancel", "Cancel any member's job")
    @app_commands.describe(job="The job number")
    async def cancel(interaction: discord.Interaction, job: app_commands.Range[int, 1]) -> str:
        found = await queue.get(job)
        if found is None or found.guild_id != interaction.guild_id:
            return f"There is no job #{job} in this server."
        log.info("admin cancel", extra={"job_id": job, "user_id": interaction.user.id})
        return cancel_text(job, await actions.cancel_job(found))

    @_admin_command(group, "purge", "Cancel all open jobs of a member")
    @app_commands.describe(user="Whose jobs to cancel")
    async def purge(interaction: discord.Interaction, user: discord.User) -> str:
        cancelled, stopping = await _purge(queue, actions, _guild_id(interaction), user.id)
        return f"<@{user.id}>: {_purged(cancelled, stopping)}."

    @_admin_command(group, "ban", "Stop a member from using ponybot here (cancels their jobs)")
    @app_commands.describe(user="Who to ban", reason="Why (kept with the ban)")
    async def ban(
        interaction: discord.Interaction,
        user: discord.User,
        reason: app_commands.Range[str, 1, 200] | None = None,
    ) -> str:
        if user.id == interaction.user.id:
            return "You can't ban yourself."
        guild_id = _guild_id(interaction)
        created = await store.ban(guild_id, user.id, interaction.user.id, reason)
        cancelled, stopping = await _purge(queue, actions, guild_id, user.id)
        log.info("member banned", extra={"user_id": user.id, "by": interaction.user.id})
        first = f"Banned <@{user.id}> from ponybot here" if created else f"<@{user.id}> was already banned"
        return f"{first}; {_purged(cancelled, stopping)}."

    @_admin_command(group, "unban", "Let a banned member use ponybot again")
    @app_commands.describe(user="Who to unban")
    async def unban(interaction: discord.Interaction, user: discord.User) -> str:
        if await store.unban(_guild_id(interaction), user.id):
            log.info("member unbanned", extra={"user_id": user.id, "by": interaction.user.id})
            return f"Unbanned <@{user.id}>."
        return f"<@{user.id}> isn't banned."

    # --- settings -------------------------------------------------------------------------------

    async def show(guild_id: int) -> str:
        guild = await store.get(guild_id)
        return settings_text(settings, guild, Policy.build(settings, guild), await store.bans(guild_id))

    @_admin_command(settings_group, "show", "This server's settings, bans and allowed channels")
    async def settings_show(interaction: discord.Interaction) -> str:
        return await show(_guild_id(interaction))

    @_admin_command(settings_group, "set", "Change defaults and limits for this server")
    @app_commands.describe(
        default_steps=f"Steps when a member gives none (1-{steps_limit})",
        default_count=f"Images per request when a member gives none (1-{MAX_COUNT})",
        max_steps=f"Most steps a member may ask for (1-{steps_limit})",
        max_open_jobs=f"Open jobs one member may have (1-{MAX_OPEN_JOBS})",
        cooldown=f"Seconds between two requests of one member (0-{MAX_COOLDOWN_S:g})",
        negative="Negative prompt added outside age-restricted channels ('none' for none)",
        nsfw_negative="Negative prompt added in age-restricted channels ('none' for none)",
    )
    async def settings_set(
        interaction: discord.Interaction,
        default_steps: app_commands.Range[int, 1, steps_limit] | None = None,
        default_count: app_commands.Range[int, 1, MAX_COUNT] | None = None,
        max_steps: app_commands.Range[int, 1, steps_limit] | None = None,
        max_open_jobs: app_commands.Range[int, 1, MAX_OPEN_JOBS] | None = None,
        cooldown: app_commands.Range[float, 0.0, MAX_COOLDOWN_S] | None = None,
        negative: app_commands.Range[str, 1, MAX_PROMPT_CHARS] | None = None,
        nsfw_negative: app_commands.Range[str, 1, MAX_PROMPT_CHARS] | None = None,
    ) -> str:
        problems = [
            _out_of_range("Default steps", default_steps, 1, settings.max_steps),
            _out_of_range("Default count", default_count, 1, MAX_COUNT),
            _out_of_range("Max steps", max_steps, 1, settings.max_steps),
            _out_of_range("Max open jobs", max_open_jobs, 1, MAX_OPEN_JOBS),
            _out_of_range("Cooldown", cooldown, 0, MAX_COOLDOWN_S),
        ]
        for name, text in (("Negative", negative), ("NSFW negative", nsfw_negative)):
            if text is not None and len(text) > MAX_PROMPT_CHARS:
                problems.append(f"{name} must be at most {MAX_PROMPT_CHARS} characters.")
        problem = next((p for p in problems if p), None)
        if problem:
            return problem
        values = {
            "default_steps": default_steps,
            "default_count": default_count,
            "max_steps": max_steps,
            "max_open_jobs_per_user": max_open_jobs,
            "cooldown_s": cooldown,
            "default_negative": _negative(negative),
            "nsfw_default_negative": _negative(nsfw_negative),
        }
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return "Nothing to change: give at least one option."
        guild_id = _guild_id(interaction)
        current = await store.get(guild_id)
        steps = (current.default_steps if default_steps is None else default_steps) or settings.default_steps
        limit = (current.max_steps if max_steps is None else max_steps) or settings.max_steps
        if steps > limit:
            return f"Default steps ({steps}) can't be above max steps ({limit})."
        await store.set_values(guild_id, interaction.user.id, values)
        log.info("guild settings changed: %s", sorted(values), extra={"user_id": interaction.user.id})
        return "Saved.\n" + await show(guild_id)

    @_admin_command(settings_group, "reset", "Go back to the global value of one setting, or all")
    @app_commands.describe(setting="Which one (everything also clears channels and blocked terms)")
    @app_commands.choices(setting=[app_commands.Choice(name=k, value=k) for k in RESETTABLE])
    async def settings_reset(interaction: discord.Interaction, setting: str) -> str:
        if setting not in RESETTABLE:
            return f"Unknown setting; choose one of: {', '.join(RESETTABLE)}."
        guild_id = _guild_id(interaction)
        column = RESETTABLE[setting]
        if column is None:
            await store.reset(guild_id)
        else:
            await store.set_values(guild_id, interaction.user.id, {column: None})
        log.info("guild setting reset: %s", setting, extra={"user_id": interaction.user.id})
        return f"Reset {setting}.\n" + await show(guild_id)

    # --- channels -------------------------------------------------------------------------------

    @_admin_command(channels_group, "allow", "Allow ponybot in a channel (then only in allowed ones)")
    @app_commands.describe(channel="The channel")
    async def channels_allow(interaction: discord.Interaction, channel: discord.TextChannel) -> str:
        guild_id = _guild_id(interaction)
        current = await store.get(guild_id)
        if channel.id not in current.allowed_channels and len(current.allowed_channels) >= MAX_CHANNELS:
            return f"At most {MAX_CHANNELS} channels can be listed."
        updated = await store.allow_channel(guild_id, interaction.user.id, channel.id)
        listed = ", ".join(f"<#{c}>" for c in updated.allowed_channels)
        return f"ponybot now works only in: {listed}."

    @_admin_command(channels_group, "disallow", "Remove a channel from the allowed list")
    @app_commands.describe(channel="The channel")
    async def channels_disallow(interaction: discord.Interaction, channel: discord.TextChannel) -> str:
        updated = await store.disallow_channel(_guild_id(interaction), interaction.user.id, channel.id)
        if not updated.allowed_channels:
            return "No channels are listed: ponybot works in every channel."
        listed = ", ".join(f"<#{c}>" for c in updated.allowed_channels)
        return f"ponybot now works only in: {listed}."

    @_admin_command(channels_group, "clear", "Allow ponybot in every channel again")
    async def channels_clear(interaction: discord.Interaction) -> str:
        await store.clear_list(_guild_id(interaction), interaction.user.id, "allowed_channels")
        return "ponybot works in every channel again."

    # --- blocked terms --------------------------------------------------------------------------

    @_admin_command(blocked_group, "add", "Refuse prompts with this term outside age-restricted channels")
    @app_commands.describe(term="A word or phrase (matched ignoring case, width and invisible characters)")
    async def blocked_add(
        interaction: discord.Interaction, term: app_commands.Range[str, 1, MAX_TERM_CHARS]
    ) -> str:
        norm = normalize_term(term)
        if not norm or len(norm) > MAX_TERM_CHARS:
            return f"A term needs 1 to {MAX_TERM_CHARS} letters or digits."
        guild_id = _guild_id(interaction)
        current = await store.get(guild_id)
        if norm not in current.blocked_terms and len(current.blocked_terms) >= MAX_TERMS:
            return f"At most {MAX_TERMS} terms can be blocked."
        await store.add_blocked_term(guild_id, interaction.user.id, norm)
        log.info("blocked term added", extra={"user_id": interaction.user.id})
        return f"Blocked `{norm}` outside age-restricted channels."

    @_admin_command(blocked_group, "remove", "Stop blocking a term")
    @app_commands.describe(term="The term to unblock")
    async def blocked_remove(
        interaction: discord.Interaction, term: app_commands.Range[str, 1, MAX_TERM_CHARS]
    ) -> str:
        norm = normalize_term(term)
        guild_id = _guild_id(interaction)
        if norm not in (await store.get(guild_id)).blocked_terms:
            return f"`{norm}` isn't blocked in this server."
        await store.remove_blocked_term(guild_id, interaction.user.id, norm)
        return f"Unblocked `{norm}`."

    @_admin_command(blocked_group, "clear", "Remove all of this server's blocked terms")
    async def blocked_clear(interaction: discord.Interaction) -> str:
        await store.clear_list(_guild_id(interaction), interaction.user.id, "blocked_terms")
        return "Removed all of this server's blocked terms (global ones still apply)."

    return group
