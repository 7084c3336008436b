"""Where result images live on disk: `<images dir>/<job id>/ponybot-<job id>-<n>.png`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from generator.pipeline import GenerationResult

log = logging.getLogger(__name__)


def result_name(job_id: int, number: int) -> str:
    """The path of image `number` (1-based) of a job, relative to the images folder."""
    return f"{job_id}/ponybot-{job_id}-{number}.png"


def save_results(images_dir: Path, job_id: int, result: GenerationResult) -> list[str]:
    """Write each image of a GenerationResult as a PNG with its A1111 metadata.

    Returns the relative names. On an error (e.g. disk full) no partial set is left behind.
    """
    from generator.metadata import save_png

    names: list[str] = []
    try:
        for number, img in enumerate(result.images, start=1):
            name = result_name(job_id, number)
            names.append(name)
            save_png(img.image, images_dir / name, img.parameters)
    except OSError:
        for name in names:
            with contextlib.suppress(OSError):
                (images_dir / name).unlink(missing_ok=True)
        raise
    log.debug("saved %d images for job %s", len(names), job_id)
    return names
