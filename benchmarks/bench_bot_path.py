"""(d) The whole bot path against bare pipeline calls, on the CPU with the tiny model.

Three rows in one process, on the same tiny random model, same number of images:

  bare pipeline   the model card's code: one `pipe(prompt, ...)` call per job, back to back (baseline)
  generator       ponybot's Generator alone: one `txt2img` per job
  bot             the real bot (`bot.app.run_bot`) against the loopback Discord of the e2e tests
                  (tests/e2e/fake_discord.py, same process and event loop): /pony slash commands from
                  4 members -> defer -> queue (SQLite file) -> worker -> engine thread -> PNG saves ->
                  status/progress edits and result uploads (multipart) -> done

The bot row's time runs from the first /pony until the last result message is posted; ratio =
row seconds / bare pipeline seconds. Target: bot <= 1.10x. torch uses one thread (OMP_NUM_THREADS=1)
in every row, so that the bot's event loop, PNG encodes and the loopback Discord have the second
core, as they would have spare cores on a GPU box.

    .venv/bin/python benchmarks/bench_bot_path.py --tiny            # 16 jobs, 256x256, 25 steps
    .venv/bin/python benchmarks/bench_bot_path.py --tiny --jobs 32 --size 128
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, for every thread
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from speed_common import (
    PROMPT,
    ROOT,
    emit,
    machine,
    pick_device,
    plain_pipeline,
    quiet_libraries,
    write_model,
)

sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from generator.config import GeneratorConfig
from generator.params import GenerationParams
from generator.pipeline import Generator

RESULT_TITLES = ("Image", "Upscale", "Variations")


def _is_result(message: Any) -> bool:
    return (
        bool(message.attachments) and bool(message.embeds) and message.embeds[0].get("title") in RESULT_TITLES
    )


def bare(folder: Path, jobs: int, size: int, steps: int) -> float:
    """The model card's code, one call per job."""
    pipe = plain_pipeline(folder, "cpu")
    pipe(PROMPT, num_inference_steps=steps, height=size, width=size)  # warm-up
    start = time.perf_counter()
    for i in range(jobs):
        pipe(f"{PROMPT} {i}", num_inference_steps=steps, height=size, width=size).images[0]
    return time.perf_counter() - start


def generator_alone(folder: Path, jobs: int, size: int, steps: int) -> float:
    """ponybot's Generator, one txt2img per job."""
    gen = Generator.load(GeneratorConfig(model=str(folder), device="cpu", revision=None))
    gen.txt2img(GenerationParams(prompt=PROMPT, steps=steps, width=size, height=size))  # warm-up
    start = time.perf_counter()
    for i in range(jobs):
        gen.txt2img(GenerationParams(prompt=f"{PROMPT} {i}", seed=i, steps=steps, width=size, height=size))
    return time.perf_counter() - start


async def bot_path(folder: Path, data: Path, jobs: int, size: int, steps: int, batch: int) -> dict[str, Any]:
    """Start the real bot against the loopback Discord; time `jobs` /pony commands end to end."""
    from fake_discord import FakeDiscord

    from bot.app import run_bot
    from bot.config import load_settings
    from bot.runtime.engine import EngineState

    fake = FakeDiscord()
    fake.check_spec = False  # the tests check bodies; here it would add ~30 ms per request to the loop
    await fake.start()
    env = {
        "DISCORD_TOKEN": fake.bot_token,
        "DISCORD_API_BASE": fake.api_base,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "PONY_DATA_DIR": str(data),
        "PONY_MODEL": str(folder),
        "PONY_DEVICE": "cpu",
        "PONY_COOLDOWN_S": "0",
        "PONY_MAX_OPEN_JOBS_PER_USER": str(jobs),
        "PONY_MAX_QUEUE": str(jobs * 2),
        "PONY_DEFAULT_STEPS": str(steps),
        "PONY_DEFAULT_COUNT": "1",
        "PONY_BASE_RESOLUTION": str(size),
        "PONY_BATCH_SIZE": str(batch),
        "PONY_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    stop = asyncio.Event()
    built: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_bot(load_settings(_env_file=None), handle_signals=False, stop=stop, started=built.set_result)
    )
    try:
        bot = await asyncio.wait_for(built, 30)
        deadline = time.monotonic() + 120
        while not (bot.is_ready() and bot.engine.state is EngineState.READY):
            if task.done() or time.monotonic() > deadline:
                raise SystemExit(f"bot did not start: {bot.engine.error or task}")
            await asyncio.sleep(0.05)
        users = [fake.alice, fake.bob, fake.mod, fake.admin]
        start = time.perf_counter()
        for i in range(jobs):
            await fake.slash("pony", {"prompt": f"{PROMPT} {i}", "seed": i}, user=users[i % len(users)])
        while sum(_is_result(m) for m in fake.channel_messages(fake.channel_id)) < jobs:
            if task.done():
                task.result()
            if time.perf_counter() - start > 600:
                raise SystemExit("the bot did not deliver every job within 600 s")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - start
        gaps = bot.engine.idle_gaps()
        return {
            "seconds": round(seconds, 3),
            "engine_calls": len(bot.engine.timeline),
            "gap_ms_max": round(max(gaps, default=0.0) * 1000, 2),
        }
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await fake.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Baseline first, then the Generator alone, then the bot; ratios against the baseline."""
    pick_device(True)
    result: dict[str, Any] = {
        "benchmark": "bot path",
        "model": "tiny random SD v1.x",
        **machine("cpu"),
        "jobs": args.jobs,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "batch_size": args.batch,
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = write_model(tmp / "model", True, "cpu")
        rows = result["rows"]
        rows["bare pipeline"] = {"seconds": round(bare(folder, args.jobs, args.size, args.steps), 3)}
        rows["generator"] = {"seconds": round(generator_alone(folder, args.jobs, args.size, args.steps), 3)}
        rows["bot"] = asyncio.run(
            bot_path(folder, tmp / "data", args.jobs, args.size, args.steps, args.batch)
        )
    base = rows["bare pipeline"]["seconds"]
    for row in rows.values():
        row["ratio"] = round(row["seconds"] / base, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (the only mode)")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="image side (PONY_BASE_RESOLUTION)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4, help="PONY_BATCH_SIZE")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    quiet_libraries()
    result = run(args)
    print(f"{result['jobs']} jobs, {result['size']}, {result['steps']} steps, tiny model on the CPU")
    print(f"{'row':>14} | {'seconds':>8} | {'ratio':>6}")
    for name, row in result["rows"].items():
        print(f"{name:>14} | {row['seconds']:>8.3f} | {row['ratio']:>6.3f}")
    emit(result, "bench_bot_path", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
