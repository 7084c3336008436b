"""A real ``discord.ext.commands.Bot`` against the loopback Discord in ``fake_discord.py``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from fake_discord import ATTACH_FILES, SEND_MESSAGES, VIEW_CHANNEL, FakeDiscord
from PIL import Image

pytestmark = pytest.mark.e2e


def _png(width: int = 4, height: int = 3) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class VoteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"vote:(?P<n>\d+)"):
    """A persistent button whose state lives in its custom_id."""

    def __init__(self, n: int) -> None:
        super().__init__(discord.ui.Button(label=f"Vote {n}", custom_id=f"vote:{n}"))
        self.n = n

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: Any, /
    ) -> VoteButton:
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(content=f"voted {self.n} by {interaction.user.name}")


class NameModal(discord.ui.Modal, title="Name your pony"):
    """A one-field modal."""

    name: discord.ui.TextInput[Any] = discord.ui.TextInput(label="Name", custom_id="pony-name")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"named {self.name.value}", ephemeral=True)


class TestBot(commands.Bot):
    """A small bot with a deferred slash command, a plain one, a modal one and a dynamic button."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.ready = asyncio.Event()
        self.resumed = asyncio.Event()
        self.raw_deletes: list[int] = []
        self.interactions: list[discord.Interaction] = []
        self.add_dynamic_items(VoteButton)

        @self.tree.command(description="Draw a pony")
        @app_commands.describe(prompt="What to draw", steps="Denoising steps")
        async def draw(
            interaction: discord.Interaction, prompt: str, steps: app_commands.Range[int, 1, 50] = 20
        ) -> None:
            self.interactions.append(interaction)
            await interaction.response.defer(thinking=True)
            image = discord.File(io.BytesIO(PNG), "out.png")
            await interaction.followup.send(f"{prompt} in {steps} steps", file=image)

        @self.tree.command(description="Say hi")
        async def hello(interaction: discord.Interaction) -> None:
            self.interactions.append(interaction)
            await interaction.response.send_message("hi!", ephemeral=True)

        @self.tree.command(description="Name a pony")
        async def name(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(NameModal())

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.raw_deletes.append(payload.message_id)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    with server.patch_discord_py():
        yield server
    await server.stop()
    assert not server.internal_errors, server.internal_errors
    assert not server.unhandled, [(r.method, r.path) for r in server.unhandled]


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[TestBot]:
    client = TestBot()
    runner = asyncio.create_task(client.start(fake.bot_token))
    ready = asyncio.create_task(client.ready.wait())
    await asyncio.wait({runner, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        ready.cancel()
        runner.result()  # raises what start() raised
    assert ready.done(), "the bot did not become ready"
    yield client
    await client.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(runner, 5)


async def test_bot_connects_and_sees_the_guild(fake: FakeDiscord, bot: TestBot) -> None:
    assert bot.user is not None
    assert (bot.user.id, bot.user.name) == (fake.bot_user_id, "ponybot")
    assert bot.application_id == fake.application_id
    guild = bot.get_guild(fake.guild_id)
    assert guild is not None
    general = guild.get_channel(fake.channel_id)
    nsfw = guild.get_channel(fake.nsfw_channel_id)
    assert isinstance(general, discord.TextChannel) and not general.is_nsfw()
    assert isinstance(nsfw, discord.TextChannel) and nsfw.is_nsfw()
    mods = guild.get_role(fake.mods_role_id)
    assert mods is not None and mods.permissions.manage_messages
    assert general.permissions_for(guild.me).send_messages
    assert fake.identify_count == 1 and fake.resume_count == 0


async def test_bot_permissions_reach_the_cache_and_are_enforced(fake: FakeDiscord, bot: TestBot) -> None:
    await fake.set_bot_permissions(fake.channel_id, VIEW_CHANNEL | SEND_MESSAGES)
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    await _eventually(lambda: not channel.permissions_for(channel.guild.me).attach_files)
    permissions = channel.permissions_for(channel.guild.me)
    assert permissions.send_messages and not permissions.attach_files
    with pytest.raises(discord.Forbidden) as caught:
        await channel.send(file=discord.File(io.BytesIO(PNG), "x.png"))
    assert caught.value.code == 50013
    inter = await fake.slash("hello")
    assert int(inter.payload["app_permissions"]) & ATTACH_FILES == 0
    await inter.wait_response()


async def test_tree_sync_publishes_commands(fake: FakeDiscord, bot: TestBot) -> None:
    synced = await bot.tree.sync()
    assert sorted(c.name for c in synced) == ["draw", "hello", "name"]
    draw = fake.find_command("draw")
    assert draw is not None
    assert next(c.id for c in synced if c.name == "draw") == int(draw["id"])
    steps = next(o for o in draw["options"] if o["name"] == "steps")
    assert (steps["type"], steps["min_value"], steps["max_value"]) == (4, 1, 50)
    again = await bot.tree.sync()
    assert {c.name: c.id for c in again} == {c.name: c.id for c in synced}  # ids are stable


async def test_slash_command_defers_then_follows_up(fake: FakeDiscord, bot: TestBot) -> None:
    await bot.tree.sync()
    inter = await fake.slash("draw", {"prompt": "a pony", "steps": 5}, user=fake.bob)
    assert [o["type"] for o in inter.payload["data"]["options"]] == [3, 4]
    response = await inter.wait_response()
    assert response.type == 5 and not response.ephemeral
    followup = await inter.wait_followup()
    assert followup.content == "a pony in 5 steps"
    assert followup.attachments == [("out.png", PNG, "image/png")]
    assert followup.id == inter.original_message_id and not followup.loading  # filled the "thinking" message
    assert inter.content == "a pony in 5 steps"
    assert bot.interactions[-1].user.id == fake.bob.id
    with pytest.raises(ValueError, match="max_value"):
        await fake.slash("draw", {"prompt": "x", "steps": 99})


async def test_message_with_a_file_is_stored(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("hello", file=discord.File(io.BytesIO(PNG), "pony.png"))
    stored = fake.messages[sent.id]
    assert stored.content == "hello" and stored.author_id == fake.bot_user_id
    assert stored.attachments == [("pony.png", PNG, "image/png")]
    assert (sent.attachments[0].width, sent.attachments[0].height) == (4, 3)
    assert await sent.attachments[0].read() == PNG
    fetched = await channel.fetch_message(sent.id)
    assert fetched.attachments[0].filename == "pony.png"


async def test_edit_replaces_attachments(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("v1", file=discord.File(io.BytesIO(PNG), "a.png"))
    edited = await sent.edit(content="v2", attachments=[discord.File(io.BytesIO(b"second"), "b.txt")])
    stored = fake.messages[sent.id]
    assert [a.filename for a in stored.attachments] == ["b.txt"]
    assert stored.content == "v2" and stored.edits == 1
    assert stored.history[0].content == "v1" and stored.history[0].attachments[0].filename == "a.png"
    await edited.edit(attachments=[edited.attachments[0], discord.File(io.BytesIO(PNG), "c.png")])
    assert [a.filename for a in stored.attachments] == ["b.txt", "c.png"]
    assert stored.attachments[0].data == b"second"


async def test_dynamic_item_click_reaches_the_callback(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    view = discord.ui.View(timeout=None)
    view.add_item(VoteButton(7))
    sent = await channel.send("vote!", view=view)
    assert fake.buttons(sent.id) == [("Vote 7", "vote:7")]
    inter = await fake.click(sent.id, "vote:7", user=fake.bob)
    response = await inter.wait_response()
    assert response.type == 7
    assert fake.messages[sent.id].content == "voted 7 by bob"
    assert inter.content == "voted 7 by bob"


async def test_modal_round_trip(fake: FakeDiscord, bot: TestBot) -> None:
    inter = await fake.slash("name")
    assert (await inter.wait_response()).type == 9
    submitted = await fake.submit_modal(inter, {"pony-name": "Sparkle"})
    response = await submitted.wait_response()
    assert response.type == 4 and response.ephemeral
    assert submitted.content == "named Sparkle"


async def test_429_makes_discord_py_wait_and_retry(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    path = rf"^/channels/{fake.channel_id}/messages$"
    fake.fail_next("POST", path, 429, retry_after=0.3)
    started = time.monotonic()
    await channel.send("after the limit")
    assert time.monotonic() - started >= 0.25
    assert [r.status for r in fake.requests_matching("POST", path)] == [429, 200]
    assert [m.content for m in fake.channel_messages(fake.channel_id)] == ["after the limit"]


async def test_reconnect_resumes_and_events_keep_arriving(fake: FakeDiscord, bot: TestBot) -> None:
    await fake.reconnect_gateway()
    await asyncio.wait_for(bot.resumed.wait(), 5)
    assert (fake.identify_count, fake.resume_count) == (1, 1)
    inter = await fake.slash("hello")
    assert (await inter.wait_response()).content == "hi!"
    # Events sent while the socket is down are replayed on RESUME.
    await fake.drop_gateway(wait=False)
    missed = await fake.slash("hello")
    assert (await missed.wait_response(timeout=10)).content == "hi!"
    assert (fake.identify_count, fake.resume_count) == (1, 2)


async def test_bad_token_fails_login(fake: FakeDiscord) -> None:
    client = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    with pytest.raises(discord.LoginFailure):
        await client.start("not-the-token")
    await client.close()
    async with aiohttp.ClientSession() as session, session.ws_connect(fake.gateway_url) as ws:
        hello = await ws.receive_json()
        assert hello["op"] == 10
        await ws.send_json({"op": 2, "d": {"token": "not-the-token", "intents": 0, "properties": {}}})
        closing = await ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4004


async def test_message_rules_are_enforced(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as caught:
        await channel.send("x" * 2001)
    assert (caught.value.status, caught.value.code) == (400, 50035)
    with pytest.raises(discord.HTTPException) as caught:
        await channel.send(embeds=[discord.Embed(description="y" * 4000) for _ in range(2)])
    assert "6000" in caught.value.text
    fake.attachment_limit = 100
    with pytest.raises(discord.HTTPException) as caught:
        await channel.send(file=discord.File(io.BytesIO(b"z" * 101), "big.bin"))
    assert (caught.value.status, caught.value.code) == (413, 40005)
    assert fake.channel_messages(fake.channel_id) == []


async def test_expired_token_and_deletions(fake: FakeDiscord, bot: TestBot) -> None:
    inter = await fake.slash("hello")
    await inter.wait_response()
    fake.expire_token(inter)
    with pytest.raises(discord.HTTPException) as caught:
        await bot.interactions[-1].followup.send("too late")
    assert (caught.value.status, caught.value.code) == (401, 50027)

    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("doomed")
    await fake.delete_message_externally(sent.id)
    await fake.wait_for_message(lambda m: m.id == sent.id and m.deleted, timeout=1)
    await _eventually(lambda: sent.id in bot.raw_deletes)
    with pytest.raises(discord.NotFound) as missing:
        await sent.edit(content="ghost")
    assert missing.value.code == 10008

    await fake.delete_channel(fake.nsfw_channel_id)
    with pytest.raises(discord.NotFound) as gone:
        await bot.http.send_message(fake.nsfw_channel_id, params=_params("hello?"))
    assert gone.value.code == 10003


async def test_server_error_is_retried_once(fake: FakeDiscord, bot: TestBot) -> None:
    channel = bot.get_channel(fake.channel_id)
    assert isinstance(channel, discord.TextChannel)
    fake.fail_next("POST", r"/messages$", 500)
    await channel.send("eventually")
    assert [m.content for m in fake.channel_messages(fake.channel_id)] == ["eventually"]
    assert [r.status for r in fake.requests_matching("POST", r"/messages$")] == [500, 200]


async def _eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until the bot has processed a gateway event (events arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _params(content: str) -> Any:
    return discord.http.MultipartParameters(payload={"content": content}, multipart=None, files=None)
