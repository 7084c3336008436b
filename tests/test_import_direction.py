"""Import hygiene of bot/ and generator/: every module imports on its own (no hidden cycle), and
imports point only in the allowed direction between packages (docs/ARCHITECTURE.md).

The direction check reads the source with `ast`, so it also sees imports that never run in a test:
those under `if TYPE_CHECKING:` and those inside functions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "generator")

#: the modules every bot package may lean on: the package itself, settings, errors, logging
BASE_MODULES = frozenset({"bot", "bot.config", "bot.errors", "bot.logging_setup"})

#: generator modules that import neither torch nor diffusers (bot.jobs may use these, and only these)
TORCH_FREE_GENERATOR = frozenset(
    {
        "generator",
        "generator.config",
        "generator.errors",
        "generator.extra_files",
        "generator.hires",
        "generator.metadata",
        "generator.params",
        "generator.prompt_syntax",
        "generator.samplers",
    }
)

#: every layer and the other layers it may import (a layer may always import itself)
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset({"torch-free generator", "generator"}),
    "bot.jobs": frozenset({"base", "torch-free generator"}),
    "bot.policy": frozenset({"bot.jobs", "base", "torch-free generator", "generator"}),
    "bot.runtime": frozenset({"bot.jobs", "base", "torch-free generator", "generator"}),
    "bot.ops": frozenset(
        {"bot.runtime", "bot.jobs", "bot.policy", "base", "torch-free generator", "generator"}
    ),
    "bot.discord_ui": frozenset(
        {"bot.ops", "bot.runtime", "bot.jobs", "bot.policy", "base", "torch-free generator", "generator"}
    ),
    "bot.app": frozenset(
        {
            "bot.discord_ui",
            "bot.ops",
            "bot.runtime",
            "bot.jobs",
            "bot.policy",
            "base",
            "torch-free generator",
            "generator",
        }
    ),
    "bot.cli": frozenset(
        {
            "bot.app",
            "bot.discord_ui",
            "bot.ops",
            "bot.runtime",
            "bot.jobs",
            "bot.policy",
            "base",
            "torch-free generator",
            "generator",
        }
    ),
    "torch-free generator": frozenset(),
    "generator": frozenset({"torch-free generator"}),
}

TORCH_STACK = frozenset(
    {"torch", "torchvision", "torchao", "diffusers", "transformers", "safetensors", "spandrel", "peft"}
)

#: third-party packages a layer must not import at all
FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "bot.runtime": frozenset({"discord"}),
    "bot.jobs": TORCH_STACK,
    "torch-free generator": TORCH_STACK,
}


@dataclass(frozen=True)
class ImportSite:
    """One import statement's target, where it is written."""

    target: str
    line: int


def module_files() -> dict[str, Path]:
    """Every module of bot/ and generator/, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer of one of our modules (a key of ALLOWED), None for third-party or unknown ones."""
    if module.split(".")[0] == "generator":
        return "torch-free generator" if module in TORCH_FREE_GENERATOR else "generator"
    if module in BASE_MODULES:
        return "base"
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def imports_in(source: str, module: str, is_package: bool, known: set[str]) -> list[ImportSite]:
    """Every module `source` imports, wherever the statement is (top level, TYPE_CHECKING, functions)."""
    sites: list[ImportSite] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            sites += [ImportSite(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from bot import config` imports the module bot.config
                sub = f"{base}.{alias.name}"
                sites.append(ImportSite(sub if sub in known else base, node.lineno))
    return list(dict.fromkeys(sites))  # `from x import a, b` is one import of x


def _all_imports() -> dict[str, list[ImportSite]]:
    files = module_files()
    known = set(files)
    return {
        name: imports_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def test_the_direction_checker_sees_type_checking_and_function_imports() -> None:
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        import bot.jobs.queue
        from bot import config
        if TYPE_CHECKING:
            from bot.discord_ui.client import PonyBot
        def later():
            import discord
            from . import text
        """
    )
    known = {"bot.config", "bot.jobs.queue", "bot.policy.text"}
    targets = {site.target for site in imports_in(source, "bot.policy.guard", False, known)}
    assert targets == {
        "typing",
        "bot.jobs.queue",
        "bot.config",
        "bot.discord_ui.client",
        "discord",
        "bot.policy.text",
    }


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(name for name in module_files() if layer_of(name) is None)
    assert not unplaced, f"add these modules to a layer in {Path(__file__).name}: {unplaced}"


def test_imports_point_the_allowed_way() -> None:
    files = module_files()
    violations = []
    for module, sites in _all_imports().items():
        layer = layer_of(module)
        if layer is None:
            continue  # reported by test_every_module_belongs_to_a_layer
        for site in sites:
            target_layer = layer_of(site.target) if site.target.split(".")[0] in PACKAGES else None
            if target_layer is None or target_layer == layer or target_layer in ALLOWED[layer]:
                continue
            where = f"{files[module].relative_to(ROOT)}:{site.line}"
            allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing outside itself"
            violations.append(
                f"{where}: {layer} imports {site.target} ({target_layer}); {layer} may import {allowed}"
            )
    assert not violations, "imports against the allowed direction:\n" + "\n".join(violations)


def test_no_forbidden_third_party_imports() -> None:
    files = module_files()
    violations = []
    for module, sites in _all_imports().items():
        forbidden = FORBIDDEN_THIRD_PARTY.get(layer_of(module) or "", frozenset())
        for site in sites:
            if site.target.split(".")[0] in forbidden:
                where = f"{files[module].relative_to(ROOT)}:{site.line}"
                violations.append(f"{where}: {layer_of(module)} must not import {site.target}")
    assert not violations, "\n".join(violations)


#: run in one fresh interpreter: import each module first, with no bot/generator module loaded yet
IMPORT_ALONE = """
import importlib, json, sys, traceback
sys.path.insert(0, sys.argv[1])
failures = {}
for name in sys.argv[2:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("bot", "generator")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failures[name] = "".join(traceback.format_exception_only(exc)).strip()
import bot
print(json.dumps({"failures": failures, "bot_file": bot.__file__}))
"""


def test_every_module_imports_on_its_own() -> None:
    modules = sorted(module_files())
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALONE, str(ROOT), *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["bot_file"]).is_relative_to(ROOT)  # this checkout, not another install
    failures: dict[str, str] = report["failures"]
    assert not failures, "modules that fail when imported first:\n" + "\n".join(
        f"{name}: {error}" for name, error in failures.items()
    )
