"""Shared pieces of the speed benchmarks (bench_latency, bench_throughput, bench_bot_path).

The baseline everywhere is the pony-diffusion model card's code: a `StableDiffusionPipeline` with
the card's `DDIMScheduler`, fp16 on CUDA, default settings, one `pipe(prompt, ...)` call per request.
Models have the real SD v1.x architecture with random weights (compute does not depend on weight
values) or, with `--tiny`, the tests' tiny random model on the CPU.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "pinkie pie portrait, smiling, detailed, (best quality)"
NEGATIVE = "lowres, bad anatomy, worst quality, low quality"


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers/transformers."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def pick_device(tiny: bool) -> str:
    """cpu for --tiny (one torch thread, so neighbours on a shared machine disturb it less), else cuda."""
    if tiny:
        torch.set_num_threads(1)
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny on a CPU")
    return "cuda"


def write_model(folder: Path, tiny: bool, device: str) -> Path:
    """The tiny random model (--tiny) or the SD v1.x architecture with random weights."""
    if tiny:
        from generator.tiny import write_tiny_model

        return write_tiny_model(folder)
    return write_real_size_model(folder, device)


def write_real_size_model(path: Path, device: str) -> Path:
    """SD v1.x UNet/VAE/CLIP-L configs with random weights, saved as a diffusers folder (fp16 on CUDA)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from generator.tiny import MODEL_CARD_SCHEDULER, byte_level_vocab

    vocab = byte_level_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)
    with torch.device(device):  # random init on the GPU is much faster than on the CPU
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                projection_dim=768,
                hidden_act="quick_gelu",
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**MODEL_CARD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if device.startswith("cuda"):
        pipe.to(torch.float16)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def plain_pipeline(folder: Path, device: str) -> Any:
    """The model card's usage: StableDiffusionPipeline + the card's DDIMScheduler, fp16 on CUDA."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        dtype=dtype,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn` takes, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def machine(device: str) -> dict[str, Any]:
    """What ran the benchmark."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return info


def peak_gib(device: str) -> float | None:
    """Peak GPU memory allocated since the last reset, GiB (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak(device: str) -> None:
    """Start a new peak-memory window."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def emit(result: dict[str, Any], name: str, json_path: Path | None) -> None:
    """Print the JSON; also write it to `json_path` and to $OUT/<name>.json when $OUT is set."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        json_path.write_text(text + "\n", encoding="utf-8")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"{name}.json").write_text(text + "\n", encoding="utf-8")
