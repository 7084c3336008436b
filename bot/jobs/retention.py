"""Image retention: delete result files of finished jobs by age, then by total size (Discord-free).

Only jobs in a terminal state (done/failed/cancelled/dead) are touched, never open ones
(queued/running/generated), never a job that an open upscale/variation job names as its parent
(that job still has to read the image), and never a file that an open job lists. Pruned jobs get
`pruned_at` (migration 0002); U/V buttons on a pruned result re-create the image from its
parameters and seed (bot/runtime/worker.py `_source_image`). `bot.ops.Ops` runs `prune` periodically.

Members' uploads (`uploads/<interaction id>.png`, named by a job's `params.source`, see
bot/discord_ui/member_images.py) are deleted by age: once no open job and no job finished within `max_age_s`
names them (and the file is over an hour old, so an upload whose job is being queued stays).

Both engines run the same SQL (`bot.jobs.store_db`). On SQLite `prune` writes in its own
`BEGIN IMMEDIATE` ... `COMMIT`, so give it a connection that no other task is using for a
transaction at the same time: best a dedicated one (`bot.jobs.db.connect`), not the job queue's.
On PostgreSQL give it the `PgJobQueue` (its pool). There the images also live in the database
(`job_files`, one copy shared by every machine) and each machine keeps its own local folder:

* pruning a job also deletes its `job_files` rows, in the transaction that sets `pruned_at`;
* uploads no open or recent job names lose their `job_files` rows too (after the same hour);
* by size, a machine prunes only jobs it holds files of (its folder is what the limit is about);
* a machine's local copies of jobs that another machine already pruned (`<id>/` folders of jobs
  with `pruned_at` set) are deleted as well (on SQLite these are only files left over from an
  earlier failed delete), so every machine's folder shrinks, not only the pruning one's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bot.jobs.models import OPEN_STATUSES, TERMINAL_STATUSES, sql_literals
from bot.jobs.store_db import Source, StoreDb, Writer, store_db

log = logging.getLogger(__name__)

GB = 10**9


@dataclass
class PruneReport:
    """What one `prune` run did; `total_bytes` is the size of the images folder afterwards."""

    files_deleted: int = 0
    bytes_freed: int = 0
    jobs_pruned: list[int] = field(default_factory=list)
    jobs_by_age: int = 0
    jobs_by_size: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class _Candidate:
    job_id: int
    finished_at: float
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Deleted:
    files: int
    bytes: int
    complete: bool  # False if some file could not be removed (the job is then retried next run)


def retention_limits(retention_days: float, retention_max_gb: float) -> tuple[float, int]:
    """(max_age_s, max_bytes) from the `PONY_RETENTION_DAYS` / `PONY_RETENTION_MAX_GB` settings."""
    return retention_days * 86400.0, int(retention_max_gb * GB)


def _paths(text: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(text or "")
    except (TypeError, ValueError):
        return ()
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str) and item)


def _safe_relative(rel: str) -> Path | None:
    """`rel` as a relative path that stays inside the images folder, or None."""
    path = Path(rel)
    if path.is_absolute() or path.drive or ".." in path.parts or not path.parts:
        return None
    return path


_OPEN = sql_literals(OPEN_STATUSES)
#: no open upscale/variation job names job `j` as its parent
_NO_OPEN_CHILD = f"NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id AND c.status IN ({_OPEN}))"
#: at most this many job ids in one `IN (...)` list of the local sweep
_SWEEP_CHUNK = 500


async def _candidates(db: StoreDb) -> list[_Candidate]:
    """Unpruned terminal jobs with files, oldest finish first; parents of open jobs left out."""
    rows = await db.fetch(
        "SELECT j.id, COALESCE(j.finished_at, j.updated_at) AS ended, j.result_files FROM jobs j"
        f" WHERE j.status IN ({sql_literals(TERMINAL_STATUSES)})"
        f" AND j.pruned_at IS NULL AND j.result_files IS NOT NULL AND {_NO_OPEN_CHILD}"
        " ORDER BY ended, j.id"
    )
    out: list[_Candidate] = []
    for row in rows:
        paths = _paths(row["result_files"])
        if paths:
            out.append(_Candidate(int(row["id"]), float(row["ended"]), paths))
    return out


async def _protected(db: StoreDb) -> set[Path]:
    """Files listed by open jobs: never deleted, whoever else lists them."""
    keep: set[Path] = set()
    for row in await db.fetch(f"SELECT result_files FROM jobs WHERE status IN ({_OPEN})"):
        for rel in _paths(row["result_files"]):
            safe = _safe_relative(rel)
            if safe is not None:
                keep.add(safe)
    return keep


def _delete_job(root: Path, files: Iterable[str], protected: set[Path]) -> _Deleted:
    """Delete one job's listed files (blocking), then its now-empty folders below `root`."""
    count = freed = 0
    complete = True
    folders: set[Path] = set()
    for rel in files:
        safe = _safe_relative(rel)
        if safe is None:
            log.warning("retention: refusing unsafe path %r", rel)
            continue
        if safe in protected:
            continue
        path = root / safe
        folders.add(path.parent)
        try:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                log.warning("retention: %s is a folder, not deleted", path)
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("retention: could not delete %s: %s", path, exc)
            complete = False
            continue
        count += 1
        freed += info.st_size
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _remove_empty_dirs(root, folder)
    return _Deleted(count, freed, complete)


