"""`ponybot doctor`: check everything the bot needs before (or while) it runs, one line per check.

Each line is `ok  <what>` or `FAIL <what>: <the fix>`, on stdout. The exit code is 0 when all
checks pass, 1 when any failed, 2 when the settings cannot even be read. Checks, in order:
settings; data folder; database (the SQLite file, or PostgreSQL when PONY_DATABASE_URL is set:
server and schema version, or one line naming why it cannot connect); model (loads it the way the bot does: device, dtype, free GPU
memory on CUDA); upscaler; metrics port; Discord (token via GET /users/@me, servers, and the
channel permissions the bot needs). The token is never printed: every line is redacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

import aiohttp
import aiosqlite
import discord

from bot.config import Settings, SettingsError, load_settings
from bot.jobs.models import OPEN_STATUSES
from bot.logging_setup import REDACTED, redact, setup_logging
from bot.policy.permissions import REQUIRED, missing_permissions
from generator.errors import first_line

if TYPE_CHECKING:
    from generator.pipeline import Generator

GIB = 1024**3
#: below this much free disk in the data folder, the check fails
MIN_FREE_DISK = 200 * 1000**2
#: below this much free GPU memory after loading the model, the check fails
MIN_FREE_GPU = 1 * GIB
#: text channels (0) and announcement channels (5) are where /pony is used
TEXT_CHANNEL_TYPES = (0, 5)
#: at most this many servers are inspected channel by channel
MAX_GUILDS = 25
HTTP_TIMEOUT_S = 20.0
ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 53) - 1


class Report:
    """Prints check lines (redacted) and counts failures."""

    def __init__(self, out: TextIO, secrets: Iterable[str] = ()) -> None:
        self.out = out
        self.secrets = [s for s in secrets if s]
        self.failures = 0

    def ok(self, what: str) -> None:
        """A passing check."""
        self._emit("ok  ", what)

    def fail(self, what: str, fix: str) -> None:
        """A failing check and how to fix it."""
        self.failures += 1
        self._emit("FAIL ", f"{what}: {fix}")

    def _emit(self, prefix: str, text: str) -> None:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = " ".join(redact(text).split())  # one line, whatever the messages held
        print(prefix + text, file=self.out, flush=True)


# --- settings, folders, database -----------------------------------------------------------------


def check_settings(settings: Settings, report: Report) -> None:
    """Where the settings came from, and the main choices."""
    env_file = Path.cwd() / ".env"
    source = (
        f"environment and {env_file}" if env_file.is_file() else f"environment only (no .env in {Path.cwd()})"
    )
    token = "set" if settings.discord_token is not None else "not set"
    report.ok(
        f"settings: read from the {source}; model {settings.model}, device {settings.device},"
        f" data {settings.data_dir}, DISCORD_TOKEN {token}"
    )


def _probe_write(folder: Path) -> None:
    """Create and remove a file in `folder` (raises OSError when that is not possible)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".ponybot-doctor-"):
        pass


def check_data_folder(settings: Settings, report: Report) -> bool:
    """The data and images folders exist (they are created, as the bot would) and are writable."""
    folder = settings.data_dir.expanduser()
    what = f"data folder {folder}"
    fix = (
        f"make it a folder the user running ponybot can write to (e.g. `sudo chown -R ponybot: {folder}`)"
        " or set PONY_DATA_DIR to one"
    )
    if folder.exists() and not folder.is_dir():
        report.fail(what, f"it is a file, not a folder: {fix}")
        return False
    try:
        settings.images_dir.mkdir(parents=True, exist_ok=True)
        _probe_write(folder)
        _probe_write(settings.images_dir)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        report.fail(what, f"not writable ({exc.strerror or first_line(exc)}): {fix}")
        return False
    if free < MIN_FREE_DISK:
        report.fail(
            what,
            f"only {free / 1e6:.0f} MB free on its disk: free some space, or lower PONY_RETENTION_MAX_GB"
            " / PONY_RETENTION_DAYS so old images are pruned",
        )
        return False
    report.ok(
        f"{what}: writable, {free / 1e9:.1f} GB free; images kept {settings.retention_days:g} days,"
        f" at most {settings.retention_max_gb:g} GB"
    )
    return True


AllowedChannels = dict[int, tuple[int, ...]]


