"""`ponybot generate` / `ponybot tiny-model` through generator.cli."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main as ponybot_main
from generator.cli import main, tiny_model_main
from generator.metadata import parse_parameters, read_parameters


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("PONY_MODEL", "PONY_DEFAULT_STEPS", "PONY_MAX_STEPS", "PONY_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def test_generate_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["a (pony:1.2)", "--model", str(tiny_model_dir), "--device", "cpu", "--width", "64"]
    argv += ["--height", "128", "--steps", "2", "--count", "2", "--seed", "42", "--sampler", "Euler a"]
    argv += ["--negative", "ugly", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "42-0.png"), str(out / "42-1.png")]
    for n, path in enumerate(printed):
        meta = parse_parameters(read_parameters(path) or "")
        assert meta["prompt"] == "a (pony:1.2)" and meta["negative"] == "ugly"
        assert (meta["seed"], meta["steps"], meta["sampler"]) == (42 + n, 2, "Euler a")
        assert (meta["width"], meta["height"]) == (64, 128)
        assert meta["model"] == "tiny-pony"


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["x", "--width", "65", "--height", "64"], 2, "Width must be a multiple of 64"),
        (["x", "--steps", "abc"], 2, "invalid int value"),
        (["x", "--sampler", "PLMS"], 2, "invalid choice"),
        (["x", "--aspect", "huge"], 2, "invalid choice"),
        (["x", "--count", "9"], 2, "Count must be between 1 and 4"),
        (["x", "--seed", "-5"], 2, "Seed must be between"),
        ([], 2, "the following arguments are required: prompt"),
        (
            ["x", "--model", "/no/such/model.safetensors", "--width", "64", "--height", "64"],
            1,
            "no such file",
        ),
    ],
)
def test_bad_values_one_line(
    argv: list[str], code: int, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ponybot generate: error:") and fragment in err[0]


def test_bad_setting_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PONY_DEFAULT_STEPS", "many")
    assert ponybot_main(["generate", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PONY_DEFAULT_STEPS" in err[0]


def test_tiny_model_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "tiny"
    assert tiny_model_main([str(target), "--upscaler", str(tmp_path / "x4.pth")]) == 0
    assert (target / "model_index.json").is_file() and (tmp_path / "x4.pth").is_file()
    assert capsys.readouterr().out.split() == [str(target), str(tmp_path / "x4.pth")]
    (tmp_path / "file").write_text("x")
    assert tiny_model_main([str(tmp_path / "file")]) == 2


def test_generate_with_loras_schedule_and_clip_skip(
    tiny_model_dir: Path, extras_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    loras, embeddings = extras_dirs
    argv = ["a pony <lora:detail:0.5> AND x", "--model", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--width", "64", "--height", "64", "--steps", "2", "--seed", "1", "--sampler", "DPM++ 2M SDE"]
    argv += ["--schedule", "karras", "--clip-skip", "2", "--lora-dir", str(loras)]
    argv += ["--embeddings-dir", str(embeddings), "--negative", "easyneg", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ignored: AND" in captured.err
    meta = parse_parameters(read_parameters(captured.out.split()[0]) or "")
    assert (meta["sampler"], meta["schedule"], meta["clip_skip"]) == ("DPM++ 2M SDE", "karras", 2)
    assert meta["extra"]["Lora hashes"].startswith("detail: ") and "TI hashes" in meta["extra"]
    assert main(["<lora:nope>", "--lora-dir", str(loras), "--width", "64", "--height", "64"]) == 2
    assert 'Unknown LoRA "nope". Available: detail, kohya_style.' in capsys.readouterr().err
