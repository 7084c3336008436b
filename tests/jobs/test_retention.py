"""bot/jobs/retention.py: prune by age, by size, and never the files of open jobs.

Every test taking `db` runs on SQLite (a dedicated autocommit connection, as `Ops` gives it) and
on PostgreSQL (the `PgJobQueue`, whose `job_files` rows are pruned with the jobs)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from engine_queue import open_database, open_queue

from bot.jobs.db import MIGRATIONS_DIR
from bot.jobs.retention import UPLOAD_GRACE_S, prune, retention_limits
from bot.jobs.store_db import Source, store_db

MIGRATIONS = MIGRATIONS_DIR
NOW = 1_750_000_000.0
DAY = 86400.0
KB = 1000

Db = Source


@pytest.fixture
async def db(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    """What `Ops` hands `prune`: its own SQLite connection, or the PostgreSQL queue."""
    async with open_database(backend, request, tmp_path) as database:
        yield database


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir(exist_ok=True)
    return path


async def sql(db: Db, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One statement (`:name` parameters) on either engine, committed."""
    result = await store_db(db).fetch(query, params)
    if isinstance(db, aiosqlite.Connection) and db.in_transaction:
        await db.commit()  # sqlite3's legacy mode opened a transaction for the write
    return result


async def insert_job(db: Db, **columns: Any) -> int:
    cols: dict[str, Any] = {"kind": "txt2img", "channel_id": 1, "user_id": 2, "params": "{}", **columns}
    names = ", ".join(cols)
    marks = ", ".join(f":{name}" for name in cols)
    (row,) = await sql(db, f"INSERT INTO jobs ({names}) VALUES ({marks}) RETURNING id", cols)
    return int(row["id"])


async def job_with_files(
    conn: Db,
    images: Path,
    *,
    status: str,
    finished_ago_days: float | None,
    sizes: list[int],
    parent_id: int | None = None,
    kind: str = "txt2img",
    listed: bool = True,
) -> tuple[int, list[Path]]:
    """Insert a job and write its files as `<id>/ponybot-<id>-<n>.png` of the given sizes."""
    finished = None if finished_ago_days is None else NOW - finished_ago_days * DAY
    created = (finished or NOW) - 60
    job_id = await insert_job(
        conn,
        kind=kind,
        parent_id=parent_id,
        image_index=0 if parent_id else None,
        status=status,
        created_at=created,
        finished_at=finished,
        updated_at=finished or created,
    )
    rels = [f"{job_id}/ponybot-{job_id}-{n}.png" for n in range(len(sizes))]
    paths = []
    for rel, size in zip(rels, sizes, strict=True):
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        paths.append(path)
    if listed:
        await sql(
            conn, "UPDATE jobs SET result_files = :f WHERE id = :id", {"f": json.dumps(rels), "id": job_id}
        )
    return job_id, paths


async def pruned_at(conn: Db) -> dict[int, float | None]:
    return {
        row["id"]: row["pruned_at"] for row in await sql(conn, "SELECT id, pruned_at FROM jobs ORDER BY id")
    }


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def test_prune_by_age(db: Db, images: Path) -> None:
    old_done, old_done_files = await job_with_files(
        db, images, status="done", finished_ago_days=40, sizes=[3 * KB, 4 * KB]
    )
    old_dead, old_dead_files = await job_with_files(
        db, images, status="dead", finished_ago_days=31, sizes=[1 * KB]
    )
    new_done, new_done_files = await job_with_files(
        db, images, status="done", finished_ago_days=5, sizes=[2 * KB]
    )
    old_generated, gen_files = await job_with_files(
        db, images, status="generated", finished_ago_days=None, sizes=[5 * KB]
    )
    await sql(
        db, "UPDATE jobs SET created_at = :t WHERE id = :id", {"t": NOW - 50 * DAY, "id": old_generated}
    )

    report = await prune(db, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)

    assert sorted(report.jobs_pruned) == sorted([old_done, old_dead])
    assert report.jobs_by_age == 2 and report.jobs_by_size == 0
    assert report.files_deleted == 3
    assert report.bytes_freed == 8 * KB
    for path in old_done_files + old_dead_files:
        assert not path.exists()
    assert (
        not (images / str(old_done)).exists() and not (images / str(old_dead)).exists()
    )  # empty folders gone
    assert all(p.exists() for p in new_done_files + gen_files)
    assert images.exists()
    marks = await pruned_at(db)
    assert marks[old_done] == marks[old_dead] == NOW
    assert marks[new_done] is None and marks[old_generated] is None
    assert report.total_bytes == tree_size(images) == 7 * KB

    again = await prune(db, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW + 1)
    assert again.jobs_pruned == [] and again.files_deleted == 0


