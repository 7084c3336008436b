"""Errors the generator raises. Each carries a short message fit to show a user."""

from __future__ import annotations


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
