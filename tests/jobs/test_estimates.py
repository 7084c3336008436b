"""bot.jobs.estimates: the ETA arithmetic behind `JobQueue.position` / `eta_seconds` and `QueueFull`."""

from __future__ import annotations

import pytest

from bot.jobs.estimates import (
    DEFAULT_SEC_PER_UNIT,
    MIN_RETRY_S,
    QueuePlace,
    RunningWork,
    queued_eta,
    remaining_seconds,
    sec_per_unit,
    slot_free_seconds,
    speed_sample,
)

NOW = 1_000.0


def test_sec_per_unit_falls_back_to_the_default_until_measured() -> None:
    assert sec_per_unit(None) == DEFAULT_SEC_PER_UNIT
    assert sec_per_unit(0.0) == DEFAULT_SEC_PER_UNIT
    assert sec_per_unit(0.25) == 0.25


def test_speed_sample_ignores_jobs_without_cost_or_time() -> None:
    assert speed_sample(5.0, 10) == 0.5
    assert speed_sample(5.0, 0) is None
    assert speed_sample(0.0, 10) is None


def test_remaining_seconds_of_a_running_job() -> None:
    assert remaining_seconds(RunningWork(cost=10, started_at=NOW - 0.4), NOW, 0.1) == pytest.approx(0.6)
    assert remaining_seconds(RunningWork(cost=10, started_at=NOW - 5), NOW, 0.1) == 0.0  # over its estimate
    # reserved, not started yet: all of it
    assert remaining_seconds(RunningWork(cost=10, started_at=None), NOW, 0.1) == pytest.approx(1.0)


def test_position_is_one_past_the_jobs_ahead() -> None:
    assert QueuePlace(ahead=0, ahead_cost=0, own_cost=5).position == 1
    assert QueuePlace(ahead=3, ahead_cost=30, own_cost=5).position == 4


def test_queued_eta_adds_the_work_ahead_its_own_and_what_running_jobs_have_left() -> None:
    place = QueuePlace(ahead=2, ahead_cost=20, own_cost=30)
    running = [RunningWork(cost=10, started_at=NOW - 0.5), RunningWork(cost=10, started_at=NOW - 9)]
    # (20 + 30) * 0.1 + (1.0 - 0.5) + 0
    assert queued_eta(place, running, NOW, 0.1) == pytest.approx(5.5)
    assert queued_eta(place, [], NOW, 0.1) == pytest.approx(5.0)


def test_slot_free_seconds() -> None:
    running = [RunningWork(cost=100, started_at=NOW - 2), RunningWork(cost=40, started_at=NOW)]
    assert slot_free_seconds(running, 50, NOW, 0.1) == pytest.approx(4.0)  # the soonest running job
    assert slot_free_seconds([], 50, NOW, 0.1) == pytest.approx(5.0)  # nothing running: the next job
    assert slot_free_seconds([], None, NOW, 0.1) == MIN_RETRY_S  # nothing at all: never below 1 s
    assert slot_free_seconds([RunningWork(cost=1, started_at=NOW - 9)], None, NOW, 0.1) == MIN_RETRY_S


def test_live_workers_share_the_work_ahead_but_not_the_jobs_own() -> None:
    place = QueuePlace(ahead=4, ahead_cost=40, own_cost=10)
    running = [RunningWork(cost=20, started_at=NOW)]
    # (40 * 0.1 + 2.0) / 2 + 10 * 0.1
    assert queued_eta(place, running, NOW, 0.1, workers=2) == pytest.approx(4.0)
    assert queued_eta(place, running, NOW, 0.1, workers=1) == pytest.approx(7.0)
    assert queued_eta(place, running, NOW, 0.1, workers=0) == queued_eta(place, running, NOW, 0.1)


def test_slot_free_seconds_over_several_workers() -> None:
    assert slot_free_seconds([], 50, NOW, 0.1, workers=2) == pytest.approx(2.5)
    assert slot_free_seconds([], 50, NOW, 0.1, workers=10) == MIN_RETRY_S
    running = [RunningWork(cost=100, started_at=NOW - 2)]
    assert slot_free_seconds(running, 50, NOW, 0.1, workers=2) == pytest.approx(8.0), "soonest running job"
