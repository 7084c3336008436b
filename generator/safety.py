"""Optional output image classifier: flags images a transformers image-classification model labels
as not safe for work, and draws the notice that replaces them. Knows nothing of Discord.

The model is a local folder that `transformers.pipeline("image-classification", model=folder)`
loads offline (config.json with `id2label`, the weights, and preprocessor_config.json), for
example a download of Falconsai/nsfw_image_detection (labels "normal" and "nsfw"). An image is
flagged when the scores of the configured labels add up to at least the threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from generator.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)

NOTICE_TEXT = "Hidden by the image filter"
NOTICE_COLOUR = (48, 48, 56)


@dataclass
class ImageClassifier:
    """A loaded image-classification pipeline and the labels that flag an image."""

    pipe: Any
    labels: frozenset[str]
    threshold: float

    @classmethod
    def load(
        cls, folder: Path, *, labels: Iterable[str], threshold: float, device: str = "cpu"
    ) -> ImageClassifier:
        """Load the model folder; raise ModelLoadError (one line) when it can't be used."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"Image classifier {str(folder)!r}: no such folder (PONY_NSFW_CLASSIFIER).")
        wanted = frozenset(label.strip().casefold() for label in labels if label.strip())
        try:
            from transformers import pipeline

            pipe = pipeline("image-classification", model=str(folder), device=device)
        except Exception as exc:
            raise ModelLoadError(
                f"Image classifier {str(folder)!r} could not be loaded: {first_line(exc)}"
            ) from None
        id2label = pipe.model.config.id2label or {}  # a config without labels flags nothing: refused below
        known = {str(name).casefold() for name in id2label.values()}
        if not wanted & known:
            raise ModelLoadError(
                f"Image classifier {str(folder)!r}: none of PONY_NSFW_LABELS ({', '.join(sorted(wanted))})"
                f" is one of its labels ({', '.join(sorted(known))})."
            )
        log.info("image classifier loaded from %s (flags %s)", folder, ", ".join(sorted(wanted & known)))
        return cls(pipe=pipe, labels=wanted & known, threshold=threshold)

    def scores(self, images: list[Image.Image]) -> list[float]:
        """For each image, the summed score of the flagging labels (0..1)."""
        if not images:
            return []
        outputs = self.pipe([im.convert("RGB") for im in images], top_k=None)
        if images and isinstance(outputs, list) and outputs and isinstance(outputs[0], dict):
            outputs = [outputs]  # one image: a flat list of {label, score}
        return [
            sum(float(o["score"]) for o in out if str(o["label"]).casefold() in self.labels)
            for out in outputs
        ]

    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """For each image, True when it should be hidden."""
        return [score >= self.threshold for score in self.scores(images)]


def notice_image(size: tuple[int, int], text: str = NOTICE_TEXT) -> Image.Image:
    """A plain image of `size` saying it replaces a hidden one."""
    image = Image.new("RGB", size, NOTICE_COLOUR)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), text)
    x = max(0, (size[0] - (box[2] - box[0])) // 2)
    y = max(0, (size[1] - (box[3] - box[1])) // 2)
    draw.text((x, y), text, fill=(220, 220, 220))
    return image


def write_tiny_classifier(path: Path, *, flags_everything: bool) -> Path:
    """A tiny image classifier folder (labels "normal"/"nsfw") for tests and smoke runs: it labels
    every image "nsfw" (`flags_everything`) or "normal", whatever the picture."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    head = model.classifier
    assert isinstance(head, torch.nn.Linear), "two labels give a linear classification head"
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0] if flags_everything else [10.0, 0.0]))
    path = Path(path)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
