"""Per-job LoRAs and textual-inversion embeddings with the tiny model."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from result_images import same_images

from generator.errors import InvalidParams
from generator.metadata import parse_parameters
from generator.params import GenerationParams
from generator.pipeline import Generator
from generator.prompts import encode_text, tokenize_chunks


@pytest.fixture
def p() -> GenerationParams:
    return GenerationParams(prompt="a pony", negative="ugly", seed=7, steps=3, width=64, height=64)


def _autov3(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()[:12]


# --- LoRAs ---------------------------------------------------------------------------------------


def test_available_loras(extras_generator: Generator, generator: Generator) -> None:
    assert extras_generator.available_loras() == ["detail", "kohya_style"]
    assert generator.available_loras() == []


def test_lora_applies_to_its_job_only(extras_generator: Generator, p: GenerationParams) -> None:
    g = extras_generator
    base = g.txt2img(p)
    with_lora = g.txt2img(replace(p, prompt="a pony <lora:detail:0.8>"))
    assert not same_images(base, with_lora)
    assert same_images(base, g.txt2img(p))  # the next job without LoRAs is untouched
    assert same_images(with_lora, g.txt2img(replace(p, prompt="a pony <lora:detail:0.8>")))
    assert not same_images(with_lora, g.txt2img(replace(p, prompt="a pony <lora:detail:0.3>")))
    assert same_images(base, g.txt2img(replace(p, prompt="a pony <lora:detail:0>")))  # weight 0 = none
    # the tag is not encoded: the same as the plain prompt with the LoRA active
    assert same_images(with_lora, g.txt2img(replace(p, prompt="a pony<lora:Detail:0.8>")))


def test_adapters_are_loaded_once(
    extras_generator: Generator, p: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = extras_generator
    calls: list[str] = []
    real = g.pipe.load_lora_weights

    def counting(*args, **kwargs):
        calls.append(kwargs["adapter_name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(g.pipe, "load_lora_weights", counting)
    for prompt in [
        "<lora:detail>",
        "<lora:kohya_style:0.5>",
        "x",
        "<lora:detail> <lora:kohya_style>",
        "y",
    ] * 2:
        g.txt2img(replace(p, prompt=prompt))
    assert len(calls) == len(set(calls)) <= 2


def test_kohya_lora_adapts_the_text_encoder(extras_generator: Generator, p: GenerationParams) -> None:
    g = extras_generator
    g._use_loras(replace(p, prompt="<lora:kohya_style>"))
    adapted = encode_text(g.pipe, "a pony")
    g._use_loras(p)
    plain = encode_text(g.pipe, "a pony")
    assert not torch.allclose(adapted, plain)
    assert g.pipe.get_list_adapters()["text_encoder"]


def test_lora_metadata_and_errors(extras_generator: Generator, extras_dirs: tuple[Path, Path], p) -> None:
    g = extras_generator
    loras = extras_dirs[0]
    result = g.txt2img(replace(p, prompt="a pony <lora:kohya_style:0.7>, <lora:detail>"))
    text = result.images[0].parameters
    assert text.startswith("a pony <lora:kohya_style:0.7>, <lora:detail>\n")  # the prompt as given
    expected = f"kohya_style: {_autov3(loras / 'kohya_style.safetensors')}, detail: {_autov3(loras / 'detail.safetensors')}"
    assert parse_parameters(text)["extra"]["Lora hashes"] == expected
    assert "Lora hashes" not in g.txt2img(p).images[0].parameters
    with pytest.raises(InvalidParams, match=r'^Unknown LoRA "foo"\. Available: detail, kohya_style\.$'):
        g.txt2img(replace(p, prompt="<lora:foo:1>"))
    with pytest.raises(InvalidParams, match="share"):
        g.txt2img_batch([p, replace(p, prompt="a pony <lora:detail>")])


def test_batched_loras_equal_unbatched(extras_generator: Generator, p: GenerationParams) -> None:
    g = extras_generator
    requests = [
        replace(p, prompt="a pony <lora:detail:0.5>", seed=1, count=2),
        replace(p, prompt="a meadow <lora:detail:0.5>", negative="easyneg", seed=2),
    ]
    batched = g.txt2img_batch(requests)
    for request, result in zip(requests, batched, strict=True):
        assert same_images(result, g.txt2img(request))


def test_unloading_mode_for_compiled_routes(
    extras_generator: Generator, p: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = extras_generator
    lora_p = replace(p, prompt="a pony <lora:detail:0.8>")
    base, with_lora = g.txt2img(p), g.txt2img(lora_p)
    monkeypatch.setattr(g.loras, "keep_loaded", False)
    try:
        assert same_images(base, g.txt2img(p))  # unloads the adapters
        assert same_images(with_lora, g.txt2img(lora_p))  # loads (reads the file: it was dropped)
        assert same_images(base, g.txt2img(p))
        assert not getattr(g.pipe.unet, "peft_config", None)  # the plain modules are back
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read again"))
        assert same_images(with_lora, g.txt2img(lora_p))  # re-added from memory
    finally:
        g.txt2img(p)


def test_notes_on_results(extras_generator: Generator, p: GenerationParams) -> None:
    result = extras_generator.txt2img(replace(p, prompt="a pony AND a cat <hypernet:x:1>"))
    assert result.notes == ["ignored: hypernetwork <hypernet:x:1>", "ignored: AND"]
    assert result.images[0].parameters.startswith("a pony AND a cat <hypernet:x:1>\n")
    assert extras_generator.txt2img(p).notes == []


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_are_loaded_and_tokenized(
    extras_generator: Generator, extras_dirs: tuple[Path, Path]
) -> None:
    g = extras_generator
    assert g.available_embeddings() == ["easyneg", "goodpt"]
    tok = g.pipe.tokenizer
    ids = tok.convert_tokens_to_ids(["easyneg", "easyneg_1", "goodpt"])
    chunk = tokenize_chunks(tok, "a EasyNeg, goodpt")[0][0]
    assert chunk[2:4] == ids[:2] and ids[2] in chunk
    # the same ids as diffusers' own expansion
    converted = g.pipe.maybe_convert_prompt("a easyneg, goodpt", tok)
    assert converted.count("easyneg_1") == 1
    expected = tok(converted, add_special_tokens=False)["input_ids"]
    assert chunk[1 : 1 + len(expected)] == expected
    # the vectors are the file's
    from safetensors.torch import load_file

    vectors = load_file(str(extras_dirs[1] / "easyneg.safetensors"))["emb_params"]
    weight = g.pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(weight[ids[0]], vectors[0]) and torch.allclose(weight[ids[1]], vectors[1])


def test_embedding_never_straddles_chunks(extras_generator: Generator) -> None:
    tok = extras_generator.pipe.tokenizer
    first, second = tok.convert_tokens_to_ids(["easyneg", "easyneg_1"])
    chunks, _ = tokenize_chunks(tok, "a" * 74 + " easyneg")
    assert len(chunks) == 2
    assert chunks[1][1:3] == [first, second] and first not in chunks[0]


def test_embedding_changes_the_image_and_metadata(
    extras_generator: Generator, extras_dirs: tuple[Path, Path], p: GenerationParams
) -> None:
    g = extras_generator
    plain = g.txt2img(replace(p, negative="ugly"))
    embedded = g.txt2img(replace(p, negative="ugly, easyneg"))
    assert not same_images(plain, embedded)
    parsed = parse_parameters(embedded.images[0].parameters)
    digest = hashlib.sha256((extras_dirs[1] / "easyneg.safetensors").read_bytes()).hexdigest()[:12]
    assert parsed["extra"]["TI hashes"] == f"easyneg: {digest}"
    both = g.txt2img(replace(p, prompt="goodpt pony", negative="easyneg"))
    pt = hashlib.sha256((extras_dirs[1] / "goodpt.pt").read_bytes()).hexdigest()[:12]
    assert (
        parse_parameters(both.images[0].parameters)["extra"]["TI hashes"]
        == f"goodpt: {pt}, easyneg: {digest}"
    )
    assert "TI hashes" not in plain.images[0].parameters
