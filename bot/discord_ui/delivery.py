"""Posting and editing job messages through the bot's own channel messages.

Everything goes through `channel.send` / message edits by the bot user, never the interaction
webhook, so a job that waited past the 15-minute interaction token still delivers. Delivery is
idempotent: the status message becomes the result (an edit can be repeated), and when no message
id was recorded (a crash between posting and recording) the channel's recent history is searched
for the bot's message naming the job before anything new is posted.

Several processes may deliver from one PostgreSQL queue: a generated job is delivered only by the
process that holds its delivery (`claim_delivery`), its images are fetched from the queue when they
were saved on another machine (`ensure_files`), and progress edits in a channel are paced across
every process (`progress_slot`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import discord
from PIL import Image

from bot.discord_ui import messages
from bot.discord_ui.buttons import status_view
from bot.discord_ui.result_message import build_result_message
from bot.jobs.contract import JobQueueContract
from bot.jobs.db import retrying
from bot.jobs.models import NOTICE_STATUSES, Job, JobStatus
from bot.logging_setup import log_job_event

log = logging.getLogger(__name__)

DEFAULT_FILE_LIMIT = 10 * 1024 * 1024
#: how far before a job's creation the history search for its message starts (clock skew)
HISTORY_SLACK_S = 60.0
#: how often a result is shrunk and re-sent after Discord answers 413 (file too large)
SHRINK_TRIES = 8
#: 4xx answers that are worth retrying: request timeout, rate limited (after discord.py's own tries)
_TRANSIENT_4XX = frozenset({408, 429})
#: the statuses whose outcome is a failure/cancel notice rather than images


def is_permanent(exc: Exception) -> bool:
    """True for a Discord answer that will never change on retry: any 4xx but 408/429.

    Unknown channel (10003), missing access (50001), archived thread (50083), ... A 5xx, a
    timeout or a lost connection is passing: the worker's sweeps retry those.
    """
    return (
        isinstance(exc, discord.HTTPException)
        and 400 <= exc.status < 500
        and exc.status not in _TRANSIENT_4XX
    )


def delivery_owner() -> str:
    """An id unique to this process run: the holder of the deliveries it makes (`claim_delivery`)."""
    return f"delivery:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _log_failure(task: asyncio.Task[None]) -> None:
    """Done callback of a progress edit: its error is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("progress edit failed", exc_info=task.exception())


def post_nonce(job_id: int, purpose: str) -> str:
    """The nonce of a job's channel post (<= 25 chars), the same on every try of that post.

    discord.py draws a random nonce per `send` call; ours stays the same when the worker sends
    again after a lost answer, so Discord (`enforce_nonce`) returns the first message instead.
    """
    return f"pb{job_id}{purpose}"[:25]


