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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

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
from bot.jobs.models import QueueLimits
from bot.jobs.queue import JobQueue
from bot.ops.ops import Ops
from bot.policy.guard import Guard
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker, WorkerFailed

log = logging.getLogger(__name__)


async def open_queue(settings: Settings) -> JobQueue:
    """The job queue on `PONY_DB_PATH` (connected and migrated)."""
    return await JobQueue.open(
        settings.db_path, QueueLimits.from_settings(settings), busy_timeout_ms=settings.db_busy_timeout_ms
    )


def build_services(settings: Settings, queue: JobQueue, engine: Engine, client: discord.Client) -> Services:
    """Build every service of one bot process, once, on `queue`, `engine` and `client` (nothing starts)."""
    guard = Guard(settings, queue)
    if guard.store is None:  # a guard built with a queue always has its store
        raise RuntimeError("the guard has no guild settings store")
    delivery = Delivery(client, queue, settings.images_dir)
    worker = Worker(
        queue,
        engine,
        delivery,
        images_dir=settings.images_dir,
        batch_size=settings.batch_size,
        job_timeout_s=settings.job_timeout_s,
        lease_s=settings.lease_s,
    )
    ops = Ops(settings, engine, worker)  # metrics, health, periodic refresh and retention
    worker.heartbeat = ops.worker_heartbeat
    worker.on_finished = ops.job_finished
    output_filter = OutputFilter(settings, engine, client) if settings.nsfw_classifier is not None else None
    if output_filter is not None:
        worker.screen = output_filter.screen
    image_options = ImageOptions(settings)  # /pony image:, strength:, hires: (issue #14)
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
    queue = await open_queue(settings)
    engine = Engine(settings.generator_config())
    client = make_client(settings)  # PONY_SHARDS: one gateway connection, or shards in this process
    services = build_services(settings, queue, engine, client)
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
