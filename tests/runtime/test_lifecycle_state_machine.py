"""The job life cycle as a stateful property (issue #10 "one visible outcome").

Hypothesis drives random interleavings of member actions and failures against the REAL JobQueue
(an SQLite file in a temp dir) and the REAL Worker/PostProcess/Engine. Only the edges are fakes:

- `FakeGenerator` (no torch) returns GenerationResult-shaped objects with tiny PIL images; on
  command the next call raises OutOfMemory / BadOutput / an unexpected RuntimeError, or blocks
  (mid-steps, honouring cancel; or in the "decode", after the last step, ignoring it) so other
  rules run while a job is on the GPU and while the next batch is claimed ahead.
- `FakeDiscord` is the outside world that outlives a process: each job's channel message and
  every visible outcome shown to the member (result posted, notice shown in the channel, DM).
  It fails the next post transiently (503) or permanently (403: that job's channel is gone).
- `FakeDelivery` (one per process) does what bot.delivery.Delivery does with those answers:
  idempotent edits of the job's message, `mark_done` after the result, `mark_notified` after a
  notice, a DM when the channel refuses for good, and on a permanent result failure
  `queue.fail(retryable=False)` then the notice.
- `FaultyConnection` wraps the queue's aiosqlite connection so chosen writes raise
  sqlite3.OperationalError("database is locked"), `times` in a row.

A crash cancels every task of the process without any release, closes its connection and starts a
new Worker (new worker id, `recover`) on a freshly opened JobQueue of the same file; a clean
restart is `Worker.stop()` first. Invariants hold after every step; at the end the faults heal and
the live worker must settle everything by itself, then once more after a clean restart.

The `test_a_*` functions at the end replay, step by step, short interleavings in which the machine
found a violation, so each one is reproduced deterministically in about a second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import discord
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from PIL import Image

import bot.runtime.worker
from bot.discord_ui.delivery import NOTICE_STATUSES, is_permanent, post_nonce
from bot.jobs.db import retrying
from bot.jobs.models import TERMINAL_STATUSES, Job, JobKind, JobStatus, QueueFull, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig
from generator.errors import BadOutput, Cancelled, OutOfMemory
from generator.params import GenerationParams

T = TypeVar("T")

#: tiny back-off for every retried DB write (PostProcess.retry_delays, and the Worker's own calls)
FAST_RETRY = (0.001, 0.002, 0.004)
LIMITS = QueueLimits(
    max_open_per_user=3, max_queued=100, cooldown_s=0.0, max_attempts=3, lease_s=1.0, retry_backoff_s=0.01
)
USERS = (1, 2, 3)
STEPS = 2
#: how long the end of an example waits for everything to settle (lease 1 s, sweep every 0.1 s)
SETTLE_S = 8.0
TERMINAL = {s.value for s in TERMINAL_STATUSES}
NOTICES = {s.value for s in NOTICE_STATUSES}


# --- the generator ------------------------------------------------------------------------------


@dataclass
class FakeImage:
    """Shaped like generator.pipeline.ImageResult (what bot.images.save_results reads)."""

    image: Image.Image
    seed: int
    parameters: str


@dataclass
class FakeResult:
    """Shaped like generator.pipeline.GenerationResult."""

    images: list[FakeImage]
    seconds: float
    width: int
    height: int


class _Abandoned(Exception):
    """The process that made this call is gone (a crash): end the GPU thread's call quietly."""


@dataclass
class Plan:
    """What the next generator calls do; shared by every process of one example."""

    outcomes: collections.deque[str] = field(default_factory=collections.deque)
    #: set = blocked calls may go on (mid-step blocks also end on a cancel)
    gate: threading.Event = field(default_factory=threading.Event)
    #: set = a blocked "decode" ends (it ignores cancel, like the real VAE decode)
    decode_gate: threading.Event = field(default_factory=threading.Event)
    calls: int = 0

    def __post_init__(self) -> None:
        self.gate.set()
        self.decode_gate.set()


