"""`ponybot generate` and `ponybot tiny-model`: the generator from a shell, without Discord.

Defaults come from the same settings as the bot (`PONY_*` environment variables and `.env`). Any
bad value ends with one line on stderr and a non-zero exit: 2 for usage, settings or parameter
errors, 1 when the model cannot be loaded or generation fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from generator.config import GeneratorConfig
from generator.errors import GeneratorError, InvalidParams
from generator.params import ASPECTS, GenerationParams, aspect_size, random_seed, validate
from generator.samplers import SAMPLER_NAMES, SCHEDULE_NAMES

DEFAULT_OUT = Path("outputs")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (we print one line)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code: 2 after a one-line usage error, 0 after --help."""
    try:
        return parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(parser.prog, str(exc), 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


#: Where `main` gets the generator config and request defaults (keys: negative, steps, guidance,
#: count, sampler, base_resolution); raises `ValueError` with a one-line message for a bad setting.
DefaultsSource = Callable[[], tuple[GeneratorConfig, dict[str, Any]]]


def _no_settings() -> tuple[GeneratorConfig, dict[str, Any]]:
    return GeneratorConfig(), {}


def build_generate_parser() -> argparse.ArgumentParser:
    """The argument parser of `ponybot generate` (defaults of None mean: from settings)."""
    p = _Parser(prog="ponybot generate", description="Generate images from a prompt, without Discord.")
    p.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), (word), [word])")
    p.add_argument("--negative", help="negative prompt (default: PONY_DEFAULT_NEGATIVE)")
    p.add_argument(
        "--seed", type=int, help="seed of the first image; image n uses seed + n (default: random)"
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: PONY_DEFAULT_STEPS)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: PONY_DEFAULT_GUIDANCE)")
    p.add_argument("--count", type=int, help="number of images (default: PONY_DEFAULT_COUNT)")
    p.add_argument(
        "--aspect",
        choices=list(ASPECTS),
        default="square",
        help="size preset, scaled to PONY_BASE_RESOLUTION (default: square)",
    )
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 64 (overrides --aspect)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 64 (overrides --aspect)")
    p.add_argument("--sampler", choices=list(SAMPLER_NAMES), help="sampler (default: PONY_DEFAULT_SAMPLER)")
    p.add_argument("--schedule", choices=list(SCHEDULE_NAMES), default="automatic", help="schedule type")
    p.add_argument(
        "--clip-skip", type=int, default=1, help="A1111 clip skip: 1 = last layer (default), 2 = penultimate"
    )
    p.add_argument("--lora-dir", type=Path, help="folder of <lora:name> .safetensors files")
    p.add_argument("--embeddings-dir", type=Path, help="folder of textual-inversion embeddings")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: PONY_MODEL)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="device (default: PONY_DEVICE)")
    return p


def main(argv: list[str] | None = None, defaults_source: DefaultsSource = _no_settings) -> int:
    """`ponybot generate PROMPT [options]`: write OUT/<seed>-<n>.png files and print their paths.

    `defaults_source` supplies the config and defaults (the bot passes its settings' values).
    """
    prog = "ponybot generate"
    args = _parse(build_generate_parser(), argv)
    if isinstance(args, int):
        return args

    try:
        gen_config, defaults = defaults_source()
    except ValueError as exc:
        return _fail(prog, str(exc), 2)

    width, height = aspect_size(args.aspect, defaults.get("base_resolution", 512))
    params = GenerationParams(
        prompt=args.prompt,
        negative=args.negative if args.negative is not None else defaults.get("negative", ""),
        seed=args.seed if args.seed is not None else random_seed(),
        steps=args.steps if args.steps is not None else defaults.get("steps", 25),
        guidance=args.guidance if args.guidance is not None else defaults.get("guidance", 7.0),
        width=args.width if args.width is not None else width,
        height=args.height if args.height is not None else height,
        count=args.count if args.count is not None else defaults.get("count", 1),
        sampler=args.sampler or defaults.get("sampler", SAMPLER_NAMES[0]),
        clip_skip=args.clip_skip,
        schedule=args.schedule,
    )
    if args.model:
        gen_config = replace(gen_config, model=args.model)
    if args.device:
        gen_config = replace(gen_config, device=args.device)
    if args.lora_dir:
        gen_config = replace(gen_config, lora_dir=args.lora_dir)
    if args.embeddings_dir:
        gen_config = replace(gen_config, embeddings_dir=args.embeddings_dir)
    # one run draws a few images: a compile warm-up (about a minute per shape) would cost far more
    gen_config = replace(gen_config, compile=False)
    try:
        from generator.extra_files import available_loras

        params = validate(
            params,
            max_pixels=gen_config.max_pixels,
            max_steps=gen_config.max_steps,
            loras=available_loras(gen_config.lora_dir),
        )
    except InvalidParams as exc:
        return _fail(prog, str(exc), 2)

    _quiet_libraries()
    from tqdm import tqdm

    from generator.metadata import save_png
    from generator.pipeline import Generator

    try:
        generator = Generator.load(gen_config)
        with tqdm(total=params.steps, desc="generating", unit="step", file=sys.stderr, leave=False) as bar:

            def progress(step: int, total: int, _preview: object) -> None:
                if bar.total != total:
                    bar.total = total
                bar.update(step - bar.n)

            result = generator.txt2img(params, progress=progress)
        paths = []
        for n, item in enumerate(result.images):
            paths.append(save_png(item.image, args.out / f"{params.seed}-{n}.png", item.parameters))
        for note in result.notes:
            print(note, file=sys.stderr)
    except GeneratorError as exc:
        return _fail(prog, str(exc), 2 if isinstance(exc, InvalidParams) else 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except OSError as exc:
        return _fail(prog, f"could not write images: {exc}", 1)
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def tiny_model_main(argv: list[str] | None = None) -> int:
    """`ponybot tiny-model PATH [--seed N] [--upscaler FILE]`: write tiny random models for testing."""
    prog = "ponybot tiny-model"
    p = _Parser(prog=prog, description="Write a tiny random SD v1.x diffusers folder (for tests and demos).")
    p.add_argument("path", type=Path, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--upscaler", type=Path, help="also write a tiny ESRGAN x4 here (.pth or .safetensors)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if args.path.exists() and not args.path.is_dir():
        return _fail(prog, f"{args.path} exists and is not a folder", 2)
    _quiet_libraries()
    from generator.tiny import write_tiny_esrgan, write_tiny_model

    try:
        print(write_tiny_model(args.path, seed=args.seed))
        if args.upscaler:
            print(write_tiny_esrgan(args.upscaler, seed=args.seed))
    except OSError as exc:
        return _fail(prog, str(exc), 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
