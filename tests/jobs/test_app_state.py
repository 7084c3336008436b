"""AppState: small facts kept in `app_state` over the queue's connection."""

from __future__ import annotations

from pathlib import Path

from bot.jobs.app_state import AppState
from bot.jobs.models import QueueLimits
from bot.jobs.queue import JobQueue


async def test_get_set_replace_delete_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with await JobQueue.open(path, QueueLimits()) as queue:
        state = AppState(queue, clock=lambda: 100.0)
        assert await state.get("commands_synced:1:global") is None
        await state.set("commands_synced:1:global", "abc")
        await state.set("commands_synced:1:global", "def")  # replaces
        await state.set("commands_synced:1:guild:5", "ghi")
        assert await state.get("commands_synced:1:global") == "def"
    async with await JobQueue.open(path, QueueLimits()) as queue:
        state = AppState(queue)
        assert await state.get("commands_synced:1:global") == "def"
        assert await state.delete("commands_synced:1:global")
        assert not await state.delete("commands_synced:1:global")
        assert await state.get("commands_synced:1:global") is None
        assert await state.get("commands_synced:1:guild:5") == "ghi"