class FakeGenerator:
    """A Generator stand-in for `Engine(loader=...)`: no torch, outcomes from the `Plan`."""

    model_name = "fake"
    model_hash = "0000000000"
    device = "cpu"
    dtype_name = "float32"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        #: the process that owns this generator crashed: its calls end at once, reporting nothing
        self.dead = False

    def txt2img(
        self,
        params: GenerationParams,
        *,
        progress: Any = None,
        want_preview: bool = False,
        should_cancel: Any = None,
    ) -> FakeResult:
        return self._run([params], progress, should_cancel)[0]

    def txt2img_batch(
        self, requests: list[GenerationParams], *, progress: Any = None, should_cancel: Any = None
    ) -> list[FakeResult]:
        return self._run(list(requests), progress, should_cancel)

    def _wait(self, gate: threading.Event, should_cancel: Any) -> None:
        deadline = time.monotonic() + 30  # a safety net only: teardown always opens the gates
        while not gate.is_set() and time.monotonic() < deadline:
            if self.dead:
                raise _Abandoned()
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled.")
            time.sleep(0.003)

    def _run(self, requests: list[GenerationParams], progress: Any, should_cancel: Any) -> list[FakeResult]:
        try:
            outcome = self.plan.outcomes.popleft()
        except IndexError:
            outcome = "ok"
        self.plan.calls += 1
        total = requests[0].steps
        for step in range(1, total + 1):
            if self.dead:
                raise _Abandoned()
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled.")
            if step == 1 and outcome == "oom":
                raise OutOfMemory("Out of GPU memory; try fewer or smaller images.")
            if step == 1 and outcome == "block":
                self._wait(self.plan.gate, should_cancel)
            if progress is not None:
                progress(step, total, None)  # the last step lets the worker claim ahead
        if outcome == "block_decode":
            self._wait(self.plan.decode_gate, None)
        if self.dead:
            raise _Abandoned()
        if outcome == "blank":
            raise BadOutput("The image came out blank; try another seed or prompt.")
        if outcome == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [
            FakeResult(
                images=[
                    FakeImage(
                        Image.new("RGB", (8, 8), (i * 40, 90, 160)), r.seed + i, f"{r.prompt}\nSeed: {r.seed}"
                    )
                    for i in range(r.count)
                ],
                seconds=0.01,
                width=r.width,
                height=r.height,
            )
            for r in requests
        ]


# --- Discord ------------------------------------------------------------------------------------


@dataclass
class FakeResponse:
    """What discord.HTTPException reads from an aiohttp response."""

    status: int
    reason: str


def transient_error() -> discord.HTTPException:
    return discord.HTTPException(FakeResponse(503, "Service Unavailable"), "upstream connect error")


def permanent_error() -> discord.HTTPException:
    return discord.Forbidden(FakeResponse(403, "Forbidden"), {"code": 50001, "message": "Missing Access"})


class FakeDiscord:
    """Each job's channel message and the visible outcomes the member saw; outlives processes."""

    def __init__(self) -> None:
        #: what the job's channel message shows now ("result" / "notice"; absent: the status message)
        self.message: dict[int, str] = {}
        #: every visible outcome, in order: "result", "notice" (channel) or "dm"
        self.outcomes: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
        #: idempotent repeats (the same content edited in again): invisible, counted for the report
        self.repeats: collections.Counter[int] = collections.Counter()
        #: jobs whose channel refuses for good (deleted, no access)
        self.gone: set[int] = set()
        #: what the next posts do: "transient" or "permanent"
        self.faults: collections.deque[str] = collections.deque()
        self.dm_nonces: set[str] = set()

    async def post(self, job_id: int, content: str) -> None:
        """Edit the job's message into `content` (or post it): the job's one message, like Delivery."""
        await asyncio.sleep(0.001)  # a round trip to Discord: other tasks run meanwhile
        if job_id in self.gone:
            raise permanent_error()
        if self.faults:
            fault = self.faults.popleft()
            if fault == "transient":
                raise transient_error()
            self.gone.add(job_id)
            raise permanent_error()
        if self.message.get(job_id) == content:
            self.repeats[job_id] += 1
            return
        self.message[job_id] = content
        self.outcomes[job_id].append(content)

    async def direct_message(self, job_id: int, nonce: str | None = None) -> None:
        """A DM to the requester: a new message each time, unless sent again with the same nonce
        (Discord's enforce_nonce returns the first message then)."""
        await asyncio.sleep(0.001)
        if nonce is not None and nonce in self.dm_nonces:
            self.repeats[job_id] += 1
            return
        if nonce is not None:
            self.dm_nonces.add(nonce)
        self.outcomes[job_id].append("dm")


