"""Plain configuration for the generator (no Discord, no pydantic-settings dependency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GeneratorConfig:
    """What the generator needs to load a model and bound a request."""

    model: str = "AstraliteHeart/pony-diffusion"
    revision: str | None = "fp16"
    variant: str | None = None
    device: str = "auto"
    upscaler: Path | None = None
    compile: bool = True
    max_pixels: int = 768 * 768
    max_steps: int = 50
    variation_strength: float = 0.6
    hires_strength: float = 0.35
