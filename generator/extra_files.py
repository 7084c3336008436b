"""LoRA and textual-inversion files on disk: names, look-up, A1111 hashes. No torch.

A LoRA is a `.safetensors` file in `GeneratorConfig.lora_dir` named by its stem (`add_detail` for
`add_detail.safetensors`); an embedding is a `.safetensors`, `.pt` or `.bin` file in
`embeddings_dir`, likewise. Sub-folders are not searched. The bot may call these functions
itself (autocomplete, validation) with the same folders.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable
from pathlib import Path

from generator.errors import InvalidParams

LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_LISTED = 25  #: names listed in an "Unknown LoRA" message
_HASHES: dict[tuple[str, str, int, int], str] = {}


def _stems(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if folder is None:
        return {}
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def lora_files(folder: Path | None) -> dict[str, Path]:
    """LoRA name -> file, for the `.safetensors` files of `folder` (none if it is None or missing)."""
    return _stems(folder, LORA_SUFFIXES)


def embedding_files(folder: Path | None) -> dict[str, Path]:
    """Embedding name -> file (`.safetensors` preferred over `.pt`/`.bin` of the same stem)."""
    found = _stems(folder, EMBEDDING_SUFFIXES)
    for name, path in list(found.items()):
        preferred = path.with_suffix(".safetensors")
        if path.suffix.lower() != ".safetensors" and preferred.is_file():
            found[name] = preferred
    return found


def available_loras(folder: Path | None) -> list[str]:
    """The LoRA names of `folder`, sorted case-insensitively (for autocomplete)."""
    return sorted(lora_files(folder), key=lambda n: (n.lower(), n))


def available_embeddings(folder: Path | None) -> list[str]:
    """The embedding names of `folder`, sorted case-insensitively."""
    return sorted(embedding_files(folder), key=lambda n: (n.lower(), n))


def resolve_lora(name: str, available: Collection[str]) -> str:
    """The available name that `name` means: itself, else its only case-insensitive match.

    Raises `InvalidParams`: `Unknown LoRA "foo". Available: add_detail, bar.`
    """
    if name in available:
        return name
    matches = [n for n in available if n.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    names = sorted(available, key=lambda n: (n.lower(), n))
    if not names:
        raise InvalidParams(f'Unknown LoRA "{name}". No LoRAs are installed.')
    listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    raise InvalidParams(f'Unknown LoRA "{name}". Available: {listed}.')


def check_loras(names: Iterable[str], available: Collection[str]) -> list[str]:
    """Resolve every name (`resolve_lora`); raises `InvalidParams` for the first unknown one."""
    return [resolve_lora(n, available) for n in names]


def _cached(kind: str, path: Path, compute) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = (kind, str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = compute(p)
    return _HASHES[key]


def _sha256(path: Path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def safetensors_data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a .safetensors file's tensor data (everything after its JSON header).

    This is kohya's "addnet" hash, Civitai's AutoV3, and what A1111 shows in "Lora hashes" (the
    first 12 hex digits): it ignores the metadata header, so re-tagged copies hash the same.
    """

    def compute(p: Path) -> str:
        with open(p, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        return _sha256(p, 8 + header)

    return _cached("autov3", Path(path), compute)


def lora_hash(path: str | os.PathLike[str]) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of `safetensors_data_sha256` (AutoV3)."""
    return safetensors_data_sha256(path)[:12]


def embedding_hash(path: str | os.PathLike[str]) -> str:
    """A1111's embedding short hash ("TI hashes"): the first 12 hex digits of the file's sha256."""
    return _cached("sha256", Path(path), _sha256)[:12]


def hashes_text(pairs: Iterable[tuple[str, str]]) -> str:
    """A1111's `name: hash, name: hash` value of "Lora hashes" / "TI hashes"."""
    return ", ".join(f"{name}: {digest}" for name, digest in pairs)
