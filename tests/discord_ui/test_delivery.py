"""Delivery against a small Discord double: status message -> result, lost ids, refusals, notices.

The double is a channel that keeps messages (author, embeds, files, buttons, nonce), answers
`history`, edits and posts, and can be told to refuse the next calls the way Discord does.
The jobs live in a real JobQueue on tmp_path.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest
from PIL import Image

from bot.discord_ui.delivery import Delivery
from bot.discord_ui.messages import failure_embed, footer_text
from bot.jobs.models import Job, JobStatus, QueueLimits
from bot.jobs.queue import JobQueue

BOT_ID = 900
ALICE = 111
STRANGER = 222
CHANNEL = 50
GUILD = 60
WORKER = "worker-test"
_ids = itertools.count(10_000)


def http_error(status: int, code: int, message: str = "refused") -> discord.HTTPException:
    """The exception discord.py raises for a Discord answer with this status and JSON error code."""
    response = SimpleNamespace(status=status, reason=message)
    cls = {403: discord.Forbidden, 404: discord.NotFound}.get(status, discord.HTTPException)
    if status >= 500:
        cls = discord.DiscordServerError
    return cls(response, {"code": code, "message": message})  # type: ignore[arg-type]


@dataclass
class Posted:
    """A message in the double's channel as a member would see it."""

    id: int
    author: SimpleNamespace
    embeds: list[discord.Embed]
    files: dict[str, bytes] = field(default_factory=dict)
    buttons: list[tuple[str, str]] = field(default_factory=list)
    nonce: str | None = None
    reference_id: int | None = None
    edits: int = 0

    @property
    def title(self) -> str | None:
        """The first embed's title."""
        return self.embeds[0].title if self.embeds else None


def _buttons(view: discord.ui.View | None) -> list[tuple[str, str]]:
    if view is None:
        return []
    return [(c["label"], c["custom_id"]) for row in view.to_components() for c in row["components"]]


def _read(files: list[discord.File]) -> dict[str, bytes]:
    return {f.filename or "": f.fp.read() for f in files}


class FakeChannel:
    """The job's channel: `send`, `history` and message edits, with scripted refusals."""

    def __init__(self) -> None:
        self.messages: dict[int, Posted] = {}
        self.sends: list[dict[str, Any]] = []
        #: raised (in order) by the next `send` calls / message edits
        self.send_errors: list[discord.HTTPException] = []
        self.edit_errors: list[discord.HTTPException] = []
        #: largest upload Discord accepts per file (413 above)
        self.max_file_bytes: int | None = None
        #: the channel was deleted: every call answers 404 Unknown Channel
        self.gone = False

    def add(self, author_id: int, embed: discord.Embed) -> Posted:
        """A message already in the channel."""
        message = Posted(next(_ids), SimpleNamespace(id=author_id), [embed])
        self.messages[message.id] = message
        return message

    def _check(self, files: list[discord.File], errors: list[discord.HTTPException]) -> dict[str, bytes]:
        data = _read(files)  # the upload happens before Discord answers
        if self.gone:
            raise http_error(404, 10003, "Unknown Channel")
        if errors:
            raise errors.pop(0)
        if self.max_file_bytes is not None and any(len(d) > self.max_file_bytes for d in data.values()):
            raise http_error(413, 40005, "Request entity too large")
        return data

    async def send(self, **kwargs: Any) -> Posted:
        """POST /channels/{id}/messages."""
        self.sends.append(kwargs)
        data = self._check(kwargs.get("files") or [], self.send_errors)
        reference = kwargs.get("reference")
        message = Posted(
            next(_ids),
            SimpleNamespace(id=BOT_ID),
            [kwargs["embed"]],
            data,
            _buttons(kwargs.get("view")),
            kwargs.get("nonce"),
            reference.message_id if reference is not None else None,
        )
        self.messages[message.id] = message
        return message

    async def history(
        self, *, limit: int | None, after: datetime, oldest_first: bool
    ) -> AsyncIterator[Posted]:
        """The channel's messages, oldest first."""
        for message in list(self.messages.values()):
            yield message

    def get_partial_message(self, message_id: int) -> FakePartial:
        """A handle for editing a message by id."""
        return FakePartial(self, message_id)