def _remove_empty_dirs(root: Path, folder: Path) -> None:
    """rmdir `folder` and its parents while they are empty, stopping at `root`."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty, already gone, or not ours to remove
            return
        folder = folder.parent


def _tree_size(root: Path) -> int:
    """Bytes of the regular files below `root` (symlinks not followed; missing root = 0)."""
    total = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


async def _has_job_files(writer: Writer) -> bool:
    """Whether the PostgreSQL database has the `job_files` table (migration 0005)."""
    rows = await writer.fetch("SELECT to_regclass('job_files') IS NOT NULL AS present")
    return bool(rows and rows[0]["present"])


async def _mark_pruned(db: StoreDb, pruned: list[_Candidate], now: float) -> None:
    """Set `pruned_at` on the jobs; on PostgreSQL drop their `job_files` rows in the same transaction."""
    if not pruned:
        return
    async with db.write() as writer:
        await writer.many(
            "UPDATE jobs SET pruned_at = :now WHERE id = :id AND pruned_at IS NULL",
            [{"now": now, "id": c.job_id} for c in pruned],
        )
        if db.shares_files and await _has_job_files(writer):
            await writer.many("DELETE FROM job_files WHERE job_id = :id", [{"id": c.job_id} for c in pruned])
            await writer.many(
                "DELETE FROM job_files WHERE name = :name", [{"name": n} for c in pruned for n in c.files]
            )


def _local_job_ids(root: Path) -> list[int]:
    """The job ids that have a folder (`<id>/`) in the images folder."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False))


async def _sweep_pruned(db: StoreDb, root: Path, protected: set[Path]) -> _Deleted:
    """Delete local files of jobs already pruned (by another machine, or an earlier failed run)."""
    ids = await asyncio.to_thread(_local_job_ids, root)
    stale: list[tuple[str, ...]] = []
    for start in range(0, len(ids), _SWEEP_CHUNK):
        chunk = ", ".join(str(i) for i in ids[start : start + _SWEEP_CHUNK])  # ints: safe as literals
        rows = await db.fetch(
            f"SELECT j.id, j.result_files FROM jobs j WHERE j.id IN ({chunk})"
            f" AND j.pruned_at IS NOT NULL AND {_NO_OPEN_CHILD}"
        )
        stale.extend(_paths(row["result_files"]) for row in rows)
    if not stale:
        return _Deleted(0, 0, True)
    results = await asyncio.to_thread(lambda: [_delete_job(root, files, protected) for files in stale])
    return _Deleted(sum(r.files for r in results), sum(r.bytes for r in results), True)


UPLOADS_DIR = "uploads"
UPLOAD_GRACE_S = 3600.0  #: an upload younger than this may belong to a job being queued right now


