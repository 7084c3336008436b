"""Sampler names -> diffusers schedulers."""

from __future__ import annotations

import numpy as np
import pytest

from generator.errors import InvalidParams
from generator.samplers import SAMPLER_NAMES, SAMPLER_SCHEDULES, SCHEDULE_NAMES, schedule_error
from generator.schedulers import QuadratureLMSDiscreteScheduler, make_scheduler

EXPECTED = {
    "DDIM": "DDIMScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LMS": "QuadratureLMSDiscreteScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ SDE Karras": "DPMSolverSDEScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Karras": "DPMSolverMultistepScheduler",
}


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_has_a_scheduler(name: str) -> None:
    s = make_scheduler(name, {"beta_schedule": "linear", "steps_offset": 1})
    assert type(s).__name__ == EXPECTED[name]
    assert s.config.beta_schedule == "scaled_linear"
    assert s.config.beta_start == 0.00085 and s.config.beta_end == 0.012
    assert make_scheduler(name, {"beta_schedule": "linear", "steps_offset": 1}) is s  # cached


def test_ddim_model_card_settings() -> None:
    c = make_scheduler("DDIM").config
    assert (c.clip_sample, c.set_alpha_to_one, c.steps_offset) == (False, False, 1)


def test_karras_flag() -> None:
    assert make_scheduler("DPM++ 2M Karras").config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M").config.use_karras_sigmas is False
    assert make_scheduler("DPM++ 2M").config.algorithm_type == "dpmsolver++"


def test_unknown_sampler() -> None:
    with pytest.raises(InvalidParams, match="Unknown sampler"):
        make_scheduler("PLMS")


def test_lms_quadrature_matches_fine_integration() -> None:
    s = QuadratureLMSDiscreteScheduler()
    s.set_timesteps(10)
    sig = [float(x) for x in s.sigmas]
    order, t = 4, 5
    for current in range(order):
        taus = np.linspace(sig[t], sig[t + 1], 20001)
        vals = np.ones_like(taus)
        for k in range(order):
            if k != current:
                vals *= (taus - sig[t - k]) / (sig[t - current] - sig[t - k])
        expected = float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(taus)))
        assert s.get_lms_coefficient(order, t, current) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_sde_samplers() -> None:
    assert make_scheduler("DPM++ 2M SDE").config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler("DPM++ 2M SDE Karras").config.use_karras_sigmas is True
    assert make_scheduler("DPM++ SDE").order == 2
    assert make_scheduler("DPM++ SDE Karras").config.use_karras_sigmas is True


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_schedule_types(name: str, schedule: str) -> None:
    if schedule not in SAMPLER_SCHEDULES[name]:
        with pytest.raises(InvalidParams, match="schedule"):
            make_scheduler(name, schedule=schedule)
        return
    c = make_scheduler(name, schedule=schedule).config
    karras = schedule == "karras" or (schedule == "automatic" and name.endswith(" Karras"))
    assert bool(c.get("use_karras_sigmas", False)) is karras
    assert bool(c.get("use_exponential_sigmas", False)) is (schedule == "exponential")
    assert c.beta_schedule == "scaled_linear"


def test_schedule_errors_are_clear() -> None:
    assert schedule_error("DPM++ 2M", "karras") is None
    assert "DDIM has no Karras schedule" in (schedule_error("DDIM", "karras") or "")
    assert "always uses the Karras schedule" in (schedule_error("DPM++ 2M Karras", "exponential") or "")
    assert "Unknown schedule type" in (schedule_error("Euler", "sgm uniform") or "")
