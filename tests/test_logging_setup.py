"""bot/logging_setup.py: JSON lines, plain lines, token redaction, job events."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bot.logging_setup import REDACTED, log_job_event, redact, setup_logging

# Token-shaped but fake, built at run time so secret scanners do not flag the source.
FAKE_TOKEN = "MTA" + "x" * 23 + "." + "GaBcDe" + "." + "Q" * 38
FAKE_MFA = "mfa." + "z" * 84


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_lines_parseable_with_extras() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", True, stream=out)
    log = logging.getLogger("ponybot.test")
    log.debug("hello %s", "world", extra={"job_id": 7, "user_id": 42, "wait_s": 1.5})
    log.info('unicode ✓ and "quotes"\nand a newline')
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.exception("it failed", extra={"job_id": 8})
    records = [json.loads(line) for line in lines(out)]
    assert len(records) == 3
    first = records[0]
    assert first["msg"] == "hello world" and first["level"] == "DEBUG" and first["logger"] == "ponybot.test"
    assert first["job_id"] == 7 and first["user_id"] == 42 and first["wait_s"] == 1.5
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert records[1]["msg"].endswith("and a newline")
    assert "ValueError: bad thing" in records[2]["exc"] and records[2]["level"] == "ERROR"


def test_level_filtering_and_bad_level() -> None:
    out = io.StringIO()
    setup_logging("warning", True, stream=out)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert [json.loads(line)["msg"] for line in lines(out)] == ["shown"]
    with pytest.raises(ValueError):
        setup_logging("LOUD", False, stream=out)


def test_setup_twice_keeps_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", True, stream=first)
    setup_logging("INFO", False, stream=second)
    logging.getLogger("x").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1 and "once" in second.getvalue()


@pytest.mark.parametrize("json_lines", [True, False])
def test_token_redacted_everywhere(json_lines: bool) -> None:
    out = io.StringIO()
    setup_logging("INFO", json_lines, stream=out)
    log = logging.getLogger("ponybot.secret")
    log.info(f"token in message {FAKE_TOKEN}")
    log.info("token in args %s and %s", FAKE_TOKEN, FAKE_MFA)
    log.info("token in extra", extra={"header": f"Bot {FAKE_TOKEN}"})
    try:
        raise RuntimeError(f"401 Unauthorized for Authorization: Bot {FAKE_TOKEN}")
    except RuntimeError:
        log.exception("login failed")
    text = out.getvalue()
    assert FAKE_TOKEN not in text and FAKE_MFA not in text
    assert "QQQQQQQQQQ" not in text and "zzzzzzzzzz" not in text
    assert text.count(REDACTED) >= 5
    if json_lines:
        for line in lines(out):
            json.loads(line)
    else:
        assert "header=Bot [REDACTED]" in text


def test_redact_leaves_ordinary_text() -> None:
    text = "job 12 done in 3.5 s; seed 1234567890; file 12/ponybot-12-0.png; v1.2.3"
    assert redact(text) == text
    assert redact(f"({FAKE_TOKEN})") == f"({REDACTED})"


def test_log_job_event_json() -> None:
    out = io.StringIO()
    setup_logging("INFO", True, stream=out)
    log = logging.getLogger("bot.runtime.worker")
    log_job_event(log, 12, 34, "running", wait_s=1.23456)
    log_job_event(log, 12, 34, "done", wait_s=1.2, run_s=8.04321, images=4, error=None)
    log_job_event(log, 13, 34, "failed", error="Out of GPU memory")
    records = [json.loads(line) for line in lines(out)]
    assert len(records) == 3
    assert records[0] | {"ts": None} == {
        "ts": None,
        "level": "INFO",
        "logger": "bot.runtime.worker",
        "msg": "job 12 running",
        "job_id": 12,
        "user_id": 34,
        "status": "running",
        "wait_s": 1.235,
    }
    assert records[1]["run_s"] == 8.043 and records[1]["images"] == 4 and "error" not in records[1]
    assert records[2]["level"] == "WARNING" and records[2]["error"] == "Out of GPU memory"


def test_log_job_event_plain() -> None:
    out = io.StringIO()
    setup_logging("INFO", False, stream=out)
    log_job_event(logging.getLogger("bot.runtime.worker"), 5, 6, "queued", msg="clash")
    (line,) = lines(out)
    assert "bot.runtime.worker: job 5 queued job_id=5 user_id=6 status=queued msg_=clash" in line


def test_voice_support_warnings_are_dropped() -> None:
    import io
    import logging

    from bot.logging_setup import setup_logging

    stream = io.StringIO()
    setup_logging("INFO", False, stream=stream)
    logging.getLogger("discord.client").warning("PyNaCl is not installed, voice will NOT be supported")
    logging.getLogger("discord.client").warning("something that matters")
    assert "voice" not in stream.getvalue()
    assert "something that matters" in stream.getvalue()
