"""Generator vs plain diffusers as on the pony-diffusion model card, same model, same process.

The model is the SD v1.x architecture at real size with random weights (compute does not depend
on weight values), written to a temporary diffusers folder so that the Generator loads it through
`generator.loader` like a real model. The baseline is the model card's code: a
`StableDiffusionPipeline` with the card's `DDIMScheduler`, fp16 on CUDA, default settings. Both
make one 512x512 image from the same prompt at 25 and 50 DDIM steps; runs alternate between the
two and the median is reported. ratio = Generator seconds / diffusers seconds (< 1: faster).

    .venv/bin/python benchmarks/generate_bench.py            # GPU (or CPU: very slow), real size
    .venv/bin/python benchmarks/generate_bench.py --tiny     # CPU, tiny random model, 64x64
    .venv/bin/python benchmarks/generate_bench.py --tiny --repeats 9 --json out.json

`--tiny` runs torch with 1 thread (both sides), so other jobs on a small shared machine disturb it
less. The JSON also goes to $OUT/generate_bench.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed_common import plain_pipeline, timed, write_model

from generator.config import GeneratorConfig
from generator.params import GenerationParams
from generator.pipeline import Generator

PROMPT = "pinkie pie portrait, smiling, detailed, (best quality)"
STEPS = (25, 50)


def run(tiny: bool, repeats: int) -> dict:
    """Measure both sides; returns the result dict (also printed as a table)."""

    if tiny:
        torch.set_num_threads(1)
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 64 if tiny else 512
    result: dict = {
        "model": "tiny random SD v1.x" if tiny else "SD v1.x architecture, random weights",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": f"{size}x{size}",
        "repeats": repeats,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = Path(tmp) / ("tiny" if tiny else "sd-v1-random")
        write_model(folder, tiny, device)
        result["write_model_s"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        # on CUDA the Generator row is the fast path (compiled, CUDA graphs), warmed at this size, batch 1
        gen = Generator.load(
            GeneratorConfig(
                model=str(folder), device=device, revision=None, warmup_sizes=((size, size),), batch_size=1
            )
        )
        result["generator_load_s"] = round(time.perf_counter() - t0, 2)
        # the model card's code
        t0 = time.perf_counter()
        plain = plain_pipeline(folder, device)
        result["diffusers_load_s"] = round(time.perf_counter() - t0, 2)

        for steps in STEPS:
            params = GenerationParams(
                prompt=PROMPT, seed=1, steps=steps, width=size, height=size, sampler="DDIM"
            )

            def ours(p: GenerationParams = params) -> object:
                return gen.txt2img(p)

            def theirs(n: int = steps) -> object:
                return plain(PROMPT, num_inference_steps=n, height=size, width=size).images[0]

            ours()
            theirs()  # warm-up
            a, b = [], []
            for _ in range(repeats):
                a.append(timed(ours, device))
                b.append(timed(theirs, device))
            g, d = statistics.median(a), statistics.median(b)
            result["rows"].append(
                {
                    "steps": steps,
                    "generator_s": round(g, 4),
                    "diffusers_s": round(d, 4),
                    "ratio": round(g / d, 3),
                    "generator_runs_s": [round(x, 4) for x in a],
                    "diffusers_runs_s": [round(x, 4) for x in b],
                }
            )
        if device.startswith("cuda"):
            result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (64x64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side and step count")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    result = run(args.tiny, args.repeats)

    print(f"{result['model']} on {result['device']} ({result['size']}, torch {result['torch']})")
    print(f"{'steps':>5} | {'Generator s/img':>15} | {'diffusers s/img':>15} | {'ratio':>6}")
    for row in result["rows"]:
        print(
            f"{row['steps']:>5} | {row['generator_s']:>15.4f} | {row['diffusers_s']:>15.4f} | {row['ratio']:>6.3f}"
        )
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "generate_bench.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
