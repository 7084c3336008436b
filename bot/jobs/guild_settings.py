"""Per-guild settings and bans (tables from migrations/0003_guild_admin.sql, on either engine).

The store works on the queue it is given (`bot.jobs.store_db`): SQLite through the queue's
connection (`JobQueue.exclusive()`, so a change never lands inside, and is never rolled back
with, a queue transaction), PostgreSQL through the queue's pool. Every change is one autocommit
statement: an UPSERT, with the engine's JSON functions for the list columns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiosqlite

from bot.jobs.store_db import Dialect, Row, Source, store_db

#: Scalar per-guild settings; NULL (None) = use the global PONY_* setting.
SETTING_COLUMNS: tuple[str, ...] = (
    "default_negative",
    "nsfw_default_negative",
    "default_steps",
    "default_count",
    "max_steps",
    "max_open_jobs_per_user",
    "cooldown_s",
)


@dataclass(frozen=True)
class GuildSettings:
    """One guild's overrides; None / empty = the global setting applies."""

    guild_id: int
    allowed_channels: tuple[int, ...] = ()
    blocked_terms: tuple[str, ...] = ()
    default_negative: str | None = None
    nsfw_default_negative: str | None = None
    default_steps: int | None = None
    default_count: int | None = None
    max_steps: int | None = None
    max_open_jobs_per_user: int | None = None
    cooldown_s: float | None = None
    updated_at: float | None = None
    updated_by: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | aiosqlite.Row) -> GuildSettings:
        """Decode a `SELECT * FROM guild_settings` row."""
        return cls(
            guild_id=row["guild_id"],
            allowed_channels=tuple(int(c) for c in json.loads(row["allowed_channels"] or "[]")),
            blocked_terms=tuple(str(t) for t in json.loads(row["blocked_terms"] or "[]")),
            **{name: row[name] for name in SETTING_COLUMNS},
            updated_at=row["updated_at"],
            updated_by=row["updated_by"],
        )


@dataclass(frozen=True)
class Ban:
    """A member banned from the bot in one guild."""

    guild_id: int
    user_id: int
    reason: str | None
    banned_by: int | None
    created_at: float


# `{cur}` (a JSON array text) with `:value` appended unless present, and `{cur}` without `:value`:
# the engine-specific piece of the list statements below ({type}: the SQL type of the value).
_LIST_EXPRESSIONS = {
    "sqlite": (
        "CASE WHEN EXISTS (SELECT 1 FROM json_each({cur}) WHERE value = :value) THEN {cur}"
        " ELSE json_insert({cur}, '$[#]', :value) END",
        "(SELECT json_group_array(value) FROM json_each({cur}) WHERE value != :value)",
    ),
    "postgres": (
        "CASE WHEN ({cur})::jsonb @> jsonb_build_array(CAST(:value AS {type})) THEN {cur}"
        " ELSE (({cur})::jsonb || jsonb_build_array(CAST(:value AS {type})))::text END",
        "(SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)::text"
        " FROM jsonb_array_elements(({cur})::jsonb) WITH ORDINALITY AS t(e, n)"
        " WHERE e <> to_jsonb(CAST(:value AS {type})))",
    ),
}
# Add `:value` to the JSON array in `{col}` unless present (creating the row when needed).
_LIST_ADD = """
INSERT INTO guild_settings (guild_id, {col}, updated_at, updated_by)
VALUES (:guild, {added_to_empty}, :now, :by)
ON CONFLICT (guild_id) DO UPDATE SET {col} = {added}, updated_at = :now, updated_by = :by
RETURNING *
"""
# Remove `:value` from the JSON array in `{col}`.
_LIST_REMOVE = """
UPDATE guild_settings SET {col} = {removed}, updated_at = :now, updated_by = :by
WHERE guild_id = :guild
RETURNING *
"""
#: the list columns and the SQL type of their items
_LIST_TYPES = {"allowed_channels": "bigint", "blocked_terms": "text"}


def _list_sql(dialect: Dialect, template: str, column: str) -> str:
    """`_LIST_ADD` / `_LIST_REMOVE` for `column` on `dialect`."""
    add, remove = _LIST_EXPRESSIONS[dialect.name]
    kind = _LIST_TYPES[column]
    current = f"coalesce(guild_settings.{column}, '[]')"
    return template.format(
        col=column,
        added_to_empty=add.format(cur="'[]'", type=kind),
        added=add.format(cur=current, type=kind),
        removed=remove.format(cur=current, type=kind),
    )


_LIST_COLUMNS = tuple(_LIST_TYPES)


