"""The composition root: builds every service once and runs the bot until it is told to stop.

`build_services` is the only place that constructs services; `run_bot` (`ponybot run`) and
`sync_now` (`ponybot sync`) both use it. The order settles who needs whom:

1. the Discord client first (`make_client`: a `PonyBot`, or a `ShardedPonyBot` when `PONY_SHARDS`
   asks for shards; a REST-only `discord.Client` for `sync_now`): delivery,
   the image filter and the use cases post through it, and it is inert until started;
2. the services, each given its collaborators in its constructor: guard (and its guild settings
   store), delivery, the worker, then `Ops`, which watches the worker and is handed the worker's
   `heartbeat` / `on_finished` hooks here, the image filter as the worker's `screen` hook, and the
   use cases (`JobActions`, `MemberImages`);
3. `PonyBot.attach(services)`, which puts the slash commands (closures over the services) on the
   client's tree; only then is the client started.

With `PONY_DATABASE_URL` the queue is PostgreSQL (`open_queue`) and several processes may share
it: `run_worker` (`ponybot worker`) runs only the worker half, over REST (`login()`, never a
gateway connection, never a command sync); `ponybot run --no-worker` (`PONY_LOCAL_WORKER=false`)
runs only the gateway half: its worker is built but never started (`Worker.stay_elsewhere`), so
it serves commands and queues jobs that the worker processes claim. The per-guild settings and the
synced command schema live in the queue's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import discord
from discord import app_commands

from bot.config import Settings
from bot.discord_ui.actions import JobActions
from bot.discord_ui.client import make_client, point_discord_at
from bot.discord_ui.command_sync import SyncResult, add_commands, sync_commands
from bot.discord_ui.delivery import Delivery
from bot.discord_ui.member_images import ImageOptions, MemberImages
from bot.discord_ui.output_filter import OutputFilter
from bot.discord_ui.services import Services
from bot.jobs.app_state import AppState
from bot.jobs.contract import JobQueueContract
from bot.jobs.models import QueueLimits
from bot.jobs.pg_db import CONNECT_ERRORS, database_place
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.queue import JobQueue
from bot.ops.ops import Ops
from bot.policy.guard import Guard
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker, WorkerFailed, new_worker_id

log = logging.getLogger(__name__)

#: PostgreSQL keeps at most 63 characters of an application_name
APPLICATION_NAME_CHARS = 63


def gateway_name() -> str:
    """The database application_name of a gateway process that runs no worker."""
    return f"ponybot-gateway:{socket.gethostname()}:{os.getpid()}"[:APPLICATION_NAME_CHARS]


class DatabaseUnreachable(Exception):
    """PostgreSQL at PONY_DATABASE_URL could not be reached or refused the connection (one line)."""


async def open_queue(settings: Settings, *, application_name: str | None = None) -> JobQueue | PgJobQueue:
    """The job queue (connected and migrated): PostgreSQL at `PONY_DATABASE_URL` when set (its
    connections named `application_name`, default `gateway_name()`), else SQLite at `PONY_DB`.

    Raises DatabaseUnreachable when PostgreSQL cannot be reached or refuses the connection.
    """
    limits = QueueLimits.from_settings(settings)
    if settings.database_url is not None:
        try:
            return await PgJobQueue.open(
                settings.database_url,
                limits,
                images_dir=settings.images_dir,
                application_name=application_name or gateway_name(),
            )
        except CONNECT_ERRORS as exc:
            raise DatabaseUnreachable(
                f"Could not open the PostgreSQL queue at {database_place(settings.database_url)}"
                f" ({type(exc).__name__}: {exc}). Check PONY_DATABASE_URL and that the server is up."
            ) from exc
    return await JobQueue.open(
        settings.db_path, limits, busy_timeout_ms=settings.db_busy_timeout_ms, images_dir=settings.images_dir
    )


def _delivery_owner(queue: JobQueueContract) -> str | None:
    """Who holds this process's deliveries: on PostgreSQL its connections' name, so a hold ends
    the moment the process dies (`PgJobQueue.claim_delivery`); else a fresh id per process."""
    return queue.application_name if isinstance(queue, PgJobQueue) else None


def build_worker(
    settings: Settings,
    queue: JobQueueContract,
    engine: Engine,
    delivery: Delivery,
    client: discord.Client,
    *,
    worker_id: str | None = None,
    gateway: bool = True,
) -> tuple[Worker, Ops, OutputFilter | None]:
    """The worker with its watchers: `Ops` (given the worker's heartbeat / on_finished hooks) and
    the image filter (its `screen` hook, when PONY_NSFW_CLASSIFIER is set). Nothing starts."""
    worker = Worker(
        queue,
        engine,
        delivery,
        images_dir=settings.images_dir,
        batch_size=settings.batch_size,
        job_timeout_s=settings.job_timeout_s,
        lease_s=settings.lease_s,
        worker_id=worker_id,
    )
    # metrics, health, periodic refresh and retention, on the queue's database
    ops = Ops(
        settings,
        engine,
        worker,
        queue=queue,
        gateway=gateway,
        local_worker=settings.local_worker or not gateway,
    )
    worker.heartbeat = ops.worker_heartbeat
    worker.on_finished = ops.job_finished
    output_filter = OutputFilter(settings, engine, client) if settings.nsfw_classifier is not None else None
    if output_filter is not None:
        worker.screen = output_filter.screen
    return worker, ops, output_filter


def build_services(
    settings: Settings,
    queue: JobQueue | PgJobQueue,
    engine: Engine,
    client: discord.Client,
    *,
    worker_id: str | None = None,
) -> Services:
    """Build every service of one bot process, once, on `queue`, `engine` and `client` (nothing starts).

    With `settings.local_worker` false the worker is built but never started (`stay_elsewhere`).
    """
    guard = Guard(settings, queue)
    if guard.store is None:  # a guard built with a queue always has its store
        raise RuntimeError("the guard has no guild settings store")
    delivery = Delivery(client, queue, settings.images_dir, owner=_delivery_owner(queue))
    worker, ops, output_filter = build_worker(settings, queue, engine, delivery, client, worker_id=worker_id)
    if not settings.local_worker:
        worker.stay_elsewhere()
    image_options = ImageOptions(settings, queue)  # /pony image:, strength:, hires: (issue #14)
    actions = JobActions(
        settings,
        queue=queue,
        engine=engine,
        guard=guard,
        delivery=delivery,
        worker=worker,
        ops=ops,
        extras=image_options,
        client=client,
    )
    member_images = MemberImages(  # Edit, Re-create with ponybot (issue #14)
        settings, queue=queue, engine=engine, guard=guard, actions=actions, client=client
    )
    return Services(
        settings=settings,
        client=client,
        queue=queue,
        engine=engine,
        app_state=AppState(queue),
        guild_settings=guard.store,
        guard=guard,
        delivery=delivery,
        worker=worker,
        ops=ops,
        output_filter=output_filter,
        image_options=image_options,
        actions=actions,
        member_images=member_images,
    )


async def run_bot(
    settings: Settings,
    *,
    handle_signals: bool = True,
    stop: asyncio.Event | None = None,
    started: Callable[[Services], None] | None = None,
) -> None:
    """Run ponybot until SIGINT/SIGTERM (or `stop` is set); `started` gets the services once built."""
    if settings.discord_token is None:
        raise SystemExit("Missing setting DISCORD_TOKEN: put the bot token in .env (see README).")
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    worker_id = new_worker_id() if settings.local_worker else None
    queue = await open_queue(settings, application_name=worker_id)
    engine = Engine(settings.generator_config())
    client = make_client(settings)  # PONY_SHARDS: one gateway connection, or shards in this process
    services = build_services(settings, queue, engine, client, worker_id=worker_id)
    if not settings.local_worker:
        log.info("no local worker (--no-worker / PONY_LOCAL_WORKER=false): `ponybot worker` runs the jobs")
        if settings.database_url is None:
            log.warning("no local worker and no PONY_DATABASE_URL: nothing will run the queued jobs")
    client.attach(services)
    if started is not None:
        started(services)
    stop = stop or asyncio.Event()
    services.worker.on_fatal = lambda _reason: stop.set()  # e.g. a hung GPU: shut down, then exit non-zero
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        await services.ops.start()
        async with client:
            runner = asyncio.create_task(client.start(settings.discord_token.get_secret_value()))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if runner in done:
                stopper.cancel()
                runner.result()  # login failures surface here
            else:
                await client.shutdown()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
    finally:
        await services.ops.stop()
        await queue.close()
    if services.worker.fatal is not None:
        raise WorkerFailed(services.worker.fatal)


@dataclass(frozen=True)
class WorkerProcess:
    """The services of one `ponybot worker` process (see `run_worker`)."""

    settings: Settings
    #: a REST-only client: logged in, never connected to the gateway
    client: discord.Client
    queue: JobQueueContract
    engine: Engine
    delivery: Delivery
    worker: Worker
    ops: Ops
    output_filter: OutputFilter | None


async def run_worker(
    settings: Settings,
    *,
    handle_signals: bool = True,
    stop: asyncio.Event | None = None,
    started: Callable[[WorkerProcess], None] | None = None,
) -> None:
    """`ponybot worker`: claim, generate and deliver jobs of the PostgreSQL queue until SIGINT/SIGTERM
    (or `stop` is set); `started` gets the services once the worker runs.

    Logs in over REST only (`login()`, never `connect()`: no gateway, no command sync) and posts
    by channel id. On stop the running job finishes within PONY_SHUTDOWN_GRACE_S, else it and
    every other job this worker holds go back to the queue.
    """
    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    if settings.database_url is None:
        raise ValueError("ponybot worker needs PONY_DATABASE_URL (PostgreSQL)")
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    worker_id = new_worker_id()
    queue = await open_queue(settings, application_name=worker_id)
    engine = Engine(settings.generator_config())
    client = discord.Client(intents=discord.Intents.none(), allowed_mentions=discord.AllowedMentions.none())
    delivery = Delivery(client, queue, settings.images_dir, owner=_delivery_owner(queue))
    worker, ops, output_filter = build_worker(
        settings, queue, engine, delivery, client, worker_id=worker_id, gateway=False
    )
    stop = stop or asyncio.Event()
    worker.on_fatal = lambda _reason: stop.set()  # e.g. a hung GPU: shut down, then exit non-zero
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with client:
            await client.login(settings.discord_token.get_secret_value())  # REST only: no gateway
            await ops.start()
            engine.start_loading()
            worker.start()
            log.info("worker %s serving the queue as %s", worker.worker_id, client.user)
            if started is not None:
                started(WorkerProcess(settings, client, queue, engine, delivery, worker, ops, output_filter))
            try:
                await stop.wait()
            finally:
                log.info("shutting down")
                await worker.stop(grace_s=settings.shutdown_grace_s)
    finally:
        await ops.stop()
        engine.shutdown()
        await queue.close()
    if worker.fatal is not None:
        raise WorkerFailed(worker.fatal)


async def sync_now(settings: Settings) -> SyncResult:
    """`ponybot sync`: log in over REST only (no gateway), sync the commands even if unchanged, and
    remember the schema so the next `ponybot run` does not send it again.

    The tree is built from the same services as `run_bot` builds (nothing is started), so what is
    synced is exactly what the bot serves.
    """
    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    queue = await open_queue(settings)
    engine = Engine(settings.generator_config())  # never loaded: the commands only need to exist
    try:
        client = discord.Client(intents=discord.Intents.none())  # login() runs no PonyBot.setup_hook
        services = build_services(settings, queue, engine, client)
        tree: app_commands.CommandTree = app_commands.CommandTree(client)
        guild = add_commands(tree, services)
        async with client:
            await client.login(settings.discord_token.get_secret_value())
            return await sync_commands(
                tree, services.app_state, application_id=client.application_id or 0, guild=guild, force=True
            )
    finally:
        engine.shutdown()
        await queue.close()
