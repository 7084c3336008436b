"""AppState: small facts kept in `app_state`, on SQLite and on PostgreSQL (`backend`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_queue import open_queue, rows

from bot.jobs.app_state import AppState


async def test_get_set_replace_delete_and_survive_a_reopen(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with open_queue(backend, request, tmp_path) as queue:
        state = AppState(queue, clock=lambda: 100.0)
        assert await state.get("commands_synced:1:global") is None
        await state.set("commands_synced:1:global", "abc")
        await state.set("commands_synced:1:global", "def")  # replaces
        await state.set("commands_synced:1:guild:5", "ghi")
        assert await state.get("commands_synced:1:global") == "def"
        assert await rows(queue, "SELECT key, value, updated_at FROM app_state ORDER BY key") == [
            {"key": "commands_synced:1:global", "value": "def", "updated_at": 100.0},
            {"key": "commands_synced:1:guild:5", "value": "ghi", "updated_at": 100.0},
        ]
    async with open_queue(backend, request, tmp_path) as queue:  # the same database, reopened
        state = AppState(queue)
        assert await state.get("commands_synced:1:global") == "def"
        assert await state.delete("commands_synced:1:global")
        assert not await state.delete("commands_synced:1:global")
        assert await state.get("commands_synced:1:global") is None
        assert await state.get("commands_synced:1:guild:5") == "ghi"
