"""Sampler names as A1111 users know them (the scheduler mapping lives in `generator.schedulers`)."""

from __future__ import annotations

#: offered in `/pony` and `ponybot generate`; the first is the default (the model card's DDIM)
SAMPLER_NAMES: tuple[str, ...] = (
    "DDIM",
    "Euler a",
    "Euler",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "UniPC",
    "LMS",
)

#: few-step samplers for a fused few-step LoRA (PONY_FAST_LORA); never offered for a plain model
FAST_SAMPLER_NAMES: tuple[str, ...] = ("LCM", "TCD")
