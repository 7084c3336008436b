"""PonyBot, ponybot's discord.Client: commands, persistent buttons, gateway events, shutdown."""

from __future__ import annotations

import contextlib
import logging

import discord
import yarl
from discord import app_commands

from bot.config import Settings
from bot.discord_ui.actions import JobActions
from bot.discord_ui.buttons import CUSTOM_ID_PREFIX, JobButton, on_message, parse_custom_id
from bot.discord_ui.command_sync import add_commands, sync_commands
from bot.discord_ui.delivery import Delivery
from bot.discord_ui.member_images import EDIT_PREFIX, MemberImages
from bot.discord_ui.output_filter import OutputFilter
from bot.jobs.app_state import AppState
from bot.jobs.queue import JobQueue
from bot.ops.ops import Ops
from bot.policy.guard import Guard
from bot.runtime.engine import Engine, EngineState
from bot.runtime.worker import Worker

log = logging.getLogger(__name__)


def point_discord_at(api_base: str, gateway_url: str) -> None:
    """Send REST and gateway traffic to `api_base` / `gateway_url` (a local Discord in tests)."""
    discord.http.Route.BASE = f"{api_base.rstrip('/')}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class PonyBot(discord.Client):
    """ponybot's Discord client; owns the queue, engine, worker and delivery."""

    def __init__(self, settings: Settings, queue: JobQueue, engine: Engine):
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        self.queue = queue
        self.engine = engine
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]
        self.actions = JobActions(self)
        self.images = MemberImages(self)  # /pony image:, Edit, Re-create with ponybot (issue #14)
        self.guard = Guard(settings, queue)
        self.delivery = Delivery(self, queue, settings.images_dir)
        self.ops = Ops(self)  # metrics, health, periodic refresh and retention
        self.worker = Worker(
            queue,
            engine,
            self.delivery,
            images_dir=settings.images_dir,
            batch_size=settings.batch_size,
            job_timeout_s=settings.job_timeout_s,
            lease_s=settings.lease_s,
            heartbeat=self.ops.worker_heartbeat,
            on_finished=self.ops.job_finished,
        )
        if settings.nsfw_classifier is not None:
            self.worker.screen = OutputFilter(settings, engine, self).screen

    async def setup_hook(self) -> None:
        """Register persistent buttons and commands, sync them, start the model and the worker."""
        self.add_dynamic_items(JobButton)
        guild = add_commands(self.tree, self.settings)
        # only a schema that changed since the last successful sync is sent (CommandSyncRefused: one line)
        result = await sync_commands(
            self.tree, AppState(self.queue), application_id=self.application_id or 0, guild=guild
        )
        if result.synced:
            log.info("synced %d slash commands %s", result.count, result.where)
        else:
            log.info(
                "slash commands unchanged since the last sync (%d, %s); not synced",
                result.count,
                result.where,
            )
        self.engine.start_loading()
        self.worker.start()

    async def on_ready(self) -> None:
        self.ops.gateway(True)
        log.info(
            "logged in as %s (%s) in %d guilds", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    async def on_resumed(self) -> None:
        self.ops.gateway(True)

    async def on_disconnect(self) -> None:
        self.ops.gateway(False)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Answer forged or stale ponybot buttons that no DynamicItem matched; handle Edit forms
        (stateless: the job id is in the modal's custom_id, see `bot.member_images.edit_modal`)."""
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        if interaction.type is discord.InteractionType.modal_submit and custom_id.startswith(EDIT_PREFIX):
            await self.images.submit_edit(interaction)
            return
        if interaction.type is not discord.InteractionType.component:
            return
        if custom_id.startswith(CUSTOM_ID_PREFIX) and (
            parse_custom_id(custom_id) is None or not on_message(interaction.message, custom_id)
        ):
            with contextlib.suppress(discord.HTTPException):
                await interaction.response.send_message("That button isn't valid.", ephemeral=True)

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error("command failed", exc_info=error)
        text = "Something went wrong on my side; nothing was queued."
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)

    def engine_notice(self) -> str | None:
        """A note for the requester when the generator is not ready."""
        if self.engine.state is EngineState.LOADING:
            return "The model is still loading; your job will start as soon as it is ready."
        if self.engine.state is EngineState.FAILED:
            return "The generator is unavailable right now; your job is kept in the queue."
        if self.engine.state is EngineState.HUNG:
            return "The generator is restarting; your job is kept in the queue."
        return None

    async def shutdown(self) -> None:
        """Finish or put back the running job, then disconnect."""
        log.info("shutting down")
        await self.worker.stop(grace_s=self.settings.shutdown_grace_s)
        await self.close()
        self.engine.shutdown()
