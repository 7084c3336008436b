"""Result and upload files under the images folder, as the queue shares them between machines.

Names are paths relative to the images folder (`12/0.png`, `uploads/<key>.png`). A name that
would leave the folder (absolute, `..`) is never read or written. Writes are atomic (a temporary
file in the same folder, then a rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath


def local_path(images_dir: Path, name: str) -> Path | None:
    """Where `name` lives under `images_dir`; None when the name would leave the folder."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        return None
    return images_dir.joinpath(*rel.parts)


def missing_locally(images_dir: Path, names: Iterable[str]) -> list[str]:
    """The names (in order, once each) with no file under `images_dir`."""
    missing: list[str] = []
    for name in dict.fromkeys(names):
        path = local_path(images_dir, name)
        if path is None or not path.is_file():
            missing.append(name)
    return missing


def read_local(images_dir: Path, names: Iterable[str]) -> tuple[dict[str, bytes], list[str]]:
    """The bytes of each name present under `images_dir`, and the names that are not."""
    found: dict[str, bytes] = {}
    missing: list[str] = []
    for name in dict.fromkeys(names):
        path = local_path(images_dir, name)
        try:
            if path is None:
                raise FileNotFoundError(name)
            found[name] = path.read_bytes()
        except FileNotFoundError:
            missing.append(name)
    return found, missing


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (creates the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_all(images_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write each name's bytes under `images_dir` (atomic per file); names leaving it are skipped."""
    for name, data in files.items():
        path = local_path(images_dir, name)
        if path is not None:
            write_atomic(path, data)
