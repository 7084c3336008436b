"""The generator's home inside the bot: one dedicated thread that owns the model.

All GPU work runs in that single thread, so the event loop (and the gateway heartbeat) never
stalls. The model loads in the background at start-up; jobs wait in the queue meanwhile. This
module imports the generator lazily, inside the thread, so `bot/` never imports torch itself.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from generator.config import GeneratorConfig
from generator.errors import GeneratorError, ModelLoadError

if TYPE_CHECKING:
    from generator.pipeline import Generator

log = logging.getLogger(__name__)
T = TypeVar("T")


TIMELINE_LEN = 1024


@dataclass(frozen=True)
class GpuCall:
    """One generator call as seen by the GPU thread (`time.perf_counter` seconds)."""

    method: str
    start: float
    end: float
    ok: bool


class EngineState(enum.StrEnum):
    """Where the model is in its life."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    #: a call ignored the watchdog: no more work in this process (it exits for a restart)
    HUNG = "hung"


class GeneratorUnavailable(GeneratorError):
    """The model is not loaded (still loading, or failed to load)."""

    retryable = True


class Engine:
    """Runs generator calls one at a time in the GPU thread."""

    def __init__(self, config: GeneratorConfig, loader: Callable[[GeneratorConfig], Generator] | None = None):
        self.config = config
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponybot-gpu")
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.generator: Generator | None = None
        self.load_seconds: float | None = None
        self._ready = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        #: the latest generator calls, as timed in the GPU thread (benchmarks, tests, /healthz)
        self.timeline: collections.deque[GpuCall] = collections.deque(maxlen=TIMELINE_LEN)

    def start_loading(self) -> asyncio.Task[None]:
        """Begin loading the model in the GPU thread; returns the task (never raises)."""
        if self._load_task is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())
        return self._load_task

    def _load_in_thread(self) -> Generator:
        if self._loader is not None:
            return self._loader(self.config)
        from generator.pipeline import Generator  # lazy: keeps torch out of the bot's import graph

        return Generator.load(self.config)

    async def _load(self) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            self.generator = await loop.run_in_executor(self._executor, self._load_in_thread)
        except ModelLoadError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a model that cannot load must not take the bot down
            log.exception("model load crashed")
            self._fail(f"Could not load model {self.config.model!r}: {exc}")
        else:
            self.load_seconds = time.perf_counter() - started
            self.state = EngineState.READY
            log.info("model ready in %.1f s on %s", self.load_seconds, self.describe())
        finally:
            self._ready.set()

    def _fail(self, message: str) -> None:
        self.state = EngineState.FAILED
        self.error = message
        log.error("generator unavailable: %s", message)

    async def wait_loaded(self) -> bool:
        """Wait until loading ended; True when the model is usable."""
        await self._ready.wait()
        return self.state is EngineState.READY

    def describe(self) -> str:
        """One line: model, device and dtype (or the state)."""
        gen = self.generator
        if gen is None:
            return f"{self.config.model} ({self.state.value})"
        return f"{gen.model_name} on {gen.device} ({gen.dtype_name})"

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `generator.<method>(*args, **kwargs)` in the GPU thread."""
        if self.state is not EngineState.READY:
            raise GeneratorUnavailable(
                f"The generator is unavailable: {self.error}"
                if self.state is EngineState.FAILED
                else "The generator is unavailable right now; your job stays in the queue."
            )
        fn = functools.partial(getattr(self.generator, method), *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, method, fn)

    def _timed(self, method: str, fn: Callable[[], T]) -> T:
        """Run `fn` in the GPU thread and record when it started and ended (`timeline`)."""
        start = time.perf_counter()
        ok = False
        try:
            result = fn()
            ok = True
            return result
        finally:
            self.timeline.append(GpuCall(method, start, time.perf_counter(), ok))

    def idle_gaps(self, calls: list[GpuCall] | None = None) -> list[float]:
        """Seconds the GPU thread sat idle between consecutive calls (of `calls`, default the timeline)."""
        calls = list(self.timeline) if calls is None else calls
        return [b.start - a.end for a, b in itertools.pairwise(calls)]

    def gpu_memory(self) -> tuple[str, int, int] | None:
        """(GPU name, bytes in use, total bytes) when on CUDA, else None. Cheap; any thread."""
        gen = self.generator
        if gen is None or not str(gen.device).startswith("cuda"):
            return None
        import torch  # only reached on a CUDA box, where torch is already loaded

        free, total = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), total - free, total

    def mark_hung(self, reason: str) -> None:
        """The GPU thread is hung (the watchdog's verdict): refuse every further call.

        The stuck call may still be using the pipeline, and a CUDA context in that state is not
        to be trusted, so no next job runs beside it; the process exits and is restarted.
        """
        log.critical("GPU thread is hung: %s", reason)
        self.state = EngineState.HUNG
        self.error = reason

    def shutdown(self) -> None:
        """Stop the GPU thread after the current call."""
        self._executor.shutdown(wait=False, cancel_futures=True)
