"""generator.safety: the optional output image classifier and its notice image."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from generator.errors import ModelLoadError
from generator.safety import NOTICE_COLOUR, ImageClassifier, notice_image, write_tiny_classifier


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "all": write_tiny_classifier(root / "flags-all", flags_everything=True),
        "none": write_tiny_classifier(root / "flags-none", flags_everything=False),
    }


def test_flags_by_label_score(classifiers: dict[str, Path]) -> None:
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("L", (48, 80), 90)]
    flagging = ImageClassifier.load(classifiers["all"], labels=["NSFW", "porn"], threshold=0.5)
    assert flagging.labels == frozenset({"nsfw"}), "labels the model lacks are ignored"
    assert flagging.flagged(images) == [True, True]
    assert flagging.flagged(images[:1]) == [True]
    assert flagging.flagged([]) == []
    calm = ImageClassifier.load(classifiers["none"], labels=["nsfw"], threshold=0.5)
    assert calm.flagged(images) == [False, False]
    assert all(0.0 <= s < 0.01 for s in calm.scores(images))
    strict = ImageClassifier.load(classifiers["none"], labels=["normal"], threshold=0.5)
    assert strict.flagged(images) == [True, True], "the configured labels decide"


def test_unusable_classifiers_fail_with_one_line(classifiers: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"none of PONY_NSFW_LABELS \(explicit\) is one of its labels"):
        ImageClassifier.load(classifiers["all"], labels=["explicit"], threshold=0.5)
    with pytest.raises(ModelLoadError, match="no such folder"):
        ImageClassifier.load(tmp_path / "missing", labels=["nsfw"], threshold=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not be loaded") as info:
        ImageClassifier.load(tmp_path / "empty", labels=["nsfw"], threshold=0.5)
    assert "\n" not in str(info.value)


def test_notice_image() -> None:
    image = notice_image((96, 64))
    assert image.size == (96, 64) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == NOTICE_COLOUR
    assert any(lo != hi for lo, hi in image.getextrema()), "it carries the text"
