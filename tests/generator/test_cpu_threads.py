"""On the CPU the model load leaves a core to the event loop (PONY_CPU_THREADS overrides it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bot.config import SettingsError, load_settings
from generator.config import GeneratorConfig
from generator.loader import load_pipeline

#: torch's own thread count before the load in these tests: more than any core count faked here
TORCH_DEFAULT = 16


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """Start from a generous torch default and put the suite's one thread back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_DEFAULT)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fake_cores(monkeypatch: pytest.MonkeyPatch, cores: int, *, affinity: bool = True) -> None:
    """This process may run on `cores` CPUs of a machine with 64 (or `cores` without an affinity API)."""
    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)


def threads_after_load(model: Path, *, cpu_threads: int = 0) -> int:
    """Load on the CPU in a dedicated thread, as the bot's engine does; torch's threads there afterwards."""
    config = GeneratorConfig(model=str(model), device="cpu", revision=None, cpu_threads=cpu_threads)
    with ThreadPoolExecutor(max_workers=1) as gpu_thread:
        gpu_thread.submit(load_pipeline, config).result()
        return gpu_thread.submit(torch.get_num_threads).result()


@pytest.mark.parametrize(("cores", "affinity", "expected"), [(4, True, 3), (6, False, 5), (1, True, 1)])
def test_auto_leaves_one_core(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, cores: int, affinity: bool, expected: int
) -> None:
    fake_cores(monkeypatch, cores, affinity=affinity)
    assert threads_after_load(tiny_model_dir) == expected
    # threads that start using torch later (a new GPU thread) get the same count
    with ThreadPoolExecutor(max_workers=1) as later:
        assert later.submit(torch.get_num_threads).result() == expected


def test_auto_never_raises_torchs_own_count(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OMP_NUM_THREADS=2 (or a program's torch.set_num_threads(2)) on 8 cores stays 2."""
    fake_cores(monkeypatch, 8)
    torch.set_num_threads(2)
    assert threads_after_load(tiny_model_dir) == 2


def test_pony_cpu_threads_overrides(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cores(monkeypatch, 4)
    monkeypatch.setenv("PONY_CPU_THREADS", "4")
    config = load_settings().generator_config()
    assert config.cpu_threads == 4
    assert threads_after_load(tiny_model_dir, cpu_threads=config.cpu_threads) == 4
    assert threads_after_load(tiny_model_dir, cpu_threads=2) == 2


def test_pony_cpu_threads_unset_or_zero_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PONY_CPU_THREADS", raising=False)
    assert load_settings().generator_config().cpu_threads == 0
    monkeypatch.setenv("PONY_CPU_THREADS", "0")
    assert load_settings().generator_config().cpu_threads == 0


def test_negative_pony_cpu_threads_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONY_CPU_THREADS", "-1")
    with pytest.raises(SettingsError, match=r"^Invalid setting PONY_CPU_THREADS: .*got '-1'"):
        load_settings()
