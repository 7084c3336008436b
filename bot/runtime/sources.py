"""Members' uploaded source images on disk: where they are kept, writing them, and reading them
back for the worker (screened by the image filter first).

An accepted upload is kept as `<images>/uploads/<key>.png` (see bot.discord_ui.member_images) and
its job names it in `params["source"]`. No Discord here: the worker reads sources through this
module only.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from bot.jobs.models import Job
from bot.runtime.postprocess import Screen
from generator.errors import GeneratorError

#: the folder under the images folder that holds members' uploads
UPLOADS_DIR = "uploads"


class SharedFiles(Protocol):
    """Where files saved on another machine are fetched from (the job queue: `ensure_files`)."""

    async def ensure_files(self, names: Sequence[str]) -> list[str]: ...


@dataclass
class _Picture:
    """One image as the image filter sees it (shaped like generator.pipeline.ImageResult)."""

    image: Image.Image


@dataclass
class _Pictures:
    """A set of images to screen (shaped like generator.pipeline.GenerationResult)."""

    images: list[_Picture]


def save_source(images_dir: Path, key: int, image: Image.Image) -> str:
    """Write an upload as `uploads/<key>.png` (atomic); returns the path relative to `images_dir`."""
    rel = f"{UPLOADS_DIR}/{key}.png"
    path = images_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rel


def source_path(images_dir: Path, job: Job) -> Path | None:
    """The uploaded source a job names (`params["source"]`), kept inside the images folder."""
    rel = job.params.get("source")
    if not isinstance(rel, str) or not rel:
        return None
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (UPLOADS_DIR,):
        return None
    return images_dir / path


async def load_source(
    images_dir: Path,
    job: Job,
    screen: Screen | None,
    executor: Executor | None = None,
    *,
    files: SharedFiles | None = None,
) -> Image.Image:
    """The worker's source for an uploaded-image job: read, then screened by the image filter.

    With `files`, an upload saved on another machine is fetched first (`ensure_files`). Raises
    GeneratorError when the file is gone or the filter hid it (nothing is drawn from it).
    """
    path = source_path(images_dir, job)
    if path is not None and files is not None:
        await files.ensure_files([path.relative_to(images_dir).as_posix()])
    if path is None or not path.exists():
        raise GeneratorError("The uploaded image is no longer kept; upload it again.")
    loop = asyncio.get_running_loop()
    image = await loop.run_in_executor(executor, lambda: Image.open(path).convert("RGB"))
    if screen is not None:
        holder = _Pictures([_Picture(image)])
        await screen(job, holder)
        if holder.images[0].image is not image:
            raise GeneratorError("The image filter hid your uploaded image, so nothing was drawn from it.")
    return image
