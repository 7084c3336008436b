"""`Services`: every long-lived object of one bot process, built once by the composition root
(`bot.app.build_services`) and handed to the Discord client and the slash commands."""

from __future__ import annotations

from dataclasses import dataclass

import discord

from bot.config import Settings
from bot.discord_ui.actions import JobActions
from bot.discord_ui.delivery import Delivery
from bot.discord_ui.member_images import ImageOptions, MemberImages
from bot.discord_ui.output_filter import OutputFilter
from bot.jobs.app_state import AppState
from bot.jobs.contract import JobQueueContract
from bot.jobs.guild_settings import GuildSettingsStore
from bot.ops.ops import Ops
from bot.policy.guard import Guard
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker


@dataclass(frozen=True)
class Services:
    """The services of one bot process (see `bot.app.build_services` for the order they are built in)."""

    settings: Settings
    #: the Discord client the services post through (a `PonyBot`, or a REST-only client for `ponybot sync`)
    client: discord.Client
    #: the job queue: SQLite, or PostgreSQL shared with `ponybot worker` processes
    queue: JobQueueContract
    engine: Engine
    #: small facts kept in the database (the last synced command schema)
    app_state: AppState
    #: per-guild settings and bans (`/pony-admin`), the guard's store
    guild_settings: GuildSettingsStore
    guard: Guard
    delivery: Delivery
    #: this process's worker; with `ponybot run --no-worker` built but never started
    #: (`WorkerState.ELSEWHERE`: it claims nothing, `wake` and `request_cancel` do nothing)
    worker: Worker
    ops: Ops
    #: the image filter (PONY_NSFW_CLASSIFIER), None when it is off
    output_filter: OutputFilter | None
    image_options: ImageOptions
    actions: JobActions
    member_images: MemberImages
