"""Sharding (`PONY_SHARDS`): one process runs every gateway shard, each guild's events reach the bot
on its own shard, and health counts the shards that are up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from conftest import PONYBOT_SCRIPT, is_result, job_messages, wait_until, wait_until_async
from fake_discord import FakeDiscord, guild_id_on_shard

from bot.config import SettingsError, load_settings

pytestmark = pytest.mark.e2e

#: ids of the bare extra guilds, far from the fake's own ids
OTHER_GUILDS_FROM = 2_000_000_000_000_000_000
BAD_SHARDS_LINE = (
    "Invalid setting PONY_SHARDS: use auto (the count Discord recommends) or a whole number of shards,"
    " 1 or more (got {value!r})"
)


@pytest.fixture
async def discord_server(request: pytest.FixtureRequest) -> AsyncIterator[FakeDiscord]:
    """A started loopback Discord made with the test's parameters (`indirect` parametrization)."""
    fake = FakeDiscord(**getattr(request, "param", {}))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def healthz(port: int) -> dict[str, Any]:
    """The bot's `/healthz` answer."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as response:
        return json.loads(await response.text())


@pytest.mark.parametrize(
    "discord_server",
    [{"shards": 3, "max_concurrency": 16, "guild_id": guild_id_on_shard(2, 3)}],
    indirect=True,
)
async def test_pony_works_in_a_guild_on_shard_2_of_3(
    discord_server: FakeDiscord, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    on_0, on_1 = (guild_id_on_shard(shard, 3, near=OTHER_GUILDS_FROM) for shard in (0, 1))
    fake.add_guild(on_0, "Shard Zero")
    fake.add_guild(on_1, "Shard One")
    bot = await start_bot(PONY_SHARDS=3)

    assert fake.gateway_connections == 3
    assert sorted(identify.shard for identify in fake.identifies) == [(0, 3), (1, 3), (2, 3)]
    times = [identify.time for identify in fake.identifies]
    assert max(times) - min(times) < 4.5, "max_concurrency 16: the shards identified together, not 5 s apart"
    client = bot.client
    assert isinstance(client, discord.AutoShardedClient) and client.shard_count == 3
    assert {guild.id: guild.shard_id for guild in client.guilds} == {on_0: 0, on_1: 1, fake.guild_id: 2}

    interaction = await fake.slash("pony", {"prompt": "a pony on the third shard", "count": 2})
    ack = await interaction.wait_followup()
    assert ack.ephemeral and ack.content.startswith("Queued as job #1")
    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, 1) == [result], "the status message became the result"
    assert result.history, "the status message was shown before the result"
    assert [a.filename for a in result.attachments] == ["ponybot-1-1.png", "ponybot-1-2.png"]
    assert [label for label, _ in result.buttons()] == ["Reroll", "Edit", "Delete", "U1", "U2", "V1", "V2"]
    await wait_until(
        lambda: bot.ops.check_health()[1]["gateway_shards"] == {"total": 3, "up": 3, "down": []},
        10,
        "every shard counted up",
    )


@pytest.mark.parametrize("discord_server", [{"shards": 2, "max_concurrency": 1}], indirect=True)
async def test_auto_runs_the_shard_count_discord_recommends(
    discord_server: FakeDiscord, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_SHARDS="auto", wait_model=False)

    assert bot.client.shard_count == 2
    assert sorted(identify.shard for identify in fake.identifies) == [(0, 2), (1, 2)]
    first, second = sorted(identify.time for identify in fake.identifies)
    assert second - first >= 4.9, "max_concurrency 1: one IDENTIFY per 5 s"
    await wait_until(lambda: bot.ops.check_health()[1]["gateway_connected"], 10, "gateway connected")
    assert bot.ops.check_health()[1]["gateway_shards"] == {"total": 2, "up": 2, "down": []}


@pytest.mark.parametrize("discord_server", [{"shards": 2, "max_concurrency": 2}], indirect=True)
async def test_a_guild_on_shard_1_is_served_while_shard_0_is_down(
    discord_server: FakeDiscord, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    assert fake.shard_of(fake.guild_id) == 1
    fake.add_guild(guild_id_on_shard(0, 2, near=OTHER_GUILDS_FROM), "Shard Zero")
    port = free_port()
    await start_bot(PONY_SHARDS=2, PONY_METRICS_PORT=port)

    async def shards(expected: dict[str, Any]) -> dict[str, Any] | None:
        health = await healthz(port)
        return health if health["gateway_shards"] == expected else None

    up = await wait_until_async(lambda: shards({"total": 2, "up": 2, "down": []}), 10, "both shards up")
    assert up["gateway_connected"] is True

    fake.hold_shard(0)  # shard 0's RESUME waits: it stays down until released
    await fake.reconnect_gateway(shard=0, wait=False)  # op 7 on shard 0 only
    down = await wait_until_async(lambda: shards({"total": 2, "up": 1, "down": [0]}), 10, "shard 0 down")
    assert down["gateway_connected"] is False

    interaction = await fake.slash("pony", {"prompt": "served by shard one", "count": 1})
    ack = await interaction.wait_followup()
    assert ack.content.startswith("Queued as job #1")
    result = await fake.wait_for_message(is_result, timeout=60)
    assert [label for label, _ in result.buttons()] == ["Reroll", "Edit", "Delete", "U1", "V1"]
    assert not fake.shard_connected(0)
    assert (await healthz(port))["gateway_shards"]["down"] == [0]

    fake.release_shard(0)
    back = await wait_until_async(lambda: shards({"total": 2, "up": 2, "down": []}), 10, "shard 0 back")
    assert back["gateway_connected"] is True
    assert fake.resume_count == 1 and fake.identify_count == 2, "shard 0 resumed its session"


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many", "auto,2"])
def test_a_bad_shard_setting_is_one_line_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONY_SHARDS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert str(caught.value) == BAD_SHARDS_LINE.format(value=value)


def test_ponybot_run_with_a_bad_shard_setting_exits_with_that_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PONY_", "DISCORD_"))}
    env |= {"PONY_SHARDS": "zero", "DISCORD_TOKEN": "sekrit.token", "PONY_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [str(PONYBOT_SCRIPT), "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == BAD_SHARDS_LINE.format(value="zero")


@pytest.mark.parametrize(
    ("shard", "close_code"),
    [(None, 4011), ([0, 1], 4011), ([3, 3], 4010), ([0, 4], 4010), ([-1, 3], 4010), ("0,3", 4010)],
)
async def test_the_fake_closes_a_wrong_shard_identify_as_discord_does(
    shard: Any, close_code: int, discord_server: FakeDiscord
) -> None:
    fake = discord_server
    fake.shard_count = 3
    async with aiohttp.ClientSession() as http, http.ws_connect(fake.gateway_url) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["op"] == 10
        identify: dict[str, Any] = {"token": fake.bot_token, "intents": 0, "properties": {}}
        if shard is not None:
            identify["shard"] = shard
        await ws.send_json({"op": 2, "d": identify})
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == close_code
    assert fake.identify_count == 0 and not fake.connected
