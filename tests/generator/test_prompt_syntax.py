"""LoRA tags, ignored syntax and the batch key (generator.prompt_syntax, params), torch-free."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from generator.errors import InvalidParams
from generator.extra_files import available_loras, lora_hash, resolve_lora
from generator.params import BATCH_KEY_FIELDS, GenerationParams, validate
from generator.prompt_syntax import (
    MAX_LORAS,
    embedding_key,
    embedding_pattern,
    lora_key,
    parse_loras,
    parse_prompt,
    prompt_notes,
)


def test_lora_tags() -> None:
    text, loras = parse_loras("a pony <lora:add_detail:0.8>, <lora:bar> <lyco:Foo-1:-0.5>")
    assert text == "a pony ,  "  # removed as A1111 removes them (the spaces stay)
    assert loras == [("add_detail", 0.8), ("bar", 1.0), ("Foo-1", -0.5)]
    assert parse_prompt("<lora:x:0.5> <lora:x:0.25>").loras == (("x", 0.75),)  # applied twice
    assert parse_prompt("<LoRA:x:.5>").loras == (("x", 0.5),)
    extra = parse_prompt("<lora:x:0.5:0.2>")
    assert extra.loras == (("x", 0.5),) and extra.notes == (
        "ignored: extra LoRA arguments in <lora:x:0.5:0.2>",
    )


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:x:abc>", "LoRA weight must be a number"),
        ("<lora:x:11>", "LoRA weight must be between"),
        ("<lora: :1>", "needs a name"),
        (" ".join(f"<lora:l{i}>" for i in range(MAX_LORAS + 1)), f"At most {MAX_LORAS} LoRAs"),
    ],
)
def test_bad_lora_tags(prompt: str, message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        parse_prompt(prompt)
    with pytest.raises(InvalidParams, match=message):
        validate(GenerationParams(prompt=prompt), max_pixels=512 * 512, max_steps=50)


def test_unsupported_syntax_is_stripped_and_noted() -> None:
    p = parse_prompt("a cat:1.2 AND a dog :0.8 AND <hypernet:anime:1> <wild:card> x")
    assert "AND" not in p.text and "hypernet" not in p.text and "wild" not in p.text
    assert p.text.startswith("a cat, a dog, ")
    assert p.notes == ("ignored: hypernetwork <hypernet:anime:1>", "ignored: <wild:card>", "ignored: AND")
    neg = parse_prompt("ugly <lora:x:1>", negative=True)
    assert (
        neg.text == "ugly "
        and neg.loras == ()
        and neg.notes == ("ignored: <lora:x:1> in the negative prompt",)
    )
    assert prompt_notes("a AND b", "<lora:x>") == ["ignored: AND", "ignored: <lora:x> in the negative prompt"]
    assert prompt_notes("ANDROID pony", "") == []  # a whole word only
    assert parse_prompt("a <3 pony").text == "a <3 pony"


def test_batch_key_includes_loras_clip_skip_and_schedule() -> None:
    base = GenerationParams(prompt="a pony <lora:x:0.5>", sampler="DPM++ 2M")
    data = base.to_dict()
    assert data["loras"] == "x:0.5" and data["clip_skip"] == 1 and data["schedule"] == "automatic"
    assert GenerationParams.from_dict(data) == base
    assert base.batch_key() == tuple(data[k] for k in BATCH_KEY_FIELDS)
    same = replace(base, prompt="another <lora:x:0.5> prompt", seed=5, negative="n")
    assert same.batch_key() == base.batch_key()
    for other in (
        replace(base, prompt="a pony"),
        replace(base, prompt="a pony <lora:x:0.6>"),
        replace(base, clip_skip=2),
        replace(base, schedule="karras"),
    ):
        assert other.batch_key() != base.batch_key()
    assert lora_key([("b", 1.0), ("a", 0.5), ("c", 0.0)]) == "a:0.5,b:1"
    assert GenerationParams(prompt="<lora:x:zz>").to_dict()["loras"] == "?"


def test_validate_new_fields() -> None:
    ok = validate(
        GenerationParams(prompt="p", sampler="Euler", schedule="Karras", clip_skip=2),
        max_pixels=512 * 512,
        max_steps=50,
    )
    assert ok.schedule == "karras"
    for change, message in (
        ({"clip_skip": 0}, "Clip skip must be between 1 and 12"),
        ({"clip_skip": 13}, "Clip skip must be between 1 and 12"),
        ({"sampler": "DDIM", "schedule": "karras"}, "DDIM has no Karras schedule"),
        ({"schedule": "uniform"}, "Unknown schedule type"),
    ):
        with pytest.raises(InvalidParams, match=message):
            validate(replace(ok, **change), max_pixels=512 * 512, max_steps=50)
    with pytest.raises(InvalidParams, match=r'Unknown LoRA "foo"\. Available: add_detail, bar\.'):
        validate(
            replace(ok, prompt="<lora:foo>"), max_pixels=512 * 512, max_steps=50, loras=["bar", "add_detail"]
        )
    assert validate(replace(ok, prompt="<lora:BAR>"), max_pixels=512 * 512, max_steps=50, loras=["bar"])


def test_lora_files_and_hashes(tmp_path: Path) -> None:
    for name in ("b.safetensors", "A.safetensors", "c.pt", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    assert available_loras(tmp_path) == ["A", "b"]
    assert available_loras(None) == [] and available_loras(tmp_path / "missing") == []
    assert resolve_lora("a", ["A", "b"]) == "A"
    with pytest.raises(InvalidParams, match=r'Unknown LoRA "z"\. No LoRAs are installed\.'):
        resolve_lora("z", [])
    import hashlib
    import json

    header = json.dumps({"__metadata__": {"k": "v"}}).encode()
    data = b"\x01\x02" * 50
    path = tmp_path / "l.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert lora_hash(path) == hashlib.sha256(data).hexdigest()[:12]  # AutoV3: the tensor data only


def test_embedding_pattern() -> None:
    pattern = embedding_pattern(["easynegative", "bad prompt", "neg_v2", "easy"])
    assert pattern is not None
    found = [
        embedding_key(m.group(0)) for m in pattern.finditer("EasyNegative, bad  prompt,neg_v2x, xeasy, easy_")
    ]
    assert found == ["easynegative", "bad prompt", "neg_v2", "easy"]
    assert embedding_pattern([]) is None
