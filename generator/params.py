"""Request parameters and their validation, shared by the CLI and the bot (no torch here)."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any

from generator.errors import InvalidParams
from generator.prompt_syntax import lora_key, parse_prompt
from generator.samplers import SAMPLER_NAMES, schedule_error, schedule_name

MAX_SEED = 2**32 - 1
MAX_COUNT = 4
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000
MAX_CLIP_SKIP = 12

#: the `to_dict()` keys that must be equal for jobs to share one batched pipeline call
#: (`loras` is derived from the prompt's `<lora:...>` tags: `prompt_syntax.lora_key`)
BATCH_KEY_FIELDS: tuple[str, ...] = (
    "width",
    "height",
    "steps",
    "sampler",
    "guidance",
    "clip_skip",
    "schedule",
    "loras",
)

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
    """One txt2img request. Image i of the request uses seed `seed + i`.

    `clip_skip` is A1111's "Clip skip" (1 = the text encoder's last layer, 2 = the penultimate, ...);
    `schedule` is A1111's "Schedule type" in lower case (`samplers.SCHEDULE_NAMES`).
    """

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    count: int = 1
    sampler: str = "DDIM"
    clip_skip: int = 1
    schedule: str = "automatic"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the job row): the fields, plus the derived `loras` key."""
        return {**asdict(self), "loras": self.lora_key()}

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

    def lora_key(self) -> str:
        """The prompt's LoRA set as text ("" for none; "?" when its tags are invalid)."""
        try:
            return lora_key(parse_prompt(self.prompt).loras)
        except InvalidParams:
            return "?"

    def batch_key(self) -> tuple:
        """Jobs whose keys match can share one batched pipeline call (`BATCH_KEY_FIELDS` of `to_dict`)."""
        data = self.to_dict()
        return tuple(data[name] for name in BATCH_KEY_FIELDS)


def random_seed() -> int:
    """A fresh seed in 0..2^32-1."""
    return secrets.randbelow(MAX_SEED + 1)


def validate(
    params: GenerationParams,
    *,
    max_pixels: int,
    max_steps: int,
    samplers: Collection[str] = SAMPLER_NAMES,
    loras: Collection[str] | None = None,
) -> GenerationParams:
    """Check every field; raise `InvalidParams` naming the field and the allowed range.

    `samplers` are the accepted sampler names (the generator adds its few-step sampler in fast mode).
    `loras`, when given, are the available LoRA names (`extra_files.available_loras`): a prompt's
    `<lora:name>` must name one of them. Returns the params with `schedule` normalised ("Karras" ->
    "karras").
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
    if not 1 <= params.clip_skip <= MAX_CLIP_SKIP:
        raise InvalidParams(f"Clip skip must be between 1 and {MAX_CLIP_SKIP}.")
    schedule = schedule_name(params.schedule) or params.schedule
    error = schedule_error(params.sampler, schedule)
    if error is not None:
        raise InvalidParams(error)
    parsed = parse_prompt(params.prompt)  # raises for malformed <lora:...> tags
    if loras is not None:
        from generator.extra_files import check_loras

        check_loras([name for name, _ in parsed.loras], loras)
    return params if schedule == params.schedule else replace(params, schedule=schedule)


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
