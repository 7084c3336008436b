"""Logging for ponybot: plain or JSON lines on stderr, with Discord tokens redacted (stdlib only).

`setup_logging` installs one handler on the root logger (calling it again replaces it). Extra
fields passed with `extra={...}` (job_id, user_id, status, wait_s, run_s, ...) become JSON keys,
or ` key=value` pairs in plain mode. `log_job_event` writes one line per job state change.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

#: Discord bot/user tokens: base64 user id . timestamp . HMAC; plus old `mfa.` tokens.
TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:mfa\.[A-Za-z0-9_-]{20,}|[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,})"
    r"(?![A-Za-z0-9_-])"
)
REDACTED = "[REDACTED]"

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_HANDLER_FLAG = "_ponybot_handler"


def redact(text: str) -> str:
    """`text` with anything shaped like a Discord token replaced by [REDACTED]."""
    return TOKEN_RE.sub(REDACTED, text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}


class RedactTokensFilter(logging.Filter):
    """Safety net: rewrites the message, string extras and traceback text without tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we can
            message = str(record.msg)
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO 8601), level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return redact(json.dumps(data, default=str, ensure_ascii=False))


class PlainFormatter(logging.Formatter):
    """`2025-01-01 12:00:00,000 INFO    bot.worker: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            pairs = " ".join(f"{k}={v}" for k, v in extras.items())
            first, sep, rest = text.partition("\n")
            text = f"{first} {pairs}{sep}{rest}"
        return redact(text)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    mapping = logging.getLevelNamesMapping()
    if name not in mapping:
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return mapping[name]


class DropVoiceWarnings(logging.Filter):
    """discord.py warns at every start that voice support is missing; ponybot never uses voice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "discord.client" and "voice will NOT be supported" in record.getMessage())


def setup_logging(level: str = "INFO", json_lines: bool = False, *, stream: TextIO | None = None) -> None:
    """Configure the root logger: one stderr handler, plain or JSON lines, tokens redacted."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(JsonLinesFormatter() if json_lines else PlainFormatter())
    handler.addFilter(RedactTokensFilter())
    handler.addFilter(DropVoiceWarnings())
    root.addHandler(handler)
    root.setLevel(_level(level))
    logging.captureWarnings(True)


def log_job_event(
    logger: logging.Logger, job_id: int, user_id: int, status: str, **timings: float | str | None
) -> None:
    """One line for a job state change; timings (wait_s, run_s, ...) become extra fields.

    None values are dropped, floats rounded to milliseconds; failed/dead jobs log at WARNING.
    """
    extra: dict[str, Any] = {"job_id": job_id, "user_id": user_id, "status": status}
    for key, value in timings.items():
        if value is None:
            continue
        name = key if key not in _RESERVED else f"{key}_"
        extra[name] = round(value, 3) if isinstance(value, float) else value
    level = logging.WARNING if status in ("failed", "dead") else logging.INFO
    logger.log(level, "job %s %s", job_id, status, extra=extra)
