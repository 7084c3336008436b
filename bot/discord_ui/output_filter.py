"""The optional output image filter (`PONY_NSFW_CLASSIFIER`): outside age-restricted channels,
finished images that the classifier flags are replaced by a notice before they are saved, so the
result, /pony-info and the U/V buttons only ever see the notice.

The classifier (generator.safety) loads on first use, on the generator's device, and runs in a
thread of its own: a result is screened while the next generation runs, never queued behind it.
If it cannot load, the filter fails closed: every image outside age-restricted channels is
replaced, and the reason is logged.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import discord

from bot.config import Settings
from bot.jobs.models import Job
from bot.policy.guard import channel_is_nsfw
from bot.runtime.engine import Engine
from bot.runtime.postprocess import ScreenedImages
from generator.errors import ModelLoadError
from generator.safety import notice_image

if TYPE_CHECKING:
    from generator.safety import ImageClassifier

log = logging.getLogger(__name__)


class OutputFilter:
    """Screens a job's finished images; `screen` is the worker's hook."""

    def __init__(self, settings: Settings, engine: Engine, client: discord.Client) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.error: str | None = None
        self._classifier: ImageClassifier | None = None
        self._lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponybot-filter")

    def applies_to(self, job: Job) -> bool:
        """False only for jobs from a channel known to be age-restricted."""
        channel = self.client.get_channel(job.channel_id)
        return channel is None or not channel_is_nsfw(channel)

    def _load(self) -> ImageClassifier:
        from generator.safety import ImageClassifier

        generator = self.engine.generator
        device = str(getattr(generator, "device", "cpu")) if generator is not None else "cpu"
        assert self.settings.nsfw_classifier is not None
        return ImageClassifier.load(
            self.settings.nsfw_classifier,
            labels=self.settings.nsfw_label_list,
            threshold=self.settings.nsfw_threshold,
            device="cpu" if device == "mps" else device,
        )

    async def classifier(self) -> ImageClassifier | None:
        """The loaded classifier, or None when it can't load (then `error` says why)."""
        async with self._lock:
            if self._classifier is None and self.error is None:
                try:
                    loop = asyncio.get_running_loop()
                    self._classifier = await loop.run_in_executor(self._thread, self._load)
                except ModelLoadError as exc:
                    self.error = str(exc)
                    log.error(
                        "image filter unavailable, hiding every image outside age-restricted channels: %s",
                        exc,
                    )
            return self._classifier

    async def screen(self, job: Job, result: ScreenedImages) -> None:
        """Replace flagged images of `result` in place, unless the job's channel is age-restricted."""
        if not self.applies_to(job) or not result.images:
            return
        classifier = await self.classifier()
        if classifier is None:
            flags = [True] * len(result.images)
        else:
            images = [item.image for item in result.images]
            flags = await asyncio.get_running_loop().run_in_executor(self._thread, classifier.flagged, images)
        for item, flagged in zip(result.images, flags, strict=True):
            if flagged:
                item.image = notice_image(item.image.size)
        if any(flags):
            log.info("image filter hid %d of %d images", sum(flags), len(flags), extra={"job_id": job.id})
