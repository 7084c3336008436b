"""bot.jobs.guild_settings: per-guild overrides and bans, on SQLite and on PostgreSQL (`backend`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engine_queue import Queue, open_queue, rows

from bot.jobs.guild_settings import GuildSettings, GuildSettingsStore
from bot.jobs.models import QueueFull, QueueLimits
from bot.jobs.queue import JobQueue

G = 1_000_000_000_000_000_100
CH1 = 1_000_000_000_000_000_110
CH2 = 1_000_000_000_000_000_111


@pytest.fixture
async def queue(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Queue]:
    async with open_queue(backend, request, tmp_path) as q:
        yield q


async def test_defaults_then_values_and_resets(queue: Queue) -> None:
    store = GuildSettingsStore(queue, clock=lambda: 50.0)
    assert await store.get(G) == GuildSettings(G)
    saved = await store.set_values(G, 5, {"default_steps": 12, "default_negative": ""})
    assert saved.default_steps == 12 and saved.default_negative == "" and saved.updated_by == 5
    saved = await store.set_values(G, 6, {"cooldown_s": 1.5})
    assert (saved.default_steps, saved.cooldown_s, saved.updated_by) == (12, 1.5, 6)
    saved = await store.set_values(G, 6, {"default_steps": None})
    assert saved.default_steps is None and saved.cooldown_s == 1.5
    with pytest.raises(ValueError, match="unknown guild settings"):
        await store.set_values(G, 6, {"steps; DROP TABLE jobs": 1})
    await store.reset(G)
    assert await store.get(G) == GuildSettings(G)
    assert await store.get(G + 1) == GuildSettings(G + 1)


async def test_list_columns_dedupe_and_remove(queue: Queue) -> None:
    store = GuildSettingsStore(queue)
    await store.allow_channel(G, 1, CH1)
    await store.allow_channel(G, 1, CH1)
    saved = await store.allow_channel(G, 1, CH2)
    assert saved.allowed_channels == (CH1, CH2), "64-bit ids kept exactly, no duplicates"
    assert (await store.disallow_channel(G, 1, CH1)).allowed_channels == (CH2,)
    assert (await store.disallow_channel(G + 1, 1, CH1)).allowed_channels == ()  # no row: nothing to do
    await store.add_blocked_term(G, 1, "big cat")
    await store.add_blocked_term(G, 1, "gore")
    await store.add_blocked_term(G, 1, "gore")
    assert (await store.get(G)).blocked_terms == ("big cat", "gore")
    assert (await store.remove_blocked_term(G, 1, "big cat")).blocked_terms == ("gore",)
    assert (await store.clear_list(G, 1, "blocked_terms")).blocked_terms == ()
    assert (await store.get(G)).allowed_channels == (CH2,)


async def test_bans(queue: Queue) -> None:
    store = GuildSettingsStore(queue)
    assert await store.ban(G, 7, 1, "spam")
    assert not await store.ban(G, 7, 2, "again")
    ban = await store.ban_of(G, 7)
    assert ban is not None and (ban.reason, ban.banned_by) == ("spam", 1)
    assert await store.ban_of(G + 1, 7) is None, "bans are per guild"
    assert [b.user_id for b in await store.bans(G)] == [7]
    assert await store.unban(G, 7)
    assert not await store.unban(G, 7)
    assert await store.ban_of(G, 7) is None


@pytest.mark.sqlite_only("reads the SQLite connection's transaction state")
async def test_writes_never_land_inside_a_queue_transaction(queue: JobQueue) -> None:
    """A settings write racing queue reads (which end by rolling back their snapshot) is kept."""
    store = GuildSettingsStore(queue)
    job, _ = await queue.enqueue(
        kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=1, guild_id=G
    )
    readers = [asyncio.create_task(queue.position(job.id)) for _ in range(20)]
    writers = [asyncio.create_task(store.set_values(G, 1, {"default_steps": n})) for n in range(1, 21)]
    await asyncio.gather(*readers, *writers)
    assert (await store.get(G)).default_steps == 20
    assert not queue.connection.in_transaction


async def test_enqueue_takes_a_guilds_limits(queue: Queue) -> None:
    tight = QueueLimits(max_open_per_user=1, cooldown_s=0)
    await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=1, limits=tight)
    with pytest.raises(QueueFull) as info:
        await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=1, limits=tight)
    assert info.value.kind == "user" and info.value.retry_after is None
    await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=1)  # queue's own: 3
    slow = QueueLimits(cooldown_s=60)
    await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=2, limits=slow)
    with pytest.raises(QueueFull) as info:
        await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=CH1, user_id=2, limits=slow)
    assert info.value.kind == "cooldown" and info.value.retry_after is not None
    assert info.value.reason.startswith("Slow down: try again in ")


async def test_rows_in_the_database_are_what_the_admin_set(queue: Queue) -> None:
    """The stored row (as `ponybot doctor` and a second process read it): JSON lists, exact ids."""
    store = GuildSettingsStore(queue, clock=lambda: 70.0)
    await store.allow_channel(G, 9, CH1)
    await store.allow_channel(G, 9, CH2)
    await store.add_blocked_term(G, 9, 'it\'s "quoted"')
    await store.set_values(G, 9, {"max_steps": 30, "cooldown_s": 2})
    (row,) = await rows(queue, "SELECT * FROM guild_settings WHERE guild_id = :g", {"g": G})
    assert json.loads(row["allowed_channels"]) == [CH1, CH2]
    assert json.loads(row["blocked_terms"]) == ['it\'s "quoted"']
    assert (row["max_steps"], row["cooldown_s"], row["updated_at"], row["updated_by"]) == (30, 2.0, 70.0, 9)
    other = GuildSettingsStore(queue)  # a second store (another process) sees the same
    assert (await other.get(G)).allowed_channels == (CH1, CH2)
    assert (await other.disallow_channel(G, 9, CH2)).allowed_channels == (CH1,)
    assert (await other.disallow_channel(G, 9, CH1)).allowed_channels == ()
    assert await store.ban(G, 7, 9, "spam") and [b.reason for b in await other.bans(G)] == ["spam"]
