"""The `ponybot` console script: run, worker, sync, generate, tiny-model, migrate, doctor, invite-url."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bot.config import Settings, SettingsError, load_settings
from generator.config import GeneratorConfig

#: exit status when Discord refused something or could not be reached (2: bad settings)
EXIT_DISCORD = 3

#: exit status when the PostgreSQL queue (PONY_DATABASE_URL) could not be opened
EXIT_DATABASE = 5

#: `ponybot run`'s exit status when the worker could not go on, e.g. a hung GPU (systemd's
#: Restart=on-failure restarts it)
EXIT_WORKER_FAILED = 4


#: `ponybot worker` without PostgreSQL: the one line it prints (exit status 2)
WORKER_NEEDS_POSTGRES = (
    "ponybot worker needs PONY_DATABASE_URL (PostgreSQL) to share the queue with `ponybot run`;"
    " with SQLite, one `ponybot run` is the worker."
)


def _run(args: argparse.Namespace) -> int:
    from bot.app import run_bot

    settings = _discord_settings()
    if settings is None:
        return 2
    if args.no_worker:
        settings = settings.model_copy(update={"local_worker": False})
    return _serve(run_bot, settings)


def _worker(_args: argparse.Namespace) -> int:
    from bot.app import run_worker

    loaded = load_settings()
    if loaded.database_url is None:
        print(WORKER_NEEDS_POSTGRES, file=sys.stderr)
        return 2
    settings = _discord_settings(loaded)
    if settings is None:
        return 2
    return _serve(run_worker, settings)


def _serve(serve: Callable[[Settings], Coroutine[Any, Any, None]], settings: Settings) -> int:
    """Run `ponybot run` / `ponybot worker` until stopped: 0, or one line and a non-zero status."""
    from bot.app import DatabaseUnreachable
    from bot.runtime.worker import WorkerFailed

    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except DatabaseUnreachable as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_DATABASE
    except WorkerFailed as exc:
        print(
            f"{exc}; its jobs are back in the queue. Exiting so the service manager restarts"
            " ponybot on a fresh GPU context.",
            file=sys.stderr,
        )
        sys.stderr.flush()
        logging.shutdown()
        os._exit(EXIT_WORKER_FAILED)  # the hung GPU thread can never be joined: leave without waiting
    except Exception as exc:  # login failure, refused command sync and friends: one line, no traceback
        return _discord_exit(exc, settings)
    return 0


def _discord_settings(settings: Settings | None = None) -> Settings | None:
    """Settings (`settings`, else loaded) for a command that logs in to Discord, with logging set
    up; None (after one line on stderr) when DISCORD_TOKEN is missing."""
    from bot.logging_setup import setup_logging

    settings = settings or load_settings()
    if settings.discord_token is None:
        print("Missing setting DISCORD_TOKEN: put the bot token in .env (see README).", file=sys.stderr)
        return None
    setup_logging(settings.log_level, settings.log_json)
    return settings


def _discord_exit(exc: Exception, settings: Settings) -> int:
    """Print the one line for an error talking to Discord and return EXIT_DISCORD; re-raise others."""
    line = _discord_failure(exc, settings)
    if line is None:
        raise exc
    print(line, file=sys.stderr)
    return EXIT_DISCORD


def _discord_failure(exc: BaseException, settings: Settings) -> str | None:
    """One line for an error talking to Discord (login, command sync), or None for anything else."""
    import aiohttp
    import discord

    from bot.discord_ui.command_sync import CommandSyncRefused

    if isinstance(exc, CommandSyncRefused):
        return f"{exc}. Nothing was synced; fix that command's definition."
    if isinstance(exc, discord.LoginFailure):
        return "Discord refused the token: check DISCORD_TOKEN (Developer Portal > Bot > Reset Token)."
    if isinstance(exc, discord.HTTPException):
        response = exc.response
        method = getattr(response, "method", "?")
        path = str(getattr(getattr(response, "url", None), "path", "?"))
        detail = " ".join((exc.text or str(getattr(response, "reason", "") or "")).split())
        line = f"Discord at {settings.discord_api_base} answered HTTP {exc.status} to {method} {path}"
        line += f" (code {exc.code}: {detail})." if detail else f" (code {exc.code})."
        if exc.status == 404:
            line += " Check DISCORD_API_BASE (leave it unset for discord.com)."
        elif exc.status == 403 and path.endswith("/commands"):
            line += " Invite the bot with the applications.commands scope (see README)."
        return line
    if isinstance(exc, aiohttp.ClientError | OSError | discord.GatewayNotFound):
        return (
            f"Could not reach Discord at {settings.discord_api_base} ({exc}). Check the network,"
            " or DISCORD_API_BASE / DISCORD_GATEWAY_URL if you changed them."
        )
    return None


def _sync(_args: argparse.Namespace) -> int:
    from bot.app import sync_now

    settings = _discord_settings()
    if settings is None:
        return 2
    try:
        result = asyncio.run(sync_now(settings))
    except Exception as exc:
        return _discord_exit(exc, settings)
    print(f"synced {result.count} slash commands {result.where}")
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from bot.jobs.db import DatabaseTooNew, migrate_path

    settings = load_settings()
    if settings.database_url is not None:
        return _migrate_postgres(settings.database_url)
    try:
        applied = migrate_path(settings.db_path)
    except DatabaseTooNew as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{settings.db_path}: applied {applied}" if applied else f"{settings.db_path}: up to date")
    return 0


def _migrate_postgres(url: str) -> int:
    """`ponybot migrate` with PONY_DATABASE_URL: the PostgreSQL schema, one line either way."""
    from bot.jobs.db import DatabaseTooNew
    from bot.jobs.pg_db import CONNECT_ERRORS, database_place, migrate_url

    place = database_place(url)
    try:
        applied = asyncio.run(migrate_url(url))
    except DatabaseTooNew as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except CONNECT_ERRORS as exc:
        print(
            f"Could not migrate the PostgreSQL database at {place} ({type(exc).__name__}: {exc}).",
            file=sys.stderr,
        )
        return EXIT_DATABASE
    print(f"{place}: applied {applied}" if applied else f"{place}: up to date")
    return 0


def _invite_url(args: argparse.Namespace) -> int:
    from bot.policy.permissions import invite_url

    print(invite_url(args.application_id))
    return 0


def _doctor(_args: argparse.Namespace) -> int:
    from bot.ops.doctor import main as doctor_main

    return doctor_main()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (generate/tiny-model parse their own options)."""
    parser = argparse.ArgumentParser(prog="ponybot", description="pony-diffusion Discord bot")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="log in to Discord and serve /pony")
    run.add_argument(
        "--no-worker",
        action="store_true",
        help="serve the commands and queue jobs, but run none here (`ponybot worker` does; PONY_LOCAL_WORKER=false)",
    )
    run.set_defaults(func=_run)
    sub.add_parser(
        "worker", help="claim, generate and deliver jobs of the PostgreSQL queue (REST only, no gateway)"
    ).set_defaults(func=_worker)
    sub.add_parser(
        "sync", help="send the slash commands to Discord now, even if unchanged (REST only)"
    ).set_defaults(func=_sync)
    sub.add_parser("migrate", help="create or upgrade the database").set_defaults(func=_migrate)
    sub.add_parser("doctor", help="check settings, database, model and Discord access").set_defaults(
        func=_doctor
    )
    invite = sub.add_parser("invite-url", help="print the URL that adds the bot to a server")
    invite.add_argument("application_id", type=int, help="the application id from the Developer Portal")
    invite.set_defaults(func=_invite_url)
    sub.add_parser("generate", help="make images without Discord (run `ponybot generate -h`)", add_help=False)
    sub.add_parser("tiny-model", help="write a tiny random model for tests", add_help=False)
    return parser


def _generate_defaults() -> tuple[GeneratorConfig, dict[str, Any]]:
    """`ponybot generate`'s config and defaults from the settings (ValueError: one line)."""
    try:
        s = load_settings()
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    return s.generator_config(), {
        "negative": s.default_negative,
        "steps": s.default_steps,
        "guidance": s.default_guidance,
        "count": s.default_count,
        "sampler": s.default_sampler,
        "base_resolution": s.base_resolution,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        from generator.cli import main as generate_main

        return generate_main(argv[1:], defaults_source=_generate_defaults)
    if argv and argv[0] == "tiny-model":
        from generator.cli import tiny_model_main

        return tiny_model_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
