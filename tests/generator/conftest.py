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


@pytest.fixture(scope="session")
def extras_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(lora_dir, embeddings_dir) for the tiny model: LoRAs `detail` (diffusers layout, UNet) and
    `kohya_style` (kohya layout, UNet + text encoder); embeddings `easyneg` (2 vectors,
    .safetensors) and `goodpt` (1 vector, A1111 .pt)."""
    from generator.tiny import write_random_embedding, write_random_kohya_lora, write_random_lora

    root = tmp_path_factory.mktemp("extras")
    loras, embeddings = root / "loras", root / "embeddings"
    write_random_lora(tiny_model_dir, loras / "detail.safetensors", seed=1)
    write_random_kohya_lora(tiny_model_dir, loras / "kohya_style.safetensors", seed=2)
    write_random_embedding(tiny_model_dir, embeddings / "easyneg.safetensors", vectors=2, seed=3)
    write_random_embedding(tiny_model_dir, embeddings / "goodpt.pt", vectors=1, seed=4)
    return loras, embeddings


@pytest.fixture(scope="session")
def extras_generator(tiny_model_dir: Path, extras_dirs: tuple[Path, Path]) -> Generator:
    """The tiny model with a LoRA folder and an embeddings folder."""
    loras, embeddings = extras_dirs
    return Generator.load(
        GeneratorConfig(
            model=str(tiny_model_dir), device="cpu", revision=None, lora_dir=loras, embeddings_dir=embeddings
        )
    )