class FakeDelivery:
    """The Deliverer of one process, doing with FakeDiscord's answers what bot.delivery.Delivery does."""

    def __init__(self, queue: JobQueue, world: FakeDiscord) -> None:
        self.queue = queue
        self.world = world
        self._locks: collections.defaultdict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._delivering: set[int] = set()

    async def job_started(self, job: Job) -> None:
        await asyncio.sleep(0)

    async def job_requeued(self, job: Job) -> None:
        await asyncio.sleep(0)

    def progress(self, job: Job, step: int, total: int, preview: Any = None) -> None:
        pass

    def is_delivering(self, job_id: int) -> bool:
        return job_id in self._delivering

    async def deliver(self, job: Job) -> None:
        if job.id in self._delivering:
            return
        self._delivering.add(job.id)
        try:
            async with self._locks[job.id]:
                current = await self.queue.get(job.id)
                if current is None or current.status != JobStatus.GENERATED:
                    return
                try:
                    await self.world.post(job.id, "result")
                except discord.HTTPException as exc:
                    if is_permanent(exc):
                        await self._give_up(current, "I lost permission to post in that channel.")
                        return
                    raise  # passing: the worker's sweep delivers again
                # as Delivery._deliver_locked: recording the result is retried
                await retrying(
                    lambda: self.queue.mark_done(job.id, 10_000 + job.id), "done", delays=FAST_RETRY
                )
        finally:
            self._delivering.discard(job.id)

    async def notify(self, job: Job) -> bool:
        async with self._locks[job.id]:
            current = await self.queue.get(job.id)
            if current is None or current.notified_at is not None or current.status not in NOTICE_STATUSES:
                return True
            return await self._notify_locked(current)

    async def _notify_locked(self, job: Job) -> bool:
        try:
            await self.world.post(job.id, "notice")
        except discord.HTTPException as exc:
            if not is_permanent(exc):
                return False
            # as Delivery._direct_message: `user.send(..., nonce=post_nonce(job.id, "d"))`
            await self.world.direct_message(job.id, nonce=post_nonce(job.id, "d"))
        await retrying(lambda: self.queue.mark_notified(job.id), "notified", delays=FAST_RETRY)
        return True

    async def _give_up(self, job: Job, reason: str) -> None:
        failed = await self.queue.fail(job.id, reason, retryable=False)
        if failed.status in NOTICE_STATUSES and failed.notified_at is None:
            await self._notify_locked(failed)


# --- the database -------------------------------------------------------------------------------

#: a statement of each queue operation (a substring of its SQL), for aiming a write failure
DB_OPS: dict[str, str] = {
    "enqueue": "INSERT INTO jobs",
    "claim": "SET status = 'running', attempts = attempts + :start",
    "begin": "SET attempts = attempts + 1, started_at",
    "extend_lease": "SET lease_expires_at = ?, updated_at = ?",
    "generated": "SET status = 'generated'",
    "generated_stats": "INSERT INTO queue_stats",  # the second statement: the first one committed
    "done": "SET status = 'done'",
    "notified": "UPDATE jobs SET notified_at",
    "fail": "WHERE id = :id RETURNING *",
    "cancel": "WHERE id = :id AND status = 'queued' RETURNING id",
    "finish_cancelled": "status IN ('running', 'queued') AND cancel_requested = 1",
    "release": "solo = max(solo, :solo)",
    "recover": "WHERE status = 'running' AND lease_owner IS NOT ?",
    "requeue_expired": "WHERE status = 'running' AND lease_expires_at < ?",
}
_WRITES = ("UPDATE", "INSERT", "DELETE")
#: what `next_db_write_fails` aims at ("any": the next write, in practice mostly an idle claim or
#: a sweep's requeue_expired, which is why those two and enqueue are not aimed at by name)
FAULT_TARGETS = [op for op in ("any", *DB_OPS) if op not in ("enqueue", "claim", "requeue_expired")]


