"""Sampler names (`generator.samplers.SAMPLER_NAMES`) and schedule types -> diffusers schedulers.

Schedule types map to the schedulers' `use_karras_sigmas` / `use_exponential_sigmas` (where
`generator.samplers.SAMPLER_SCHEDULES` allows them); "automatic" keeps the sampler's own sigmas.
`DPM++ SDE` is `DPMSolverSDEScheduler` (its Brownian-tree noise needs torchsde); its noise is seeded
per image by the generator (`noise_sampler_seed`), so it is deterministic and batch invariant.
`DPM++ 2M SDE` is `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")` (midpoint
solver, as k-diffusion's `sample_dpmpp_2m_sde`), its noise drawn from the per-image generators.

Every scheduler keeps the model's training noise schedule (SD v1.x: scaled_linear betas
0.00085..0.012); DDIM gets the model card's settings exactly. Instances are cached per
(name, base config): a pipeline call resets a scheduler's state in `set_timesteps`, and the
generator runs one call at a time, so sharing one instance per sampler is safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

# the real classes from their own modules: `diffusers.LMSDiscreteScheduler` is a stub raising
# ImportError without scipy, and for a type checker the names of diffusers' lazy __init__ are the
# placeholder classes it imports when torch is missing (not SchedulerMixin subclasses)
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_tcd import TCDScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from generator.errors import InvalidParams
from generator.samplers import FAST_SAMPLER_NAMES, SAMPLER_NAMES, schedule_error

#: the SD v1.x training schedule, shared by every sampler
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

#: DDIM as on the pony-diffusion model card
DDIM_MODEL_CARD: dict[str, Any] = {
    **NOISE_SCHEDULE,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


class QuadratureLMSDiscreteScheduler(LMSDiscreteScheduler):
    """diffusers' LMS with its coefficient integral done by Gauss-Legendre quadrature.

    Upstream calls `scipy.integrate.quad` on a Lagrange basis polynomial of degree < 4; an
    8-point Gauss-Legendre rule integrates that exactly, so scipy is not needed.
    """

    _NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial `current_order`."""
        sigmas = [float(s) for s in self.sigmas]
        lo, hi = sigmas[t], sigmas[t + 1]
        taus = (hi - lo) / 2 * self._NODES + (hi + lo) / 2
        values = np.ones_like(taus)
        for k in range(order):
            if k == current_order:
                continue
            values *= (taus - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
        return float((hi - lo) / 2 * np.sum(self._WEIGHTS * values))


#: name -> (scheduler class, overrides on top of the model's config)
_TABLE: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DDIM": (DDIMScheduler, DDIM_MODEL_CARD),
    "Euler a": (EulerAncestralDiscreteScheduler, NOISE_SCHEDULE),
    "Euler": (EulerDiscreteScheduler, NOISE_SCHEDULE),
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        {**NOISE_SCHEDULE, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {**NOISE_SCHEDULE, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "UniPC": (UniPCMultistepScheduler, NOISE_SCHEDULE),
    "LMS": (QuadratureLMSDiscreteScheduler, NOISE_SCHEDULE),
    "DPM++ SDE": (DPMSolverSDEScheduler, {**NOISE_SCHEDULE, "use_karras_sigmas": False}),
    "DPM++ SDE Karras": (DPMSolverSDEScheduler, {**NOISE_SCHEDULE, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": (
        DPMSolverMultistepScheduler,
        {
            **NOISE_SCHEDULE,
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "use_karras_sigmas": False,
        },
    ),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {**NOISE_SCHEDULE, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # few-step samplers of a fused LCM-LoRA / TCD / Hyper-SD LoRA (fast mode only)
    "LCM": (LCMScheduler, NOISE_SCHEDULE),
    "TCD": (TCDScheduler, NOISE_SCHEDULE),
}
assert set(_TABLE) == set(SAMPLER_NAMES) | set(FAST_SAMPLER_NAMES), "every sampler name needs a scheduler"

#: extra pipeline-call arguments per sampler (TCD's gamma, passed as `eta`, as its authors use it)
SAMPLER_CALL_KWARGS: dict[str, dict[str, Any]] = {"TCD": {"eta": 0.3}}

#: schedule type -> sigma flags (only for samplers whose scheduler has them)
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SCHEDULE_FLAGS: dict[str, dict[str, bool]] = {
    "karras": {"use_karras_sigmas": True, "use_exponential_sigmas": False},
    "exponential": {"use_karras_sigmas": False, "use_exponential_sigmas": True},
}

_CACHE: dict[tuple[str, str, str], SchedulerMixin] = {}


def _config(name: str, base: dict[str, Any], schedule: str) -> dict[str, Any]:
    _, overrides = _TABLE[name]
    # timestep_spacing/steps_offset of the model are kept (SD v1: "leading", 1), except for DDIM
    config = {k: v for k, v in base.items() if k not in _SIGMA_FLAGS}
    config.update(overrides)
    if schedule in _SCHEDULE_FLAGS:
        config.update(_SCHEDULE_FLAGS[schedule])
    return config


def make_scheduler(
    name: str, base_config: Mapping[str, Any] | None = None, schedule: str = "automatic"
) -> SchedulerMixin:
    """The scheduler for sampler `name` and `schedule`, built from the model's scheduler config (cached).

    `base_config` is the loaded pipeline's `scheduler.config` (or None for defaults); the
    sampler's own settings override it. Raises `InvalidParams` for an unknown name or a schedule
    the sampler does not support.
    """
    if name not in _TABLE:
        raise InvalidParams(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}.")
    error = schedule_error(name, schedule)
    if error is not None:
        raise InvalidParams(error)
    base = {k: v for k, v in dict(base_config or {}).items() if not k.startswith("_")}
    key = (name, schedule, json.dumps(base, sort_keys=True, default=str))
    scheduler = _CACHE.get(key)
    if scheduler is None:
        cls, _ = _TABLE[name]
        scheduler = _from_config(cls, _config(name, base, schedule))
        _CACHE[key] = scheduler
    return scheduler


def _from_config(cls: type[SchedulerMixin], config: dict[str, Any]) -> SchedulerMixin:
    """`cls.from_config(config)`, typed: the method comes from ConfigMixin, every scheduler's other base."""
    assert issubclass(cls, ConfigMixin), f"{cls.__name__} is not a diffusers config class"
    scheduler = cls.from_config(config)
    # diffusers types the result `Self | tuple[Self, dict]`; the tuple comes only with return_unused_kwargs
    assert not isinstance(scheduler, tuple)
    return scheduler
