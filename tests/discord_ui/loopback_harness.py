"""tests/e2e's harness for the tests of bot.discord_ui that run the real bot (import this module).

tests/e2e/conftest.py is loaded once more as the module `e2e_fixtures` (tests/e2e goes on sys.path
for its `fake_discord` and `discord_spec` imports); its helpers are re-exported here. Importing this
module imports the composition root (bot.app), so only the bot-driven test files import it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"


def _load() -> ModuleType:
    name = "e2e_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    if str(E2E_DIR) not in sys.path:
        sys.path.append(str(E2E_DIR))
    spec = importlib.util.spec_from_file_location(name, E2E_DIR / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


e2e = _load()

from fake_discord import FakeDiscord, FakeInteraction, FakeMessage, take_created  # noqa: E402

InProcessBot = e2e.InProcessBot
bot_env = e2e.bot_env
is_result = e2e.is_result
job_messages = e2e.job_messages
wait_until = e2e.wait_until
wait_for_status = e2e.wait_for_status
slow_down_generation = e2e.slow_down_generation

__all__ = [
    "FakeDiscord",
    "FakeInteraction",
    "FakeMessage",
    "InProcessBot",
    "bot_env",
    "is_result",
    "job_messages",
    "slow_down_generation",
    "take_created",
    "wait_for_status",
    "wait_until",
]
