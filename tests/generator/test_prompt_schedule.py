"""A1111 prompt editing and alternation schedules (generator.prompt_schedule), torch-free."""

from __future__ import annotations

import pytest

from generator.prompt_schedule import get_learned_conditioning_prompt_schedules, text_index


def g(prompt: str, steps: int = 10) -> list:
    return get_learned_conditioning_prompt_schedules([prompt], steps)[0]


def test_a1111_docstring_landscape() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert g(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [
        ("test", 10, [[10, "test"]]),
        ("a [b:3]", 10, [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", 10, [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", 10, [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", 10, [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", 10, [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", 10, [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [unbalanced", 10, [[10, "a [unbalanced"]]),
        ("a [b:.5] c", 10, [[5, "a  c"], [10, "a b c"]]),  # 0.5 * 10 = 5
        ("a [b:1.5] c", 10, [[1, "a  c"], [10, "a b c"]]),  # int(1.5) = 1
        ("((a][:b:c [d:3]", 10, [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        ("[a:b:3]", 5, [[3, "a"], [5, "b"]]),
        ("a [b|c] d", 3, [[1, "a b d"], [2, "a c d"], [3, "a b d"]]),
        ("(a [b:c:0.5]:1.2)", 10, [[5, "(a b:1.2)"], [10, "(a c:1.2)"]]),
        ("[a:b:0]", 4, [[4, "b"]]),  # a step below 1 adds no change
        ("[a:b:20]", 4, [[4, "a"]]),  # clamped to the last step
        ("a | b [c:d:2]", 10, [[10, "a | b [c:d:2]"]]),  # unreadable: one entry, as A1111
        (r"\[a:b:2\]", 10, [[10, r"\[a:b:2\]"]]),
    ],
)
def test_a1111_schedules(prompt: str, steps: int, expected: list) -> None:
    assert g(prompt, steps) == expected


def test_alternation() -> None:
    assert g("[fe|]male") == [
        [1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"],
        [6, "male"], [7, "female"], [8, "male"], [9, "female"], [10, "male"],
    ]  # fmt: skip
    assert g("[fe|||]male", 12) == [
        [1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
        [7, "male"], [8, "male"], [9, "female"], [10, "male"], [11, "male"], [12, "male"],
    ]  # fmt: skip
    assert g("[a|(b:1.1)]", 4) == [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"]]


def test_many_prompts_and_lookup() -> None:
    out = get_learned_conditioning_prompt_schedules(["x", "[a:b:0.5]", "x"], 4)
    assert out == [[[4, "x"]], [[2, "a"], [4, "b"]], [[4, "x"]]]
    schedule = out[1]
    assert [text_index(schedule, s) for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert text_index([2, 4], 9) == 1