class Delivery:
    """Builds and sends status, progress and result messages for jobs."""

    def __init__(
        self,
        client: discord.Client,
        queue: JobQueueContract,
        images_dir: Path,
        *,
        progress_every_s: float = 2.0,
        owner: str | None = None,
    ):
        self.client = client
        self.queue = queue
        self.images_dir = images_dir
        self.progress_every_s = progress_every_s
        #: who holds this process's deliveries (`claim_delivery`): one id per process
        self.owner = owner or delivery_owner()
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._last_progress: dict[int, float] = {}
        self._progress_tasks: dict[int, asyncio.Task[None]] = {}
        self._delivering: set[int] = set()

    # --- helpers ------------------------------------------------------------------------------

    def _channel(self, job: Job) -> discord.abc.Messageable:
        channel = self.client.get_channel(job.channel_id)
        if isinstance(channel, discord.abc.Messageable):
            return channel
        return self.client.get_partial_messageable(job.channel_id, guild_id=job.guild_id or None)

    def file_limit(self, job: Job) -> int:
        """Per-file upload limit in this job's guild."""
        guild = self.client.get_guild(job.guild_id) if job.guild_id else None
        return guild.filesize_limit if guild is not None else DEFAULT_FILE_LIMIT

    async def _find_own_message(self, job: Job) -> discord.Message | None:
        """A message by the bot in the job's channel whose footer names the job.

        Reads every message since the job was created (not just the latest page), oldest first.
        """
        channel = self._channel(job)
        me = self.client.user
        since = datetime.fromtimestamp(max(job.created_at - HISTORY_SLACK_S, 0), UTC)
        async for message in channel.history(limit=None, after=since, oldest_first=True):
            if me is not None and message.author.id != me.id:
                continue
            if messages.names_job(message, job.id):
                return message
        return None

    # --- status -------------------------------------------------------------------------------

    async def post_status(self, job: Job, position: int | None, eta_s: float | None) -> int | None:
        """Post the public "queued" message for a new job and record its id."""
        async with self._locks[job.id]:
            current = await self.queue.get(job.id)
            if current is None or current.status_message_id or current.status in (JobStatus.DONE,):
                return current.status_message_id if current else None
            reference = None
            if job.reply_to_message_id:
                reference = discord.MessageReference(
                    message_id=job.reply_to_message_id, channel_id=job.channel_id, fail_if_not_exists=False
                )
            message = await self._channel(job).send(
                embed=messages.queued_embed(job, position, eta_s),
                view=status_view(job.id),
                reference=reference,  # type: ignore[arg-type]
                nonce=post_nonce(job.id, "s"),  # discord.py adds enforce_nonce
            )
            await self.queue.set_status_message(job.id, message.id)
            return message.id

    async def _status_message(self, job: Job) -> discord.PartialMessage | None:
        current = await self.queue.get(job.id)
        message_id = current.status_message_id if current else None
        if message_id is None:
            return None
        return self._channel(job).get_partial_message(message_id)  # type: ignore[attr-defined]

    async def job_started(self, job: Job) -> None:
        """Show "generating" on the status message."""
        self._last_progress[job.id] = time.monotonic()
        await self._edit_progress(job, 0, _total_steps(job), None)

    async def job_requeued(self, job: Job) -> None:
        """Show that a job will be retried."""
        message = await self._status_message(job)
        if message is not None:
            await self._quiet(message.edit(embed=messages.requeued_embed(job), attachments=[]))

    def progress(self, job: Job, step: int, total: int, preview: Image.Image | None = None) -> None:
        """Called on the event loop for every step; edits at most every `progress_every_s`."""
        now = time.monotonic()
        if step < total and now - self._last_progress.get(job.id, 0.0) < self.progress_every_s:
            return
        pending = self._progress_tasks.get(job.id)
        if pending is not None and not pending.done():
            return
        self._last_progress[job.id] = now
        task = asyncio.ensure_future(self._paced_progress(job, step, total, preview))
        task.add_done_callback(_log_failure)
        self._progress_tasks[job.id] = task

    async def _paced_progress(self, job: Job, step: int, total: int, preview: Image.Image | None) -> None:
        """A progress edit, unless the channel had one from any process in the last `progress_every_s`."""
        if await self.queue.progress_slot(job.channel_id, self.progress_every_s):
            await self._edit_progress(job, step, total, preview)

    async def _edit_progress(self, job: Job, step: int, total: int, preview: Image.Image | None) -> None:
        async with self._locks[job.id]:
            current = await self.queue.get(job.id)
            if current is None or current.status not in (JobStatus.RUNNING, JobStatus.QUEUED):
                return
            message = await self._status_message(job)
            if message is None:
                return
            attachments: list[discord.File] = []
            if preview is not None:
                buf = io.BytesIO()
                preview.convert("RGB").save(buf, "JPEG", quality=70)
                buf.seek(0)
                attachments.append(discord.File(buf, filename="preview.jpg"))
            embed = messages.progress_embed(job, step, total, has_preview=bool(attachments))
            await self._quiet(message.edit(embed=embed, attachments=attachments))

    # --- results ------------------------------------------------------------------------------

    def is_delivering(self, job_id: int) -> bool:
        """True while a delivery of this job is in flight."""
        return job_id in self._delivering

    async def deliver(self, job: Job) -> None:
        """Turn the status message into the result (or post it), then mark the job done."""
        if job.id in self._delivering:
            return
        self._delivering.add(job.id)
        try:
            async with self._locks[job.id]:
                current = await self.queue.get(job.id)
                if current is None or current.status != JobStatus.GENERATED:
                    return
                if not await self.queue.claim_delivery(current.id, self.owner):
                    return  # another process is delivering it now
                await self._deliver_locked(current)
        finally:
            self._delivering.discard(job.id)

    async def _deliver_locked(self, job: Job) -> None:
        missing = await self.queue.ensure_files(job.result_files)  # saved on another machine: fetched
        if missing:
            log.warning("result files not found anywhere: %s", missing, extra={"job_id": job.id})
        paths = [self.images_dir / name for name in job.result_files]
        limit = self.file_limit(job)
        for _ in range(SHRINK_TRIES):
            try:
                post = await build_result_message(job, paths, limit)
            except OSError as exc:
                await self._give_up(job, f"The images could not be read back ({exc.strerror or exc}).")
                return
            try:
                message = await self._post_or_edit(job, embed=post.embed, files=post.files, view=post.view)
                break
            except discord.HTTPException as exc:
                if exc.status != 413:
                    if is_permanent(exc):
                        await self._give_up(job, _discord_reason(exc))
                        return
                    raise  # passing (5xx, 429 after discord.py's retries): the worker's sweep retries
                # the channel's real limit is lower than we thought: halve the largest file and retry
                limit = min(limit, max(post.sizes)) // 2
                log.warning("upload too large for job %s; retrying under %d bytes", job.id, limit)
        else:
            await self._give_up(job, "The images were too large for this channel even after shrinking them.")
            return
        # retried: a result posted but not recorded would otherwise be delivered (or failed) again
        if await retrying(lambda: self.queue.mark_done(job.id, message.id), f"recording job #{job.id} done"):
            log_job_event(
                log,
                job.id,
                job.user_id,
                "done",
                wait_s=job.started_at - job.created_at if job.started_at else None,
                gen_s=job.gen_seconds,
                total_s=time.time() - job.created_at,
                images=len(job.result_files),
            )
        self._cleanup(job.id)

    async def _post_or_edit(
        self, job: Job, *, embed: discord.Embed, files: list[discord.File], view: discord.ui.View | None
    ) -> discord.Message:
        """Edit the job's own message into place; post a new one only when none exists."""
        message_id = job.status_message_id
        if message_id is None:
            found = await self._find_own_message(job)
            message_id = found.id if found else None
        if message_id is not None:
            partial = self._channel(job).get_partial_message(message_id)  # type: ignore[attr-defined]
            try:
                return await partial.edit(content=None, embed=embed, attachments=files, view=view)
            except discord.NotFound as exc:
                if exc.code != 10008:  # the channel is gone, not just the message
                    raise
                for f in files:
                    f.reset()
        reference = None
        if job.reply_to_message_id:
            reference = discord.MessageReference(
                message_id=job.reply_to_message_id, channel_id=job.channel_id, fail_if_not_exists=False
            )
        kwargs: dict[str, Any] = {
            "embed": embed,
            "files": files,
            "reference": reference,
            # the same nonce on every try (discord.py adds enforce_nonce): Discord answers a
            # repeated post with the first message instead of posting twice
            "nonce": post_nonce(job.id, "r" if files else "n"),
        }
        if view is not None:
            kwargs["view"] = view
        return await self._channel(job).send(**kwargs)

    async def notify(self, job: Job) -> bool:
        """Show a failed, cancelled or dead job's notice, exactly once, and record it (`notified_at`).

        The notice replaces the job's message in the channel; when the channel refuses for good
        (deleted, no access, archived thread), the requester gets a DM. True when the notice is
        settled (shown, already shown, or impossible to show anywhere); False when Discord failed
        for a passing reason: the notice stays owed and the worker's sweep tries again.
        """
        async with self._locks[job.id]:
            current = await self.queue.get(job.id)
            if current is None or current.notified_at is not None or current.status not in NOTICE_STATUSES:
                return True
            if not await self._notify_locked(current):
                return False
        self._cleanup(job.id)
        return True

    async def _notify_locked(self, job: Job) -> bool:
        """`notify` for a job whose notice is owed; the caller holds the job's lock."""
        try:
            await self._post_or_edit(job, embed=messages.failure_embed(job), files=[], view=None)
        except discord.HTTPException as exc:
            if not is_permanent(exc):
                log.warning("notice for job %s not shown yet: %s", job.id, exc, extra={"job_id": job.id})
                return False
            log.info("notice not posted in the channel: %s", exc, extra={"job_id": job.id})
            if not await self._direct_message(job):
                return False
        # retried: a notice shown but not recorded would be shown again by the sweep
        await retrying(lambda: self.queue.mark_notified(job.id), f"recording job #{job.id}'s notice")
        return True

    async def _direct_message(self, job: Job) -> bool:
        """Tell the requester by DM; False only when that failed for a passing reason."""
        what = "was cancelled" if job.status is JobStatus.CANCELLED else f"failed: {job.error}"
        try:
            user = self.client.get_user(job.user_id) or await self.client.fetch_user(job.user_id)
            await user.send(
                f"Your ponybot job #{job.id} in <#{job.channel_id}> {what}", nonce=post_nonce(job.id, "d")
            )
        except discord.HTTPException as exc:
            if not is_permanent(exc):
                return False
            log.warning("could not tell the requester of job %s: %s", job.id, exc, extra={"job_id": job.id})
        return True

    async def _give_up(self, job: Job, reason: str) -> None:
        """Fail the job for good (never retried) and tell the requester; caller holds the job's lock."""
        log.error(
            "delivery failed for good: %s",
            reason,
            extra={"job_id": job.id, "user_id": job.user_id, "status": "failed"},
        )
        failed = await self.queue.fail(job.id, reason, retryable=False)
        if failed.status in NOTICE_STATUSES and failed.notified_at is None:
            await self._notify_locked(failed)  # if this fails for a passing reason, the sweep retries
        self._cleanup(job.id)

    def _cleanup(self, job_id: int) -> None:
        self._last_progress.pop(job_id, None)
        self._progress_tasks.pop(job_id, None)
        self._locks.pop(job_id, None)

    async def _quiet(self, coro: Awaitable[object]) -> None:
        try:
            await coro
        except discord.HTTPException as exc:
            log.debug("status edit failed: %s", exc)


def _total_steps(job: Job) -> int:
    """Total steps shown for a job's progress."""
    return int(job.params.get("steps", 0)) or 1


def _discord_reason(exc: discord.HTTPException) -> str:
    """The reason shown to the member when Discord refused a result for good."""
    if exc.code == 10003 or (isinstance(exc, discord.NotFound) and exc.code != 10008):
        return "The channel was deleted before the result could be posted."
    if exc.code == 50083:
        return "The thread was archived before the result could be posted."
    if exc.code in (50001, 50013) or isinstance(exc, discord.Forbidden):
        return "I lost permission to post in that channel (Missing Permissions)."
    return f"Discord refused the result ({exc.status} {exc.text or ''})".strip()