@dataclass
class FakePartial:
    channel: FakeChannel
    id: int

    async def edit(self, **kwargs: Any) -> Posted:
        """PATCH /channels/{id}/messages/{id}."""
        data = self.channel._check(kwargs.get("attachments") or [], self.channel.edit_errors)
        message = self.channel.messages.get(self.id)
        if message is None:
            raise http_error(404, 10008, "Unknown Message")
        message.embeds = [kwargs["embed"]]
        message.files = data
        message.buttons = _buttons(kwargs.get("view"))
        message.edits += 1
        return message


class FakeUser:
    """A member who can be sent DMs (or who blocks them)."""

    def __init__(self) -> None:
        self.dms: list[tuple[str, str | None]] = []
        self.errors: list[discord.HTTPException] = []

    async def send(self, content: str, *, nonce: str | None = None) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.dms.append((content, nonce))


class FakeClient:
    """The bits of discord.Client that delivery reads."""

    def __init__(self, channel: FakeChannel) -> None:
        self.user = SimpleNamespace(id=BOT_ID)
        self.channel = channel
        self.member = FakeUser()
        self.guild: Any = None

    def get_channel(self, channel_id: int) -> None:
        return None  # not cached: delivery falls back to a partial messageable

    def get_partial_messageable(self, channel_id: int, *, guild_id: int | None = None) -> FakeChannel:
        assert channel_id == CHANNEL
        return self.channel

    def get_guild(self, guild_id: int) -> Any:
        return self.guild

    def get_user(self, user_id: int) -> FakeUser | None:
        return None

    async def fetch_user(self, user_id: int) -> FakeUser:
        assert user_id == ALICE
        return self.member


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[JobQueue]:
    q = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits())
    yield q
    await q.close()


@pytest.fixture
def channel() -> FakeChannel:
    return FakeChannel()


@pytest.fixture
def client(channel: FakeChannel) -> FakeClient:
    return FakeClient(channel)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def delivery(client: FakeClient, queue: JobQueue, images_dir: Path) -> Delivery:
    return Delivery(client, queue, images_dir)  # type: ignore[arg-type]


async def queued_job(queue: JobQueue, *, count: int = 2, reply_to: int | None = None) -> Job:
    job, _ = await queue.enqueue(
        kind="txt2img",
        params={"prompt": "a pony", "seed": 5, "steps": 3, "width": 64, "height": 64, "count": count},
        channel_id=CHANNEL,
        user_id=ALICE,
        guild_id=GUILD,
        reply_to_message_id=reply_to,
    )
    return job


async def generated_job(
    queue: JobQueue, images_dir: Path, *, count: int = 2, size: int = 64, noisy: bool = False
) -> Job:
    """A job whose `count` PNGs are on disk and recorded (status generated)."""
    job = await queued_job(queue, count=count)
    claimed = await queue.claim(WORKER)
    assert claimed is not None and claimed.id == job.id
    names = []
    rng = random.Random(job.id)
    for n in range(1, count + 1):
        name = f"{job.id}/ponybot-{job.id}-{n}.png"
        (images_dir / name).parent.mkdir(exist_ok=True)
        if noisy:  # incompressible: a big PNG
            image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        else:
            image = Image.new("RGB", (size, size), (n * 40, 90, 200))
        image.save(images_dir / name)
        names.append(name)
    assert await queue.mark_generated(job.id, WORKER, names, [5 + i for i in range(count)], 1.5)
    got = await queue.get(job.id)
    assert got is not None
    return got


async def failed_job(queue: JobQueue, error: str = "Out of memory.") -> Job:
    job = await queued_job(queue)
    assert await queue.claim(WORKER) is not None
    return await queue.fail(job.id, error, retryable=False)


async def reload(queue: JobQueue, job_id: int) -> Job:
    job = await queue.get(job_id)
    assert job is not None
    return job


async def test_post_status_posts_queued_message_with_cancel_once(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel
) -> None:
    job = await queued_job(queue, reply_to=4242)
    message_id = await delivery.post_status(job, 2, 30)
    posted = channel.messages[message_id]  # type: ignore[index]
    assert posted.title == "Image queued"
    assert posted.embeds[0].footer.text == f"ponybot job #{job.id}"
    assert posted.buttons == [("Cancel", f"pony:cancel:{job.id}")]
    assert posted.reference_id == 4242
    assert posted.nonce == f"pb{job.id}s"
    assert (await reload(queue, job.id)).status_message_id == message_id
    # a second call (e.g. a retried interaction) posts nothing new
    assert await delivery.post_status(await reload(queue, job.id), 2, 30) == message_id
    assert len(channel.sends) == 1