async def _prune_uploads(db: StoreDb, root: Path, cutoff: float, now: float) -> _Deleted:
    """Delete uploads that no open or recent job names (see the module docstring)."""
    source = db.dialect.text_at("params", "source")
    rows = await db.fetch(
        f"SELECT DISTINCT {source} AS source FROM jobs WHERE {source} IS NOT NULL"
        f" AND (status IN ({_OPEN}) OR coalesce(finished_at, updated_at) > :cutoff)",
        {"cutoff": cutoff},
    )
    keep = {Path(row["source"]).name for row in rows if isinstance(row["source"], str)}
    if db.shares_files:
        async with db.write() as writer:
            if await _has_job_files(writer):
                await writer.fetch(
                    f"DELETE FROM job_files WHERE name LIKE '{UPLOADS_DIR}/%' AND created_at <= :grace"
                    " AND NOT (name = ANY(CAST(:keep AS text[])))",
                    {
                        "grace": now - UPLOAD_GRACE_S,
                        "keep": [f"{UPLOADS_DIR}/{name}" for name in sorted(keep)],
                    },
                )
    folder = root / UPLOADS_DIR
    if not folder.is_dir():
        return _Deleted(0, 0, True)

    def delete() -> _Deleted:
        count = freed = 0
        for path in folder.glob("*.png"):
            try:
                info = path.lstat()
                if (
                    path.name in keep
                    or not stat.S_ISREG(info.st_mode)
                    or now - info.st_mtime < UPLOAD_GRACE_S
                ):
                    continue
                path.unlink()
            except OSError:
                continue
            count += 1
            freed += info.st_size
        return _Deleted(count, freed, True)

    return await asyncio.to_thread(delete)


async def prune(
    conn: Source, images_dir: Path, *, max_age_s: float, max_bytes: int, now: float
) -> PruneReport:
    """Delete finished jobs' images older than `max_age_s`, then oldest-first until the images
    folder holds at most `max_bytes`; set `pruned_at = now` on each pruned job.

    `conn`: a dedicated SQLite connection, or the `PgJobQueue` (see the module docstring).
    If only protected files remain, the folder may stay above `max_bytes`; `total_bytes` says so.
    """
    db = store_db(conn)
    root = Path(images_dir)
    report = PruneReport()
    candidates = await _candidates(db)
    protected = await _protected(db)

    def record(candidate: _Candidate, result: _Deleted, pruned: list[_Candidate]) -> None:
        report.files_deleted += result.files
        report.bytes_freed += result.bytes
        if result.complete:
            pruned.append(candidate)

    cutoff = now - max_age_s
    old = [c for c in candidates if c.finished_at <= cutoff]
    by_age: list[_Candidate] = []
    if old:
        results = await asyncio.to_thread(lambda: [_delete_job(root, c.files, protected) for c in old])
        for candidate, result in zip(old, results, strict=True):
            record(candidate, result, by_age)
    await _mark_pruned(db, by_age, now)

    swept = await _sweep_pruned(db, root, protected)
    report.files_deleted += swept.files
    report.bytes_freed += swept.bytes

    total = await asyncio.to_thread(_tree_size, root)
    by_size: list[_Candidate] = []
    for candidate in candidates:
        if total <= max_bytes:
            break
        if candidate.finished_at <= cutoff:
            continue  # handled above (kept only if a file could not be deleted)
        result = await asyncio.to_thread(_delete_job, root, candidate.files, protected)
        if db.shares_files and result.files == 0:
            continue  # not on this machine: freeing nothing here, the shared copy stays (age prunes it)
        record(candidate, result, by_size)
        total -= result.bytes
    await _mark_pruned(db, by_size, now)

    uploads = await _prune_uploads(db, root, cutoff, now)
    report.files_deleted += uploads.files
    report.bytes_freed += uploads.bytes
    report.total_bytes = total - uploads.bytes
    report.jobs_pruned = [c.job_id for c in by_age + by_size]
    report.jobs_by_age, report.jobs_by_size = len(by_age), len(by_size)
    report.total_bytes = max(report.total_bytes, 0)
    if report.jobs_pruned:
        log.info(
            "retention: pruned %d jobs (%d by age, %d by size), %d files, %d bytes; %d bytes kept",
            len(report.jobs_pruned),
            report.jobs_by_age,
            report.jobs_by_size,
            report.files_deleted,
            report.bytes_freed,
            report.total_bytes,
        )
    return report
