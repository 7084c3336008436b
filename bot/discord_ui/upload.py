"""Fitting result images under Discord's attachment limits without dropping any."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import discord
from PIL import Image


@dataclass
class FittedImages:
    """Files ready to attach, the image size, and a note when something was re-encoded."""

    files: list[discord.File]
    size: tuple[int, int] | None
    note: str | None
    #: bytes of each file as sent
    sizes: list[int]


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=quality, method=4) if fmt == "WEBP" else image.save(
        buf, fmt, quality=quality
    )
    return buf.getvalue()


def fit_image(path: Path, limit: int) -> tuple[str, bytes, str | None]:
    """(filename, bytes, note): the PNG as is when it fits, else high-quality WebP, else downscaled."""
    data = path.read_bytes()
    if len(data) <= limit:
        return path.name, data, None
    with Image.open(path) as src:
        image = src.convert("RGB")
    stem = path.stem
    for quality in (95, 90, 80):
        webp = _encode(image, "WEBP", quality)
        if len(webp) <= limit:
            return f"{stem}.webp", webp, "Large images were sent as high-quality WebP to fit Discord's limit."
    scale = 0.75
    while True:
        smaller = image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS
        )
        webp = _encode(smaller, "WEBP", 90)
        if len(webp) <= limit or smaller.width <= 64:
            note = f"Images were downscaled to {smaller.width}x{smaller.height} to fit Discord's limit."
            return f"{stem}.webp", webp, note
        scale *= 0.75


def fit_images(paths: list[Path], per_file_limit: int, message_limit: int) -> FittedImages:
    """Every image, each under the per-file limit and all together under the message limit."""
    limit = min(per_file_limit, message_limit // max(1, len(paths)))
    files, notes, sizes, size = [], [], [], None
    for path in paths:
        name, data, note = fit_image(path, limit)
        if size is None:
            with Image.open(path) as img:
                size = img.size
        files.append(discord.File(io.BytesIO(data), filename=name))
        sizes.append(len(data))
        if note and note not in notes:
            notes.append(note)
    return FittedImages(files=files, size=size, note=" ".join(notes) or None, sizes=sizes)
