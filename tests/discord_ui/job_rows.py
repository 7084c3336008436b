"""Job rows as the queue returns them, for the tests of what a job's messages show."""

from __future__ import annotations

import dataclasses
from typing import Any

from bot.jobs.models import Job, JobKind, JobStatus

ALICE = 111


def job_row(*, params: dict[str, Any] | None = None, **fields: Any) -> Job:
    """A txt2img job of ALICE's ("a pony", seed 42, 20 steps, 512x768); `fields` override columns."""
    job = Job(
        id=7,
        kind=JobKind.TXT2IMG,
        parent_id=None,
        image_index=None,
        guild_id=1,
        channel_id=2,
        user_id=ALICE,
        interaction_id=None,
        params={"prompt": "a pony", "seed": 42, "steps": 20, "width": 512, "height": 768, **(params or {})},
        cost=1,
        status=JobStatus.QUEUED,
        attempts=1,
        cancel_requested=False,
        lease_owner=None,
        lease_expires_at=None,
        not_before=0.0,
        created_at=1000.0,
        started_at=None,
        generated_at=None,
        finished_at=None,
        updated_at=1000.0,
        reply_to_message_id=None,
        status_message_id=None,
        result_message_id=None,
        result_files=[],
        seeds=[],
        gen_seconds=None,
        error=None,
    )
    return dataclasses.replace(job, **fields)
