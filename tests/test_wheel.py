"""Issue #11: the built wheel works on its own, outside the checkout.

`pip wheel` (no dependencies, no build isolation: no network needed) builds ponybot from a clean
copy of the sources; the wheel goes, non-editable, into a fresh venv; from a folder outside the
checkout that venv's `ponybot` then migrates a database, writes the tiny model and generates a PNG.
The heavy dependencies (torch, diffusers, ...) come from this environment through a `.pth` line,
which adds its site-packages without running that folder's own `.pth` files, so this environment's
editable ponybot stays invisible to the new venv.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MIGRATION_FILES = sorted(
    p.name for p in (ROOT / "bot" / "jobs" / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")
)

#: what a fresh clone would not have at its top: environments, build outputs, caches, local data
NOT_IN_A_CLONE = {".git", ".venv", "build", "dist", "data", "tmp", ".env"}


def not_sources(folder: str, names: list[str]) -> set[str]:
    """`shutil.copytree` ignore: build leftovers anywhere, local state at the top of the checkout."""
    top = NOT_IN_A_CLONE if Path(folder) == ROOT else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(("_cache", ".egg-info"))}


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output when it exits non-zero."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """`pip wheel` of a clean copy of this checkout (a stale build/ folder could add deleted modules)."""
    sources = tmp_path / "sources"
    shutil.copytree(ROOT, sources, ignore=not_sources)
    wheels = tmp_path / "wheels"
    pip_wheel: list[str | Path] = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    run([*pip_wheel, "--quiet", "-w", wheels, "."], cwd=sources, env=env)
    (wheel,) = wheels.glob("ponybot-*.whl")
    return wheel


def make_venv(venv: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A fresh venv with the wheel installed (not editable); returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent, env=env)
    python = venv / "bin" / "python"
    site_packages = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv, env=env
    ).stdout.strip()
    ours = sysconfig.get_paths()
    dependency_dirs = dict.fromkeys([ours["purelib"], ours["platlib"]])
    (Path(site_packages) / "ponybot-test-dependencies.pth").write_text("\n".join(dependency_dirs) + "\n")
    pip_install: list[str | Path] = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
    ]
    run([*pip_install, "--quiet", wheel], cwd=venv.parent, env=env)
    return python


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PONY_", "DISCORD_", "PYTHON", "VIRTUAL_ENV"))
    }
    env |= {
        "HF_HUB_OFFLINE": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PONY_DATA_DIR": str(tmp_path / "data"),
    }
    wheel = build_wheel(tmp_path, env)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bot/jobs/migrations/{name}" for name in MIGRATION_FILES} <= shipped
    assert not any(name.startswith("tests/") for name in shipped)

    venv = tmp_path / "venv"
    python = make_venv(venv, wheel, env)
    ponybot = venv / "bin" / "ponybot"
    work = tmp_path / "elsewhere"  # no .env, no checkout
    work.mkdir()

    located = run(
        [python, "-c", "import bot, generator; print(bot.__file__); print(generator.__file__)"],
        cwd=work,
        env=env,
    )
    for path in located.stdout.split():
        assert Path(path).is_relative_to(venv), path

    migrated = run([ponybot, "migrate"], cwd=work, env=env)
    numbers = [int(name[:4]) for name in MIGRATION_FILES]
    assert migrated.stdout.strip() == f"{tmp_path / 'data' / 'jobs.sqlite3'}: applied {numbers}"
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == numbers[-1]

    model = tmp_path / "tiny-model"
    written = run([ponybot, "tiny-model", model], cwd=work, env=env)
    assert written.stdout.split() == [str(model)]

    generate: list[str | Path] = [
        ponybot,
        "generate",
        "a (pony:1.2) in a meadow",
        "--model",
        model,
        "--device",
        "cpu",
    ]
    generate += ["--width", "64", "--height", "128", "--steps", "2", "--count", "1", "--seed", "7"]
    generated = run([*generate, "--negative", "blurry", "--out", "images"], cwd=work, env=env)
    assert generated.stdout.split() == [str(Path("images") / "7-0.png")]
    with Image.open(work / "images" / "7-0.png") as image:
        assert image.format == "PNG" and image.size == (64, 128)
        parameters = image.info["parameters"]
    prompt, negative, settings = parameters.split("\n")
    assert prompt == "a (pony:1.2) in a meadow" and negative == "Negative prompt: blurry"
    assert "Steps: 2" in settings and "Seed: 7" in settings and "Size: 64x128" in settings
