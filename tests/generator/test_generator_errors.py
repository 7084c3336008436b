"""The one-line reasons and the out-of-memory test every generator module (and the doctor) share."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from generator.errors import OutOfMemory, first_line, is_oom


def test_first_line_is_the_stripped_first_line_of_the_message() -> None:
    assert first_line(ValueError("  bad header \nTraceback noise\nmore")) == "bad header"


def test_first_line_falls_back_to_the_type_name() -> None:
    assert first_line(TimeoutError()) == "TimeoutError"
    assert first_line(TimeoutError(), with_type=True) == "TimeoutError"


def test_first_line_with_type_names_the_error() -> None:
    assert (
        first_line(RuntimeError("inductor exploded\nstack"), with_type=True)
        == "RuntimeError: inductor exploded"
    )


def test_first_line_cuts_to_the_limit_with_an_ellipsis() -> None:
    assert first_line(OSError("x" * 300)) == "x" * 197 + "..."
    cut = first_line(RuntimeError("y" * 300), 160, with_type=True)
    assert len(cut) == 160 and cut.startswith("RuntimeError: yyy") and cut.endswith("...")
    assert first_line(OSError("z" * 160), 160) == "z" * 160


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA error: allocation failed"),
        OutOfMemory("The GPU ran out of memory."),
        RuntimeError("MPS backend out of memory (MPS allocated: 9 GiB)"),
    ],
)
def test_is_oom_recognises_every_device_oom(exc: BaseException) -> None:
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [RuntimeError("shape mismatch"), ValueError("out of memory"), MemoryError()])
def test_is_oom_leaves_other_errors_alone(exc: BaseException) -> None:
    assert not is_oom(exc)


def test_errors_module_stays_torch_free() -> None:
    code = "import sys, generator.errors as e; assert not e.is_oom(RuntimeError('x')); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