class GuildSettingsStore:
    """Reads and writes `guild_settings` and `bans` in the queue's database (SQLite or PostgreSQL)."""

    def __init__(self, queue: Source, *, clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.db = store_db(queue)
        self._clock = clock

    async def _rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return await self.db.fetch(sql, params)

    async def _settings(self, guild_id: int, sql: str, params: Mapping[str, Any]) -> GuildSettings:
        rows = await self._rows(sql, params)
        return GuildSettings.from_row(rows[0]) if rows else GuildSettings(guild_id)

    # --- settings -----------------------------------------------------------------------------

    async def get(self, guild_id: int) -> GuildSettings:
        """The guild's overrides (all None / empty when it never changed anything)."""
        return await self._settings(
            guild_id, "SELECT * FROM guild_settings WHERE guild_id = :guild", {"guild": guild_id}
        )

    async def set_values(self, guild_id: int, by: int | None, values: Mapping[str, Any]) -> GuildSettings:
        """Set scalar settings (names from `SETTING_COLUMNS`); a None value resets one to global."""
        unknown = set(values) - set(SETTING_COLUMNS)
        if unknown:
            raise ValueError(f"unknown guild settings: {sorted(unknown)}")
        if not values:
            return await self.get(guild_id)
        names = list(values)
        columns = ", ".join(names)
        marks = ", ".join(f":{n}" for n in names)
        updates = ", ".join(f"{n} = excluded.{n}" for n in names)
        sql = (
            f"INSERT INTO guild_settings (guild_id, {columns}, updated_at, updated_by)"
            f" VALUES (:guild, {marks}, :now, :by)"
            f" ON CONFLICT (guild_id) DO UPDATE SET {updates},"
            " updated_at = excluded.updated_at, updated_by = excluded.updated_by RETURNING *"
        )
        params = {**values, "guild": guild_id, "now": self._clock(), "by": by}
        return await self._settings(guild_id, sql, params)

    async def reset(self, guild_id: int) -> None:
        """Forget every override of the guild (bans are kept)."""
        await self._rows("DELETE FROM guild_settings WHERE guild_id = :guild", {"guild": guild_id})

    async def _list_change(
        self, sql: str, column: str, guild_id: int, by: int | None, value: Any
    ) -> GuildSettings:
        assert column in _LIST_COLUMNS
        params = {"guild": guild_id, "value": value, "now": self._clock(), "by": by}
        return await self._settings(guild_id, _list_sql(self.db.dialect, sql, column), params)

    async def allow_channel(self, guild_id: int, by: int | None, channel_id: int) -> GuildSettings:
        """Add a channel to the guild's allowed list (the first one restricts the bot to the list)."""
        return await self._list_change(_LIST_ADD, "allowed_channels", guild_id, by, int(channel_id))

    async def disallow_channel(self, guild_id: int, by: int | None, channel_id: int) -> GuildSettings:
        """Remove a channel from the allowed list (an empty list allows every channel)."""
        return await self._list_change(_LIST_REMOVE, "allowed_channels", guild_id, by, int(channel_id))

    async def add_blocked_term(self, guild_id: int, by: int | None, term: str) -> GuildSettings:
        """Add a (normalised) term to the guild's blocked list."""
        return await self._list_change(_LIST_ADD, "blocked_terms", guild_id, by, term)

    async def remove_blocked_term(self, guild_id: int, by: int | None, term: str) -> GuildSettings:
        """Remove a term from the guild's blocked list."""
        return await self._list_change(_LIST_REMOVE, "blocked_terms", guild_id, by, term)

    async def clear_list(self, guild_id: int, by: int | None, column: str) -> GuildSettings:
        """Empty `allowed_channels` or `blocked_terms`."""
        assert column in _LIST_COLUMNS
        sql = (
            f"UPDATE guild_settings SET {column} = NULL, updated_at = :now, updated_by = :by"
            " WHERE guild_id = :guild RETURNING *"
        )
        return await self._settings(guild_id, sql, {"guild": guild_id, "now": self._clock(), "by": by})

    # --- bans ---------------------------------------------------------------------------------

    async def ban(self, guild_id: int, user_id: int, by: int | None, reason: str | None = None) -> bool:
        """Ban a member from the bot in the guild; False if they were already banned."""
        rows = await self._rows(
            "INSERT INTO bans (guild_id, user_id, reason, banned_by, created_at)"
            " VALUES (:guild, :user, :reason, :by, :now)"
            " ON CONFLICT (guild_id, user_id) DO NOTHING RETURNING user_id",
            {"guild": guild_id, "user": user_id, "reason": reason, "by": by, "now": self._clock()},
        )
        return bool(rows)

    async def unban(self, guild_id: int, user_id: int) -> bool:
        """Lift a ban; False if the member was not banned."""
        rows = await self._rows(
            "DELETE FROM bans WHERE guild_id = :guild AND user_id = :user RETURNING user_id",
            {"guild": guild_id, "user": user_id},
        )
        return bool(rows)

    async def ban_of(self, guild_id: int, user_id: int) -> Ban | None:
        """The member's ban in the guild, or None."""
        rows = await self._rows(
            "SELECT * FROM bans WHERE guild_id = :guild AND user_id = :user",
            {"guild": guild_id, "user": user_id},
        )
        return _ban(rows[0]) if rows else None

    async def bans(self, guild_id: int) -> list[Ban]:
        """Every ban in the guild, oldest first."""
        rows = await self._rows(
            "SELECT * FROM bans WHERE guild_id = :guild ORDER BY created_at", {"guild": guild_id}
        )
        return [_ban(row) for row in rows]


def _ban(row: Mapping[str, Any] | aiosqlite.Row) -> Ban:
    return Ban(
        guild_id=row["guild_id"],
        user_id=row["user_id"],
        reason=row["reason"],
        banned_by=row["banned_by"],
        created_at=row["created_at"],
    )
