"""Upscales: tiny random ESRGAN through spandrel (.pth and .safetensors), and the hires fix."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from generator.config import GeneratorConfig
from generator.errors import Cancelled, ModelLoadError
from generator.metadata import parse_parameters, save_png
from generator.params import GenerationParams
from generator.pipeline import Generator
from generator.tiny import write_tiny_esrgan
from generator.upscale import load_upscaler, tile_count, upscale_tiled


@pytest.fixture(scope="module")
def source(generator: Generator) -> Image.Image:
    p = GenerationParams(prompt="a pony", seed=3, steps=2, width=64, height=128)
    return generator.txt2img(p).images[0].image


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_esrgan_upscale_4x(
    generator: Generator,
    source: Image.Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    params: GenerationParams,
    suffix: str,
) -> None:
    path = write_tiny_esrgan(tmp_path / f"tiny-esrgan{suffix}")
    upscaler = load_upscaler(path, "cpu", torch.float32)
    assert upscaler.scale == 4 and upscaler.name == "tiny-esrgan"
    monkeypatch.setattr(generator, "upscaler", upscaler)
    p = replace(params, width=64, height=128)
    result = generator.upscale(source, p)
    assert len(result.images) == 1
    out = result.images[0]
    assert out.image.size == (256, 512) == (result.width, result.height)
    assert out.image.mode == "RGB"
    assert "Upscaler: tiny-esrgan" in out.parameters
    assert parse_parameters(out.parameters)["seed"] == p.seed
    # no params, no metadata: just the upscale is described
    assert generator.upscale(source).images[0].parameters == "Upscaler: tiny-esrgan, Upscale by: 4"


def test_generator_load_with_upscaler(tiny_model_dir: Path, tmp_path: Path, source: Image.Image) -> None:
    path = write_tiny_esrgan(tmp_path / "x4.safetensors")
    gen = Generator.load(GeneratorConfig(model=str(tiny_model_dir), device="cpu", upscaler=path))
    assert gen.upscaler is not None
    assert gen.upscale(source).images[0].image.size == (256, 512)


def test_tiled_matches_size_and_polls(tmp_path: Path, source: Image.Image) -> None:
    upscaler = load_upscaler(write_tiny_esrgan(tmp_path / "u.pth"), "cpu", torch.float32)
    seen: list[tuple[int, int]] = []
    tiled = upscale_tiled(upscaler, source, tile=32, overlap=8, progress=lambda s, n, _: seen.append((s, n)))
    whole = upscale_tiled(upscaler, source, tile=1024)
    assert tiled.size == whole.size == (256, 512)
    assert seen[-1] == (8, 8) == (tile_count(64, 128, 32),) * 2
    with pytest.raises(Cancelled):
        upscale_tiled(upscaler, source, tile=32, should_cancel=lambda: True)


def test_bad_upscaler_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_upscaler(tmp_path / "missing.pth", "cpu", torch.float32)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"only \.pth and \.safetensors"):
        load_upscaler(tmp_path / "model.pt", "cpu", torch.float32)
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ModelLoadError, match="PONY_UPSCALER"):
        Generator.load(
            GeneratorConfig(model=str(tiny_model_dir), device="cpu", upscaler=tmp_path / "foo.safetensors")
        )


def test_hires_fix_fallback(generator: Generator, source: Image.Image, tmp_path: Path) -> None:
    assert generator.upscaler is None
    p = GenerationParams(prompt="a pony", seed=3, steps=4, width=64, height=128)
    steps: list[int] = []
    result = generator.upscale(source, p, progress=lambda s, n, _: steps.append(s))
    out = result.images[0]
    assert out.image.size == (128, 256) == (result.width, result.height)
    assert steps  # img2img steps were reported
    parsed = parse_parameters(out.parameters)
    assert parsed["extra"]["Hires upscale"] == "2"
    assert parsed["extra"]["Denoising strength"] == f"{generator.config.hires_strength:g}"
    assert (parsed["width"], parsed["height"]) == (64, 128)  # the base size, as A1111 records it
    # params from the image's own metadata when none are given
    path = save_png(source, tmp_path / "src.png", out.parameters)
    with Image.open(path) as im:
        im.load()
        again = generator.upscale(im)
    assert again.images[0].image.size == (128, 256)
    assert parse_parameters(again.images[0].parameters)["prompt"] == "a pony"


def test_hires_fix_with_foreign_metadata(generator: Generator, source: Image.Image) -> None:
    foreign = (
        "a pony\nSteps: 150, Sampler: DPM2 a, Schedule type: Karras, CFG scale: 40, Seed: 5, Size: 64x128, "
        "Model: other, Clip skip: 40"
    )
    image = source.copy()
    image.info["parameters"] = foreign
    result = generator.upscale(image, progress=None)
    parsed = parse_parameters(result.images[0].parameters)
    assert (parsed["sampler"], parsed["seed"]) == ("DDIM", 5)
    assert parsed["schedule"] is None and parsed["clip_skip"] == 12  # DDIM has no Karras schedule
    assert parsed["steps"] == generator.config.max_steps and parsed["cfg"] == 30.0