async def _allowed_channels(conn: aiosqlite.Connection) -> AllowedChannels:
    """guild id -> the channels `/pony-admin channels allow` restricted the bot to (non-empty only)."""
    sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'guild_settings'"
    async with conn.execute(sql) as cur:
        if await cur.fetchone() is None:
            return {}
    async with conn.execute("SELECT * FROM guild_settings") as cur:
        return _allowed_from_rows([row async for row in cur])


def _allowed_from_rows(rows: Iterable[Mapping[str, Any] | aiosqlite.Row]) -> AllowedChannels:
    """guild id -> allowed channels, from `guild_settings` rows of either engine (non-empty only)."""
    from bot.jobs.guild_settings import GuildSettings

    decoded = [GuildSettings.from_row(row) for row in rows]
    return {row.guild_id: row.allowed_channels for row in decoded if row.allowed_channels}


async def check_database(settings: Settings, report: Report) -> AllowedChannels:
    """The job database opens, is not newer than this ponybot, is intact and writable.

    Returns the per-server allowed channels it holds, for the Discord permission check.
    """
    from bot.jobs.db import MigrationError, available_migrations, connect, integrity_ok, schema_version

    path = settings.db_path.expanduser()
    what = f"database {path}"
    try:
        newest = available_migrations()[-1][0]
    except (MigrationError, IndexError, OSError) as exc:
        report.fail(what, f"the migrations folder is missing or broken ({exc}): reinstall ponybot")
        return {}
    if not path.exists():
        if path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK):
            report.ok(f"{what}: not created yet; the bot creates it at start (or run `ponybot migrate`)")
        else:
            report.fail(
                what, f"its folder {path.parent} is missing or not writable: fix the data folder or PONY_DB"
            )
        return {}
    try:
        conn = await connect(path, busy_timeout_ms=settings.db_busy_timeout_ms)
    except (sqlite3.Error, OSError) as exc:
        report.fail(
            what, f"cannot open it ({first_line(exc)}): check the file's owner and permissions, or PONY_DB"
        )
        return {}
    allowed: AllowedChannels = {}
    try:
        version = await schema_version(conn)
        if version > newest:
            report.fail(
                what,
                f"it was written by a newer ponybot (schema {version}, this one knows {newest}):"
                " upgrade ponybot, or point PONY_DB at another file",
            )
            return {}
        if not await integrity_ok(conn):
            report.fail(
                what,
                "it fails SQLite's integrity check: stop the bot, move the file aside (keep it), and"
                " start again for a fresh database",
            )
            return {}
        await conn.execute("BEGIN IMMEDIATE")  # proves we can take the write lock
        await conn.execute("ROLLBACK")
        counts: dict[str, int] = {}
        if version >= 1:
            async with conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status") as cur:
                counts = {row[0]: row[1] async for row in cur}
        allowed = await _allowed_channels(conn)
    except sqlite3.Error as exc:
        hint = (
            "another program holds it locked; try again"
            if "locked" in str(exc)
            else "check the file's owner and permissions (and its -wal/-shm files), or PONY_DB"
        )
        report.fail(what, f"{first_line(exc)}: {hint}")
        return {}
    finally:
        await conn.close()
    report.ok(f"{what}: {_schema_and_jobs(version, newest, counts)}")
    return allowed


def _schema_and_jobs(version: int, newest: int, counts: Mapping[str, int]) -> str:
    """`schema N, up to date; J jobs, O open` (or how many migrations are pending), for either engine."""
    pending = newest - version
    state = (
        "up to date"
        if pending == 0
        else f"{pending} migration(s) pending, applied at the next start (or run `ponybot migrate`)"
    )
    waiting = sum(counts.get(s, 0) for s in OPEN_STATUSES)
    return f"schema {version}, {state}; {sum(counts.values())} jobs, {waiting} open"


#: how long `ponybot doctor` waits for PostgreSQL to answer
PG_CONNECT_TIMEOUT_S = 5.0


def url_password(url: str) -> str:
    """The password in a database URL ("" when none), for the report to redact."""
    try:
        return unquote(urlsplit(url).password or "")
    except ValueError:
        return ""


