"""What users can do: submit a /pony job and press the buttons on its messages.

Shared by the slash commands and the persistent buttons. Every refusal is a short ephemeral
message; nothing here raises to the user.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from typing import Any, Protocol

import discord

from bot.config import Settings
from bot.discord_ui.buttons import ButtonAction
from bot.discord_ui.delivery import Delivery
from bot.discord_ui.messages import names_job
from bot.discord_ui.replies import tell
from bot.errors import BUSY, Refusal, refusal_text
from bot.jobs.contract import JobQueueContract
from bot.jobs.extras import hires_of, job_cost, job_extras
from bot.jobs.models import Job, JobKind, JobStatus, QueueFull
from bot.logging_setup import log_job_event
from bot.ops.ops import Ops
from bot.policy.guard import Guard, Policy
from bot.policy.permissions import missing_permissions
from bot.policy.text import clean_prompt, format_duration
from bot.runtime.engine import Engine, EngineState
from bot.runtime.worker import Worker
from generator.errors import InvalidParams
from generator.extra_files import available_loras
from generator.hires import hires_size
from generator.params import GenerationParams, aspect_size, random_seed, validate

log = logging.getLogger(__name__)

__all__ = ["JobActions", "PonyExtras", "cancel_text", "engine_notice", "validate_params"]


class PonyExtras(Protocol):
    """/pony's image, strength and hires options (bot.discord_ui.member_images.ImageOptions)."""

    async def pony_extras(
        self,
        interaction: discord.Interaction,
        params: GenerationParams,
        *,
        image: discord.Attachment | None,
        strength: float | None,
        hires: bool | None,
        hires_scale: float | None,
        aspect: str | None,
    ) -> tuple[JobKind, GenerationParams, dict[str, Any], str | None]:
        """(kind, params, extra params, note) for those options; raises Refusal."""
        ...

    def forget_source(self, rel: str) -> None:
        """Delete a saved upload whose job was refused."""
        ...


def validate_params(
    settings: Settings, params: GenerationParams, policy: Policy | None = None
) -> GenerationParams:
    """`validate` with the bot's limits (the guild's max steps); raises InvalidParams."""
    max_steps = policy.max_steps if policy else settings.max_steps
    return validate(
        params, max_pixels=settings.max_pixels, max_steps=max_steps, loras=available_loras(settings.lora_dir)
    )


def engine_notice(engine: Engine) -> str | None:
    """A note for the requester when the generator is not ready."""
    if engine.state is EngineState.LOADING:
        return "The model is still loading; your job will start as soon as it is ready."
    if engine.state is EngineState.FAILED:
        return "The generator is unavailable right now; your job is kept in the queue."
    if engine.state is EngineState.HUNG:
        return "The generator is restarting; your job is kept in the queue."
    return None


