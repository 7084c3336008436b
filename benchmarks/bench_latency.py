"""(a) Single-job latency: one image at 25 DDIM steps, ponybot's Generator vs the model card's diffusers.

Rows, all in one process on the same model (runs alternate between rows; medians):

  diffusers   the model card's code (baseline): StableDiffusionPipeline + DDIM, fp16 on CUDA
  eager       Generator with PONY_COMPILE=false (fp16, SDPA, channels-last on CUDA)
  fast path   Generator as the bot runs it: torch.compile (PONY_COMPILE_MODE, default
              reduce-overhead = CUDA graphs), this size warmed at batch 1 (warm-up time reported)
  fast mode   the fast path plus a fused few-step LoRA (random weights in the LCM-LoRA layout),
              LCM sampler, 4 steps, CFG 1 (--fast-mode)

ratio = row seconds / diffusers seconds (< 1: faster). Target on one H100: fast path <= 0.15 s at
512x512, 25 steps. On a CPU (--tiny) nothing compiles: the rows measure the Generator's overhead.

    .venv/bin/python benchmarks/bench_latency.py --fast-mode                  # GPU, 512x512, real size
    .venv/bin/python benchmarks/bench_latency.py --tiny                       # CPU, tiny model, 64x64
    .venv/bin/python benchmarks/bench_latency.py --compile-mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from speed_common import (
    PROMPT,
    emit,
    machine,
    pick_device,
    plain_pipeline,
    quiet_libraries,
    timed,
    write_model,
)

from generator.config import GeneratorConfig
from generator.fastpath import COMPILE_MODES
from generator.params import GenerationParams
from generator.pipeline import Generator


def run(args: argparse.Namespace) -> dict:
    """Load every row's pipeline, warm each once, then time `repeats` alternating rounds."""
    device = pick_device(args.tiny)
    size = args.size or (64 if args.tiny else 512)
    result: dict = {
        "benchmark": "latency",
        "model": "tiny random SD v1.x" if args.tiny else "SD v1.x architecture, random weights",
        **machine(device),
        "size": f"{size}x{size}",
        "steps": args.steps,
        "repeats": args.repeats,
        "compile_mode": args.compile_mode,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model", args.tiny, device)
        plain = plain_pipeline(folder, device)
        config = GeneratorConfig(
            model=str(folder),
            device=device,
            revision=None,
            compile_mode=args.compile_mode,
            warmup_sizes=((size, size),),
            batch_size=1,
        )
        params = GenerationParams(prompt=PROMPT, seed=1, steps=args.steps, width=size, height=size)
        rows: dict[str, Callable[[], object]] = {
            "diffusers": lambda: plain(
                PROMPT, num_inference_steps=args.steps, height=size, width=size
            ).images[0],
        }
        eager = Generator.load(replace(config, compile=False))
        rows["eager"] = lambda: eager.txt2img(params)
        t0 = time.perf_counter()
        fast = Generator.load(config)
        result["fast_path_load_s"] = round(time.perf_counter() - t0, 1)
        result["fast_path"] = fast.fast_path.summary() if fast.fast_path else None
        rows["fast path"] = lambda: fast.txt2img(params)
        if args.fast_mode:
            from generator.tiny import write_random_lora

            lora = write_random_lora(folder, Path(tmp) / "lora" / "lcm-like.safetensors")
            fast_mode = Generator.load(replace(config, fast_lora=lora, fast_sampler="LCM", fast_steps=4))
            result["fast_mode"] = fast_mode.fast_path.summary() if fast_mode.fast_path else None
            rows["fast mode (LCM 4 steps)"] = lambda: fast_mode.txt2img(params)

        for fn in rows.values():  # warm-up run (kernels, allocator, cuDNN autotune)
            fn()
        runs: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, fn in rows.items():
                runs[name].append(timed(fn, device))
        base = statistics.median(runs["diffusers"])
        for name, values in runs.items():
            median = statistics.median(values)
            result["rows"].append(
                {
                    "row": name,
                    "seconds": round(median, 4),
                    "ratio": round(median / base, 3),
                    "runs_s": [round(v, 4) for v in values],
                }
            )
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU")
    ap.add_argument("--size", type=int, help="image side (default 512; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="reduce-overhead")
    ap.add_argument("--fast-mode", action="store_true", help="add the few-step LoRA row")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    quiet_libraries()
    result = run(args)
    print(f"{result['model']} on {result['device']} ({result['size']}, {result['steps']} steps)")
    print(f"{'row':>24} | {'s/image':>8} | {'ratio':>6}")
    for row in result["rows"]:
        print(f"{row['row']:>24} | {row['seconds']:>8.4f} | {row['ratio']:>6.3f}")
    emit(result, "bench_latency", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