async def test_prune_by_size_oldest_first(db: Db, images: Path) -> None:
    a, a_files = await job_with_files(db, images, status="done", finished_ago_days=4, sizes=[3 * KB, 3 * KB])
    b, b_files = await job_with_files(db, images, status="failed", finished_ago_days=3, sizes=[2 * KB])
    c, c_files = await job_with_files(db, images, status="cancelled", finished_ago_days=2, sizes=[4 * KB])
    d, d_files = await job_with_files(db, images, status="done", finished_ago_days=1, sizes=[5 * KB])
    # total 17 KB; limit 10 KB: drop a (6) -> 11, then b (2) -> 9 <= 10; c and d stay
    report = await prune(db, images, max_age_s=30 * DAY, max_bytes=10 * KB, now=NOW)

    assert report.jobs_pruned == [a, b]
    assert report.jobs_by_size == 2 and report.jobs_by_age == 0
    assert report.files_deleted == 3 and report.bytes_freed == 8 * KB
    assert report.total_bytes == tree_size(images) == 9 * KB
    assert not any(p.exists() for p in a_files + b_files)
    assert all(p.exists() for p in c_files + d_files)
    marks = await pruned_at(db)
    assert marks[a] == marks[b] == NOW and marks[c] is None and marks[d] is None


async def test_prune_counts_unlisted_files_in_size(db: Db, images: Path) -> None:
    a, _ = await job_with_files(db, images, status="done", finished_ago_days=2, sizes=[3 * KB])
    b, _ = await job_with_files(db, images, status="done", finished_ago_days=1, sizes=[3 * KB])
    (images / "stray.bin").write_bytes(b"\0" * (5 * KB))  # not any job's file: counted, never deleted
    report = await prune(db, images, max_age_s=30 * DAY, max_bytes=6 * KB, now=NOW)
    assert report.jobs_pruned == [a, b]
    assert (images / "stray.bin").exists()
    assert report.total_bytes == 5 * KB


async def test_never_prunes_open_jobs(db: Db, images: Path) -> None:
    opened = {}
    for status in ("queued", "running", "generated"):
        opened[status] = await job_with_files(
            db, images, status=status, finished_ago_days=None, sizes=[2 * KB]
        )
        await sql(
            db, "UPDATE jobs SET created_at = 0, updated_at = 0 WHERE id = :id", {"id": opened[status][0]}
        )
    # a running job whose files are on disk but not yet listed
    partial, partial_files = await job_with_files(
        db, images, status="running", finished_ago_days=None, sizes=[1 * KB], listed=False
    )
    # a finished parent that an open upscale still has to read, and an old finished job
    parent, parent_files = await job_with_files(
        db, images, status="done", finished_ago_days=90, sizes=[3 * KB]
    )
    await job_with_files(
        db, images, status="queued", finished_ago_days=None, sizes=[], kind="upscale", parent_id=parent
    )
    old, old_files = await job_with_files(db, images, status="done", finished_ago_days=90, sizes=[3 * KB])

    report = await prune(db, images, max_age_s=1.0, max_bytes=0, now=NOW)

    assert report.jobs_pruned == [old]
    assert not any(p.exists() for p in old_files)
    for _job_id, files in opened.values():
        assert all(p.exists() for p in files)
    assert all(p.exists() for p in partial_files + parent_files)
    marks = await pruned_at(db)
    assert [job for job, mark in marks.items() if mark is not None] == [old]
    assert marks[partial] is None and marks[parent] is None
    assert report.total_bytes == tree_size(images) == 3 * 2 * KB + 1 * KB + 3 * KB


