"""Request parameters and their validation, shared by the CLI and the bot (no torch here)."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any

from generator.errors import InvalidParams
from generator.samplers import SAMPLER_NAMES

MAX_SEED = 2**32 - 1
MAX_COUNT = 4
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000

#: aspect choices offered to users -> (width, height); all multiples of 64
ASPECTS: dict[str, tuple[int, int]] = {
    "square": (512, 512),
    "portrait": (512, 768),
    "landscape": (768, 512),
    "tall": (448, 832),
    "wide": (832, 448),
}


@dataclass(frozen=True)
class GenerationParams:
    """One txt2img request. Image i of the request uses seed `seed + i`."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    count: int = 1
    sampler: str = "DDIM"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the job row)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """Inverse of `to_dict`; unknown keys are ignored."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def with_seed(self, seed: int) -> GenerationParams:
        """The same request with another seed."""
        return replace(self, seed=seed)

    def single(self, index: int) -> GenerationParams:
        """The request that re-creates image `index` alone."""
        return replace(self, seed=(self.seed + index) % (MAX_SEED + 1), count=1)

    def batch_key(self) -> tuple:
        """Jobs whose keys match can share one batched pipeline call."""
        return (self.width, self.height, self.steps, self.sampler, self.guidance)


def random_seed() -> int:
    """A fresh seed in 0..2^32-1."""
    return secrets.randbelow(MAX_SEED + 1)


def validate(
    params: GenerationParams,
    *,
    max_pixels: int,
    max_steps: int,
    samplers: Collection[str] = SAMPLER_NAMES,
) -> GenerationParams:
    """Check every field; raise `InvalidParams` naming the field and the allowed range.

    `samplers` are the accepted sampler names (the generator adds its few-step sampler in fast mode).
    """
    if not params.prompt.strip():
        raise InvalidParams("The prompt is empty.")
    if len(params.prompt) > MAX_PROMPT_CHARS:
        raise InvalidParams(
            f"The prompt is too long ({len(params.prompt)} characters; at most {MAX_PROMPT_CHARS})."
        )
    if len(params.negative) > MAX_PROMPT_CHARS:
        raise InvalidParams(f"The negative prompt is too long (at most {MAX_PROMPT_CHARS} characters).")
    if not 0 <= params.seed <= MAX_SEED:
        raise InvalidParams(f"Seed must be between 0 and {MAX_SEED}.")
    if not 1 <= params.steps <= max_steps:
        raise InvalidParams(f"Steps must be between 1 and {max_steps}.")
    if not MIN_GUIDANCE <= params.guidance <= MAX_GUIDANCE:
        raise InvalidParams(f"Guidance must be between {MIN_GUIDANCE:g} and {MAX_GUIDANCE:g}.")
    if not 1 <= params.count <= MAX_COUNT:
        raise InvalidParams(f"Count must be between 1 and {MAX_COUNT}.")
    for name, value in (("Width", params.width), ("Height", params.height)):
        if value < 64 or value % 64:
            raise InvalidParams(f"{name} must be a multiple of 64 (got {value}).")
    if params.width * params.height > max_pixels:
        raise InvalidParams(
            f"{params.width}x{params.height} is too large; at most {max_pixels} pixels per image."
        )
    if params.sampler not in samplers:
        raise InvalidParams(f"Unknown sampler {params.sampler!r}; choose one of: {', '.join(samplers)}.")
    return params


def aspect_size(aspect: str, base_resolution: int = 512) -> tuple[int, int]:
    """(width, height) of an aspect choice, scaled from the 512 table to `base_resolution`.

    Sizes stay multiples of 64 (at least 64). Raises InvalidParams for an unknown aspect.
    """
    if aspect not in ASPECTS:
        raise InvalidParams(f"Unknown aspect {aspect!r}; choose one of: {', '.join(ASPECTS)}.")
    width, height = ASPECTS[aspect]
    scale = base_resolution / 512

    def snap(value: int) -> int:
        return max(64, round(value * scale / 64) * 64)

    return snap(width), snap(height)