async def test_deliver_edits_the_status_message_into_the_result(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    job = await queued_job(queue)
    status_id = await delivery.post_status(job, 1, 1)
    assert await queue.claim(WORKER) is not None
    names = []
    for n in (1, 2):
        name = f"{job.id}/ponybot-{job.id}-{n}.png"
        (images_dir / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 96), "white").save(images_dir / name)
        names.append(name)
    assert await queue.mark_generated(job.id, WORKER, names, [5, 6], 2.0)

    await delivery.deliver(await reload(queue, job.id))

    assert len(channel.sends) == 1  # only the status post: the result is an edit of it
    result = channel.messages[status_id]  # type: ignore[index]
    assert result.title == "Image" and result.edits == 1
    assert sorted(result.files) == [f"ponybot-{job.id}-1.png", f"ponybot-{job.id}-2.png"]
    assert Image.open(io.BytesIO(result.files[f"ponybot-{job.id}-1.png"])).size == (64, 96)
    fields = {f.name: f.value for f in result.embeds[0].fields}
    assert fields["Seeds"] == "5, 6" and fields["Size"] == "64x96"
    assert [label for label, _ in result.buttons] == ["Reroll", "Edit", "Delete", "U1", "U2", "V1", "V2"]
    done = await reload(queue, job.id)
    assert done.status is JobStatus.DONE and done.result_message_id == status_id
    assert done.notified_at is not None
    # delivering again changes nothing
    await delivery.deliver(done)
    assert result.edits == 1 and len(channel.sends) == 1


async def test_without_a_recorded_id_the_bots_own_message_is_found_by_footer(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    job = await generated_job(queue, images_dir, count=1)
    # a member quoting the footer, and the bot's message of another job, come first
    impostor = channel.add(STRANGER, discord.Embed(title="fake").set_footer(text=footer_text(job.id)))
    other = channel.add(BOT_ID, discord.Embed(title="Image queued").set_footer(text=footer_text(job.id + 1)))
    own = channel.add(BOT_ID, discord.Embed(title="Image queued").set_footer(text=footer_text(job.id)))
    assert job.status_message_id is None

    await delivery.deliver(job)

    assert channel.sends == []  # nothing new posted
    assert own.title == "Image" and list(own.files) == [f"ponybot-{job.id}-1.png"]
    assert impostor.title == "fake" and other.title == "Image queued"
    assert impostor.edits == other.edits == 0
    assert (await reload(queue, job.id)).result_message_id == own.id


async def test_a_deleted_status_message_gets_a_new_result_post(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    job = await generated_job(queue, images_dir)
    await queue.set_status_message(job.id, 31337)  # deleted by a moderator meanwhile: 404 10008

    await delivery.deliver(await reload(queue, job.id))

    assert len(channel.sends) == 1
    posted = next(iter(channel.messages.values()))
    assert posted.title == "Image" and posted.nonce == f"pb{job.id}r"
    # the files were read by the failed edit and sent again whole
    for data in posted.files.values():
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert len(posted.files) == 2
    done = await reload(queue, job.id)
    assert done.status is JobStatus.DONE and done.result_message_id == posted.id


async def test_a_permanent_refusal_fails_the_job_for_good_and_tells_the_member_by_dm(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, client: FakeClient, images_dir: Path
) -> None:
    job = await generated_job(queue, images_dir)
    await queue.set_status_message(job.id, 31337)
    channel.gone = True

    await delivery.deliver(await reload(queue, job.id))

    failed = await reload(queue, job.id)
    reason = "The channel was deleted before the result could be posted."
    assert failed.status is JobStatus.FAILED and failed.error == reason
    assert failed.notified_at is not None
    assert client.member.dms == [
        (f"Your ponybot job #{job.id} in <#{CHANNEL}> failed: {reason}", f"pb{job.id}d")
    ]
    # the notice is settled: another notify shows nothing more
    assert await delivery.notify(failed) is True
    assert len(client.member.dms) == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            http_error(403, 50013, "Missing Permissions"),
            "I lost permission to post in that channel (Missing Permissions).",
        ),
        (
            http_error(400, 50083, "Thread is archived"),
            "The thread was archived before the result could be posted.",
        ),
        (http_error(400, 50035, "Invalid Form Body"), "Discord refused the result (400 Invalid Form Body)"),
    ],
)
async def test_permanent_refusals_name_the_reason(
    delivery: Delivery,
    queue: JobQueue,
    channel: FakeChannel,
    client: FakeClient,
    images_dir: Path,
    error: discord.HTTPException,
    reason: str,
) -> None:
    job = await generated_job(queue, images_dir, count=1)
    channel.send_errors = [error]  # the result post is refused; the notice post goes through

    await delivery.deliver(job)

    failed = await reload(queue, job.id)
    assert failed.status is JobStatus.FAILED and failed.error == reason
    notice = next(iter(channel.messages.values()))
    assert notice.title == "Failed" and notice.files == {} and notice.buttons == []
    assert {f.name: f.value for f in notice.embeds[0].fields}["Reason"] == failure_embed(failed).fields[
        0
    ].value
    assert notice.nonce == f"pb{job.id}n"
    assert client.member.dms == []
    assert failed.notified_at is not None


