"""The loopback Discord rejects what Discord's published OpenAPI spec rejects (and only that)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord_spec import spec
from fake_discord import FakeDiscord

pytestmark = pytest.mark.e2e

INT53_MAX = 2**53 - 1


def _command(max_value: int) -> dict[str, Any]:
    return {
        "name": "pony-info",
        "description": "Show a job",
        "type": 1,
        "options": [
            {"type": 4, "name": "job", "description": "Job number", "required": True, "min_value": 1,
             "max_value": max_value},
        ],
    }  # fmt: skip


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.stop()


async def _send(fake: FakeDiscord, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{fake.api_base}/api/v10{path}", json=body, headers={"Authorization": "Bot test-token"}
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


def test_integer_option_beyond_int53_is_a_violation() -> None:
    route = "/applications/1/commands"
    violations = spec().check("PUT", route, [_command(2**53)])
    assert violations is not None and len(violations) == 1
    violation = violations[0]
    assert violation.route == "/applications/{application_id}/commands"
    assert violation.json_path == "$[0].options[0].max_value"
    assert violation.dotted == "0.options.0.max_value"
    assert violation.code == "NUMBER_TYPE_MAX"
    assert "9007199254740991" in violation.message
    assert spec().check("PUT", route, [_command(INT53_MAX)]) == []


def test_snowflake_ints_are_accepted_other_ints_are_not() -> None:
    path = "/channels/5/messages"
    # discord.py sends attachment ids and message_reference ids as numbers; Discord accepts them
    ok = {
        "content": "hi",
        "attachments": [{"id": 0, "filename": "a.png"}],
        "message_reference": {"message_id": 7},
    }
    assert spec().check("POST", path, ok, multipart=True) == []
    assert ok["attachments"][0]["id"] == 0  # the recorded body is left as sent
    # an int is not a string where the spec wants a plain string
    [bad] = spec().check("POST", path, {"content": 5}) or []
    assert (bad.json_path, bad.keyword) == ("$.content", "type")
    # a string is not an integer
    [flags] = spec().check("POST", path, {"content": "x", "flags": "64"}) or []
    assert flags.json_path == "$.flags"
    # a missing required field names the field
    [missing] = spec().check("POST", path, {"attachments": [{"filename": "a.png"}]}) or []
    assert (missing.json_path, missing.code) == ("$.attachments[0].id", "BASE_TYPE_REQUIRED")


def test_violations_inside_unions_name_the_field() -> None:
    callback = "/interactions/1/tok/callback"
    button = {"type": 2, "style": 9, "label": "Reroll", "custom_id": "pony:reroll:1"}
    body = {"type": 4, "data": {"components": [{"type": 1, "components": [button]}]}}
    [style] = spec().check("POST", callback, body) or []
    assert (style.json_path, style.code) == ("$.data.components[0].components[0].style", "BASE_TYPE_CHOICES")
    assert style.message == "9 is not one of [1, 2, 3, 4, 5, 6]"
    button["style"] = 2
    assert spec().check("POST", callback, body) == []
    # a followup: both webhook body shapes refuse it for the same reason, so that field is named
    [long] = spec().check("POST", "/webhooks/1/tok", {"content": "x", "embeds": [{"title": "t" * 257}]}) or []
    assert (long.json_path, long.code) == ("$.embeds[0].title", "BASE_TYPE_MAX_LENGTH")


def test_routes_match_literal_segments_first() -> None:
    assert spec().route("/users/@me") == "/users/@me"
    assert spec().route("/users/42") == "/users/{user_id}"
    assert spec().route("/webhooks/1/tok/messages/@original") == (
        "/webhooks/{webhook_id}/{webhook_token}/messages/@original"
    )
    assert spec().route("/no/such/route") is None
    assert spec().check("POST", "/channels/5/typing", {}) is None  # no body schema: not validated


async def test_fake_answers_a_violation_like_discord(fake: FakeDiscord) -> None:
    status, body = await _send(
        fake, "PUT", f"/applications/{fake.application_id}/commands", [_command(2**53)]
    )
    assert status == 400
    assert (body["code"], body["message"]) == (50035, "Invalid Form Body")
    [error] = body["errors"]["0"]["options"]["0"]["max_value"]["_errors"]
    assert error["code"] == "NUMBER_TYPE_MAX"
    assert fake.commands == []  # nothing was stored
    [violation] = fake.spec_violations
    assert (violation.method, violation.dotted) == ("PUT", "0.options.0.max_value")
    fake.spec_violations.clear()  # expected here; the conftest fails a test that leaves any

    status, body = await _send(fake, "POST", f"/channels/{fake.channel_id}/messages", {"content": 5})
    assert (status, body["code"]) == (400, 50035)
    assert "content" in body["errors"]
    assert len(fake.spec_violations) == 1
    fake.spec_violations.clear()
    assert fake.channel_messages(fake.channel_id) == []


async def test_fake_accepts_valid_bodies(fake: FakeDiscord) -> None:
    status, body = await _send(
        fake, "PUT", f"/applications/{fake.application_id}/commands", [_command(INT53_MAX)]
    )
    assert status == 200 and body[0]["name"] == "pony-info"
    status, body = await _send(fake, "POST", f"/channels/{fake.channel_id}/messages", {"content": "hello"})
    assert status == 200 and body["content"] == "hello"
    assert fake.spec_violations == []


async def test_discord_py_sync_of_a_bad_command_is_refused(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.none())
    tree = app_commands.CommandTree(client)

    @tree.command(description="Too big")
    async def big(interaction: discord.Interaction, n: app_commands.Range[int, 1, 2**53]) -> None:
        raise AssertionError("never called")

    with fake.patch_discord_py():
        try:
            await client.login(fake.bot_token)
            with pytest.raises(app_commands.CommandSyncFailure) as caught:
                await tree.sync()
        finally:
            await client.close()
    assert "max_value" in str(caught.value)
    assert [v.dotted for v in fake.spec_violations] == ["0.options.0.max_value"]
    fake.spec_violations.clear()


async def test_discord_py_multipart_message_with_a_reply_is_valid(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.none())
    with fake.patch_discord_py():
        try:
            await client.login(fake.bot_token)
            channel = await client.fetch_channel(fake.channel_id)
            assert isinstance(channel, discord.TextChannel)
            first = await channel.send("first")
            file = discord.File(io.BytesIO(b"\x89PNG\r\n\x1a\n"), "a.png")
            await channel.send("second", file=file, reference=first)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
    assert fake.spec_violations == []
    [reply] = [m for m in fake.channel_messages(fake.channel_id) if m.content == "second"]
    assert reply.reference_id == first.id and len(reply.attachments) == 1
