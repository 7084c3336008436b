"""A1111 `parameters` text: format, PNG round trip, parse."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from generator.metadata import format_parameters, parse_parameters, read_parameters, save_png, to_params
from generator.params import GenerationParams

P = GenerationParams(prompt="a pony", negative="ugly", seed=123, steps=25, guidance=7.0)


def test_format_is_a1111() -> None:
    text = format_parameters(P, 123, model_name="pony-diffusion", model_hash="abc")
    assert text == (
        "a pony\nNegative prompt: ugly\n"
        "Steps: 25, Sampler: DDIM, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: abc, Model: pony-diffusion"
    )
    extra = format_parameters(
        P, 124, model_name="m", model_hash="", extra={"Denoising strength": 0.6, "Note": "a, b"}
    )
    assert extra.endswith('Seed: 124, Size: 512x512, Model: m, Denoising strength: 0.6, Note: "a, b"')
    no_negative = format_parameters(GenerationParams(prompt="x"), 1, model_name="m", model_hash="h")
    assert "Negative prompt" not in no_negative


def test_parse_round_trip() -> None:
    p = GenerationParams(
        prompt="a (pony:1.2), cute\nsecond line",
        negative="ugly, blurry",
        seed=4_000_000_000,
        steps=30,
        guidance=7.5,
        width=512,
        height=768,
        sampler="DPM++ 2M Karras",
    )
    text = format_parameters(
        p, p.seed, model_name="pony, v1", model_hash="0123456789", extra={"Upscaler": "x"}
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == p.prompt
    assert parsed["negative"] == p.negative
    assert (parsed["steps"], parsed["sampler"], parsed["cfg"], parsed["seed"]) == (
        30,
        "DPM++ 2M Karras",
        7.5,
        p.seed,
    )
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert (parsed["model"], parsed["model_hash"]) == ("pony, v1", "0123456789")
    assert parsed["extra"] == {"Upscaler": "x"}
    assert to_params(parsed) == p


def test_parse_foreign_text() -> None:
    parsed = parse_parameters("just a prompt")
    assert parsed["prompt"] == "just a prompt" and parsed["steps"] is None and parsed["seed"] is None


def test_save_and_read_png(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    text = format_parameters(GenerationParams(prompt="poney ✨ 小马"), 5, model_name="m", model_hash="h")
    path = save_png(image, tmp_path / "deep" / "dir" / "x.png", text)
    assert path == tmp_path / "deep" / "dir" / "x.png"
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left
    assert read_parameters(path) == text
    with Image.open(path) as im:
        assert read_parameters(im) == text
        assert im.getpixel((0, 0)) == (10, 20, 30)
    plain = tmp_path / "plain.png"
    image.save(plain)
    assert read_parameters(plain) is None
    assert read_parameters(tmp_path / "missing.png") is None