async def test_a_passing_failure_leaves_the_job_for_a_retry_with_the_same_nonce(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    job = await generated_job(queue, images_dir, count=1)
    channel.send_errors = [http_error(503, 0, "Service Unavailable")]

    with pytest.raises(discord.HTTPException):
        await delivery.deliver(job)
    waiting = await reload(queue, job.id)
    assert waiting.status is JobStatus.GENERATED and waiting.error is None

    await delivery.deliver(waiting)  # the worker's sweep
    assert [s["nonce"] for s in channel.sends] == [f"pb{job.id}r", f"pb{job.id}r"]
    assert len(channel.messages) == 1
    assert (await reload(queue, job.id)).status is JobStatus.DONE


async def test_413_shrinks_the_upload_until_discord_takes_it(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    job = await generated_job(queue, images_dir, count=1, size=256, noisy=True)
    png = (images_dir / job.result_files[0]).stat().st_size
    channel.max_file_bytes = png // 3

    await delivery.deliver(job)

    posted = next(iter(channel.messages.values()))
    assert len(channel.sends) >= 2  # refused with 413 at least once
    [(name, data)] = posted.files.items()
    assert name == f"ponybot-{job.id}-1.webp" and len(data) <= channel.max_file_bytes
    fields = {f.name: f.value for f in posted.embeds[0].fields}
    assert fields["Size"] == "256x256"  # the generated size, whatever was sent
    assert "to fit Discord's limit" in fields["Note"]
    assert (await reload(queue, job.id)).status is JobStatus.DONE


async def test_notify_shows_the_notice_once_and_records_it(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel
) -> None:
    job = await queued_job(queue)
    status_id = await delivery.post_status(job, 1, 1)
    assert await queue.claim(WORKER) is not None
    failed = await queue.fail(job.id, "Out of memory.", retryable=False)
    assert failed.notified_at is None

    assert await delivery.notify(failed) is True
    notice = channel.messages[status_id]  # type: ignore[index]
    assert notice.title == "Failed" and notice.buttons == []  # no Cancel on a finished job
    assert {f.name: f.value for f in notice.embeds[0].fields}["Reason"] == "Out of memory."
    assert (await reload(queue, job.id)).notified_at is not None

    assert await delivery.notify(await reload(queue, job.id)) is True
    assert await delivery.notify(failed) is True  # a stale copy of the row, too
    assert notice.edits == 1 and len(channel.sends) == 1


async def test_notify_keeps_the_notice_owed_after_a_passing_failure(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel
) -> None:
    job = await failed_job(queue)
    channel.send_errors = [http_error(502, 0, "Bad Gateway")]

    assert await delivery.notify(job) is False
    assert (await reload(queue, job.id)).notified_at is None
    assert channel.messages == {}

    assert await delivery.notify(job) is True
    assert [m.title for m in channel.messages.values()] == ["Failed"]
    assert (await reload(queue, job.id)).notified_at is not None


async def test_notify_of_a_cancelled_job_in_a_deleted_channel_dms_the_member(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, client: FakeClient
) -> None:
    job = await queued_job(queue)
    assert await queue.cancel(job.id) == "cancelled"
    channel.gone = True

    assert await delivery.notify(await reload(queue, job.id)) is True
    assert client.member.dms == [
        (f"Your ponybot job #{job.id} in <#{CHANNEL}> was cancelled", f"pb{job.id}d")
    ]
    assert (await reload(queue, job.id)).notified_at is not None


async def test_a_member_who_blocks_dms_still_settles_the_notice_but_a_passing_dm_failure_does_not(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, client: FakeClient
) -> None:
    job = await failed_job(queue)
    channel.gone = True
    client.member.errors = [http_error(503, 0, "Service Unavailable")]
    assert await delivery.notify(job) is False
    assert (await reload(queue, job.id)).notified_at is None

    client.member.errors = [http_error(403, 50007, "Cannot send messages to this user")]
    assert await delivery.notify(job) is True
    assert client.member.dms == []
    assert (await reload(queue, job.id)).notified_at is not None


async def test_notify_ignores_jobs_that_owe_no_notice(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel, images_dir: Path
) -> None:
    generated = await generated_job(queue, images_dir, count=1)
    waiting = await queued_job(queue, count=1)
    assert await delivery.notify(waiting) is True
    assert await delivery.notify(generated) is True
    assert channel.sends == [] and channel.messages == {}
    assert (await reload(queue, waiting.id)).notified_at is None


# --- several processes on one queue ---------------------------------------------------------------


async def running_job_with_status(delivery: Delivery, queue: JobQueue) -> Job:
    """A job with its status message posted, claimed and begun by WORKER (status running)."""
    job = await queued_job(queue, count=1)
    await delivery.post_status(job, 1, 1)
    assert await queue.claim(WORKER) is not None
    return await reload(queue, job.id)


async def test_progress_edits_in_one_channel_are_paced_across_jobs(
    delivery: Delivery, queue: JobQueue, channel: FakeChannel
) -> None:
    first = await running_job_with_status(delivery, queue)
    second = await running_job_with_status(delivery, queue)
    delivery.progress(first, 1, 3)
    await delivery._progress_tasks[first.id]
    delivery.progress(second, 1, 3)  # the same channel, within progress_every_s of the first edit
    await delivery._progress_tasks[second.id]
    edited = {m.id: m.edits for m in channel.messages.values()}
    assert edited == {first.status_message_id: 1, second.status_message_id: 0}
    shown = channel.messages[first.status_message_id]  # type: ignore[index]
    assert any("step 1 of 3" in str(f.value) for f in shown.embeds[0].fields)


@pytest.fixture
async def pg_queues(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """Two processes' PostgreSQL queues on one database, each with its own images folder."""
    from bot.jobs.pg_queue import PgJobQueue

    opened = []
    for name in ("machine-a", "machine-b"):
        (tmp_path / name).mkdir()
        opened.append(await PgJobQueue.open(pg_url, QueueLimits(), images_dir=tmp_path / name))
    yield opened[0], opened[1]
    for q in opened:
        await q.close()


@pytest.mark.postgres
async def test_a_result_saved_on_another_machine_is_fetched_and_delivered(
    pg_queues: tuple[Any, Any], client: FakeClient, channel: FakeChannel, tmp_path: Path
) -> None:
    here, there = pg_queues
    job = await generated_job(there, tmp_path / "machine-b", count=2)
    delivery = Delivery(client, here, tmp_path / "machine-a")  # type: ignore[arg-type]
    await delivery.deliver(job)
    (posted,) = channel.messages.values()
    assert sorted(posted.files) == [f"ponybot-{job.id}-1.png", f"ponybot-{job.id}-2.png"]
    assert Image.open(io.BytesIO(posted.files[f"ponybot-{job.id}-2.png"])).getpixel((0, 0)) == (80, 90, 200)
    assert (tmp_path / "machine-a" / job.result_files[0]).exists(), "fetched into this machine's folder"
    assert (await reload(here, job.id)).status is JobStatus.DONE


@pytest.mark.postgres
async def test_a_delivery_held_by_another_process_is_left_to_it(
    pg_queues: tuple[Any, Any], client: FakeClient, channel: FakeChannel, tmp_path: Path
) -> None:
    here, there = pg_queues
    job = await generated_job(here, tmp_path / "machine-a", count=1)
    assert await there.claim_delivery(job.id, there.application_name)  # a live process holds it
    delivery = Delivery(client, here, tmp_path / "machine-a", owner="this-process")  # type: ignore[arg-type]
    await delivery.deliver(job)
    assert channel.sends == [] and channel.messages == {}
    assert (await reload(here, job.id)).status is JobStatus.GENERATED
