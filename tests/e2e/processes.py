"""Real ponybot processes for the multi-machine tests: `ponybot run --no-worker` and `ponybot worker`.

Each process is a child of the test (its own data folder, as on its own machine), sharing one
PostgreSQL database (PONY_DATABASE_URL) and the loopback Discord. `Cluster` starts them and reads
the database the way an operator would: job rows, and which workers are live (the
application_name of their connections in pg_stat_activity).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from conftest import PONYBOT_SCRIPT, bot_env, wait_until_async
from fake_discord import FakeDiscord

from bot.jobs.pg_liveness import LIVE_WORKERS_SQL


class PonyProcess:
    """One `ponybot <args>` child process, its output in `log_path`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (returns at once)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(PONYBOT_SCRIPT), *self.args], env=self.env, stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL, and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit status (SIGKILL after `timeout`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)
            return -9

    def log(self) -> str:
        """Everything the process printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def errors(self) -> list[str]:
        """The ERROR and CRITICAL lines of its log."""
        return [line for line in self.log().splitlines() if " ERROR " in line or " CRITICAL " in line]


def pid_of(worker_id: str) -> int:
    """The process id inside a worker id (`host:pid:random`, bot.runtime.worker.new_worker_id)."""
    return int(worker_id.rsplit(":", 2)[-2])


class Cluster:
    """A `ponybot run --no-worker` gateway and `ponybot worker` processes on one PostgreSQL database."""

    def __init__(self, fake: FakeDiscord, url: str, model: Path, root: Path, **env: Any) -> None:
        self.fake = fake
        self.url = url
        self.model = model
        self.root = root
        self.env = env
        self.gateway: PonyProcess | None = None
        self.workers: list[PonyProcess] = []
        #: gateway sockets and /commands requests seen before the gateway process started
        self.before_gateway: tuple[int, int] | None = None

    def _process(self, name: str, args: list[str]) -> PonyProcess:
        data = self.root / name
        env = bot_env(self.fake, data, self.model, PONY_DATABASE_URL=self.url, **self.env)
        return PonyProcess(name, args, env, self.root / f"{name}.log")

    def start_worker(self) -> PonyProcess:
        """Start one more `ponybot worker` (its own data folder)."""
        worker = self._process(f"worker{len(self.workers) + 1}", ["worker"])
        self.workers.append(worker)
        worker.start()
        return worker

    async def start(self, workers: int = 3) -> None:
        """Start `workers` workers and wait until they are live and logged in, note what they did
        with the gateway and the commands, then start the gateway and wait until it synced."""
        for _ in range(workers):
            self.start_worker()
        await self.wait(lambda: self._live_count(workers), 90, f"{workers} live workers")
        await self.wait_sync(
            lambda: len(self.fake.requests_matching("GET", r"^/users/@me$")) >= workers, 30, "logins"
        )
        self.before_gateway = (
            self.fake.gateway_connections,
            len(self.fake.requests_matching("*", r"/commands")),
        )
        self.gateway = self._process("gateway", ["run", "--no-worker"])
        self.gateway.start()
        await self.fake.wait_until_connected(timeout=60)
        await self.wait_sync(lambda: self.fake.find_command("pony") is not None, 30, "commands synced")

    async def _live_count(self, count: int) -> bool:
        return len(await self.live_workers()) >= count

    async def live_workers(self) -> set[str]:
        """The ids of the live registered workers: a connection named after the worker that holds
        its registration lock (bot.jobs.pg_liveness), in pg_stat_activity of this database."""
        return {r["worker_id"] for r in await self.fetch(LIVE_WORKERS_SQL)}

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one query on the shared database (a connection of the test's own)."""
        conn = await asyncpg.connect(self.url, server_settings={"application_name": "ponybot-test"})
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement on the shared database."""
        conn = await asyncpg.connect(self.url, server_settings={"application_name": "ponybot-test"})
        try:
            return str(await conn.execute(sql, *args))
        finally:
            await conn.close()

    async def job(self, job_id: int) -> asyncpg.Record:
        """The job's row (AssertionError if there is none)."""
        rows = await self.fetch("SELECT * FROM jobs WHERE id = $1", job_id)
        assert rows, f"no job #{job_id}"
        return rows[0]

    async def statuses(self) -> dict[int, str]:
        """Every job's status, by id."""
        return {r["id"]: r["status"] for r in await self.fetch("SELECT id, status FROM jobs")}

    def worker_with_pid(self, pid: int) -> PonyProcess:
        """The worker process with this pid (AssertionError if it is not one of ours)."""
        found = [w for w in self.workers if w.running and w.pid == pid]
        assert found, f"pid {pid} is not a running worker of this test"
        return found[0]

    async def wait(self, check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
        """`conftest.wait_until_async`, with every process's log in the AssertionError after `timeout`."""
        try:
            return await wait_until_async(check, timeout, f"{what} ({timeout:g} s)")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    async def wait_sync(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """`wait` for a plain function."""

        async def check_async() -> Any:
            return check()

        return await self.wait(check_async, timeout, what)

    def logs(self, lines: int = 40) -> str:
        """The last lines of every process's output (for failure messages)."""
        out = []
        for proc in [p for p in (self.gateway, *self.workers) if p is not None]:
            tail = "\n".join(proc.log().splitlines()[-lines:])
            out.append(f"--- {proc.name} (pid {proc.pid if proc.proc else '-'}) ---\n{tail}")
        return "\n".join(out)

    async def stop(self) -> dict[str, int]:
        """SIGTERM every process still running (all at once); their exit statuses by name."""
        running = [p for p in (*self.workers, self.gateway) if p is not None and p.running]
        codes = await asyncio.gather(*(proc.terminate() for proc in running))
        return {proc.name: code for proc, code in zip(running, codes, strict=True)}

    async def kill_all(self) -> None:
        """SIGKILL whatever is still running (teardown after a failure)."""
        for proc in [p for p in (*self.workers, self.gateway) if p is not None]:
            if proc.running:
                with contextlib.suppress(Exception):
                    proc.kill9()
