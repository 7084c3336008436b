"""Sampler and schedule names as A1111 users know them (no torch; `generator.schedulers` maps them).

A1111 1.9+ splits a sampler from its "Schedule type"; older infotexts name both in one
("DPM++ 2M Karras"). Both forms are accepted: the `* Karras` names are the plain sampler with the
Karras schedule, and they refuse another schedule.
"""

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
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
)

#: few-step samplers for a fused few-step LoRA (PONY_FAST_LORA); never offered for a plain model
FAST_SAMPLER_NAMES: tuple[str, ...] = ("LCM", "TCD")

#: `GenerationParams.schedule` values -> A1111's "Schedule type" label. "automatic": the
#: sampler's own noise schedule (the `* Karras` names: Karras)
SCHEDULES: dict[str, str] = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential"}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)

_ALL = frozenset(SCHEDULE_NAMES)
_KARRAS = frozenset({"automatic", "karras"})
_AUTO = frozenset({"automatic"})
#: the schedules each sampler supports (its diffusers scheduler has Karras/exponential sigmas)
SAMPLER_SCHEDULES: dict[str, frozenset[str]] = {
    "DDIM": _AUTO,
    "Euler a": _AUTO,
    "Euler": _ALL,
    "DPM++ 2M": _ALL,
    "DPM++ 2M Karras": _KARRAS,
    "UniPC": _ALL,
    "LMS": _ALL,
    "DPM++ SDE": _ALL,
    "DPM++ SDE Karras": _KARRAS,
    "DPM++ 2M SDE": _ALL,
    "DPM++ 2M SDE Karras": _KARRAS,
    "LCM": _AUTO,
    "TCD": _AUTO,
}
assert set(SAMPLER_SCHEDULES) == set(SAMPLER_NAMES) | set(FAST_SAMPLER_NAMES)


def schedule_name(value: str) -> str | None:
    """The `GenerationParams.schedule` value of an A1111 label or value ("Karras" -> "karras")."""
    key = value.strip().lower()
    return key if key in SCHEDULES else None


def schedule_error(sampler: str, schedule: str) -> str | None:
    """Why `sampler` cannot run with `schedule` (a user-facing line), or None when it can."""
    if schedule not in SCHEDULES:
        choices = ", ".join(SCHEDULES.values())
        return f"Unknown schedule type {schedule!r}; choose one of: {choices}."
    allowed = SAMPLER_SCHEDULES.get(sampler, _AUTO)
    if schedule in allowed:
        return None
    label = SCHEDULES[schedule]
    if sampler.endswith(" Karras"):
        return f"{sampler} always uses the Karras schedule; for {label}, choose {sampler[:-7]}."
    others = ", ".join(n for n, s in SAMPLER_SCHEDULES.items() if schedule in s and n in SAMPLER_NAMES)
    return f"{sampler} has no {label} schedule; choose Automatic, or one of: {others}."
