"""Comparing generation results pixel for pixel (the determinism and batch-invariance tests)."""

from __future__ import annotations

import numpy as np

from generator.pipeline import GenerationResult


def same_images(a: GenerationResult, b: GenerationResult) -> bool:
    """Whether `a` and `b` hold the same number of images, each identical pixel for pixel."""
    return len(a.images) == len(b.images) and all(
        np.array_equal(np.asarray(x.image), np.asarray(y.image))
        for x, y in zip(a.images, b.images, strict=True)
    )
