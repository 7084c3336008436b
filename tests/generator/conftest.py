"""Shared fixtures: one tiny random SD v1.x model per session, loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator.config import GeneratorConfig
from generator.params import GenerationParams
from generator.pipeline import Generator
from generator.tiny import write_tiny_model

# 2 shared cores: one thread avoids OpenMP contention, which makes tiny models 10x slower
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD v1.x diffusers folder, written once."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-pony")


@pytest.fixture(scope="session")
def generator(tiny_model_dir: Path) -> Generator:
    """The tiny model loaded through `Generator.load` on the CPU."""
    return Generator.load(GeneratorConfig(model=str(tiny_model_dir), device="cpu", revision=None))


@pytest.fixture
def params() -> GenerationParams:
    """A small, fast request."""
    return GenerationParams(
        prompt="a (pony:1.2), cute", negative="ugly", seed=1234, steps=3, width=64, height=64
    )