def postgres_failure(exc: BaseException, url: str) -> str:
    """One line naming why connecting to PostgreSQL at `url` failed, and the fix."""
    import asyncpg  # type: ignore[import-untyped]

    parts = urlsplit(url)
    user = unquote(parts.username or "") or "(none)"
    database = unquote(parts.path.lstrip("/")) or user
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"password authentication failed for user {user}: check the password in PONY_DATABASE_URL"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return (
            f"database {database} does not exist on {where}: create it"
            f" (`sudo -u postgres createdb --owner {user} {database}`) or fix PONY_DATABASE_URL"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"the server refused user {user} ({first_line(exc)}): check the user in PONY_DATABASE_URL and pg_hba.conf"
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED
    ):
        return (
            f"connection refused at {where}: is PostgreSQL running there, listening on that address"
            " (listen_addresses) and port?"
        )
    if isinstance(exc, socket.gaierror):
        return f"unknown host {parts.hostname}: check the host in PONY_DATABASE_URL"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within {PG_CONNECT_TIMEOUT_S:g} s: check the host, the port and the firewall"
    if isinstance(exc, asyncpg.PostgresError):
        return f"{first_line(exc)}: check PONY_DATABASE_URL"
    return f"cannot connect to {where} ({type(exc).__name__}: {first_line(exc)}): check PONY_DATABASE_URL"


async def check_postgres(settings: Settings, report: Report) -> AllowedChannels:
    """PONY_DATABASE_URL: the server answers, its version, the schema version, the jobs it holds.

    Returns the per-server allowed channels it holds, for the Discord permission check.
    """
    import asyncpg

    from bot.jobs.db import MigrationError, available_migrations
    from bot.jobs.pg_db import CONNECT_ERRORS, MIGRATIONS_PG_DIR, database_place, schema_version

    url = settings.database_url or ""
    what = f"database {database_place(url)}"
    try:
        newest = available_migrations(MIGRATIONS_PG_DIR)[-1][0]
    except (MigrationError, IndexError, OSError) as exc:
        report.fail(what, f"the PostgreSQL migrations folder is missing or broken ({exc}): reinstall ponybot")
        return {}
    try:
        conn = await asyncpg.connect(
            url, timeout=PG_CONNECT_TIMEOUT_S, server_settings={"application_name": "ponybot-doctor"}
        )
    except CONNECT_ERRORS as exc:  # TimeoutError is an OSError
        report.fail(what, postgres_failure(exc, url))
        return {}
    allowed: AllowedChannels = {}
    try:
        server = str(await conn.fetchval("SHOW server_version")).split()[0]
        version = await schema_version(conn)
        if version > newest:
            report.fail(
                what,
                f"PostgreSQL {server}, schema {version}, written by a newer ponybot (this one knows {newest}):"
                " upgrade ponybot, or point PONY_DATABASE_URL at another database",
            )
            return {}
        counts: dict[str, int] = {}
        if version >= 1:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            counts = {row["status"]: int(row["n"]) for row in rows}
        if await conn.fetchval("SELECT to_regclass('guild_settings') IS NOT NULL"):
            allowed = _allowed_from_rows(
                dict(row) for row in await conn.fetch("SELECT * FROM guild_settings")
            )
    except CONNECT_ERRORS as exc:
        report.fail(what, postgres_failure(exc, url))
        return {}
    finally:
        await conn.close()
    report.ok(f"{what}: PostgreSQL {server}, {_schema_and_jobs(version, newest, counts)}")
    return allowed


