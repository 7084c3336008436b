"""A throwaway PostgreSQL server for the tests: initdb + pg_ctl in a temp dir, 127.0.0.1, trust auth.

Used by the fixtures in tests/conftest.py (`pg_server`, `pg_url`). Running as root, the server
runs as the `postgres` user (PostgreSQL refuses to run as root); the data directory and the unix
socket live in a temp dir owned by it, and `stop()` removes everything again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

#: `PONY_TEST_POSTGRES=required`: missing binaries fail the PostgreSQL tests instead of skipping them
REQUIRED_ENV = "PONY_TEST_POSTGRES"
_SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
#: settings for a disposable test cluster: durability off, small, quiet
_SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    " -c shared_buffers=32MB -c max_connections=200 -c log_min_messages=warning"
)


def postgres_required() -> bool:
    """True when the environment asks for the PostgreSQL tests to run (fail rather than skip)."""
    return os.environ.get(REQUIRED_ENV, "").strip().lower() == "required"


def find_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: `pg_config --bindir`, else /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates.extend(Path(path) for path in versions)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in _SERVER_TOOLS):
            return folder
    return None


def _version_key(path: str) -> int:
    version = Path(path).parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster for a test session; `url(database)` addresses a database in it."""

    def __init__(self, bindir: Path) -> None:
        """Prepare (not start) a cluster using the server binaries in `bindir`."""
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ponybot-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = _free_port()
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0
        self._started = False

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        """initdb (trust auth, superuser `postgres`) and start the server on 127.0.0.1:`port`."""
        self.sockets.mkdir()
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.sockets} {_SERVER_OPTIONS}"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start"
        )
        self._started = True

    def stop(self) -> None:
        """Stop the server (immediate: nothing in it is worth keeping) and delete the temp dir."""
        try:
            if self._started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The connection URL of `database` on this server."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log (for failure messages)."""
        log = self.root / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def unique_database_name(prefix: str = "t") -> str:
    """A fresh database name (lower case, safe unquoted)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"
