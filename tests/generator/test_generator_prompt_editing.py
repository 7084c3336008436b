"""Prompt editing/alternation per step, clip skip, schedule types and A1111 text read back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from result_images import same_images

from generator.errors import InvalidParams
from generator.metadata import parse_parameters, to_params
from generator.params import GenerationParams
from generator.pipeline import Generator
from generator.prompts import encode_text
from generator.samplers import SAMPLER_NAMES, SAMPLER_SCHEDULES, SCHEDULE_NAMES


@pytest.fixture
def p() -> GenerationParams:
    return GenerationParams(prompt="a pony", negative="ugly", seed=3, steps=4, width=64, height=64)


@pytest.fixture
def recorded(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """encoder_hidden_states of every UNet call."""
    calls: list[torch.Tensor] = []
    forward = generator.pipe.unet.forward

    def record(sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append(encoder_hidden_states.detach().clone())
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(generator.pipe.unet, "forward", record)
    return calls


def _enc(generator: Generator, text: str, length: int = 77) -> torch.Tensor:
    z = encode_text(generator.pipe, text)
    empty = encode_text(generator.pipe, "")
    while z.shape[1] < length:
        z = torch.cat([z, empty], dim=1)
    return z[0]


def test_prompt_editing_swaps_at_the_step(generator: Generator, p, recorded) -> None:
    generator.txt2img(replace(p, prompt="[a pony:a horse:0.5]"))
    pony, horse, ugly = (_enc(generator, t) for t in ("a pony", "a horse", "ugly"))
    assert len(recorded) == 4
    for step, rows in enumerate(recorded, start=1):
        assert rows.shape[0] == 2  # CFG: [negative; prompt]
        assert torch.equal(rows[0], ugly)
        assert torch.equal(rows[1], pony if step <= 2 else horse)


def test_alternation_switches_every_step(generator: Generator, p, recorded) -> None:
    generator.txt2img(replace(p, prompt="a [cat|dog]"))
    cat, dog = _enc(generator, "a cat"), _enc(generator, "a dog")
    assert [torch.equal(r[1], cat) for r in recorded] == [True, False, True, False]
    assert [torch.equal(r[1], dog) for r in recorded] == [False, True, False, True]


def test_negative_schedule_and_no_cfg(generator: Generator, p, recorded) -> None:
    generator.txt2img(replace(p, negative="[blurry:dark:1]"))
    blurry, dark, pony = (_enc(generator, t) for t in ("blurry", "dark", "a pony"))
    assert [torch.equal(r[0], blurry) for r in recorded] == [True, False, False, False]
    assert all(torch.equal(r[0], dark) for r in recorded[1:]) and all(
        torch.equal(r[1], pony) for r in recorded
    )
    recorded.clear()
    generator.txt2img(replace(p, prompt="[a pony:a horse:2]", guidance=1.0))
    assert [r.shape[0] for r in recorded] == [1] * 4
    assert torch.equal(recorded[1][0], pony) and torch.equal(recorded[2][0], _enc(generator, "a horse"))


def test_weights_and_long_texts_in_schedules(generator: Generator, p, recorded) -> None:
    long = ", ".join(f"tag{i}" for i in range(30))  # > 75 tokens: two chunks
    generator.txt2img(replace(p, prompt=f"(a [b:c:0.5]:1.2) [short:{long}:0.5]"))
    length = encode_text(generator.pipe, f"(a c:1.2) {long}").shape[1]
    assert length > 77 and all(r.shape[1] == length for r in recorded)  # padded to the longest text
    assert torch.equal(recorded[0][1], _enc(generator, "(a b:1.2) short", length))
    assert torch.equal(recorded[3][1], _enc(generator, f"(a c:1.2) {long}", length))


def test_second_order_sampler_counts_model_calls(generator: Generator, p, recorded) -> None:
    generator.txt2img(replace(p, prompt="[a pony:a horse:0.5]", steps=3, sampler="DPM++ SDE"))
    pony = _enc(generator, "a pony")
    assert len(recorded) == 5  # 2 per step but the last
    assert [torch.equal(r[1], pony) for r in recorded] == [True, True, True, False, False]  # 3 of 6


def test_scheduled_prompts_batch_like_single_runs(generator: Generator, p) -> None:
    requests = [
        replace(p, prompt="[a pony:a horse:0.5]", seed=1, count=2),
        replace(p, prompt="a [cat|dog]", negative="[x:y:2]", seed=5),
        replace(p, prompt="plain", seed=9),
    ]
    for sampler in ("Euler a", "DPM++ SDE", "DPM++ 2M SDE"):
        batch = [replace(r, sampler=sampler) for r in requests]
        for request, result in zip(batch, generator.txt2img_batch(batch), strict=True):
            assert same_images(result, generator.txt2img(request))


def test_scheduled_variation_runs(generator: Generator, p) -> None:
    source = generator.txt2img(p).images[0].image
    out = generator.variation(source, replace(p, prompt="[a pony:a horse:0.5]"), strength=0.5)
    assert out.images[0].image.size == (64, 64)


# --- clip skip -----------------------------------------------------------------------------------


def test_clip_skip_uses_an_earlier_layer(generator: Generator, p) -> None:
    pipe = generator.pipe
    tokens = torch.tensor([[pipe.tokenizer.bos_token_id, *([pipe.tokenizer.eos_token_id] * 76)]])
    one = encode_text(pipe, "")
    two = encode_text(pipe, "", clip_skip=2)
    with torch.no_grad():
        out = pipe.text_encoder(tokens, output_hidden_states=True)
        expected = pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(one, out.last_hidden_state) and torch.allclose(two, expected)
    assert not torch.allclose(one, two)
    a, b = generator.txt2img(p), generator.txt2img(replace(p, clip_skip=2))
    assert not same_images(a, b)
    assert "Clip skip: 2" in b.images[0].parameters and "Clip skip" not in a.images[0].parameters


# --- samplers x schedule types ---------------------------------------------------------------------

PAIRS = [(s, k) for s in SAMPLER_NAMES for k in SCHEDULE_NAMES]


@pytest.mark.parametrize(("sampler", "schedule"), PAIRS)
def test_every_sampler_and_schedule(generator: Generator, p, sampler: str, schedule: str) -> None:
    q = replace(p, sampler=sampler, schedule=schedule, steps=3)
    if schedule not in SAMPLER_SCHEDULES[sampler]:
        with pytest.raises(InvalidParams, match="schedule"):
            generator.txt2img(q)
        return
    a = generator.txt2img(q)
    assert same_images(a, generator.txt2img(q))
    text = a.images[0].parameters
    assert f"Sampler: {sampler}," in text
    assert ("Schedule type" in text) is (schedule != "automatic")
    back = to_params(parse_parameters(text))
    assert (back.sampler, back.schedule) == (sampler, schedule)


def test_a1111_text_applies_everything(extras_generator: Generator) -> None:
    text = (
        "a pony <lora:detail:0.5>, [day:night:0.5] AND a cat\n"
        "Negative prompt: easyneg, ugly\n"
        "Steps: 4, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 64x64, "
        'Model hash: abc, Model: pony, Clip skip: 2, Lora hashes: "detail: 0123456789ab", Version: v1.9.4'
    )
    params = to_params(parse_parameters(text))
    assert params == GenerationParams(
        prompt="a pony <lora:detail:0.5>, [day:night:0.5] AND a cat",
        negative="easyneg, ugly",
        seed=42,
        steps=4,
        guidance=6.5,
        width=64,
        height=64,
        sampler="DPM++ 2M SDE",
        clip_skip=2,
        schedule="karras",
    )
    result = extras_generator.txt2img(params)
    assert result.notes == ["ignored: AND"]
    out = parse_parameters(result.images[0].parameters)
    assert out["prompt"] == params.prompt and out["schedule"] == "karras" and out["clip_skip"] == 2
    assert out["extra"]["Lora hashes"].startswith("detail: ") and out["extra"]["TI hashes"].startswith(
        "easyneg: "
    )
    old = to_params(
        parse_parameters("x\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    )
    assert (old.sampler, old.schedule) == ("DPM++ 2M Karras", "automatic")
    odd = parse_parameters("x\nSteps: 4, Sampler: Euler, Schedule type: SGM Uniform, Seed: 1, Size: 64x64")
    assert odd["schedule"] is None and odd["extra"]["Schedule type"] == "SGM Uniform"
