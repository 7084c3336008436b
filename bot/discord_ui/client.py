"""PonyBot, ponybot's discord.Client: commands, persistent buttons, gateway events, shutdown.

The client builds no services. The composition root (bot.app) builds it first, then the services
(some of which post through it: delivery, the image filter, the use cases), then hands them over
with `attach`, which also puts the slash commands on the tree. Only then is the client started.
"""

from __future__ import annotations

import logging

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


def point_discord_at(api_base: str, gateway_url: str) -> None:
    """Send REST and gateway traffic to `api_base` / `gateway_url` (a local Discord in tests)."""
    discord.http.Route.BASE = f"{api_base.rstrip('/')}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class PonyBot(discord.Client):
    """ponybot's Discord client; serves the commands and buttons of the `Services` it is attached to."""

    def __init__(self, settings: Settings):
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none())
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
        """Register persistent buttons, sync the commands, start the model and the worker."""
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
        services.engine.start_loading()
        services.worker.start()

    async def on_ready(self) -> None:
        """Gateway connected: healthy again; log who and where we are."""
        self.services.ops.gateway(True)
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
