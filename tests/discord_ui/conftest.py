"""The loopback Discord and the real bot for the tests of bot.discord_ui (tests/discord_ui/**).

The harness is tests/e2e's own (`FakeDiscord`, `InProcessBot`, `bot_env`: see loopback_harness.py).
It is imported when a fixture below is first used, not when this file is, so the unit tests of
this folder that never start a bot (messages, buttons, delivery) neither import the composition
root nor break while it is being changed. Tests that start the bot also use `loopback` (one torch
thread, spec-checked request bodies: what tests/e2e's autouse fixtures do).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD v1.x pipeline on disk, written once per session (as tests/e2e's)."""
    from generator.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture
async def discord_server() -> AsyncIterator[Any]:
    """A started loopback Discord (tests/e2e/fake_discord.py)."""
    from loopback_harness import FakeDiscord

    fake = FakeDiscord()
    fake.interaction_deadline = 3.0
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def start_bot(
    discord_server: Any, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """`await start_bot(**env_overrides)` starts the real bot in-process; all are stopped at the end."""
    import loopback_harness as harness

    runners: list[Any] = []

    async def start(*, wait_model: bool = True, **extra: Any) -> Any:
        env = harness.bot_env(discord_server, tmp_path / "data", tiny_model, **extra)
        runner = harness.InProcessBot(env, monkeypatch)
        runners.append(runner)
        return await runner.start(wait_model=wait_model)

    yield start
    for runner in runners:
        await runner.stop()


@pytest.fixture
def loopback() -> Iterator[None]:
    """What tests/e2e's autouse fixtures do, for a test that starts the bot: one torch thread while
    it runs, and a failure if the bot sent a request body that Discord's spec rejects."""
    import torch
    from loopback_harness import take_created

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    take_created()
    try:
        yield
    finally:
        torch.set_num_threads(before)
    violations = [v for fake in take_created() for v in fake.spec_violations]
    if violations:
        lines = "\n".join(f"  {v.method} {v.route}: {v.json_path}: {v.message}" for v in violations)
        pytest.fail(f"request bodies that Discord's spec rejects:\n{lines}", pytrace=False)
