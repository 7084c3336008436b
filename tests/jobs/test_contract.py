"""bot.jobs.contract: both queue backends offer the whole contract."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bot.jobs.contract import JobQueueContract
from bot.jobs.models import QueueLimits
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.queue import JobQueue

CONTRACT_METHODS = sorted(
    name for name, member in vars(JobQueueContract).items() if inspect.iscoroutinefunction(member)
)


async def test_the_sqlite_queue_satisfies_the_contract(tmp_path: Path) -> None:
    q = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits())
    try:
        assert isinstance(q, JobQueueContract)
    finally:
        await q.close()


@pytest.mark.postgres
async def test_the_postgres_queue_satisfies_the_contract(pg_url: str) -> None:
    q = await PgJobQueue.open(pg_url, QueueLimits())
    try:
        assert isinstance(q, JobQueueContract)
    finally:
        await q.close()


@pytest.mark.parametrize("name", CONTRACT_METHODS)
def test_both_backends_take_the_same_arguments(name: str) -> None:
    contract = inspect.signature(getattr(JobQueueContract, name))
    for backend in (JobQueue, PgJobQueue):
        method = getattr(backend, name)
        assert inspect.iscoroutinefunction(method), f"{backend.__name__}.{name} is async"
        assert list(inspect.signature(method).parameters.values()) == list(contract.parameters.values()), (
            f"{backend.__name__}.{name}"
        )
