"""Image retention: delete result files of finished jobs by age, then by total size (Discord-free).

Only jobs in a terminal state (done/failed/cancelled/dead) are touched, never open ones
(queued/running/generated), never a job that an open upscale/variation job names as its parent
(that job still has to read the image), and never a file that an open job lists. Pruned jobs get
`pruned_at` (migration 0002); U/V buttons on a pruned result re-create the image from its
parameters and seed (bot/runtime/worker.py `_source_image`). `bot.ops.Ops` runs `prune` periodically.

Members' uploads (`uploads/<interaction id>.png`, named by a job's `params.source`, see
bot/discord_ui/member_images.py) are deleted by age: once no open job and no job finished within `max_age_s`
names them (and the file is over an hour old, so an upload whose job is being queued stays).

`prune` writes in its own `BEGIN IMMEDIATE` ... `COMMIT`, so give it a connection that no other
task is using for a transaction at the same time: best a dedicated one (`bot.db.connect`), not the
job queue's.
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

import aiosqlite

from bot.jobs.models import OPEN_STATUSES, TERMINAL_STATUSES

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


def _placeholders(items: Iterable[object]) -> str:
    return ", ".join("?" for _ in items)


async def _candidates(conn: aiosqlite.Connection) -> list[_Candidate]:
    """Unpruned terminal jobs with files, oldest finish first; parents of open jobs left out."""
    sql = (
        "SELECT j.id, COALESCE(j.finished_at, j.updated_at) AS ended, j.result_files FROM jobs j"
        f" WHERE j.status IN ({_placeholders(TERMINAL_STATUSES)})"
        " AND j.pruned_at IS NULL AND j.result_files IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id"
        f" AND c.status IN ({_placeholders(OPEN_STATUSES)}))"
        " ORDER BY ended, j.id"
    )
    out: list[_Candidate] = []
    async with conn.execute(sql, (*TERMINAL_STATUSES, *OPEN_STATUSES)) as cur:
        async for job_id, ended, files in cur:
            paths = _paths(files)
            if paths:
                out.append(_Candidate(job_id, float(ended), paths))
    return out


async def _protected(conn: aiosqlite.Connection) -> set[Path]:
    """Files listed by open jobs: never deleted, whoever else lists them."""
    keep: set[Path] = set()
    sql = f"SELECT result_files FROM jobs WHERE status IN ({_placeholders(OPEN_STATUSES)})"
    async with conn.execute(sql, OPEN_STATUSES) as cur:
        async for (files,) in cur:
            for rel in _paths(files):
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


async def _mark_pruned(conn: aiosqlite.Connection, job_ids: list[int], now: float) -> None:
    if not job_ids:
        return
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.executemany(
            "UPDATE jobs SET pruned_at = ? WHERE id = ? AND pruned_at IS NULL", [(now, i) for i in job_ids]
        )
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise


UPLOADS_DIR = "uploads"
UPLOAD_GRACE_S = 3600.0  #: an upload younger than this may belong to a job being queued right now


async def _prune_uploads(conn: aiosqlite.Connection, root: Path, cutoff: float, now: float) -> _Deleted:
    """Delete uploads that no open or recent job names (see the module docstring)."""
    folder = root / UPLOADS_DIR
    if not folder.is_dir():
        return _Deleted(0, 0, True)
    sql = (
        "SELECT DISTINCT json_extract(params, '$.source') FROM jobs"
        " WHERE json_extract(params, '$.source') IS NOT NULL"
        f" AND (status IN ({_placeholders(OPEN_STATUSES)}) OR coalesce(finished_at, updated_at) > ?)"
    )
    keep: set[str] = set()
    async with conn.execute(sql, (*OPEN_STATUSES, cutoff)) as cur:
        async for (rel,) in cur:
            if isinstance(rel, str):
                keep.add(Path(rel).name)

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
    conn: aiosqlite.Connection, images_dir: Path, *, max_age_s: float, max_bytes: int, now: float
) -> PruneReport:
    """Delete finished jobs' images older than `max_age_s`, then oldest-first until the images
    folder holds at most `max_bytes`; set `pruned_at = now` on each pruned job.

    If only protected files remain, the folder may stay above `max_bytes`; `total_bytes` says so.
    """
    root = Path(images_dir)
    report = PruneReport()
    candidates = await _candidates(conn)
    protected = await _protected(conn)

    def record(candidate: _Candidate, result: _Deleted, pruned: list[int]) -> None:
        report.files_deleted += result.files
        report.bytes_freed += result.bytes
        if result.complete:
            pruned.append(candidate.job_id)

    cutoff = now - max_age_s
    old = [c for c in candidates if c.finished_at <= cutoff]
    by_age: list[int] = []
    if old:
        results = await asyncio.to_thread(lambda: [_delete_job(root, c.files, protected) for c in old])
        for candidate, result in zip(old, results, strict=True):
            record(candidate, result, by_age)
    await _mark_pruned(conn, by_age, now)

    total = await asyncio.to_thread(_tree_size, root)
    by_size: list[int] = []
    for candidate in candidates:
        if total <= max_bytes:
            break
        if candidate.finished_at <= cutoff:
            continue  # handled above (kept only if a file could not be deleted)
        result = await asyncio.to_thread(_delete_job, root, candidate.files, protected)
        record(candidate, result, by_size)
        total -= result.bytes
    await _mark_pruned(conn, by_size, now)

    uploads = await _prune_uploads(conn, root, cutoff, now)
    report.files_deleted += uploads.files
    report.bytes_freed += uploads.bytes
    report.total_bytes = total - uploads.bytes
    report.jobs_pruned = by_age + by_size
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
