"""Generator: determinism, samplers, validation, batching, variations, cancel, OOM, NaN."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from result_images import same_images

from generator.errors import BadOutput, Cancelled, InvalidParams, OutOfMemory
from generator.metadata import parse_parameters, read_parameters, save_png, to_params
from generator.params import MAX_SEED, GenerationParams
from generator.pipeline import BLANK_MESSAGE, OOM_MESSAGE, GenerationResult, Generator
from generator.samplers import SAMPLER_NAMES


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_txt2img_is_deterministic_and_recreatable(
    generator: Generator, params: GenerationParams, tmp_path: Path
) -> None:
    steps: list[tuple[int, int, bool]] = []
    first = generator.txt2img(
        replace(params, count=2),
        progress=lambda s, n, pv: steps.append((s, n, pv is not None)),
        want_preview=True,
    )
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[0][2]  # a preview on the first step
    assert (first.width, first.height) == (64, 64) and first.seconds > 0
    assert [im.seed for im in first.images] == [1234, 1235]
    for im in first.images:
        assert im.image.mode == "RGB" and im.image.size == (64, 64)
    assert not np.array_equal(_px(first.images[0].image), _px(first.images[1].image))
    assert same_images(first, generator.txt2img(replace(params, count=2)))

    # image 2 alone, from the request
    assert same_images(GenerationResult([first.images[1]], 0, 64, 64), generator.txt2img(params.single(1)))

    # image 2 alone, from the PNG's metadata
    path = save_png(first.images[1].image, tmp_path / "x.png", first.images[1].parameters)
    parsed = parse_parameters(read_parameters(path) or "")
    assert parsed["seed"] == 1235 and parsed["model"] == generator.model_name
    again = generator.txt2img(to_params(parsed))
    with Image.open(path) as saved:
        assert np.array_equal(_px(saved.convert("RGB")), _px(again.images[0].image))


def test_other_seed_differs(generator: Generator, params: GenerationParams) -> None:
    a = generator.txt2img(params)
    b = generator.txt2img(params.with_seed(params.seed + 100))
    assert not same_images(a, b)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(generator: Generator, params: GenerationParams, sampler: str) -> None:
    p = replace(params, sampler=sampler, width=64, height=128)
    a = generator.txt2img(p)
    assert a.images[0].image.size == (64, 128)
    assert f"Sampler: {sampler}," in a.images[0].parameters
    assert same_images(a, generator.txt2img(p))
    varied = generator.variation(a.images[0].image, p, strength=0.7)  # img2img with this sampler
    assert varied.images[0].image.size == (64, 128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 65}, "Width must be a multiple of 64"),
        ({"height": 100}, "Height must be a multiple of 64"),
        ({"width": 1024, "height": 1024}, "too large"),
        ({"steps": 0}, "Steps must be between 1 and 50"),
        ({"steps": 51}, "Steps must be between 1 and 50"),
        ({"guidance": 0.5}, "Guidance must be between"),
        ({"guidance": 31.0}, "Guidance must be between"),
        ({"count": 0}, "Count must be between 1 and 4"),
        ({"count": 5}, "Count must be between 1 and 4"),
        ({"seed": -1}, "Seed must be between 0"),
        ({"seed": MAX_SEED + 1}, "Seed must be between 0"),
        ({"prompt": "  "}, "The prompt is empty"),
        ({"sampler": "PLMS"}, "Unknown sampler"),
    ],
)
def test_validation_errors(
    generator: Generator, params: GenerationParams, change: dict, message: str
) -> None:
    bad = replace(params, **change)
    with pytest.raises(InvalidParams, match=message):
        generator.txt2img(bad)
    with pytest.raises(InvalidParams, match=message):
        generator.txt2img_batch([params, bad])
    with pytest.raises(InvalidParams, match=message):
        generator.variation(Image.new("RGB", (64, 64)), bad)


def test_batched_equals_unbatched(generator: Generator, params: GenerationParams) -> None:
    long_prompt = ", ".join(f"(tag{i}:1.1)" for i in range(30))  # > 77 tokens: its own call
    requests = [
        replace(params, count=2, seed=10),
        replace(params, prompt="a blue pony", negative="", seed=20),
        replace(params, prompt=long_prompt, seed=30, count=2),
        replace(params, prompt="meadow", negative="night", seed=40, count=3),
    ]
    seen: list[tuple[int, int]] = []
    batched = generator.txt2img_batch(requests, progress=lambda s, n, pv: seen.append((s, n)))
    # three pipeline calls of 3 steps, reported as one count: the 6 short-prompt images cut at
    # config.batch_size (4) into 4 + 2, and the long prompt's own call
    assert seen[-1] == (9, 9)
    assert len(batched) == 4
    for request, result in zip(requests, batched, strict=True):
        assert [im.seed for im in result.images] == [request.seed + i for i in range(request.count)]
        assert same_images(result, generator.txt2img(request))
    with pytest.raises(InvalidParams, match="share"):
        generator.txt2img_batch([params, replace(params, steps=4)])
    assert generator.txt2img_batch([]) == []


def test_guidance_one_batches_without_cfg(generator: Generator, params: GenerationParams) -> None:
    p = replace(params, guidance=1.0, count=2)
    batched = generator.txt2img(p)
    assert same_images(GenerationResult([batched.images[1]], 0, 64, 64), generator.txt2img(p.single(1)))


def test_variation(generator: Generator, params: GenerationParams) -> None:
    source = generator.txt2img(params).images[0].image
    p = replace(params, count=2, seed=77)
    result = generator.variation(source.resize((64, 128)), p, strength=0.6)
    assert len(result.images) == 2 and (result.width, result.height) == (64, 64)
    assert [im.seed for im in result.images] == [77, 78]
    for im in result.images:
        assert im.image.size == (64, 64)
        assert not np.array_equal(_px(im.image), _px(source))
        assert "Denoising strength: 0.6" in im.parameters
    assert not np.array_equal(_px(result.images[0].image), _px(result.images[1].image))
    assert same_images(result, generator.variation(source.resize((64, 128)), p, strength=0.6))
    default = generator.variation(source, replace(p, count=1, steps=1))  # config strength, >= 1 step
    assert f"Denoising strength: {generator.config.variation_strength:g}" in default.images[0].parameters
    with pytest.raises(InvalidParams, match="strength"):
        generator.variation(source, p, strength=0.0)


def test_cancel_mid_run(generator: Generator, params: GenerationParams) -> None:
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) >= 3  # before the run, after step 1, after step 2 -> cancel

    steps: list[int] = []
    with pytest.raises(Cancelled):
        generator.txt2img(
            replace(params, steps=5), progress=lambda s, n, pv: steps.append(s), should_cancel=should_cancel
        )
    assert steps == [1]
    with pytest.raises(Cancelled):
        generator.txt2img(params, should_cancel=lambda: True)
    assert len(generator.txt2img(params).images) == 1


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 10 GB)"),
    ],
)
def test_out_of_memory_is_reported_and_recoverable(
    generator: Generator, params: GenerationParams, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(type(generator.pipe), "__call__", boom)
    with pytest.raises(OutOfMemory) as info:
        generator.txt2img(params)
    assert str(info.value) == OOM_MESSAGE and info.value.retryable
    monkeypatch.undo()
    assert len(generator.txt2img(params).images) == 1


def test_other_runtime_errors_propagate(
    generator: Generator, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(type(generator.pipe), "__call__", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generator.txt2img(params)


def test_nan_decode_retried_in_fp32(
    generator: Generator, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = generator.txt2img(params)
    vae = generator.pipe.vae
    real_decode = vae.decode
    calls: list[torch.dtype] = []

    def nan_once(latents: torch.Tensor, *args: object, **kwargs: object):
        calls.append(latents.dtype)
        out = real_decode(latents, *args, **kwargs)
        if len(calls) == 1:
            return (torch.full_like(out[0], float("nan")),)
        return out

    monkeypatch.setattr(vae, "decode", nan_once)
    result = generator.txt2img(params)
    assert calls == [torch.float32, torch.float32]
    assert same_images(result, expected)

    monkeypatch.setattr(vae, "decode", lambda latents, *a, **k: (torch.full((1, 3, 64, 64), -1.0),))
    with pytest.raises(BadOutput) as info:
        generator.txt2img(params)
    assert str(info.value) == BLANK_MESSAGE
    monkeypatch.undo()
    assert same_images(generator.txt2img(params), expected)


def test_fp32_retry_restores_vae_dtype(generator: Generator) -> None:
    vae = generator.pipe.vae
    saved = {k: v.clone() for k, v in vae.state_dict().items()}
    try:
        torch.nn.Module.to(vae, torch.bfloat16)
        seen: list[torch.dtype] = []
        handle = vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        try:
            generator._vae_decode(torch.zeros(1, 4, 8, 8), fp32=True)
        finally:
            handle.remove()
        assert seen == [torch.float32]
        assert vae.dtype == torch.bfloat16
    finally:
        torch.nn.Module.to(vae, torch.float32)
        vae.load_state_dict(saved)