# --- model and upscaler -------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No progress bars or warnings from diffusers, transformers and huggingface_hub: the doctor's
    lines are its whole output (`ponybot generate` and the bot keep the libraries' defaults)."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    hub_utils.disable_progress_bars()


async def check_model(settings: Settings, report: Report) -> Generator | None:
    """Load the model as the bot does; returns the Generator, or None when it cannot load."""
    from generator.errors import ModelLoadError
    from generator.pipeline import Generator

    quiet_libraries()
    config = dataclasses.replace(settings.generator_config(), upscaler=None)  # checked on its own
    print(f"(loading the model {settings.model}; this can take a while)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        generator = await asyncio.to_thread(Generator.load, config)
    except ModelLoadError as exc:
        report.fail("model", str(exc))
        return None
    except Exception as exc:  # anything else is still a model that cannot be used
        report.fail(
            "model",
            f"could not load {settings.model!r} ({first_line(exc, with_type=True)}):"
            " check PONY_MODEL and PONY_DEVICE",
        )
        return None
    seconds = time.perf_counter() - started
    what = f"model {generator.model_name} loads on {generator.device} ({generator.dtype_name}) in {seconds:.1f} s"
    if str(generator.device).startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        what += f"; {torch.cuda.get_device_name()}: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
        if free < MIN_FREE_GPU:
            report.fail(
                what,
                "too little GPU memory left to generate: stop other programs using the GPU"
                " (nvidia-smi), or lower PONY_DEFAULT_COUNT / PONY_BATCH_SIZE",
            )
            return generator
    elif generator.device == "cpu":
        import torch

        threads = await asyncio.to_thread(torch.get_num_threads)  # as a fresh worker thread would see it
        what += f" (no GPU in use: expect minutes per image); {threads} torch thread(s) (PONY_CPU_THREADS)"
    report.ok(what)
    return generator


async def check_upscaler(settings: Settings, report: Report, generator: Generator | None) -> None:
    """The PONY_UPSCALER file loads (on the model's device when the model loaded)."""
    if settings.upscaler is None:
        report.ok("upscaler: none set; U buttons use the hires fix with the model")
        return
    from generator.errors import ModelLoadError
    from generator.loader import dtype_for, resolve_device
    from generator.upscale import load_upscaler

    if generator is not None:
        device, dtype = generator.device, generator.dtype
    else:
        try:
            device = resolve_device(settings.device)
        except ModelLoadError:
            device = "cpu"
        dtype = dtype_for(device)
    try:
        upscaler = await asyncio.to_thread(load_upscaler, settings.upscaler, device, dtype)
    except ModelLoadError as exc:
        report.fail("upscaler", str(exc))
        return
    except Exception as exc:
        report.fail(
            "upscaler", f"could not load {settings.upscaler} ({first_line(exc)}): check PONY_UPSCALER"
        )
        return
    report.ok(f"upscaler {upscaler.name}: {upscaler.scale}x on {device}")


# --- metrics ------------------------------------------------------------------------------------


async def check_metrics(settings: Settings, report: Report) -> None:
    """PONY_METRICS_PORT is free to bind, or already served by a running ponybot."""
    if settings.metrics_port is None:
        report.ok("metrics: off (set PONY_METRICS_PORT to serve /metrics and /healthz)")
        return
    host, port = settings.metrics_host, settings.metrics_port
    what = f"metrics {host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            report.fail(
                what,
                f"cannot listen there ({exc.strerror or exc}): set PONY_METRICS_HOST to an address of"
                " this machine (127.0.0.1 keeps it local)",
            )
            return
        health = await _running_health(host, port)
        if health is None:
            report.fail(what, "the port is used by another program: pick a free PONY_METRICS_PORT")
        elif health.get("ok"):
            report.ok(f"{what}: a running ponybot serves it and reports healthy")
        else:
            reasons = "; ".join(str(r) for r in health.get("reasons", [])) or "unhealthy"
            report.fail(f"{what}: the running ponybot reports unhealthy", f"{reasons}; see its logs")
        return
    report.ok(f"{what}: free; /metrics and /healthz will be served there")


async def _running_health(host: str, port: int) -> dict[str, Any] | None:
    """The JSON of a running ponybot's /healthz, or None when something else holds the port."""
    shown = f"[{host}]" if ":" in host else host
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(f"http://{shown}:{port}/healthz") as response,
        ):
            data = json.loads(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return data if isinstance(data, dict) and "ok" in data else None


# --- Discord ------------------------------------------------------------------------------------


class DiscordRest:
    """The few Discord REST calls the doctor makes (bot token auth, one retry on 429)."""

    def __init__(self, session: aiohttp.ClientSession, api_base: str) -> None:
        self.session = session
        self.api = f"{api_base.rstrip('/')}/api/v10"

    async def get(self, path: str) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None)."""
        for attempt in range(2):
            async with self.session.get(self.api + path) as response:
                try:
                    data = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = None
                if response.status == 429 and attempt == 0:
                    retry = float((data or {}).get("retry_after", 1.0)) if isinstance(data, dict) else 1.0
                    await asyncio.sleep(min(retry, 10.0))
                    continue
                return response.status, data
        raise AssertionError("unreachable")


def channel_permissions(
    guild: dict[str, Any], member_roles: Iterable[str | int], user_id: int, channel: dict[str, Any]
) -> discord.Permissions:
    """The member's effective permissions in a guild channel (Discord's documented algorithm)."""
    guild_id = str(guild["id"])
    if str(guild.get("owner_id")) == str(user_id):
        return discord.Permissions(ALL_PERMISSIONS)
    roles = {str(r["id"]): int(r.get("permissions", 0)) for r in guild.get("roles", [])}
    mine = {str(r) for r in member_roles}
    value = roles.get(guild_id, 0)
    for role_id in mine:
        value |= roles.get(role_id, 0)
    if value & ADMINISTRATOR:
        return discord.Permissions(ALL_PERMISSIONS)
    overwrites = {str(o["id"]): o for o in channel.get("permission_overwrites") or []}

    def apply(value: int, allow: int, deny: int) -> int:
        return (value & ~deny) | allow

    everyone = overwrites.get(guild_id)
    if everyone is not None:
        value = apply(value, int(everyone.get("allow", 0)), int(everyone.get("deny", 0)))
    allow = deny = 0
    for role_id in mine:
        overwrite = overwrites.get(role_id)
        if overwrite is not None and int(overwrite.get("type", 0)) == 0:
            allow |= int(overwrite.get("allow", 0))
            deny |= int(overwrite.get("deny", 0))
    value = apply(value, allow, deny)
    member = overwrites.get(str(user_id))
    if member is not None and int(member.get("type", 1)) == 1:
        value = apply(value, int(member.get("allow", 0)), int(member.get("deny", 0)))
    return discord.Permissions(value)


@dataclasses.dataclass
class _GuildView:
    guild: dict[str, Any]
    roles: list[str]
    channels: list[dict[str, Any]]


TOKEN_FIX = (
    "reset the token in the Discord Developer Portal (your application > Bot > Reset Token)"
    " and put the new one in .env as DISCORD_TOKEN"
)


async def check_discord(settings: Settings, report: Report, allowed: AllowedChannels | None = None) -> None:
    """Log in with the token, list the servers, and check the permissions the bot needs.

    In a server where `/pony-admin channels allow` named channels (`allowed`), those channels are
    checked; elsewhere every text channel the bot can see.
    """
    if settings.discord_token is None:
        report.fail("Discord token", f"DISCORD_TOKEN is not set: {TOKEN_FIX}")
        return
    headers = {
        "Authorization": f"Bot {settings.discord_token.get_secret_value()}",
        "User-Agent": "DiscordBot (https://github.com/ponybot, doctor)",
    }
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        rest = DiscordRest(session, settings.discord_api_base)
        try:
            await _check_discord(settings, report, rest, allowed or {})
        except (aiohttp.ClientError, TimeoutError) as exc:
            report.fail(
                f"Discord API at {settings.discord_api_base}",
                f"unreachable ({type(exc).__name__}: {first_line(exc) if str(exc) else 'timed out'}):"
                " check this machine's network, DNS and firewall, and DISCORD_API_BASE",
            )


async def _check_discord(
    settings: Settings, report: Report, rest: DiscordRest, allowed: AllowedChannels
) -> None:
    status, me = await rest.get("/users/@me")
    if status == 401:
        report.fail("Discord token", f"Discord refused it (401 Unauthorized): {TOKEN_FIX}")
        return
    if status != 200 or not isinstance(me, dict):
        report.fail(
            "Discord login", f"Discord answered HTTP {status}: try again later (https://discordstatus.com)"
        )
        return
    user_id = int(me["id"])
    name = me.get("username", "?")
    report.ok(f"Discord token: logged in as {name} (id {user_id})")
    invite = f"open the URL that `ponybot invite-url {user_id}` prints and add the bot to your server"

    status, guilds = await rest.get("/users/@me/guilds")
    if status != 200 or not isinstance(guilds, list):
        report.fail("Discord servers", f"could not list them (HTTP {status}): try again later")
        return
    if not guilds:
        report.fail("Discord servers", f"the bot is in no server yet: {invite}")
        return
    ids = {int(g["id"]) for g in guilds}
    if settings.discord_guild_id is not None and settings.discord_guild_id not in ids:
        report.fail(
            f"server DISCORD_GUILD_ID={settings.discord_guild_id}",
            f"the bot is not in it: {invite}, or correct DISCORD_GUILD_ID",
        )
    names = ", ".join(str(g.get("name", g["id"])) for g in guilds[:5]) + (" …" if len(guilds) > 5 else "")
    report.ok(f"Discord servers: {len(guilds)} ({names})")

    views: list[_GuildView] = []
    for partial in guilds[:MAX_GUILDS]:
        view = await _guild_view(rest, partial, user_id, report)
        if view is not None:
            views.append(view)
    if len(guilds) > MAX_GUILDS:
        report.ok(f"channel permissions: checked the first {MAX_GUILDS} of {len(guilds)} servers")
    for view in views:
        named = allowed.get(int(view.guild["id"]))
        if named:
            _check_allowed_channels(view, named, user_id, report)
        else:
            _check_all_channels(view, user_id, report)


async def _guild_view(
    rest: DiscordRest, partial: dict[str, Any], user_id: int, report: Report
) -> _GuildView | None:
    guild_id = partial["id"]
    label = f"server {partial.get('name', guild_id)}"
    status, guild = await rest.get(f"/guilds/{guild_id}")
    m_status, member = await rest.get(f"/guilds/{guild_id}/members/{user_id}")
    c_status, channels = await rest.get(f"/guilds/{guild_id}/channels")
    if status != 200 or m_status != 200 or c_status != 200:
        report.fail(
            label, f"could not read its roles and channels (HTTP {status}/{m_status}/{c_status}): try again"
        )
        return None
    return _GuildView(guild, [str(r) for r in member.get("roles", [])], list(channels))


def _missing_fix(missing: list[str]) -> str:
    return (
        f"missing {', '.join(missing)}: allow these for the bot's role in the channel's settings"
        " (Edit Channel > Permissions), or re-invite it with `ponybot invite-url`"
    )


def _check_all_channels(view: _GuildView, user_id: int, report: Report) -> None:
    """Every text channel the bot can see must have all it needs; hidden ones are skipped."""
    guild_name = view.guild.get("name", view.guild["id"])
    usable: list[str] = []
    hidden = 0
    for channel in sorted(view.channels, key=lambda c: c.get("position", 0)):
        if channel.get("type") not in TEXT_CHANNEL_TYPES:
            continue
        perms = channel_permissions(view.guild, view.roles, user_id, channel)
        if not perms.view_channel:
            hidden += 1
            continue
        missing = missing_permissions(perms)
        label = f"#{channel.get('name', channel['id'])}"
        if missing:
            report.fail(
                f"channel {label} ({channel['id']}) in {guild_name}",
                _missing_fix(missing) + ", or deny it View Channel there if /pony should not be used there",
            )
        else:
            usable.append(label)
    if not usable:
        report.fail(
            f"server {guild_name}",
            "the bot can post in no text channel: give its role "
            + ", ".join(name for _, name in REQUIRED)
            + " in the channels where /pony should work",
        )
        return
    shown = ", ".join(usable[:8]) + (" …" if len(usable) > 8 else "")
    note = f"; {hidden} channel(s) hidden from it" if hidden else ""
    report.ok(f"server {guild_name}: the bot can post in {len(usable)} channel(s) ({shown}){note}")


def _check_allowed_channels(view: _GuildView, named: Iterable[int], user_id: int, report: Report) -> None:
    """Each channel the server's admins allowed must exist and have all the bot needs."""
    guild_name = view.guild.get("name", view.guild["id"])
    known = {int(c["id"]): c for c in view.channels}
    for channel_id in named:
        channel = known.get(channel_id)
        if channel is None:
            report.fail(
                f"channel {channel_id} (allowed in {guild_name})",
                "no such channel in that server any more: remove it with `/pony-admin channels disallow`",
            )
            continue
        label = f"channel #{channel.get('name', channel_id)} ({channel_id}) in {guild_name}"
        missing = missing_permissions(channel_permissions(view.guild, view.roles, user_id, channel))
        if missing:
            report.fail(label, _missing_fix(missing))
        else:
            report.ok(f"{label}: the bot has {', '.join(name for _, name in REQUIRED)}")


