"""The test tree has no __init__.py files, so pytest imports each test module by its basename:
two files with the same name in different folders shadow each other (one collection error)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_python_module_basenames_are_unique_across_tests() -> None:
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert [name for name, count in names.items() if count > 1] == []