class DbFaults:
    """Armed write failures; shared by every connection of one example."""

    def __init__(self) -> None:
        #: op name (a DB_OPS key, or "any": the next write of any kind) -> failures left
        self.armed: dict[str, int] = {}
        self.raised: collections.Counter[str] = collections.Counter()
        self.seen: collections.Counter[str] = collections.Counter()

    def check(self, sql: str, in_txn: bool) -> None:
        text = " ".join(sql.split())
        ops = [name for name, marker in DB_OPS.items() if marker in text]
        self.seen.update(ops)
        is_write = text.startswith("BEGIN IMMEDIATE") or (not in_txn and text.startswith(_WRITES))
        for name in [*ops, "any"] if is_write else ops:
            if self.armed.get(name, 0) > 0:
                self.armed[name] -= 1
                self.raised[name] += 1
                raise sqlite3.OperationalError("database is locked")


class FaultyConnection:
    """The queue's aiosqlite connection, with `DbFaults` applied before each statement."""

    def __init__(self, inner: Any, faults: DbFaults) -> None:
        self._inner = inner
        self._faults = faults
        self._in_txn = False

    async def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._faults.check(sql, self._in_txn)
        cursor = await self._inner.execute(sql, *args, **kwargs)
        self._track(sql)
        return cursor

    async def execute_fetchall(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._faults.check(sql, self._in_txn)
        rows = await self._inner.execute_fetchall(sql, *args, **kwargs)
        self._track(sql)
        return rows

    async def rollback(self) -> None:
        self._in_txn = False
        await self._inner.rollback()

    def _track(self, sql: str) -> None:
        head = sql.lstrip().upper()
        if head.startswith("BEGIN"):
            self._in_txn = True
        elif head.startswith(("COMMIT", "ROLLBACK", "END")):
            self._in_txn = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- one bot process ----------------------------------------------------------------------------


@dataclass
class Process:
    queue: JobQueue
    engine: Engine
    generator: FakeGenerator
    delivery: FakeDelivery
    worker: Worker


def job_params(user: int, count: int, n: int) -> dict[str, Any]:
    return GenerationParams(
        prompt=f"pony {user} #{n}", seed=n, steps=STEPS, width=64, height=64, count=count
    ).to_dict()


class JobLifecycle(RuleBasedStateMachine):
    """Random interleavings of members, failures, crashes and restarts; one visible outcome each."""

    #: one ticket per /pony attempt, accepted or not: what the rules draw must never depend on timing
    #: (whether a job was refused depends on how far the worker got), or Hypothesis cannot replay
    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="ponybot-lifecycle-"))
        self.db_path = self.tmp / "jobs.sqlite3"
        self.images_dir = self.tmp / "images"
        self.faults = DbFaults()
        self.plan = Plan()
        self.world = FakeDiscord()
        self.accepted: dict[int, int] = {}  # job id -> user
        self.ticket_job: dict[int, int] = {}  # ticket -> job id, for accepted attempts
        self.terminal_seen: dict[int, str] = {}
        self.cancels: dict[int, str] = {}  # job id -> "cancelled" | "requested"
        self.refused: collections.Counter[str] = collections.Counter()
        self.stop_errors: list[str] = []
        self.violation: str | None = None
        self.steps = 0
        self.enqueued = 0
        # the Worker's own retried writes (begin, split, cancel) use bot.db's default back-off
        # of 0.5..8 s, which it has no setting for; make it as short as PostProcess.retry_delays
        self._patch = mock.patch.object(
            bot.runtime.worker, "retrying", functools.partial(retrying, delays=FAST_RETRY)
        )
        self._patch.start()
        self.proc: Process | None = None
        self.proc = self.run(self._start_process())
        self.reader = sqlite3.connect(self.db_path, timeout=5, isolation_level=None)

    # --- plumbing -----------------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _start_process(self) -> Process:
        queue = await JobQueue.open(self.db_path, LIMITS, busy_timeout_ms=50)
        queue._conn = FaultyConnection(queue._conn, self.faults)  # type: ignore[assignment]
        generator = FakeGenerator(self.plan)
        engine = Engine(
            GeneratorConfig(model="fake", device="cpu", revision=None), loader=lambda _: generator
        )
        await engine.start_loading()
        assert await engine.wait_loaded()
        delivery = FakeDelivery(queue, self.world)
        worker = Worker(
            queue,
            engine,
            delivery,
            images_dir=self.images_dir,
            batch_size=2,
            job_timeout_s=60,
            lease_s=0.4,  # the sweep (expired leases, owed deliveries and notices) every 0.1 s
            poll_s=0.02,
        )
        worker.post.retry_delays = FAST_RETRY
        worker.start()
        return Process(queue, engine, generator, delivery, worker)

    async def _kill(self, proc: Process) -> None:
        """The process is gone: none of its code runs again, no release, its connection closes."""
        proc.generator.dead = True
        # callbacks the GPU thread already queued on the loop must not claim on its behalf
        proc.worker._stopping = True
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(Exception):
            await proc.queue.close()
        proc.engine.shutdown()
        proc.worker._io.shutdown(wait=False)

    async def _crash(self) -> None:
        assert self.proc is not None
        await self._kill(self.proc)
        self.proc = await self._start_process()

    async def _restart(self) -> None:
        assert self.proc is not None
        self.plan.decode_gate.set()  # a decode always ends; a blocked step loop is stopped by stop()
        try:
            await self.proc.worker.stop(grace_s=0.1)
        except Exception as exc:  # e.g. a release that hit a locked database
            self.stop_errors.append(f"{type(exc).__name__}: {exc}")
        await self._kill(self.proc)  # what stop() left running dies with the process
        self.proc = await self._start_process()

    def _rows(self) -> dict[int, sqlite3.Row]:
        self.reader.row_factory = sqlite3.Row
        rows = self.reader.execute(
            "SELECT id, user_id, status, attempts, cancel_requested, notified_at, lease_owner FROM jobs"
        ).fetchall()
        return {row["id"]: row for row in rows}

    def _snapshot(self) -> tuple[Any, ...]:
        rows = self._rows()
        return (
            tuple(
                (r["id"], r["status"], r["attempts"], r["notified_at"], r["lease_owner"])
                for r in rows.values()
            ),
            tuple((k, tuple(v)) for k, v in sorted(self.world.outcomes.items())),
        )

    async def _until_quiet(self, limit_s: float) -> None:
        """Let the loop run until nothing changed for longer than a sweep period (the worker's lease_s / 4:
        owed deliveries and notices are retried by the sweep), or `limit_s`."""
        deadline = time.monotonic() + limit_s
        last, stable = None, 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            snap = self._snapshot()
            stable = stable + 1 if snap == last else 0
            last = snap
            if stable >= 7:  # 0.14 s
                return

    def _settled(self) -> bool:
        rows = self._rows()
        return all(r["status"] in TERMINAL and r["notified_at"] is not None for r in rows.values())

    async def _until_settled(self, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self._settled():
                return True
            await asyncio.sleep(0.02)
        return self._settled()

    def _describe(self) -> str:
        rows = self._rows()
        return "; ".join(
            f"#{i} {r['status']} attempts={r['attempts']} cancel={r['cancel_requested']}"
            f" notified={r['notified_at'] is not None} owner={r['lease_owner']}"
            f" outcomes={self.world.outcomes.get(i, [])} cancel_rule={self.cancels.get(i)}"
            for i, r in sorted(rows.items())
        )

    # --- members ------------------------------------------------------------------------------

    @rule(target=tickets, user=st.sampled_from(USERS), count=st.sampled_from([1, 1, 2]))
    def enqueue(self, user: int, count: int) -> int:
        assert self.proc is not None
        self.enqueued += 1
        ticket = self.enqueued
        try:
            job, _ = self.run(
                self.proc.queue.enqueue(
                    kind=JobKind.TXT2IMG,
                    params=job_params(user, count, self.enqueued),
                    channel_id=100 + user,
                    user_id=user,
                    guild_id=user % 2,
                )
            )
        except QueueFull as exc:
            self.refused[exc.kind] += 1
            return ticket
        except sqlite3.OperationalError:
            self.refused["busy"] += 1  # "busy, try again": nothing was queued
            return ticket
        self.accepted[job.id] = user
        self.ticket_job[ticket] = job.id
        self.proc.worker.wake()
        return ticket

    @rule(ticket=tickets)
    def cancel(self, ticket: int) -> None:
        """What JobActions.cancel_job does for the Cancel button (a refused attempt has none)."""
        job_id = self.ticket_job.get(ticket)
        if job_id is not None:
            self.run(self._cancel(job_id))

    async def _cancel(self, job_id: int) -> None:
        assert self.proc is not None
        try:
            outcome = await self.proc.queue.cancel(job_id)
        except sqlite3.OperationalError:
            return  # the member is told "busy, try again"
        if outcome != "not_open":
            self.cancels.setdefault(job_id, outcome)
        if outcome == "cancelled":
            with contextlib.suppress(sqlite3.OperationalError):  # then the sweep shows the notice
                cancelled = await self.proc.queue.get(job_id)
                if cancelled is not None:
                    await self.proc.delivery.notify(cancelled)
        elif outcome == "requested":
            self.proc.worker.request_cancel(job_id)

    # --- time -----------------------------------------------------------------------------------

    @rule()
    def advance_a_little(self) -> None:
        self.run(asyncio.sleep(0.01))

    @rule(limit_s=st.sampled_from([0.1, 0.4]))
    def advance(self, limit_s: float) -> None:
        self.run(self._until_quiet(limit_s))

    # --- the generator --------------------------------------------------------------------------

    @rule(outcome=st.sampled_from(["ok", "oom", "blank", "crash", "block", "block_decode"]))
    def next_generation(self, outcome: str) -> None:
        if outcome == "block":
            self.plan.gate.clear()
        elif outcome == "block_decode":
            self.plan.decode_gate.clear()
        self.plan.outcomes.append(outcome)

    @rule()
    def unblock(self) -> None:
        self.plan.gate.set()
        self.plan.decode_gate.set()

    # --- Discord and the database ---------------------------------------------------------------

    @rule(kind=st.sampled_from(["transient", "permanent"]))
    def next_post_fails(self, kind: str) -> None:
        self.world.faults.append(kind)

    @rule(op=st.sampled_from(FAULT_TARGETS), times=st.sampled_from([1, 1, 2, 4]))
    def next_db_write_fails(self, op: str, times: int) -> None:
        self.faults.armed[op] = self.faults.armed.get(op, 0) + times

    # --- the process ----------------------------------------------------------------------------

    @rule()
    def crash(self) -> None:
        self.run(self._crash())

    @rule()
    def restart_cleanly(self) -> None:
        self.run(self._restart())

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def one_state_and_at_most_one_outcome(self) -> None:
        """Checked after every step, raised at the end: a violation must not change which rules
        Hypothesis draws (it would stop the run at a step that depends on timing, and replays
        would then draw differently: FlakyStrategyDefinition)."""
        self.steps += 1
        if self.violation is not None:
            return
        try:
            self._check_states()
        except AssertionError as exc:
            self.violation = f"after step {self.steps - 1}: {exc}"

    def _check_states(self) -> None:
        rows = self._rows()
        assert set(rows) == set(self.accepted), "the jobs in the database are the accepted ones"
        for job_id, row in rows.items():
            status = row["status"]
            shown = self.world.outcomes.get(job_id, [])
            where = f"job #{job_id}: {self._describe()}"
            if job_id in self.terminal_seen:
                assert status == self.terminal_seen[job_id], f"a terminal state changed: {where}"
            elif status in TERMINAL:
                self.terminal_seen[job_id] = status
            assert len(shown) <= 1, f"two visible outcomes: {where}"
            if shown == ["result"]:
                assert status in ("generated", "done"), f"a result was posted for a {status} job: {where}"
            elif shown:
                assert status in NOTICES, f"a notice was shown for a {status} job: {where}"
            if status == "done":
                assert shown == ["result"], f"done without its result posted: {where}"
            if row["notified_at"] is not None:
                assert shown, f"recorded as shown but nothing was shown: {where}"
            cancel = self.cancels.get(job_id)
            if cancel == "cancelled":
                assert status == "cancelled", f"a queued job cancelled, then {status}: {where}"
            elif cancel == "requested":
                assert status in ("running", "cancelled"), f"a cancel requested while running lost: {where}"

    # --- the end ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            assert self.violation is None, self.violation
            if self.proc is not None:
                self.run(self._drain_and_check())
        finally:
            self.plan.gate.set()
            self.plan.decode_gate.set()
            with contextlib.suppress(Exception):
                self.reader.close()
            if self.proc is not None:
                with contextlib.suppress(Exception):
                    self.run(self._kill(self.proc))
            with contextlib.suppress(Exception):
                self.run(self.loop.shutdown_asyncgens())
            self.loop.close()
            self._patch.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _drain_and_check(self) -> None:
        # everything heals: no more failures, blocked generations go on
        self.faults.armed.clear()
        self.world.faults.clear()
        self.plan.outcomes.clear()
        self.plan.gate.set()
        self.plan.decode_gate.set()
        assert self.proc is not None
        self.proc.worker.wake()
        # the live worker must settle every job by itself (leases run out, sweeps retry)
        settled_live = await self._until_settled(SETTLE_S)
        stuck_live = self._describe()
        # then a clean restart, as the brief's drain does; whatever is left must settle now
        await self._restart()
        assert await self._until_settled(SETTLE_S), (
            f"jobs still open or owed after a restart: {self._describe()}"
        )
        self._check_states()
        rows = self._rows()
        for job_id, row in rows.items():
            shown = self.world.outcomes.get(job_id, [])
            where = f"job #{job_id}: {self._describe()}"
            assert len(shown) == 1, f"a finished job without exactly one visible outcome: {where}"
            expected = ["result"] if row["status"] == "done" else ["notice", "dm"]
            assert shown[0] in expected, f"the outcome does not match the status: {where}"
        proc = self.proc
        assert proc is not None
        await proc.worker.stop(grace_s=1)
        for user in USERS:
            assert await proc.queue.open_jobs(user) == [], f"user {user} still has open jobs"
            assert await proc.queue.unnotified() == []
            # never refused by the open-jobs limit for jobs that can no longer finish
            await proc.queue.enqueue(
                kind=JobKind.TXT2IMG, params=job_params(user, 1, 0), channel_id=100 + user, user_id=user
            )
        assert settled_live, f"jobs stayed open or owed until the bot restarted: {stuck_live}"


@contextlib.contextmanager
def _quiet_logs() -> Any:
    """The runs log every injected failure with a traceback; keep them out of the captured output."""
    loggers = [logging.getLogger(name) for name in ("bot", "asyncio", "aiosqlite")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


JobLifecycle.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)


class TestJobLifecycle(JobLifecycle.TestCase):  # type: ignore[name-defined,misc]
    def runTest(self) -> None:
        # a failure is shrunk for at most a minute (Hypothesis' own cap is 5, pytest's timeout too)
        with _quiet_logs(), mock.patch.object(hypothesis_engine, "MAX_SHRINKING_SECONDS", 60):
            super().runTest()


async def test_every_fault_point_is_reached(tmp_path: Path) -> None:
    """Each DB_OPS marker matches a statement the queue really runs (guards against SQL drift)."""
    faults = DbFaults()
    q = await JobQueue.open(tmp_path / "jobs.sqlite3", LIMITS)
    q._conn = FaultyConnection(q._conn, faults)  # type: ignore[assignment]
    try:
        add: Callable[[int], Awaitable[tuple[Job, bool]]] = lambda user: q.enqueue(  # noqa: E731
            kind=JobKind.TXT2IMG, params=job_params(user, 1, user), channel_id=1, user_id=user
        )
        a, _ = await add(1)
        b, _ = await add(2)
        c, _ = await add(3)
        batch = await q.claim_batch("w", 2, max_images=2, reserve=True)
        assert {j.id for j in batch} == {a.id, b.id}
        await q.begin([a.id, b.id], "w")
        await q.extend_lease(a.id, "w")
        assert await q.mark_generated(a.id, "w", ["x.png"], [1], 0.5)
        assert await q.mark_done(a.id, 1)
        assert await q.release(b.id, "w", solo=True)
        assert await q.cancel(c.id) == "cancelled"
        assert await q.mark_notified(c.id)
        [b2] = await q.claim_batch("w", 1, reserve=True)
        assert await q.cancel(b2.id) == "requested"
        assert await q.finish_cancelled(b2.id)
        d, _ = await add(4)
        await q.claim_batch("w", 1)
        await q.fail(d.id, "oops", retryable=True)
        await q.recover("other")
        await q.requeue_expired()
    finally:
        await q.close()
    assert set(faults.seen) == set(DB_OPS), f"markers never seen: {set(DB_OPS) - set(faults.seen)}"


# --- fixed interleavings: each is one way the machine above reaches a violation -----------------


def _scenario(*steps: Callable[[JobLifecycle], Any]) -> None:
    """Run `steps` on a fresh machine, checking the invariant after each, then its teardown
    (which raises the first violation, or what the drain found)."""
    with _quiet_logs():
        machine = JobLifecycle()
        try:
            for step in steps:
                step(machine)
                machine.one_state_and_at_most_one_outcome()
        except BaseException:
            with contextlib.suppress(AssertionError):
                machine.teardown()
            raise
        machine.teardown()


def _until(check: Callable[[JobLifecycle], bool], limit_s: float = 5.0) -> Callable[[JobLifecycle], None]:
    """A step: let the loop run until `check(machine)` holds."""

    async def wait(machine: JobLifecycle) -> None:
        deadline = time.monotonic() + limit_s
        while not check(machine):
            assert time.monotonic() < deadline, "the scenario did not reach its precondition"
            await asyncio.sleep(0.001)

    return lambda machine: machine.run(wait(machine))


def _status(machine: JobLifecycle, ticket: int) -> str | None:
    job_id = machine.ticket_job.get(ticket)
    row = machine._rows().get(job_id) if job_id is not None else None
    return None if row is None else row["status"]


def test_a_notice_sent_by_dm_is_sent_once_when_recording_it_fails() -> None:
    """The channel refuses for good, so the failure notice goes by DM; `mark_notified` then
    fails once. The notice stays owed, the sweep shows it again, and the DM goes out twice
    (Delivery._notify_locked: no retry of mark_notified, and `user.send` without a nonce)."""
    _scenario(
        lambda m: m.next_generation("blank"),
        lambda m: m.next_post_fails("permanent"),
        lambda m: m.next_db_write_fails("notified", 1),
        lambda m: m.enqueue(user=1, count=1),
        lambda m: m.advance(0.4),
    )


def test_a_posted_result_is_not_followed_by_a_notice_when_recording_it_fails() -> None:
    """The result is posted but `mark_done` fails once, so the job stays generated; when the
    sweep delivers again the channel refuses for good, and the job is failed and a notice sent
    (Delivery._deliver_locked: no retry of mark_done; the re-delivery gives up)."""
    _scenario(
        lambda m: m.next_db_write_fails("done", 1),
        lambda m: m.enqueue(user=1, count=1),
        _until(lambda m: bool(m.world.outcomes)),  # the result is on Discord, mark_done failed
        lambda m: m.next_post_fails("permanent"),
        lambda m: m.advance(0.4),
    )


def test_a_job_cancelled_while_claimed_ahead_ends_even_if_recording_it_fails() -> None:
    """A job claimed ahead (during the running job's decode) is cancelled; when the worker begins
    it, `finish_cancelled` fails past its retries. PostProcess.cancelled raises before dropping the
    job from the worker's held set, so its lease is extended for ever: the job stays running (and
    counts against the member's open jobs) until the bot restarts."""
    _scenario(
        lambda m: m.next_generation("block_decode"),
        lambda m: m.enqueue(user=2, count=2),  # guild 0: served first
        lambda m: m.enqueue(user=1, count=2),  # guild 1: claimed ahead at the last step
        _until(lambda m: _status(m, 2) == "running"),
        lambda m: m.cancel(2),
        lambda m: m.next_db_write_fails("finish_cancelled", 4),
        lambda m: m.unblock(),
        lambda m: m.advance(0.4),
    )
