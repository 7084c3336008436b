"""bot.jobs.models: the status groupings, their SQL form, the batch key and the row decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.jobs.models import (
    NOTICE_STATUSES,
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobKind,
    JobStatus,
    QueueLimits,
    crashed_message,
    sql_literals,
)
from bot.jobs.queue import JobQueue
from generator.params import BATCH_KEY_FIELDS, GenerationParams


def row(**overrides: Any) -> dict[str, Any]:
    """A `SELECT * FROM jobs` row of a queued txt2img job, as a mapping."""
    base: dict[str, Any] = {
        "id": 7,
        "kind": "txt2img",
        "parent_id": None,
        "image_index": None,
        "guild_id": 1,
        "channel_id": 2,
        "user_id": 3,
        "interaction_id": None,
        "params": json.dumps(GenerationParams(prompt="a pony", count=2).to_dict()),
        "cost": 50,
        "status": "queued",
        "attempts": 0,
        "cancel_requested": 0,
        "lease_owner": None,
        "lease_expires_at": None,
        "not_before": 0.0,
        "created_at": 10.0,
        "started_at": None,
        "generated_at": None,
        "finished_at": None,
        "updated_at": 10.0,
        "reply_to_message_id": None,
        "status_message_id": None,
        "result_message_id": None,
        "result_files": None,
        "seeds": None,
        "gen_seconds": None,
        "error": None,
        "pruned_at": None,
        "notified_at": None,
        "solo": 0,
    }
    base.update(overrides)
    return base


def test_open_and_terminal_statuses_split_every_status_once() -> None:
    assert set(OPEN_STATUSES) | set(TERMINAL_STATUSES) == set(JobStatus)
    assert not set(OPEN_STATUSES) & set(TERMINAL_STATUSES)
    assert len(OPEN_STATUSES) + len(TERMINAL_STATUSES) == len(JobStatus)


def test_groupings_keep_their_documented_order() -> None:
    assert OPEN_STATUSES == (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.GENERATED)
    # the order /pony stats and the metrics report outcomes in
    assert [s.value for s in TERMINAL_STATUSES] == ["done", "failed", "dead", "cancelled"]


def test_notice_statuses_are_the_terminal_ones_without_a_result() -> None:
    assert set(NOTICE_STATUSES) == set(TERMINAL_STATUSES) - {JobStatus.DONE}


def test_sql_literals_quote_each_status_in_order() -> None:
    assert sql_literals(OPEN_STATUSES) == "'queued', 'running', 'generated'"
    assert sql_literals([JobStatus.DONE]) == "'done'"


async def test_notice_literals_match_the_partial_index_of_the_migration(tmp_path: Path) -> None:
    """The owed-notice sweep can use jobs_unnotified only if its IN list implies the index's WHERE."""
    q = await JobQueue.open(tmp_path / "plan.sqlite3", QueueLimits())
    try:
        # INDEXED BY fails ("no query solution") when the partial index cannot serve the query
        plan = await q.connection.execute_fetchall(
            "EXPLAIN QUERY PLAN SELECT * FROM jobs INDEXED BY jobs_unnotified WHERE notified_at IS NULL"
            f" AND status IN ({sql_literals(NOTICE_STATUSES)}) ORDER BY id"
        )
    finally:
        await q.close()
    assert any("jobs_unnotified" in r[3] for r in plan), [r[3] for r in plan]


def test_from_row_decodes_json_columns_and_flags() -> None:
    job = Job.from_row(
        row(
            status="generated",
            result_files='["1/a.png","1/b.png"]',
            seeds="[5,6]",
            cancel_requested=1,
            solo=1,
        )
    )
    assert job.kind is JobKind.TXT2IMG and job.status is JobStatus.GENERATED
    assert job.result_files == ["1/a.png", "1/b.png"] and job.seeds == [5, 6]
    assert job.cancel_requested is True and job.solo is True
    assert job.params["prompt"] == "a pony"


def test_from_row_of_a_database_before_migration_0004() -> None:
    old = row()
    for column in ("pruned_at", "notified_at", "solo"):
        del old[column]
    job = Job.from_row(old)
    assert job.pruned_at is None and job.notified_at is None and job.solo is False


def test_batch_key_is_the_generators_own() -> None:
    """One definition: a job's key is `GenerationParams.batch_key()` of the params it stores."""
    params = GenerationParams(prompt="a pony <lora:wings:0.8>", steps=30, sampler="Euler", clip_skip=2)
    job = Job.from_row(row(params=json.dumps(params.to_dict())))
    assert job.batch_key == params.batch_key()
    assert len(job.batch_key) == len(BATCH_KEY_FIELDS)
    other = Job.from_row(row(params=json.dumps({**params.to_dict(), "steps": 31})))
    assert other.batch_key != job.batch_key


def test_batchable_only_plain_txt2img() -> None:
    assert Job.from_row(row()).batchable
    assert not Job.from_row(row(solo=1)).batchable
    assert not Job.from_row(row(kind="upscale")).batchable
    hires = {**GenerationParams(prompt="p").to_dict(), "hires": {"scale": 2.0, "strength": 0.5}}
    assert not Job.from_row(row(params=json.dumps(hires))).batchable


def test_image_count_defaults_to_one() -> None:
    assert Job.from_row(row()).image_count == 2
    assert Job.from_row(row(params=json.dumps({"prompt": "p"}))).image_count == 1


def test_crashed_message() -> None:
    assert crashed_message(1) == "This job crashed the generator once and was dropped."
    assert crashed_message(3) == "This job crashed the generator 3 times and was dropped."
