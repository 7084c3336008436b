"""Which workers are alive, on PostgreSQL: one dedicated connection per registered worker.

A worker registers by opening a connection of its own (not from the pool) whose
`application_name` is its worker id, and taking a session advisory lock of class `WORKER_LOCK`
on it (key: the connection's own backend pid, so registrations never block each other). The
worker is *live* while that connection is in `pg_stat_activity` of this database, holding that
lock (`LIVE_WORKERS_SQL`): the lock tells a registration apart from the process's pool
connections, which may carry the same name. When the machine dies, its network goes or an
operator runs `pg_terminate_backend`, the server drops the connection and the worker stops
being live at once, with no lease to wait out.

The worker side notices the loss (asyncpg's termination listener, and a heartbeat query for a
silent network) and calls `on_lost()` once; that id is never registered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

#: pg_advisory_lock class (first int4 key) of worker registrations ("ponw")
WORKER_LOCK = 0x706F6E77
#: seconds between two heartbeat queries on a registration connection
HEARTBEAT_S = 2.0
#: seconds a heartbeat query may take before the connection counts as lost
HEARTBEAT_TIMEOUT_S = 10.0

#: the application_name of every live registered worker of this database (one row each)
LIVE_WORKERS_SQL = f"""
SELECT DISTINCT a.application_name AS worker_id
FROM pg_stat_activity AS a
JOIN pg_locks AS l ON l.pid = a.pid
WHERE a.datname = current_database() AND l.locktype = 'advisory' AND l.granted
  AND l.classid = {WORKER_LOCK} AND l.objsubid = 2
"""


class WorkerRegistration:
    """One registered worker's dedicated connection; reports its loss once through `on_lost`."""

    def __init__(
        self,
        worker_id: str,
        conn: asyncpg.Connection,
        on_lost: Callable[[WorkerRegistration], None],
    ) -> None:
        """Wrap an open, locked connection (use `WorkerRegistration.open`)."""
        self.worker_id = worker_id
        self.conn = conn
        self._on_lost = on_lost
        self.lost = False
        self._closing = False
        self._heartbeat: asyncio.Task[None] | None = None
        #: one query at a time on the connection (heartbeat, LISTEN)
        self._query_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str,
        worker_id: str,
        on_lost: Callable[[WorkerRegistration], None],
        *,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> WorkerRegistration:
        """Connect as `worker_id`, take the registration lock and start watching the connection."""
        conn = await asyncpg.connect(url, server_settings={"application_name": worker_id})
        try:
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1::int4, pg_backend_pid())", WORKER_LOCK
            )
            if not locked:  # pragma: no cover - the key is this backend's own pid
                raise RuntimeError(f"worker registration lock of {worker_id} is taken")
        except BaseException:
            await conn.close()
            raise
        registration = cls(worker_id, conn, on_lost)
        conn.add_termination_listener(registration._terminated)
        registration._heartbeat = asyncio.create_task(
            registration._beat(heartbeat_s), name=f"pg-liveness-{worker_id}"
        )
        return registration

    def _terminated(self, conn: asyncpg.Connection) -> None:
        """asyncpg: the connection closed (server gone, killed, network)."""
        self._lose("the connection was closed")

    def _lose(self, why: str) -> None:
        if self.lost or self._closing:
            return
        self.lost = True
        log.warning("Worker %s lost its PostgreSQL registration (%s)", self.worker_id, why)
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        if not self.conn.is_closed():
            self.conn.terminate()
        try:
            self._on_lost(self)
        except Exception:
            log.exception("on_lost of worker %s failed", self.worker_id)

    async def _beat(self, every_s: float) -> None:
        """Query the connection every `every_s` seconds; a failure or a hang means it is lost."""
        while not self.lost and not self._closing:
            await asyncio.sleep(every_s)
            if self.lost or self._closing:
                return
            try:
                async with self._query_lock:
                    await self.conn.fetchval("SELECT 1", timeout=HEARTBEAT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    self._lose(f"heartbeat failed: {type(exc).__name__}: {exc}")
                return

    async def listen(self, channel: str, callback: Callable[..., object]) -> None:
        """LISTEN on `channel` over this connection (asyncpg listener `callback`)."""
        async with self._query_lock:
            await self.conn.add_listener(channel, callback)

    async def close(self) -> None:
        """Close the connection on purpose (no `on_lost`): the worker stops being live."""
        self._closing = True
        self.conn.remove_termination_listener(self._terminated)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if not self.conn.is_closed():
            try:
                await asyncio.wait_for(self.conn.close(), timeout=HEARTBEAT_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.conn.terminate()
