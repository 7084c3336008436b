"""The composition root: builds every service once and runs the bot until it is told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from bot.config import Settings
from bot.discord_ui.client import PonyBot, point_discord_at
from bot.jobs.queue import JobQueue, QueueLimits
from bot.runtime.engine import Engine
from bot.runtime.worker import WorkerFailed

log = logging.getLogger(__name__)


async def run_bot(
    settings: Settings,
    *,
    handle_signals: bool = True,
    stop: asyncio.Event | None = None,
    started: Callable[[PonyBot], None] | None = None,
) -> None:
    """Run ponybot until SIGINT/SIGTERM (or `stop` is set); `started` gets the bot once built."""
    if settings.discord_token is None:
        raise SystemExit("Missing setting DISCORD_TOKEN: put the bot token in .env (see README).")
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    queue = await JobQueue.open(
        settings.db_path, QueueLimits.from_settings(settings), busy_timeout_ms=settings.db_busy_timeout_ms
    )
    engine = Engine(settings.generator_config())
    bot = PonyBot(settings, queue, engine)
    if started is not None:
        started(bot)
    stop = stop or asyncio.Event()
    bot.worker.on_fatal = lambda _reason: stop.set()  # e.g. a hung GPU: shut down, then exit non-zero
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        await bot.ops.start()
        async with bot:
            runner = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if runner in done:
                stopper.cancel()
                runner.result()  # login failures surface here
            else:
                await bot.shutdown()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
    finally:
        await bot.ops.stop()
        await queue.close()
    if bot.worker.fatal is not None:
        raise WorkerFailed(bot.worker.fatal)
