"""Errors the generator raises. Each carries a short message fit to show a user."""

from __future__ import annotations

import sys


class GeneratorError(Exception):
    """Base class: `str(err)` is a short, user-facing reason."""

    #: whether retrying the same job later may succeed
    retryable: bool = False


class InvalidParams(GeneratorError, ValueError):
    """A request parameter is out of range; the message names it and the allowed range."""


class ModelLoadError(GeneratorError):
    """The model could not be loaded; the message says what to set."""


class OutOfMemory(GeneratorError):
    """The device ran out of memory; the cache was freed and the generator stays usable."""

    retryable = True


class BadOutput(GeneratorError):
    """The decode was NaN or black even after the fp32 VAE retry."""


class Cancelled(GeneratorError):
    """The job was cancelled between steps."""


def first_line(exc: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """The first line of `str(exc)` (the type name if empty), cut to `limit` chars with "...".

    `with_type` prefixes the type name (`RuntimeError: ...`) when there is a message.
    """
    lines = str(exc).strip().splitlines()
    if not lines:
        text = type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {lines[0].strip()}" if with_type else lines[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory (torch's OOM, ours, or a RuntimeError saying so)."""
    if isinstance(exc, OutOfMemory):
        return True
    torch = sys.modules.get("torch")  # this module stays torch-free: a torch error means torch is loaded
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
