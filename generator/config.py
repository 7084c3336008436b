"""Plain configuration for the generator (no Discord, no pydantic-settings dependency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GeneratorConfig:
    """What the generator needs to load a model and bound a request."""

    model: str = "AstraliteHeart/pony-diffusion"
    revision: str | None = "fp16"
    variant: str | None = None
    device: str = "auto"
    upscaler: Path | None = None
    compile: bool = True
    max_pixels: int = 768 * 768
    max_steps: int = 50
    variation_strength: float = 0.6
    hires_strength: float = 0.35
    #: folder of `.safetensors` LoRAs used by `<lora:name:weight>` prompt tags (file stem = name)
    lora_dir: Path | None = None
    #: folder of textual-inversion embeddings (.safetensors/.pt/.bin) loaded at start; stem = word
    embeddings_dir: Path | None = None
    #: torch intra-op threads on the CPU (PONY_CPU_THREADS); 0 = one core fewer than available
    cpu_threads: int = 0
    # --- speed (generator.fastpath) ---------------------------------------------------------
    #: torch.compile mode on CUDA; "reduce-overhead" and "max-autotune" add CUDA graphs
    compile_mode: str = "reduce-overhead"
    #: (width, height) sizes compiled and warmed at start-up; other sizes run eager
    warmup_sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    #: most images in one UNet call (PONY_BATCH_SIZE); warm-up covers 1..batch_size images
    batch_size: int = 4
    #: fuse each attention's Q/K/V (K/V for cross-attention) projections into one matmul
    fuse_qkv: bool = False
    #: fp8 UNet linear layers through torchao (CUDA, compute capability >= 8.9, torchao installed)
    fp8: bool = False
    #: where torch.compile keeps its on-disk cache (TORCHINDUCTOR_CACHE_DIR unless already set)
    compile_cache_dir: Path | None = None
    #: a few-step LoRA (LCM-LoRA, TCD, Hyper-SD) fused at load; then every image uses the fast_* values
    fast_lora: Path | None = None
    fast_sampler: str = "LCM"
    fast_steps: int = 4
    fast_guidance: float = 1.0