async def test_shared_file_of_open_job_is_kept(db: Db, images: Path) -> None:
    done, done_files = await job_with_files(db, images, status="done", finished_ago_days=60, sizes=[1 * KB])
    rel = done_files[0].relative_to(images).as_posix()
    sharing = await insert_job(
        db, status="generated", created_at=NOW, updated_at=NOW, result_files=json.dumps([rel])
    )
    report = await prune(db, images, max_age_s=DAY, max_bytes=0, now=NOW)
    assert report.jobs_pruned == [done]
    assert done_files[0].exists()
    assert (await pruned_at(db))[sharing] is None


async def test_unsafe_and_missing_paths(db: Db, images: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    evil_paths = ["../outside.png", str(outside), "missing/ponybot-x-0.png"]
    evil = await insert_job(
        db,
        status="done",
        created_at=0.0,
        finished_at=0.0,
        updated_at=0.0,
        result_files=json.dumps(evil_paths),
    )
    report = await prune(db, images, max_age_s=DAY, max_bytes=0, now=NOW)
    assert outside.exists()
    assert report.jobs_pruned == [evil]
    assert report.files_deleted == 0 and report.bytes_freed == 0


async def test_missing_images_dir(db: Db, tmp_path: Path) -> None:
    job = await insert_job(
        db, status="done", created_at=0.0, finished_at=0.0, updated_at=0.0, result_files='["1/a.png"]'
    )
    report = await prune(db, tmp_path / "nope", max_age_s=DAY, max_bytes=0, now=NOW)
    assert report.jobs_pruned == [job] and report.total_bytes == 0


def test_retention_limits() -> None:
    assert retention_limits(30, 20) == (30 * DAY, 20 * 10**9)


async def test_legacy_connection_mode_prunes(tmp_path: Path, images: Path) -> None:
    """sqlite3's default (implicit transactions) works too, e.g. a connection a test or script made."""
    conn = await aiosqlite.connect(tmp_path / "legacy.sqlite3")
    try:
        for script in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            await conn.executescript(script.read_text())
        await conn.commit()
        old, old_files = await job_with_files(conn, images, status="done", finished_ago_days=40, sizes=[KB])
        new, new_files = await job_with_files(conn, images, status="done", finished_ago_days=1, sizes=[KB])
        report = await prune(conn, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)
        assert report.jobs_pruned == [old] and not old_files[0].exists() and new_files[0].exists()
        assert await pruned_at(conn) == {old: NOW, new: None}
        assert not conn.in_transaction
    finally:
        await conn.close()


async def test_local_copies_of_jobs_pruned_elsewhere_are_deleted(db: Db, images: Path) -> None:
    """Another machine pruned the job (pruned_at set): this machine's copy goes too, unless an open
    job still reads it (an upscale of it queued)."""
    gone, gone_files = await job_with_files(db, images, status="done", finished_ago_days=40, sizes=[2 * KB])
    kept, kept_files = await job_with_files(db, images, status="done", finished_ago_days=40, sizes=[KB])
    for job in (gone, kept):
        await sql(db, "UPDATE jobs SET pruned_at = :t WHERE id = :id", {"t": NOW - DAY, "id": job})
    await job_with_files(
        db, images, status="queued", finished_ago_days=None, sizes=[], kind="upscale", parent_id=kept
    )
    report = await prune(db, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)
    assert report.jobs_pruned == [] and report.files_deleted == 1 and report.bytes_freed == 2 * KB
    assert not gone_files[0].exists() and not (images / str(gone)).exists()
    assert kept_files[0].exists()
    assert (await pruned_at(db))[gone] == NOW - DAY  # the first prune's time stays


@pytest.mark.postgres
async def test_pruning_drops_the_shared_copies_in_job_files(
    request: pytest.FixtureRequest, tmp_path: Path, images: Path
) -> None:
    async with open_queue("postgres", request, tmp_path) as q:
        old, old_files = await job_with_files(q, images, status="done", finished_ago_days=40, sizes=[KB])
        new, new_files = await job_with_files(q, images, status="done", finished_ago_days=1, sizes=[KB])
        elsewhere = await insert_job(  # drawn on another machine: only its shared copy is here
            q,
            status="done",
            created_at=NOW - 41 * DAY,
            finished_at=NOW - 40 * DAY,
            updated_at=NOW - 40 * DAY,
            result_files=json.dumps(["900/ponybot-900-0.png"]),
        )
        await q.share_files([p.relative_to(images).as_posix() for p in old_files], job_id=old)
        await q.share_files([p.relative_to(images).as_posix() for p in new_files], job_id=new)
        await sql(
            q,
            "INSERT INTO job_files (name, job_id, data, created_at) VALUES (:n, :j, :d, :t)",
            {"n": "900/ponybot-900-0.png", "j": elsewhere, "d": b"png", "t": NOW - 40 * DAY},
        )
        report = await prune(q, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)
        assert sorted(report.jobs_pruned) == sorted([old, elsewhere])
        stored = await sql(q, "SELECT name, job_id FROM job_files ORDER BY name")
        assert stored == [{"name": new_files[0].relative_to(images).as_posix(), "job_id": new}]
        assert await q.ensure_files([old_files[0].relative_to(images).as_posix()]) == [
            old_files[0].relative_to(images).as_posix()
        ], "a pruned image is gone from every machine"


@pytest.mark.postgres
async def test_by_size_prunes_only_jobs_this_machine_holds(
    request: pytest.FixtureRequest, tmp_path: Path, images: Path
) -> None:
    """Over the size limit, a machine frees its own folder; jobs it holds no file of stay unpruned."""
    async with open_queue("postgres", request, tmp_path) as q:
        remote = await insert_job(
            q,
            status="done",
            created_at=NOW - 3 * DAY,
            finished_at=NOW - 3 * DAY,
            updated_at=NOW - 3 * DAY,
            result_files=json.dumps(["800/ponybot-800-0.png"]),
        )
        local, local_files = await job_with_files(
            q, images, status="done", finished_ago_days=2, sizes=[4 * KB]
        )
        report = await prune(q, images, max_age_s=30 * DAY, max_bytes=KB, now=NOW)
        assert report.jobs_pruned == [local] and not local_files[0].exists()
        assert (await pruned_at(q))[remote] is None


@pytest.mark.postgres
async def test_unused_uploads_leave_job_files(
    request: pytest.FixtureRequest, tmp_path: Path, images: Path
) -> None:
    """An upload no open or recent job names loses its shared copy (after the grace hour)."""
    async with open_queue("postgres", request, tmp_path) as q:
        uploads = images / "uploads"
        uploads.mkdir()
        for name in ("used", "stale", "fresh"):
            (uploads / f"{name}.png").write_bytes(b"png")
        old = NOW - 2 * UPLOAD_GRACE_S
        os.utime(uploads / "used.png", (old, old))
        os.utime(uploads / "stale.png", (old, old))
        await q.share_files(["uploads/used.png", "uploads/stale.png", "uploads/fresh.png"])
        await sql(q, "UPDATE job_files SET created_at = :t WHERE name <> 'uploads/fresh.png'", {"t": old})
        await sql(q, "UPDATE job_files SET created_at = :t WHERE name = 'uploads/fresh.png'", {"t": NOW})
        await insert_job(
            q,
            status="queued",
            created_at=NOW,
            updated_at=NOW,
            params=json.dumps({"source": "uploads/used.png"}),
        )
        await prune(q, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)
        names = [row["name"] for row in await sql(q, "SELECT name FROM job_files ORDER BY name")]
        assert names == ["uploads/fresh.png", "uploads/used.png"]
        assert sorted(p.name for p in uploads.iterdir()) == ["fresh.png", "used.png"]
