"""Fitting images under Discord's upload limits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from bot.discord_ui.upload import fit_images


def noisy_png(path: Path, size: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_small_files_go_as_png_untouched(tmp_path: Path) -> None:
    path = noisy_png(tmp_path / "a.png", 32)
    fitted = fit_images([path], 10 * 1024 * 1024, 25 * 1024 * 1024)
    assert fitted.note is None and fitted.size == (32, 32)
    assert fitted.files[0].filename == "a.png"
    assert fitted.files[0].fp.read() == path.read_bytes()


def test_large_files_are_reencoded_then_downscaled_never_dropped(tmp_path: Path) -> None:
    paths = [noisy_png(tmp_path / f"{i}.png", 256) for i in range(3)]
    fitted = fit_images(paths, per_file_limit=20_000, message_limit=25 * 1024 * 1024)
    assert len(fitted.files) == 3
    assert all(f.filename.endswith(".webp") for f in fitted.files)
    assert all(size <= 20_000 for size in fitted.sizes)
    assert "downscaled" in fitted.note or "WebP" in fitted.note
    image = Image.open(io.BytesIO(fitted.files[0].fp.read()))
    assert image.format == "WEBP"


def test_message_limit_is_shared_between_files(tmp_path: Path) -> None:
    paths = [noisy_png(tmp_path / f"{i}.png", 128) for i in range(4)]
    one = paths[0].stat().st_size
    fitted = fit_images(paths, per_file_limit=10 * one, message_limit=2 * one)
    assert sum(fitted.sizes) <= 2 * one