class JobActions:
    """Use cases behind /pony and the buttons."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: JobQueueContract,
        engine: Engine,
        guard: Guard,
        delivery: Delivery,
        worker: Worker,
        ops: Ops,
        extras: PonyExtras,
        client: discord.Client,
    ):
        self.settings = settings
        self.queue = queue
        self.engine = engine
        self.guard = guard
        self.delivery = delivery
        self.worker = worker
        self.ops = ops
        self.extras = extras
        self.client = client

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
        s = self.settings
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
        return validate_params(self.settings, params, policy)

    async def pony(self, interaction: discord.Interaction, **options: object) -> None:
        """/pony: defer, check member and channel, validate, enqueue, announce.

        `image`/`strength` (img2img of an upload) and `hires`/`hires_scale` (hires fix) are
        handled by `PonyExtras.pony_extras` (bot.discord_ui.member_images.ImageOptions).
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        image = options.pop("image", None)
        strength = options.pop("strength", None)
        hires = options.pop("hires", None)
        hires_scale = options.pop("hires_scale", None)
        guard = self.guard
        try:
            policy = await guard.admit(interaction)
            params = self.build_params(**options, policy=policy)  # type: ignore[arg-type]
            params = await guard.check_request(interaction, params, policy)
            kind, params, extra, note = await self.extras.pony_extras(
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
        job = await self.submit(interaction, kind=kind, params=params, policy=policy, extra=extra, note=note)
        if job is None and extra.get("source"):  # refused: the saved upload is nobody's
            self.extras.forget_source(str(extra["source"]))

    # --- buttons ------------------------------------------------------------------------------

    async def on_button(
        self, interaction: discord.Interaction, action: ButtonAction, job_id: int, index: int | None
    ) -> None:
        """Dispatch a persistent button press (Edit is `MemberImages.open_edit`: a modal, no defer)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.queue.get(job_id)
        if job is None:
            await tell(interaction, "That job no longer exists.")
            return
        try:
            self.guard.check_job_access(
                interaction,
                job,
                get_channel=self.client.get_channel,
                reveals=action is not ButtonAction.CANCEL,
            )
            match action:
                case ButtonAction.CANCEL:
                    await self._cancel(interaction, job)
                case ButtonAction.DELETE:
                    await self._delete(interaction, job)
                case ButtonAction.REROLL:
                    await self._reroll(interaction, job)
                case ButtonAction.UPSCALE | ButtonAction.VARIATION:
                    await self._from_image(interaction, job, action, index or 1)
        except (Refusal, sqlite3.OperationalError) as exc:
            await self.tell_refusal(interaction, exc, f"button {action} on job {job_id}")

    async def cancel_job(self, job: Job) -> str:
        """Cancel a job (no permission check) and tell its channel.

        Returns `JobQueue.cancel`'s outcome: "cancelled", "requested" (running: stops at its next
        step) or "not_open"; `cancel_text` words it.
        """
        outcome = await self.queue.cancel(job.id)
        if outcome == "cancelled":
            cancelled = await self.queue.get(job.id)
            if cancelled is not None:
                # if Discord fails here, the notice stays owed and the worker's sweep shows it
                await self.delivery.notify(cancelled)
                self.ops.job_finished(cancelled)  # never reached the worker: count it here
            log_job_event(log, job.id, job.user_id, "cancelled")
        elif outcome == "requested":
            self.worker.request_cancel(job.id)
        return outcome

    async def _cancel(self, interaction: discord.Interaction, job: Job) -> None:
        if interaction.user.id != job.user_id:
            raise Refusal("Only the person who asked for this job can cancel it.")
        await tell(interaction, cancel_text(job.id, await self.cancel_job(job)))

    async def _delete(self, interaction: discord.Interaction, job: Job) -> None:
        perms = interaction.permissions
        if interaction.user.id != job.user_id and not perms.manage_messages:
            raise Refusal("Only the requester or a moderator can delete this.")
        if interaction.message is not None and not names_job(interaction.message, job.id):
            raise Refusal("That button doesn't belong to this message.")
        if interaction.message is not None:
            try:
                await interaction.message.delete()
            except discord.NotFound:
                pass
            except discord.Forbidden:
                raise Refusal("I can't delete that message here.") from None
        log.info("result deleted", extra={"job_id": job.id, "user_id": interaction.user.id})
        await tell(interaction, "Deleted.")

    async def _reroll(self, interaction: discord.Interaction, job: Job) -> None:
        if job.kind == JobKind.UPSCALE:
            raise Refusal("An upscale can't be rerolled.")
        params = GenerationParams.from_dict(job.params).with_seed(random_seed())
        params = await self.guard.check_request(interaction, params)
        extra = job_extras(job)  # an upload's source and strength, the hires fix
        if job.kind == JobKind.VARIATION:
            await self.submit(
                interaction,
                kind=JobKind.VARIATION,
                params=params,
                parent_id=job.parent_id,
                image_index=job.image_index,
                reply_to=interaction.message,
                extra=extra,
            )
        else:
            await self.submit(
                interaction,
                kind=JobKind.TXT2IMG,
                params=params,
                parent_id=job.id,
                reply_to=interaction.message,
                extra=extra,
            )

    async def _from_image(
        self, interaction: discord.Interaction, job: Job, action: ButtonAction, number: int
    ) -> None:
        if job.status != JobStatus.DONE:
            raise Refusal("That job has no finished images.")
        if not 1 <= number <= len(job.seeds):
            raise Refusal("There is no such image on that job.")
        base = GenerationParams.from_dict(job.params)
        base = await self.guard.check_request(interaction, base)
        if action is ButtonAction.UPSCALE:
            kind, params = JobKind.UPSCALE, base.single(number - 1)
        else:
            kind, params = JobKind.VARIATION, replace(base.with_seed(random_seed()), count=base.count)
            hires = hires_of(job.params)
            if hires:  # vary the hires picture at its own size (in the multiples of 64 offered)
                width, height = hires_size(base.width, base.height, float(hires["scale"]))
                params = replace(params, width=max(64, width // 64 * 64), height=max(64, height // 64 * 64))
        await self.submit(
            interaction,
            kind=kind,
            params=params,
            parent_id=job.id,
            image_index=number - 1,
            reply_to=interaction.message,
        )

    # --- shared -------------------------------------------------------------------------------

    async def submit(
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
        GenerationParams (bot.discord_ui.member_images: source, strength, hires); `note` leads the answer."""
        extra = extra or {}
        missing = missing_permissions(interaction.app_permissions)
        if missing:
            await tell(
                interaction, f"I can't post results here: I'm missing {', '.join(missing)} in this channel."
            )
            return None
        channel_id = interaction.channel_id
        if channel_id is None:  # Discord names the channel of every interaction from a guild
            await tell(interaction, "I can't post results here.")
            return None
        queue = self.queue
        try:
            if policy is None:
                policy = await self.guard.policy(interaction.guild_id)
            job, created = await queue.enqueue(
                kind=kind,
                params={**params.to_dict(), **extra},
                channel_id=channel_id,
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
            await tell(interaction, await self._queue_full_text(exc, interaction.user.id))
            return None
        except sqlite3.OperationalError as exc:
            log.error("enqueue failed: %s", exc)
            await tell(interaction, BUSY)
            return None
        position = await queue.position(job.id)
        eta = await queue.eta_seconds(job.id)
        if created:
            log_job_event(log, job.id, job.user_id, "queued", kind=str(job.kind))
            try:
                await self.delivery.post_status(job, position, eta)
            except discord.HTTPException as exc:
                log.warning("could not post status for job %s: %s", job.id, exc)
            self.worker.wake()
        where = f"position {position}" if position else "starting now"
        unavailable = engine_notice(self.engine) if self.settings.local_worker else None
        await tell(
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
            for job in await self.queue.open_jobs(user_id):
                eta = await self.queue.eta_seconds(job.id)
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
        await tell(interaction, refusal_text(exc))


def cancel_text(job_id: int, outcome: str) -> str:
    """What to tell whoever cancelled a job, from `JobActions.cancel_job`'s outcome."""
    if outcome == "cancelled":
        return f"Job #{job_id} cancelled."
    if outcome == "requested":
        return f"Stopping job #{job_id}…"
    return f"Job #{job_id} has already finished."
