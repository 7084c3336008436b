"""The `ponybot` console script: run, generate, tiny-model, migrate, doctor, invite-url."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bot.config import SettingsError, load_settings


def _run(_args: argparse.Namespace) -> int:
    from bot.app import run_bot
    from bot.logging_setup import setup_logging

    settings = load_settings()
    if settings.discord_token is None:
        print("Missing setting DISCORD_TOKEN: put the bot token in .env (see README).", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(run_bot(settings))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # login failure and friends: one line, no traceback
        import aiohttp
        import discord

        if isinstance(exc, discord.LoginFailure):
            print(
                "Discord refused the token: check DISCORD_TOKEN (Developer Portal > Bot > Reset Token).",
                file=sys.stderr,
            )
            return 3
        if isinstance(exc, aiohttp.ClientError | OSError | discord.GatewayNotFound):
            print(
                f"Could not reach Discord at {settings.discord_api_base} ({exc}). Check the network,"
                " or DISCORD_API_BASE / DISCORD_GATEWAY_URL if you changed them.",
                file=sys.stderr,
            )
            return 3
        raise
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from bot.db import DatabaseTooNew, migrate_path

    settings = load_settings()
    try:
        applied = migrate_path(settings.db_path)
    except DatabaseTooNew as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{settings.db_path}: applied {applied}" if applied else f"{settings.db_path}: up to date")
    return 0


def _invite_url(args: argparse.Namespace) -> int:
    from bot.permissions import invite_url

    print(invite_url(args.application_id))
    return 0


def _doctor(_args: argparse.Namespace) -> int:
    from bot.doctor import main as doctor_main

    return doctor_main()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (generate/tiny-model parse their own options)."""
    parser = argparse.ArgumentParser(prog="ponybot", description="pony-diffusion Discord bot")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="log in to Discord and serve /pony").set_defaults(func=_run)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        from generator.cli import main as generate_main

        return generate_main(argv[1:])
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
