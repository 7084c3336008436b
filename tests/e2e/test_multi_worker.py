"""Several machines drain one PostgreSQL queue: a `ponybot run --no-worker` gateway and `ponybot
worker` processes (three for the 60-job run, fewer where a scenario needs fewer; real child
processes, each with its own data folder, as on separate machines) against the loopback Discord
and a throwaway PostgreSQL server (PONY_DATABASE_URL).

Jobs are queued the way members queue them: /pony interactions to the gateway process. The tests
kill -9 workers mid-job and mid-delivery, cut a worker's database connections
(pg_terminate_backend) and cancel a job running on a worker, and check what members see: every job
ends with exactly one result message, nothing is posted twice, and a cancel stops the generation.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import is_result, job_messages
from fake_discord import FakeDiscord, FakeUser
from processes import Cluster, pid_of

pytestmark = pytest.mark.postgres

#: small, fast jobs; room for 60 open jobs of 5 members; a long lease, so that only the liveness of
#: a worker (not its lease running out) can explain a job of a killed worker running again quickly
CLUSTER_ENV = {
    "PONY_DEFAULT_COUNT": "1",
    "PONY_DEFAULT_STEPS": "2",
    "PONY_MAX_STEPS": "150",
    "PONY_MAX_OPEN_JOBS_PER_USER": "20",
    "PONY_MAX_QUEUE": "100",
    "PONY_LEASE_S": "30",
    "PONY_SHUTDOWN_GRACE_S": "2",
}
#: a job long enough (150 steps) that a kill, a cut connection or a cancel lands mid-generation
LONG_STEPS = 150


@pytest.fixture
async def start_cluster(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path, pg_url: str
) -> AsyncIterator[Callable[..., Any]]:
    """`await start_cluster(workers=3, **env)`: the workers, then the gateway, on the test's own
    database. (Fewer workers load their models faster on a 2-core machine.)"""
    clusters: list[Cluster] = []

    async def start(workers: int = 3, **env: Any) -> Cluster:
        cluster = Cluster(discord_server, pg_url, tiny_model, tmp_path, **{**CLUSTER_ENV, **env})
        clusters.append(cluster)
        await cluster.start(workers=workers)
        return cluster

    yield start
    for cluster in clusters:
        await cluster.stop()
        await cluster.kill_all()


async def queue_job(fake: FakeDiscord, user: FakeUser, prompt: str, **options: Any) -> int:
    """A member runs /pony in the test channel; returns the id of the job it queued."""
    interaction = await fake.slash("pony", {"prompt": prompt, **options}, user=user)
    answer = await interaction.wait_followup(timeout=30)
    found = re.match(r"Queued as job #(\d+)", str(answer.content))
    assert found, f"/pony answered {answer.content!r}"
    return int(found.group(1))


def assert_one_result(fake: FakeDiscord, job_id: int) -> None:
    """Exactly one message for the job in the channel, and it is the result (PNG attached)."""
    messages = job_messages(fake, job_id)
    assert len(messages) == 1 and is_result(messages[0]), (job_id, [m.embeds for m in messages])


def assert_workers_stayed_off_the_gateway(cluster: Cluster) -> None:
    """Before the gateway started, the logged-in workers had opened no gateway socket and
    touched no slash command; in the end only the gateway process connected."""
    assert cluster.before_gateway == (0, 0), "a worker opened a gateway or synced commands"
    assert cluster.fake.gateway_connections == 1 and cluster.fake.identify_count == 1
    assert len(cluster.fake.requests_matching("PUT", r"/commands")) <= 1, "commands synced more than once"


async def wait_status(cluster: Cluster, job_id: int, status: str, timeout: float) -> Any:
    """Poll until the job has `status`; its row."""

    async def check() -> Any:
        row = await cluster.job(job_id)
        return row if row["status"] == status else None

    return await cluster.wait(check, timeout, f"job #{job_id} {status}")


async def stop_cleanly(cluster: Cluster) -> None:
    """SIGTERM every process still running: each exits 0."""
    codes = await cluster.stop()
    assert all(code == 0 for code in codes.values()), (codes, cluster.logs())


async def test_sixty_jobs_on_three_workers_survive_a_kill_9(start_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await start_cluster()
    fake = cluster.fake
    members = [fake.alice, fake.bob, fake.mod, fake.admin, fake.owner]
    long_job = await queue_job(fake, fake.alice, "the long one", steps=LONG_STEPS)
    await wait_status(cluster, long_job, "running", 60)

    async def begun() -> bool:  # reserved jobs are "running" too; the attempt counts once begun
        return (await cluster.job(long_job))["started_at"] is not None

    await cluster.wait(begun, 30, f"job #{long_job} begun")
    owner = (await cluster.job(long_job))["lease_owner"]
    victim = cluster.worker_with_pid(pid_of(owner))
    victim.kill9()  # mid-generation: 150 steps take seconds here
    killed_at = time.monotonic()

    async def rerun() -> float | None:
        row = await cluster.job(long_job)
        elsewhere = row["status"] == "running" and row["lease_owner"] not in (None, owner)
        return time.monotonic() - killed_at if elsewhere or row["status"] in ("generated", "done") else None

    rerun_task = asyncio.ensure_future(cluster.wait(rerun, 30, f"job #{long_job} running again"))
    ids = [long_job]
    try:
        for start in range(1, 60, 10):  # 59 more, from 5 members, 10 interactions at a time
            batch = [
                queue_job(fake, members[n % len(members)], f"pony {n}")
                for n in range(start, min(start + 10, 60))
            ]
            ids.extend(await asyncio.gather(*batch))
    finally:
        if not rerun_task.done():
            await asyncio.wait({rerun_task}, timeout=30)
    assert len(set(ids)) == 60
    again_after = rerun_task.result()
    assert again_after <= 5.0, f"the killed worker's job ran again only {again_after:.1f} s after the kill"

    async def all_done() -> bool:
        statuses = await cluster.statuses()
        return all(statuses.get(job_id) == "done" for job_id in ids)

    await cluster.wait(all_done, 120, "all 60 jobs done")
    for job_id in ids:
        assert_one_result(fake, job_id)
    killed = await cluster.job(long_job)
    assert killed["attempts"] == 2 and killed["result_message_id"] == job_messages(fake, long_job)[0].id
    assert set((await cluster.statuses()).values()) == {"done"}
    for proc in [cluster.gateway, *cluster.workers]:
        if proc is not None and proc is not victim:
            assert not proc.errors(), f"{proc.name} logged errors:\n" + "\n".join(proc.errors())
    assert_workers_stayed_off_the_gateway(cluster)
    await stop_cleanly(cluster)


async def test_kill_9_between_generated_and_done_delivers_once(start_cluster: Callable[..., Any]) -> None:
    # two workers: one to kill, one to deliver; sweeps for owed deliveries every second
    cluster: Cluster = await start_cluster(workers=2, PONY_LEASE_S="4")
    fake = cluster.fake
    fake.hold_uploads(fake.channel_id)  # the result upload hangs: the job sits in "generated"
    job_id = await queue_job(fake, fake.bob, "stuck in the mail")
    await cluster.wait_sync(lambda: fake.held_uploads, 60, "the result upload")
    row = await wait_status(cluster, job_id, "generated", 10)
    holder = row["delivery_owner"]
    assert holder, "the delivering process holds the delivery"
    cluster.worker_with_pid(pid_of(holder)).kill9()
    await asyncio.sleep(0.3)  # the kill closed its connection to Discord
    fake.release_uploads(fake.channel_id)
    await cluster.wait_sync(lambda: fake.dropped_uploads, 10, "the killed worker's upload dropped")
    # the dead process's delivery hold (60 s) ends with its connections: no waiting it out
    done = await wait_status(cluster, job_id, "done", 20)
    assert_one_result(fake, job_id)
    assert done["result_message_id"] == job_messages(fake, job_id)[0].id
    assert done["delivery_owner"] != holder, "another process delivered it"
    uploads = [r for r in fake.requests if r.files and r.status == 200]
    assert len(uploads) == 1, "the result was uploaded once"
    assert_workers_stayed_off_the_gateway(cluster)
    await stop_cleanly(cluster)


async def test_cut_database_connections_refuse_the_late_write(start_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await start_cluster(workers=2)
    fake = cluster.fake
    job_id = await queue_job(fake, fake.mod, "cut off", steps=LONG_STEPS)
    running = await wait_status(cluster, job_id, "running", 60)
    owner = running["lease_owner"]
    victim = cluster.worker_with_pid(pid_of(owner))
    cut = await cluster.fetch(
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = $1", owner
    )
    assert cut and all(r["ok"] for r in cut)

    async def elsewhere() -> bool:
        row = await cluster.job(job_id)
        return row["status"] in ("generated", "done") or (
            row["status"] == "running" and row["lease_owner"] != owner
        )

    await cluster.wait(elsewhere, 10, f"job #{job_id} taken back from the cut-off worker")
    done = await wait_status(cluster, job_id, "done", 60)
    assert_one_result(fake, job_id)
    # the cut-off worker stops its generation at once and hands the job back uncounted when it
    # still can (1), or another worker took it first (2); its own late writes are refused either
    # way (tests/jobs/test_pg_liveness.py shows the refused mark_generated)
    assert done["attempts"] in (1, 2)
    uploads = [r for r in fake.requests if r.files and r.status == 200]
    assert len(uploads) == 1, "nothing was posted twice"

    async def registered_again() -> bool:
        live = await cluster.live_workers()
        return owner not in live and any(pid_of(w) == victim.pid for w in live)

    await cluster.wait(registered_again, 15, "the cut-off worker registered under a fresh id")
    assert victim.running, "the worker process survived its lost connections"
    assert "is no longer registered; registering a fresh id" in victim.log()
    await stop_cleanly(cluster)


async def test_cancel_stops_a_job_running_on_a_worker_within_a_step_and_a_second(
    start_cluster: Callable[..., Any],
) -> None:
    cluster: Cluster = await start_cluster(workers=1, PONY_BASE_RESOLUTION="128")
    fake = cluster.fake
    probe = await queue_job(fake, fake.admin, "how long is a step", steps=20)
    timed = await wait_status(cluster, probe, "done", 60)
    step_s = float(timed["gen_seconds"]) / 20

    job_id = await queue_job(fake, fake.alice, "a long one", steps=LONG_STEPS)
    await wait_status(cluster, job_id, "running", 60)
    status = job_messages(fake, job_id)[0]
    cancel = next(cid for label, cid in status.buttons() if label == "Cancel" and cid is not None)
    click = await fake.click(status.id, cancel)
    assert (await click.wait_followup()).content == f"Stopping job #{job_id}…"
    asked = time.monotonic()
    cancelled = await wait_status(cluster, job_id, "cancelled", 10)
    took = time.monotonic() - asked
    assert took <= step_s + 1.0, f"the cancel took {took:.2f} s (a step is {step_s:.3f} s)"
    assert cancelled["result_files"] in (None, "[]")
    notice = await cluster.wait_sync(
        lambda: fake.messages[status.id].embeds[0]["title"] == "Cancelled" and fake.messages[status.id],
        10,
        "the cancel notice",
    )
    assert not notice.attachments
    assert_workers_stayed_off_the_gateway(cluster)
    await stop_cleanly(cluster)