# --- entry point --------------------------------------------------------------------------------


async def run_checks(settings: Settings, report: Report) -> None:
    """Run every check after the settings, printing one line each."""
    check_settings(settings, report)
    check_data_folder(settings, report)
    if settings.database_url is not None:
        allowed = await check_postgres(settings, report)
    else:
        allowed = await check_database(settings, report)
    generator = await check_model(settings, report)
    await check_upscaler(settings, report, generator)
    await check_metrics(settings, report)
    await check_discord(settings, report, allowed)


def main(out: TextIO | None = None) -> int:
    """`ponybot doctor`: 0 when every check passes, 1 when one failed, 2 for unreadable settings."""
    out = out if out is not None else sys.stdout
    setup_logging("ERROR")  # the check lines are the output; library chatter stays quiet
    try:
        settings = load_settings()
    except SettingsError as exc:
        Report(out).fail("settings", f"{exc}; fix it in .env or the environment (see .env.example)")
        return 2
    token = settings.discord_token.get_secret_value() if settings.discord_token else ""
    report = Report(out, secrets=[token, url_password(settings.database_url or "")])
    asyncio.run(run_checks(settings, report))
    if report.failures:
        print(f"{report.failures} check(s) failed.", file=out)
        return 1
    print("All checks passed.", file=out)
    return 0
