"""What a job carries in its params beyond GenerationParams (issue #14), and its ETA cost.

`source` (an upload's path in the images folder, `bot.member_images`) and `strength` on
`variation` jobs without a parent; `hires` ({"scale", "strength"}) on `txt2img` jobs (the hires
fix: never batched with plain txt2img jobs, see `JobQueue.claim_batch`). Re-runs (Reroll, Edit)
carry them over. No Discord here.
"""

from __future__ import annotations

import math
from typing import Any

from bot.jobs.models import Job
from generator.hires import DEFAULT_HIRES_SCALE, fit_hires_scale, hires_size
from generator.params import GenerationParams


def job_extras(job: Job) -> dict[str, Any]:
    """The params keys of issue #14 (`source`, `strength`, `hires`) that re-runs carry over."""
    return {k: job.params[k] for k in ("source", "strength", "hires") if job.params.get(k) is not None}


def hires_of(params: dict[str, Any]) -> dict[str, float] | None:
    """The job's hires fix settings ({"scale", "strength"}) or None."""
    hires = params.get("hires")
    return hires if isinstance(hires, dict) and hires.get("scale") else None


def job_cost(params: GenerationParams, extra: dict[str, Any]) -> int:
    """Steps x images for the ETA, counting the hires pass at its pixel ratio."""
    cost = params.steps * params.count
    hires = hires_of(extra)
    if hires:
        cost += math.ceil(params.steps * params.count * hires["strength"] * hires["scale"] ** 2)
    elif extra.get("strength") is not None:
        cost = max(params.count, math.ceil(cost * float(extra["strength"])))
    return cost


def hires_extra(
    params: GenerationParams, scale: float | None, strength: float, max_pixels: int
) -> tuple[dict[str, Any], str | None]:
    """({"hires": ...}, note): the scale capped to the pixel limit (InvalidParams if nothing fits).

    Without a `scale` the default (2x) is capped silently; a scale the member chose and that had to
    be lowered gets a note.
    """
    wanted = DEFAULT_HIRES_SCALE if scale is None else float(scale)
    used = fit_hires_scale(params.width, params.height, wanted, max_pixels)
    width, height = hires_size(params.width, params.height, used)
    note = None
    if used < wanted and scale is not None:
        note = f"Hires scale lowered to {used:g}x ({width}x{height}) to stay under the pixel limit."
    return {"hires": {"scale": used, "strength": strength}}, note
