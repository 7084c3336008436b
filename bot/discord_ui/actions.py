"""What users can do: submit a /pony job and press the buttons on its messages.

Shared by the slash commands and the persistent buttons. Every refusal is a short ephemeral
message; nothing here raises to the user.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord

from bot.discord_ui.messages import footer_text, format_duration
from bot.jobs.extras import hires_of, job_cost, job_extras
from bot.jobs.queue import Job, JobKind, JobStatus, QueueFull
from bot.logging_setup import log_job_event
from bot.policy.permissions import missing_permissions
from bot.policy.text import clean_prompt
from generator.errors import InvalidParams
from generator.extra_files import available_loras
from generator.hires import hires_size
from generator.params import GenerationParams, aspect_size, random_seed, validate

if TYPE_CHECKING:
    from bot.discord_ui.client import PonyBot
    from bot.policy.guard import Policy

log = logging.getLogger(__name__)

BUSY = "The queue is busy right now; nothing was queued. Try again in a moment."


class Refusal(Exception):
    """A request refused with a short, user-facing reason."""


class JobActions:
    """Use cases behind /pony and the buttons."""

    def __init__(self, bot: PonyBot):
        self.bot = bot

    # --- /pony --------------------------------------------------------------------------------

    def build_params(
        self,
        *,
        prompt: str,
        negative: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        count: int | None = None,
        aspect: str | None = None,
        sampler: str | None = None,
        schedule: str | None = None,
        clip_skip: int | None = None,
        lora: str | None = None,
        policy: Policy | None = None,
    ) -> GenerationParams:
        """Fill defaults from settings (or the guild's `policy`), clean the text and validate;
        raises InvalidParams."""
        s = self.bot.settings
        default_steps = policy.default_steps if policy else s.default_steps
        default_count = policy.default_count if policy else s.default_count
        width, height = aspect_size(aspect or "square", s.base_resolution)
        prompt = clean_prompt(prompt)
        if lora:  # the autocompleted option is the same as writing the tag at weight 1
            prompt = f"{prompt} <lora:{lora}:1>"
        params = GenerationParams(
            prompt=prompt,
            negative=clean_prompt(negative or ""),
            seed=random_seed() if seed is None else seed,
            steps=default_steps if steps is None else steps,
            guidance=s.default_guidance if guidance is None else guidance,
            width=width,
            height=height,
            count=default_count if count is None else count,
            sampler=sampler or s.default_sampler,
            schedule=schedule or "automatic",
            clip_skip=s.clip_skip if clip_skip is None else clip_skip,
        )
        return self.validate_params(params, policy)

    def validate_params(self, params: GenerationParams, policy: Policy | None = None) -> GenerationParams:
        """`validate` with the bot's limits (the guild's max steps); raises InvalidParams."""
        s = self.bot.settings
        max_steps = policy.max_steps if policy else s.max_steps
        return validate(
            params, max_pixels=s.max_pixels, max_steps=max_steps, loras=available_loras(s.lora_dir)
        )

    async def pony(self, interaction: discord.Interaction, **options: object) -> None:
        """/pony: defer, check member and channel, validate, enqueue, announce.

        `image`/`strength` (img2img of an upload) and `hires`/`hires_scale` (hires fix) are
        handled by `bot.member_images.MemberImages.pony_extras`.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        image = options.pop("image", None)
        strength = options.pop("strength", None)
        hires = options.pop("hires", None)
        hires_scale = options.pop("hires_scale", None)
        guard = self.bot.guard
        try:
            policy = await guard.admit(interaction)
            params = self.build_params(**options, policy=policy)  # type: ignore[arg-type]
            params = await guard.check_request(interaction, params, policy)
            kind, params, extra, note = await self.bot.images.pony_extras(
                interaction,
                params,
                image=image,  # type: ignore[arg-type]
                strength=strength,  # type: ignore[arg-type]
                hires=hires,  # type: ignore[arg-type]
                hires_scale=hires_scale,  # type: ignore[arg-type]
                aspect=options.get("aspect"),  # type: ignore[arg-type]
            )
        except (InvalidParams, Refusal, sqlite3.OperationalError) as exc:
            await self.tell_refusal(interaction, exc, "guard check")
            return
        job = await self._submit(interaction, kind=kind, params=params, policy=policy, extra=extra, note=note)
        if job is None and extra.get("source"):  # refused: the saved upload is nobody's
            self.bot.images.forget_source(str(extra["source"]))

    # --- buttons ------------------------------------------------------------------------------

    async def on_button(
        self, interaction: discord.Interaction, action: str, job_id: int, index: int | None
    ) -> None:
        """Dispatch a persistent button press."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.bot.queue.get(job_id)
        if job is None:
            await self._tell(interaction, "That job no longer exists.")
            return
        try:
            self.bot.guard.check_job_access(
                interaction, job, get_channel=self.bot.get_channel, reveals=action != "cancel"
            )
            match action:
                case "cancel":
                    await self._cancel(interaction, job)
                case "del":
                    await self._delete(interaction, job)
                case "reroll":
                    await self._reroll(interaction, job)
                case "up" | "var":
                    await self._from_image(interaction, job, action, index or 1)
        except (Refusal, sqlite3.OperationalError) as exc:
            await self.tell_refusal(interaction, exc, f"button {action} on job {job_id}")

    async def cancel_job(self, job: Job) -> str:
        """Cancel a job (no permission check) and tell its channel.

        Returns `JobQueue.cancel`'s outcome: "cancelled", "requested" (running: stops at its next
        step) or "not_open"; `cancel_text` words it.
        """
        outcome = await self.bot.queue.cancel(job.id)
        if outcome == "cancelled":
            cancelled = await self.bot.queue.get(job.id)
            if cancelled is not None:
                # if Discord fails here, the notice stays owed and the worker's sweep shows it
                await self.bot.delivery.notify(cancelled)
                self.bot.ops.job_finished(cancelled)  # never reached the worker: count it here
            log_job_event(log, job.id, job.user_id, "cancelled")
        elif outcome == "requested":
            self.bot.worker.request_cancel(job.id)
        return outcome

    async def _cancel(self, interaction: discord.Interaction, job: Job) -> None:
        if interaction.user.id != job.user_id:
            raise Refusal("Only the person who asked for this job can cancel it.")
        await self._tell(interaction, cancel_text(job.id, await self.cancel_job(job)))

    async def _delete(self, interaction: discord.Interaction, job: Job) -> None:
        perms = interaction.permissions
        if interaction.user.id != job.user_id and not perms.manage_messages:
            raise Refusal("Only the requester or a moderator can delete this.")
        if interaction.message is not None and not _names_job(interaction.message, job.id):
            raise Refusal("That button doesn't belong to this message.")
        if interaction.message is not None:
            try:
                await interaction.message.delete()
            except discord.NotFound:
                pass
            except discord.Forbidden:
                raise Refusal("I can't delete that message here.") from None
        log.info("result deleted", extra={"job_id": job.id, "user_id": interaction.user.id})
        await self._tell(interaction, "Deleted.")

    async def _reroll(self, interaction: discord.Interaction, job: Job) -> None:
        if job.kind == JobKind.UPSCALE:
            raise Refusal("An upscale can't be rerolled.")
        params = GenerationParams.from_dict(job.params).with_seed(random_seed())
        params = await self.bot.guard.check_request(interaction, params)
        extra = job_extras(job)  # an upload's source and strength, the hires fix
        if job.kind == JobKind.VARIATION:
            await self._submit(
                interaction,
                kind=JobKind.VARIATION,
                params=params,
                parent_id=job.parent_id,
                image_index=job.image_index,
                reply_to=interaction.message,
                extra=extra,
            )
        else:
            await self._submit(
                interaction,
                kind=JobKind.TXT2IMG,
                params=params,
                parent_id=job.id,
                reply_to=interaction.message,
                extra=extra,
            )

    async def _from_image(self, interaction: discord.Interaction, job: Job, action: str, number: int) -> None:
        if job.status != JobStatus.DONE:
            raise Refusal("That job has no finished images.")
        if not 1 <= number <= len(job.seeds):
            raise Refusal("There is no such image on that job.")
        base = GenerationParams.from_dict(job.params)
        base = await self.bot.guard.check_request(interaction, base)
        if action == "up":
            kind, params = JobKind.UPSCALE, base.single(number - 1)
        else:
            kind, params = JobKind.VARIATION, replace(base.with_seed(random_seed()), count=base.count)
            hires = hires_of(job.params)
            if hires:  # vary the hires picture at its own size (in the multiples of 64 offered)
                width, height = hires_size(base.width, base.height, float(hires["scale"]))
                params = replace(params, width=max(64, width // 64 * 64), height=max(64, height // 64 * 64))
        await self._submit(
            interaction,
            kind=kind,
            params=params,
            parent_id=job.id,
            image_index=number - 1,
            reply_to=interaction.message,
        )

    # --- shared -------------------------------------------------------------------------------

    async def _submit(
        self,
        interaction: discord.Interaction,
        *,
        kind: JobKind,
        params: GenerationParams,
        parent_id: int | None = None,
        image_index: int | None = None,
        reply_to: discord.Message | None = None,
        policy: Policy | None = None,
        extra: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> Job | None:
        """Enqueue and announce; returns the job (None when refused). `extra`: params keys beyond
        GenerationParams (bot.member_images: source, strength, hires); `note` leads the answer."""
        extra = extra or {}
        missing = missing_permissions(interaction.app_permissions)
        if missing:
            await self._tell(
                interaction, f"I can't post results here: I'm missing {', '.join(missing)} in this channel."
            )
            return None
        queue = self.bot.queue
        try:
            if policy is None:
                policy = await self.bot.guard.policy(interaction.guild_id)
            job, created = await queue.enqueue(
                kind=kind,
                params={**params.to_dict(), **extra},
                channel_id=interaction.channel_id,
                user_id=interaction.user.id,
                guild_id=interaction.guild_id or 0,
                interaction_id=interaction.id,
                parent_id=parent_id,
                image_index=image_index,
                reply_to_message_id=reply_to.id if reply_to is not None else None,
                cost=job_cost(params, extra),
                limits=policy.limits,
            )
        except QueueFull as exc:
            await self._tell(interaction, await self._queue_full_text(exc, interaction.user.id))
            return None
        except sqlite3.OperationalError as exc:
            log.error("enqueue failed: %s", exc)
            await self._tell(interaction, BUSY)
            return None
        position = await queue.position(job.id)
        eta = await queue.eta_seconds(job.id)
        if created:
            log_job_event(log, job.id, job.user_id, "queued", kind=str(job.kind))
            try:
                await self.bot.delivery.post_status(job, position, eta)
            except discord.HTTPException as exc:
                log.warning("could not post status for job %s: %s", job.id, exc)
            self.bot.worker.wake()
        where = f"position {position}" if position else "starting now"
        unavailable = self.bot.engine_notice()
        await self._tell(
            interaction,
            (f"{note}\n" if note else "")
            + f"Queued as job #{job.id}: {where}, about {format_duration(eta)}."
            + (f"\n{unavailable}" if unavailable else ""),
        )
        return job

    async def _queue_full_text(self, exc: QueueFull, user_id: int) -> str:
        """The refusal with when to try again."""
        if exc.kind == "queue" and exc.retry_after is not None:
            return f"The queue is full right now; try again in about {format_duration(exc.retry_after)}."
        if exc.kind == "user":
            etas = []
            for job in await self.bot.queue.open_jobs(user_id):
                eta = await self.bot.queue.eta_seconds(job.id)
                if eta is not None:
                    etas.append(eta)
            if etas:
                return f"{exc.reason} Your next one should be done in about {format_duration(min(etas))}."
        return exc.reason

    async def tell_refusal(self, interaction: discord.Interaction, exc: Exception, what: str) -> None:
        """Answer a refused request privately: its reason, or "busy" when the database was locked
        (`sqlite3.OperationalError`, logged as "`what` failed"). Nothing was queued."""
        if isinstance(exc, sqlite3.OperationalError):
            log.error("%s failed: %s", what, exc)
            await self._tell(interaction, BUSY)
        else:
            await self._tell(interaction, str(exc))

    async def _tell(self, interaction: discord.Interaction, text: str) -> None:
        try:
            await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not answer interaction: %s", exc)


def _names_job(message: discord.Message, job_id: int) -> bool:
    """True when one of the message's embeds has the job's footer."""
    footer = footer_text(job_id)
    return any(e.footer and e.footer.text == footer for e in message.embeds)


def cancel_text(job_id: int, outcome: str) -> str:
    """What to tell whoever cancelled a job, from `JobActions.cancel_job`'s outcome."""
    if outcome == "cancelled":
        return f"Job #{job_id} cancelled."
    if outcome == "requested":
        return f"Stopping job #{job_id}…"
    return f"Job #{job_id} has already finished."
