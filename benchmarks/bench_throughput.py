"""(b) Throughput draining 32 queued jobs from 4 users through the real worker, and (c) the GPU
thread's idle gap between consecutive jobs while the queue is not empty.

Rows, all in one process on the same model:

  diffusers          the model card's code (baseline): one `pipe(prompt, ...)` call per job, back to back
  ponybot batch 1    JobQueue (SQLite file) -> Worker -> Engine (GPU thread) -> PNG saves -> delivery,
                     PONY_BATCH_SIZE=1
  ponybot batch N    the same with PONY_BATCH_SIZE=N (default 4): compatible jobs share a UNet call

Every job is one 512x512 image at 25 DDIM steps, CFG 7, its own prompt and seed; users' jobs are
enqueued round-robin. The delivery stand-in waits `--upload-s` per job (an upload to Discord),
then marks the job done. images/s = 32 images / seconds from `Worker.start()` until the last job
is done (delivered). The idle gap (c) is read from the engine's own record of its GPU thread
(`Engine.timeline`): the time between one generator call returning and the next one starting; for
the baseline, between one `pipe()` call returning and the next starting. GPU memory is the peak
allocated during the batch-N drain (the Generator's weights, activations and CUDA-graph pools;
the baseline pipeline is loaded only afterwards).

Targets on one H100: >= 12 images/s, idle gap <= 10 ms, <= 8 GiB at batch 4.

    .venv/bin/python benchmarks/bench_throughput.py                 # GPU, real size, compiled
    .venv/bin/python benchmarks/bench_throughput.py --tiny          # CPU, tiny model, 64x64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from speed_common import (
    NEGATIVE,
    PROMPT,
    emit,
    machine,
    peak_gib,
    percentile,
    pick_device,
    plain_pipeline,
    quiet_libraries,
    reset_peak,
    sync,
    write_model,
)

from bot.jobs.models import Job, JobKind, JobStatus, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig
from generator.params import GenerationParams

LOOSE = QueueLimits(max_open_per_user=10**6, max_queued=10**6, cooldown_s=0.0)
USERS = 4


class UploadStub:
    """Delivery stand-in: an upload takes `upload_s` (not CPU), then the job is marked done."""

    def __init__(self, queue: JobQueue, upload_s: float, jobs: int) -> None:
        self.queue = queue
        self.upload_s = upload_s
        self.left = jobs
        self.all_done = asyncio.Event()

    async def job_started(self, job: Job) -> None:
        await asyncio.sleep(self.upload_s / 2)  # the "generating" status edit

    def progress(self, job: Job, step: int, total: int, preview: Any = None) -> None:
        pass

    async def deliver(self, job: Job) -> None:
        await asyncio.sleep(self.upload_s)
        await self.queue.mark_done(job.id, job.id)
        self.left -= 1
        if self.left <= 0:
            self.all_done.set()

    async def report_failure(self, job: Job) -> None:
        pass

    async def job_requeued(self, job: Job) -> None:
        pass

    def is_delivering(self, job_id: int) -> bool:
        return False


def job_params(i: int, size: int, steps: int) -> GenerationParams:
    """Job i: its own prompt and seed, the shared size/steps/sampler/guidance."""
    return GenerationParams(
        prompt=f"{PROMPT}, variant {i}",
        negative=NEGATIVE,
        seed=1000 + i,
        steps=steps,
        width=size,
        height=size,
    )


async def drain(
    engine: Engine, jobs: int, batch_size: int, size: int, steps: int, upload_s: float, tmp: Path
) -> dict[str, Any]:
    """Enqueue `jobs` jobs from USERS users, start a Worker, wait until all are done."""
    q = await JobQueue.open(tmp / f"jobs-{batch_size}.sqlite3", LOOSE)
    try:
        for i in range(jobs):
            await q.enqueue(
                kind=JobKind.TXT2IMG,
                params=job_params(i, size, steps).to_dict(),
                channel_id=1,
                user_id=1 + i % USERS,
                enforce_limits=False,
            )
        delivery = UploadStub(q, upload_s, jobs)
        worker = Worker(q, engine, delivery, images_dir=tmp / f"images-{batch_size}", batch_size=batch_size)
        engine.timeline.clear()
        start = time.perf_counter()
        worker.start()
        await delivery.all_done.wait()
        seconds = time.perf_counter() - start
        if (await q.counts()).get(JobStatus.DONE, 0) != jobs:
            raise SystemExit("not every job was delivered")
        await worker.stop(grace_s=30)
    finally:
        await q.close()
    calls = list(engine.timeline)
    gaps = engine.idle_gaps(calls)
    return {
        "images_per_s": round(jobs / seconds, 3),
        "seconds": round(seconds, 3),
        "generated_after_s": round(calls[-1].end - start, 3),
        "calls": len(calls),
        "gap_ms_median": round(statistics.median(gaps) * 1000, 2) if gaps else None,
        "gap_ms_p95": round(percentile(gaps, 0.95) * 1000, 2),
        "gap_ms_max": round(max(gaps, default=0.0) * 1000, 2),
    }


def baseline(folder: Path, device: str, jobs: int, size: int, steps: int) -> dict[str, Any]:
    """The model card's code, one call per job, back to back."""
    pipe = plain_pipeline(folder, device)
    pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size, width=size)  # warm-up
    sync(device)
    starts, ends = [], []
    start = time.perf_counter()
    for i in range(jobs):
        p = job_params(i, size, steps)
        starts.append(time.perf_counter())
        pipe(p.prompt, negative_prompt=p.negative, num_inference_steps=steps, height=size, width=size).images[
            0
        ]
        sync(device)
        ends.append(time.perf_counter())
    seconds = time.perf_counter() - start
    gaps = [b - a for a, b in zip(ends, starts[1:], strict=False)]
    return {
        "images_per_s": round(jobs / seconds, 3),
        "seconds": round(seconds, 3),
        "calls": jobs,
        "gap_ms_median": round(statistics.median(gaps) * 1000, 3),
        "gap_ms_p95": round(percentile(gaps, 0.95) * 1000, 3),
        "gap_ms_max": round(max(gaps) * 1000, 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load and warm the engine, drain at batch 1 and batch N, then run the baseline."""
    device = pick_device(args.tiny)
    size = args.size or (64 if args.tiny else 512)
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "model": "tiny random SD v1.x" if args.tiny else "SD v1.x architecture, random weights",
        **machine(device),
        "jobs": args.jobs,
        "users": USERS,
        "size": f"{size}x{size}",
        "steps": args.steps,
        "upload_s": args.upload_s,
        "compile": not args.no_compile,
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = write_model(tmp / "model", args.tiny, device)
        config = GeneratorConfig(
            model=str(folder),
            device=device,
            revision=None,
            compile=not args.no_compile,
            warmup_sizes=((size, size),),
            batch_size=args.batch,
        )
        engine = Engine(config)
        t0 = time.perf_counter()
        await engine.start_loading()
        if not await engine.wait_loaded():
            raise SystemExit(f"model did not load: {engine.error}")
        result["engine_load_s"] = round(time.perf_counter() - t0, 1)
        fast_path = engine.generator.fast_path
        result["fast_path"] = fast_path.summary() if fast_path else None
        await engine.call("txt2img", job_params(0, size, args.steps))  # first-call costs, both rows
        reset_peak(device)
        rows = result["rows"]
        rows[f"ponybot batch {args.batch}"] = await drain(
            engine, args.jobs, args.batch, size, args.steps, args.upload_s, tmp
        )
        result["peak_gib_batch"] = peak_gib(device)
        if args.batch != 1:
            rows["ponybot batch 1"] = await drain(engine, args.jobs, 1, size, args.steps, args.upload_s, tmp)
        engine.shutdown()
        rows["diffusers"] = baseline(folder, device, args.jobs, size, args.steps)
    base = rows["diffusers"]["images_per_s"]
    for row in rows.values():
        row["throughput_ratio"] = round(row["images_per_s"] / base, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU")
    ap.add_argument("--size", type=int, help="image side (default 512; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="PONY_BATCH_SIZE (images per UNet call)")
    ap.add_argument("--upload-s", type=float, default=0.2, help="simulated upload time per job")
    ap.add_argument("--no-compile", action="store_true", help="PONY_COMPILE=false")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    quiet_libraries()
    result = asyncio.run(run(args))
    print(f"{result['model']} on {result['device']} ({result['size']}, {result['steps']} steps)")
    print(f"{'row':>18} | {'images/s':>8} | {'ratio':>6} | {'gap p50 ms':>10} | {'gap max ms':>10}")
    for name, row in result["rows"].items():
        print(
            f"{name:>18} | {row['images_per_s']:>8.3f} | {row['throughput_ratio']:>6.3f} |"
            f" {row['gap_ms_median']!s:>10} | {row['gap_ms_max']:>10}"
        )
    emit(result, "bench_throughput", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
