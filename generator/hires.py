"""Hires fix sizes (no torch): the larger size a hires-fix request is refined at, under a pixel cap.

The hires fix (A1111's "Hires. fix") draws the picture at its base size, upscales it by `scale` and
refines it with img2img on the same model (`Generator.txt2img_hires`). Sizes are whole multiples of
8 (the VAE's factor, as in A1111), rounded down, so the result never exceeds `scale` times the base
size.
"""

from __future__ import annotations

import math

from generator.errors import InvalidParams

MIN_HIRES_SCALE = 1.25
MAX_HIRES_SCALE = 2.0
DEFAULT_HIRES_SCALE = 2.0
#: A1111's "Hires upscaler" value for what the generator does: a Lanczos pixel upscale
HIRES_UPSCALER = "Lanczos"


def _snap(value: float) -> int:
    return max(64, int(value) // 8 * 8)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The refined size of a `width` x `height` picture upscaled by `scale` (multiples of 8)."""
    return _snap(width * scale + 1e-6), _snap(height * scale + 1e-6)


def fit_hires_scale(width: int, height: int, scale: float, max_pixels: int) -> float:
    """`scale`, or the largest smaller one whose size fits in `max_pixels` (2 decimals).

    Raises InvalidParams when no scale above 1 fits (the base size is already at the cap).
    """
    if not MIN_HIRES_SCALE <= scale <= MAX_HIRES_SCALE:
        raise InvalidParams(f"Hires scale must be between {MIN_HIRES_SCALE:g} and {MAX_HIRES_SCALE:g}.")
    best = min(scale, math.sqrt(max_pixels / (width * height)))
    best = math.floor(best * 100) / 100
    w, h = hires_size(width, height, best)
    if best <= 1.0 or w * h <= width * height:
        raise InvalidParams(
            f"{width}x{height} is already at the pixel limit ({max_pixels} pixels); the hires fix"
            " can't make it larger. Try a smaller aspect or leave hires off."
        )
    return best
