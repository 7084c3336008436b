"""PonyBot, ponybot's discord.Client: commands, persistent buttons, gateway events, shutdown.

The client builds no services. The composition root (bot.app) builds it first, with
`make_client` (`PONY_SHARDS`: one gateway connection, `PonyBot`, or several shards in this process,
`ShardedPonyBot`, which is PonyBot over discord.py's AutoShardedClient), then the services (some
of which post through it: delivery, the image filter, the use cases), then hands them over with
`attach`, which also puts the slash commands on the tree. Only then is the client started.
"""

from __future__ import annotations

import asyncio
import logging
import time

import discord
import yarl
from discord import app_commands

from bot.config import Settings
from bot.discord_ui.buttons import (
    CUSTOM_ID_PREFIX,
    ButtonAction,
    JobButton,
    interaction_custom_id,
    on_message,
    parse_custom_id,
)
from bot.discord_ui.command_sync import add_commands, sync_commands
from bot.discord_ui.member_images import EDIT_PREFIX
from bot.discord_ui.replies import tell
from bot.discord_ui.services import Services

log = logging.getLogger(__name__)

#: Discord allows one IDENTIFY per 5 seconds in each bucket (`shard_id % max_concurrency`)
IDENTIFY_INTERVAL_S = 5.0


def point_discord_at(api_base: str, gateway_url: str) -> None:
    """Send REST and gateway traffic to `api_base` / `gateway_url` (a local Discord in tests)."""
    discord.http.Route.BASE = f"{api_base.rstrip('/')}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class PonyBot(discord.Client):
    """ponybot's Discord client; serves the commands and buttons of the `Services` it is attached to."""

    def __init__(self, settings: Settings, *, shard_count: int | None = None):
        """`shard_count` is for `ShardedPonyBot` (None there: as many as Discord recommends)."""
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(
            intents=intents, allowed_mentions=discord.AllowedMentions.none(), shard_count=shard_count
        )
        self.settings = settings
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]
        self._services: Services | None = None
        self._sync_guild: discord.Object | None = None

    def attach(self, services: Services) -> None:
        """Take the services built for this client and put every slash command on the tree."""
        if self._services is not None:
            raise RuntimeError("PonyBot.attach: services are already attached")
        self._services = services
        self._sync_guild = add_commands(self.tree, services)

    @property
    def services(self) -> Services:
        """The attached services (`attach` comes before the client starts)."""
        if self._services is None:
            raise RuntimeError("PonyBot has no services: call attach(services) before starting it")
        return self._services

    async def setup_hook(self) -> None:
        """Register persistent buttons, sync the commands, start the model and the worker (unless
        this process runs none: `ponybot run --no-worker`)."""
        services = self.services
        self.add_dynamic_items(JobButton)
        # only a schema that changed since the last successful sync is sent (CommandSyncRefused: one line)
        result = await sync_commands(
            self.tree, services.app_state, application_id=self.application_id or 0, guild=self._sync_guild
        )
        if result.synced:
            log.info("synced %d slash commands %s", result.count, result.where)
        else:
            log.info(
                "slash commands unchanged since the last sync (%d, %s); not synced",
                result.count,
                result.where,
            )
        if services.settings.local_worker:  # else `ponybot worker` processes run the jobs
            services.engine.start_loading()
            services.worker.start()

    async def on_ready(self) -> None:
        """Gateway connected: healthy again; log who and where we are."""
        self.services.ops.gateway(True)
        self._log_logged_in()

    def _log_logged_in(self) -> None:
        log.info(
            "logged in as %s (%s) in %d guilds", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    async def on_resumed(self) -> None:
        """Gateway session resumed."""
        self.services.ops.gateway(True)

    async def on_disconnect(self) -> None:
        """Gateway connection lost (discord.py reconnects)."""
        self.services.ops.gateway(False)

    async def job_button_pressed(self, interaction: discord.Interaction, button: JobButton) -> None:
        """A job button (`JobButton`): Edit answers with its modal, the others go to `JobActions`."""
        if button.action is ButtonAction.EDIT:  # answered with a modal, which can't follow a defer
            await self.services.member_images.open_edit(interaction, button.job_id)
            return
        await self.services.actions.on_button(interaction, button.action, button.job_id, button.index)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Answer forged or stale ponybot buttons that no DynamicItem matched; handle Edit forms
        (stateless: the job id is in the modal's custom_id, see `member_images.edit_modal`)."""
        custom_id = interaction_custom_id(interaction)
        if interaction.type is discord.InteractionType.modal_submit and custom_id.startswith(EDIT_PREFIX):
            await self.services.member_images.submit_edit(interaction)
            return
        if interaction.type is not discord.InteractionType.component:
            return
        if custom_id.startswith(CUSTOM_ID_PREFIX) and (
            parse_custom_id(custom_id) is None or not on_message(interaction.message, custom_id)
        ):
            await tell(interaction, "That button isn't valid.")

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error("command failed", exc_info=error)
        await tell(interaction, "Something went wrong on my side; nothing was queued.")

    async def shutdown(self) -> None:
        """Finish or put back the running job, then disconnect."""
        services = self.services
        log.info("shutting down")
        await services.worker.stop(grace_s=self.settings.shutdown_grace_s)
        await self.close()
        services.engine.shutdown()


class ShardedPonyBot(PonyBot, discord.AutoShardedClient):
    """PonyBot over several gateway shards in this one process (`PONY_SHARDS` auto or N > 1): each
    guild's events arrive on shard `(guild_id >> 22) % shard_count`; the gateway state is kept per
    shard, and IDENTIFYs are paced by Discord's `max_concurrency`."""

    def __init__(self, settings: Settings, *, shard_count: int | None = None):
        """`shard_count` None: as many shards as GET /gateway/bot recommends (`PONY_SHARDS=auto`)."""
        super().__init__(settings, shard_count=shard_count)
        self._max_concurrency: int | None = None
        self._last_identify: dict[int, float] = {}  # rate-limit bucket -> monotonic time

    async def on_ready(self) -> None:
        """Every shard has received its guilds (the shards report their own state)."""
        self._log_logged_in()
        log.info("gateway: %d shards", self.shard_count or 0)

    async def on_resumed(self) -> None:
        """A shard resumed; counted per shard in `on_shard_resumed`."""

    async def on_disconnect(self) -> None:
        """A shard lost its connection; counted per shard in `on_shard_disconnect`."""

    async def on_shard_ready(self, shard_id: int) -> None:
        """A shard identified and has received its guilds."""
        self._report_shard(shard_id, connected=True)

    async def on_shard_resumed(self, shard_id: int) -> None:
        """A shard's session resumed."""
        self._report_shard(shard_id, connected=True)

    async def on_shard_disconnect(self, shard_id: int) -> None:
        """A shard lost its connection (discord.py reconnects it)."""
        self._report_shard(shard_id, connected=False)

    def _report_shard(self, shard_id: int, *, connected: bool) -> None:
        if not connected:
            log.warning("gateway shard %d disconnected", shard_id)
        self.services.ops.gateway(connected, shard_id=shard_id, shard_count=self.shard_count or 1)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Wait for this shard's IDENTIFY slot: one per `IDENTIFY_INTERVAL_S` in each rate-limit
        bucket (`shard_id % max_concurrency`, from GET /gateway/bot), so shards in different
        buckets start together instead of 5 s apart."""
        if self._max_concurrency is None:
            try:
                self._max_concurrency = max(1, (await self.fetch_session_start_limits()).max_concurrency)
            except discord.GatewayNotFound:
                log.warning("could not read Discord's max_concurrency; identifying one shard at a time")
                self._max_concurrency = 1
        bucket = (shard_id or 0) % self._max_concurrency
        last = self._last_identify.get(bucket)
        if last is not None:
            await asyncio.sleep(max(0.0, last + IDENTIFY_INTERVAL_S - time.monotonic()))
        self._last_identify[bucket] = time.monotonic()


def make_client(settings: Settings) -> PonyBot:
    """The Discord client `PONY_SHARDS` asks for: `PonyBot` (one gateway connection) for 1,
    `ShardedPonyBot` with Discord's recommended shard count for auto, or with N shards."""
    if settings.shards == 1:
        return PonyBot(settings)
    return ShardedPonyBot(settings, shard_count=None if settings.shards == "auto" else settings.shards)
