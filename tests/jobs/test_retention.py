"""bot/jobs/retention.py: prune by age, by size, and never the files of open jobs."""

from __future__ import annotations

import json
from pathlib import Path

import aiosqlite
import pytest

from bot.jobs.db import MIGRATIONS_DIR
from bot.jobs.retention import prune, retention_limits

MIGRATIONS = MIGRATIONS_DIR
NOW = 1_750_000_000.0
DAY = 86400.0
KB = 1000


@pytest.fixture(params=["autocommit", "legacy"])
async def conn(request: pytest.FixtureRequest, tmp_path: Path):
    """The bot's connection mode (autocommit, Row) and sqlite3's default (implicit transactions)."""
    if request.param == "autocommit":
        db = await aiosqlite.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
        db.row_factory = aiosqlite.Row
    else:
        db = await aiosqlite.connect(tmp_path / "jobs.sqlite3")
    for script in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        await db.executescript(script.read_text())
    await db.commit()
    yield db
    await db.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


async def job_with_files(
    conn: aiosqlite.Connection,
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
    cur = await conn.execute(
        "INSERT INTO jobs (kind, parent_id, image_index, channel_id, user_id, params, status,"
        " created_at, finished_at, updated_at) VALUES (?, ?, ?, 1, 2, '{}', ?, ?, ?, ?)",
        (kind, parent_id, 0 if parent_id else None, status, created, finished, finished or created),
    )
    job_id = cur.lastrowid
    rels = [f"{job_id}/ponybot-{job_id}-{n}.png" for n in range(len(sizes))]
    paths = []
    for rel, size in zip(rels, sizes, strict=True):
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        paths.append(path)
    if listed:
        await conn.execute("UPDATE jobs SET result_files = ? WHERE id = ?", (json.dumps(rels), job_id))
    await conn.commit()
    return job_id, paths


async def pruned_at(conn: aiosqlite.Connection) -> dict[int, float | None]:
    async with conn.execute("SELECT id, pruned_at FROM jobs") as cur:
        return {row[0]: row[1] async for row in cur}


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def test_prune_by_age(conn: aiosqlite.Connection, images: Path) -> None:
    old_done, old_done_files = await job_with_files(
        conn, images, status="done", finished_ago_days=40, sizes=[3 * KB, 4 * KB]
    )
    old_dead, old_dead_files = await job_with_files(
        conn, images, status="dead", finished_ago_days=31, sizes=[1 * KB]
    )
    new_done, new_done_files = await job_with_files(
        conn, images, status="done", finished_ago_days=5, sizes=[2 * KB]
    )
    old_generated, gen_files = await job_with_files(
        conn, images, status="generated", finished_ago_days=None, sizes=[5 * KB]
    )
    await conn.execute("UPDATE jobs SET created_at = ? WHERE id = ?", (NOW - 50 * DAY, old_generated))
    await conn.commit()

    report = await prune(conn, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW)

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
    marks = await pruned_at(conn)
    assert marks[old_done] == marks[old_dead] == NOW
    assert marks[new_done] is None and marks[old_generated] is None
    assert report.total_bytes == tree_size(images) == 7 * KB

    again = await prune(conn, images, max_age_s=30 * DAY, max_bytes=10**12, now=NOW + 1)
    assert again.jobs_pruned == [] and again.files_deleted == 0


async def test_prune_by_size_oldest_first(conn: aiosqlite.Connection, images: Path) -> None:
    a, a_files = await job_with_files(
        conn, images, status="done", finished_ago_days=4, sizes=[3 * KB, 3 * KB]
    )
    b, b_files = await job_with_files(conn, images, status="failed", finished_ago_days=3, sizes=[2 * KB])
    c, c_files = await job_with_files(conn, images, status="cancelled", finished_ago_days=2, sizes=[4 * KB])
    d, d_files = await job_with_files(conn, images, status="done", finished_ago_days=1, sizes=[5 * KB])
    # total 17 KB; limit 10 KB: drop a (6) -> 11, then b (2) -> 9 <= 10; c and d stay
    report = await prune(conn, images, max_age_s=30 * DAY, max_bytes=10 * KB, now=NOW)

    assert report.jobs_pruned == [a, b]
    assert report.jobs_by_size == 2 and report.jobs_by_age == 0
    assert report.files_deleted == 3 and report.bytes_freed == 8 * KB
    assert report.total_bytes == tree_size(images) == 9 * KB
    assert not any(p.exists() for p in a_files + b_files)
    assert all(p.exists() for p in c_files + d_files)
    marks = await pruned_at(conn)
    assert marks[a] == marks[b] == NOW and marks[c] is None and marks[d] is None


async def test_prune_counts_unlisted_files_in_size(conn: aiosqlite.Connection, images: Path) -> None:
    a, _ = await job_with_files(conn, images, status="done", finished_ago_days=2, sizes=[3 * KB])
    b, _ = await job_with_files(conn, images, status="done", finished_ago_days=1, sizes=[3 * KB])
    (images / "stray.bin").write_bytes(b"\0" * (5 * KB))  # not any job's file: counted, never deleted
    report = await prune(conn, images, max_age_s=30 * DAY, max_bytes=6 * KB, now=NOW)
    assert report.jobs_pruned == [a, b]
    assert (images / "stray.bin").exists()
    assert report.total_bytes == 5 * KB


async def test_never_prunes_open_jobs(conn: aiosqlite.Connection, images: Path) -> None:
    opened = {}
    for status in ("queued", "running", "generated"):
        opened[status] = await job_with_files(
            conn, images, status=status, finished_ago_days=None, sizes=[2 * KB]
        )
        await conn.execute(
            "UPDATE jobs SET created_at = 0, updated_at = 0 WHERE id = ?", (opened[status][0],)
        )
    # a running job whose files are on disk but not yet listed
    partial, partial_files = await job_with_files(
        conn, images, status="running", finished_ago_days=None, sizes=[1 * KB], listed=False
    )
    # a finished parent that an open upscale still has to read, and an old finished job
    parent, parent_files = await job_with_files(
        conn, images, status="done", finished_ago_days=90, sizes=[3 * KB]
    )
    await job_with_files(
        conn, images, status="queued", finished_ago_days=None, sizes=[], kind="upscale", parent_id=parent
    )
    old, old_files = await job_with_files(conn, images, status="done", finished_ago_days=90, sizes=[3 * KB])
    await conn.commit()

    report = await prune(conn, images, max_age_s=1.0, max_bytes=0, now=NOW)

    assert report.jobs_pruned == [old]
    assert not any(p.exists() for p in old_files)
    for _job_id, files in opened.values():
        assert all(p.exists() for p in files)
    assert all(p.exists() for p in partial_files + parent_files)
    marks = await pruned_at(conn)
    assert [job for job, mark in marks.items() if mark is not None] == [old]
    assert marks[partial] is None and marks[parent] is None
    assert report.total_bytes == tree_size(images) == 3 * 2 * KB + 1 * KB + 3 * KB


async def test_shared_file_of_open_job_is_kept(conn: aiosqlite.Connection, images: Path) -> None:
    done, done_files = await job_with_files(conn, images, status="done", finished_ago_days=60, sizes=[1 * KB])
    rel = done_files[0].relative_to(images).as_posix()
    cur = await conn.execute(
        "INSERT INTO jobs (kind, channel_id, user_id, params, status, created_at, updated_at, result_files)"
        " VALUES ('txt2img', 1, 2, '{}', 'generated', ?, ?, ?)",
        (NOW, NOW, json.dumps([rel])),
    )
    await conn.commit()
    report = await prune(conn, images, max_age_s=DAY, max_bytes=0, now=NOW)
    assert report.jobs_pruned == [done]
    assert done_files[0].exists()
    assert (await pruned_at(conn))[cur.lastrowid] is None


async def test_unsafe_and_missing_paths(conn: aiosqlite.Connection, images: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    evil_paths = ["../outside.png", str(outside), "missing/ponybot-x-0.png"]
    cur = await conn.execute(
        "INSERT INTO jobs (kind, channel_id, user_id, params, status, created_at, finished_at, updated_at,"
        " result_files) VALUES ('txt2img', 1, 2, '{}', 'done', 0, 0, 0, ?)",
        (json.dumps(evil_paths),),
    )
    await conn.commit()
    report = await prune(conn, images, max_age_s=DAY, max_bytes=0, now=NOW)
    assert outside.exists()
    assert report.jobs_pruned == [cur.lastrowid]
    assert report.files_deleted == 0 and report.bytes_freed == 0


async def test_missing_images_dir(conn: aiosqlite.Connection, tmp_path: Path) -> None:
    await conn.execute(
        "INSERT INTO jobs (kind, channel_id, user_id, params, status, created_at, finished_at, updated_at,"
        " result_files) VALUES ('txt2img', 1, 2, '{}', 'done', 0, 0, 0, '[\"1/a.png\"]')"
    )
    await conn.commit()
    report = await prune(conn, tmp_path / "nope", max_age_s=DAY, max_bytes=0, now=NOW)
    assert report.jobs_pruned == [1] and report.total_bytes == 0


def test_retention_limits() -> None:
    assert retention_limits(30, 20) == (30 * DAY, 20 * 10**9)
