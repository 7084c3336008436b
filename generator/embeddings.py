"""Textual-inversion embeddings from `GeneratorConfig.embeddings_dir`, loaded once at start.

Each file (`.safetensors`, `.pt`, `.bin`; A1111, Civitai or diffusers layout) goes through
`pipe.load_textual_inversion(path, token=stem)`, which adds the tokens `stem`, `stem_1`, ... to the
tokenizer and their vectors to the text encoder; `generator.prompts` puts them in wherever the
stem appears as a word (A1111's behaviour: e.g. `easynegative` in the negative prompt). `.pt`/
`.bin` files are read with `torch.load(weights_only=True)` (diffusers' loader): tensors and plain
data only. A file that does not load (wrong width, name clash) is skipped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.extra_files import embedding_files, embedding_hash, hashes_text
from generator.prompt_syntax import embedding_key, embedding_pattern

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    """One loaded embedding: its word, file and A1111 short hash."""

    name: str
    path: Path
    hash: str


class Embeddings:
    """The embeddings loaded into one pipeline, and which of them a prompt uses."""

    def __init__(self, loaded: list[Embedding] | None = None) -> None:
        self.loaded = {e.name: e for e in loaded or []}
        self._pattern = embedding_pattern(self.loaded)
        self._by_key = {embedding_key(n): e for n, e in self.loaded.items()}

    @classmethod
    def load(cls, pipe: Any, folder: Path | None) -> Embeddings:
        """Load every embedding file of `folder` into `pipe` (none if the folder is None)."""
        loaded = []
        for name, path in embedding_files(folder).items():
            try:
                pipe.load_textual_inversion(str(path), token=name, local_files_only=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                log.warning("embedding %s skipped: %s", path.name, first)
                continue
            loaded.append(Embedding(name, path, embedding_hash(path)))
        if loaded:
            log.info("loaded %d embeddings: %s", len(loaded), ", ".join(e.name for e in loaded))
        return cls(loaded)

    def names(self) -> list[str]:
        """The loaded embedding names, sorted."""
        return sorted(self.loaded, key=lambda n: (n.lower(), n))

    def used(self, *texts: str) -> list[Embedding]:
        """The embeddings that the texts use, in first-use order."""
        if self._pattern is None:
            return []
        found: dict[str, Embedding] = {}
        for text in texts:
            for m in self._pattern.finditer(text):
                e = self._by_key[embedding_key(m.group(0))]
                found.setdefault(e.name, e)
        return list(found.values())

    def hashes(self, *texts: str) -> str | None:
        """A1111's "TI hashes" value (`name: hash, ...`) of the embeddings the texts use, or None."""
        return hashes_text((e.name, e.hash) for e in self.used(*texts)) or None
