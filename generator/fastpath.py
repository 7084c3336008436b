"""Speed set-up of a loaded pipeline (called from `Generator._prepare_for_device`).

Every device (`prepare_model`):

- an optional few-step LoRA (`GeneratorConfig.fast_lora`: LCM-LoRA, TCD, Hyper-SD) loaded with
  `pipe.load_lora_weights`, fused into the weights and its adapter dropped, so it costs nothing
  per step; the generator then uses `fast_sampler`/`fast_steps`/`fast_guidance` for every image;
- PyTorch SDPA attention (`AttnProcessor2_0`) in the UNet and VAE; nothing here enables attention
  slicing or CPU offload;
- optional fused QKV projections (`pipe.fuse_qkv_projections()`).

CUDA only (`accelerate`; a no-op on CPU and MPS):

- TF32 for fp32 leftovers, cuDNN autotuning, channels-last UNet and VAE (the weights are fp16;
  the fp32 VAE is only the generator's NaN retry);
- optional fp8 UNet linear layers through torchao, only if torchao is importable;
- `torch.compile` of the UNet and of the VAE decode, then a warm-up that runs every configured
  size at 1..batch_size images through the real generator. Only the shapes seen in the warm-up
  use the compiled code (with CUDA graphs in "reduce-overhead" / "max-autotune" mode); any other
  shape runs eager, so no job ever waits behind a 50-80 s compile. A compile that fails, during the
  warm-up or later, logs a warning and falls back to eager; it never takes the bot down.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from generator.config import GeneratorConfig
from generator.errors import ModelLoadError, first_line, is_oom

log = logging.getLogger(__name__)

#: accepted `compile_mode` values (torch.compile modes)
COMPILE_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default")
#: modes in which inductor records CUDA graphs
CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
#: UNet calls per warmed shape: compile, then CUDA-graph warm-up and recording, then a replay
WARMUP_STEPS = 3
#: any guidance above 1 gives the CFG shapes (2 UNet rows per image) that real requests use
WARMUP_GUIDANCE = 7.0
FAST_ADAPTER = "ponybot_fast"


@dataclass
class FastPathReport:
    """What the speed set-up did, for logs, tests and benchmarks."""

    device: str
    applied: list[str] = field(default_factory=list)
    #: A1111 "Lora hashes" text of the fused few-step LoRA ("name: hash"), or None
    fast_lora: str | None = None
    compile_mode: str | None = None
    #: (width, height, images) shapes compiled and warmed
    warmed: list[tuple[int, int, int]] = field(default_factory=list)
    warmup_s: float = 0.0
    peak_gib: float | None = None
    #: why the compiled path is off (compile failed), or None
    compile_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    routes: list[CompiledRoute] = field(default_factory=list)

    def summary(self) -> str:
        """One log line."""
        parts = [", ".join(self.applied) or "nothing"]
        if self.compile_mode and not self.compile_error:
            parts.append(f"{len(self.warmed)} shapes warmed in {self.warmup_s:.1f} s")
        if self.peak_gib is not None:
            parts.append(f"peak {self.peak_gib:.2f} GiB")
        if self.compile_error:
            parts.append(f"compile off: {self.compile_error}")
        return f"fast path on {self.device}: " + "; ".join(parts)


# --- every device ------------------------------------------------------------------------------


def _lora_file(path: Path) -> tuple[Path, str]:
    """(folder, weight file name) of a LoRA given as a .safetensors file or a folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"PONY_FAST_LORA folder {str(path)!r} holds no .safetensors file.")
        preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        return path, (preferred or files)[0].name
    if not path.is_file():
        raise ModelLoadError(f"PONY_FAST_LORA {str(path)!r}: no such file or folder.")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"PONY_FAST_LORA {str(path)!r}: only .safetensors LoRA files are loaded (pickles are refused)."
        )
    return path.parent, path.name


def load_fast_lora(pipe: Any, path: Path) -> str:
    """Load a few-step LoRA into `pipe`, fuse it into the weights and drop the adapter.

    Returns the A1111 "Lora hashes" text ("name: hash"). Raises `ModelLoadError` with one line
    when peft is missing or the file is not a LoRA for this model.
    """
    from generator.loader import short_hash

    folder, weight_name = _lora_file(path)
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError("PONY_FAST_LORA needs the peft package (pip install peft).")
    name = Path(weight_name).stem if Path(path).is_file() else Path(path).name
    try:
        pipe.load_lora_weights(
            str(folder), weight_name=weight_name, adapter_name=FAST_ADAPTER, local_files_only=True
        )
        adapters = pipe.get_list_adapters()
        if FAST_ADAPTER not in adapters.get("unet", []):
            raise ValueError("it has no weights for this model's UNet (is it an SD v1.x LoRA?)")
        pipe.fuse_lora(lora_scale=1.0, adapter_names=[FAST_ADAPTER])
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load PONY_FAST_LORA {str(path)!r}: {first_line(exc, 160, with_type=True)}"
        ) from None
    return f"{name}: {short_hash(folder / weight_name)}"


def _use_sdpa(pipe: Any) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        model.set_attn_processor(AttnProcessor2_0())


def prepare_model(pipe: Any, config: GeneratorConfig, device: str) -> FastPathReport:
    """Device-independent set-up: fast LoRA (fused), SDPA attention, optional fused QKV."""
    report = FastPathReport(device=device)
    if config.fast_lora is not None:
        report.fast_lora = load_fast_lora(pipe, Path(config.fast_lora))
        report.applied.append(
            f"fast LoRA {report.fast_lora} ({config.fast_sampler}, {config.fast_steps} steps)"
        )
    _use_sdpa(pipe)
    report.applied.append("sdpa")
    if config.fuse_qkv and config.lora_dir is not None:
        _warn(report, "fused QKV projections are off: per-job LoRAs (PONY_LORA_DIR) adapt to_q/to_k/to_v")
    elif config.fuse_qkv:
        try:
            pipe.fuse_qkv_projections()
            report.applied.append("fused qkv")
        except Exception as exc:  # experimental in diffusers: keep the unfused model
            _warn(
                report, f"fused QKV projections failed ({first_line(exc, 160, with_type=True)}); left unfused"
            )
    return report


def _warn(report: FastPathReport, message: str) -> None:
    log.warning(message)
    report.warnings.append(message)


# --- compiled routes ---------------------------------------------------------------------------


class CompiledRoute:
    """Sends calls whose shape key was seen during the warm-up to `compiled`, the rest to `eager`.

    While `warming` is set every call goes to `compiled` and its key is remembered on success.
    A compiled call that fails outside the warm-up (other than out of memory) disables the route
    for good, with a warning, and is re-run eager. With CUDA graphs the outputs are cloned: a
    replay overwrites the previous replay's output buffers.
    """

    def __init__(
        self,
        name: str,
        eager: Callable[..., torch.Tensor],
        compiled: Callable[..., torch.Tensor],
        *,
        cudagraphs: bool,
    ) -> None:
        self.name = name
        self.eager = eager
        self.compiled = compiled
        self.cudagraphs = cudagraphs
        self.keys: set[Hashable] = set()
        self.warming = False
        self.error: str | None = None
        self.compiled_calls = 0
        self.eager_calls = 0

    def __call__(self, key: Hashable, *args: torch.Tensor) -> torch.Tensor:
        if self.error is None and (self.warming or key in self.keys):
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(*args)
            except Exception as exc:
                if self.warming or is_oom(exc):
                    raise
                self.disable(first_line(exc, 160, with_type=True))
            else:
                if self.warming:
                    self.keys.add(key)
                self.compiled_calls += 1
                return out.clone() if self.cudagraphs else out
        self.eager_calls += 1
        return self.eager(*args)

    def disable(self, reason: str) -> None:
        """Run eager from now on."""
        if self.error is None:
            log.warning("torch.compile of the %s failed (%s); it runs eager from now on", self.name, reason)
            self.error = reason


def _compile(fn: Callable[..., Any], mode: str, backend: str) -> Callable[..., Any]:
    if backend == "inductor":
        return torch.compile(fn, mode=mode, dynamic=False, fullgraph=False)
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=False)


def route_unet(unet: Any, *, mode: str, backend: str = "inductor", cudagraphs: bool = False) -> CompiledRoute:
    """Replace `unet.forward` with a shape-routed compiled forward; returns the route.

    Calls with extra conditioning (timestep_cond, added_cond_kwargs, cross_attention_kwargs), and
    any call while per-job LoRA adapters are in the UNet (`peft_config`), run
    eager. The timestep goes in as a float32 tensor on the UNet's device, for every sampler: the
    UNet's sinusoidal embedding casts it to float anyway, so one compiled graph serves integer
    (DDIM, DPM++) and float (Euler, LMS) timesteps with the same results.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    eager_forward = unet.forward

    def core(
        sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return eager_forward(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]

    route = CompiledRoute("UNet", core, _compile(core, mode, backend), cudagraphs=cudagraphs)

    def forward(
        sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any, **kw: Any
    ):
        return_dict = kw.pop("return_dict", True)
        # per-job LoRA adapter layers (generator.loras) change the module tree: eager, no recompile
        if args or any(v is not None for v in kw.values()) or getattr(unet, "peft_config", None):
            return eager_forward(
                sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kw
            )
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(device=sample.device, dtype=torch.float32)
        key = (
            tuple(sample.shape),
            sample.dtype,
            tuple(encoder_hidden_states.shape),
            encoder_hidden_states.dtype,
            tuple(t.shape),
            str(sample.device),
        )
        out = route(key, sample, t, encoder_hidden_states)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward
    return route


def route_vae_decode(
    vae: Any, *, mode: str, backend: str = "inductor", cudagraphs: bool = False
) -> CompiledRoute:
    """Replace `vae.decode` with a shape-routed compiled decode; returns the route.

    Latents in another dtype than the VAE's weights at install time (the fp32 NaN retry) run eager.
    """
    from diffusers.models.autoencoders.vae import DecoderOutput

    eager_decode = vae.decode
    dtype = vae.dtype

    def core(z: torch.Tensor) -> torch.Tensor:
        return eager_decode(z, return_dict=False)[0]

    route = CompiledRoute("VAE decoder", core, _compile(core, mode, backend), cudagraphs=cudagraphs)

    def decode(z: torch.Tensor, return_dict: bool = True, **kw: Any):
        if kw or z.dtype != dtype:
            return eager_decode(z, return_dict=return_dict, **kw)
        out = route((tuple(z.shape), z.dtype, str(z.device)), z)
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae.decode = decode
    return route


def _raise_recompile_limit(shapes: int) -> None:
    """Each warmed shape is one compile of the same code: lift dynamo's per-code limit (8) above them."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), shapes + 8))


def warm_up(
    generator: Any,
    routes: list[CompiledRoute],
    sizes: Iterable[tuple[int, int]],
    max_images: int,
    report: FastPathReport,
) -> None:
    """Run each size at 1..max_images images (WARMUP_STEPS steps) through the real generator.

    The routes remember the shapes they compile. Out of memory at some batch skips the larger
    batches of that size (they run eager, and would run out of memory eager too); any other error
    turns compiling off (eager), with a warning.
    """
    from generator.params import GenerationParams

    steps = max(1, min(WARMUP_STEPS, generator.config.max_steps))
    start = time.perf_counter()
    for route in routes:
        route.warming = True
    try:
        for width, height in sizes:
            for images in range(1, max_images + 1):
                requests = [
                    GenerationParams(
                        prompt="warm-up",
                        seed=i,
                        steps=steps,
                        width=width,
                        height=height,
                        guidance=WARMUP_GUIDANCE,
                    )
                    for i in range(images)
                ]
                t0 = time.perf_counter()
                try:
                    generator.txt2img_batch(requests)
                except Exception as exc:
                    if is_oom(exc):
                        _warn(report, f"warm-up: {images} images at {width}x{height} ran out of memory")
                        break
                    report.compile_error = first_line(exc, 160, with_type=True)
                    for route in routes:
                        route.disable(report.compile_error)
                    return
                report.warmed.append((width, height, images))
                log.info("warm-up: %dx%d x%d in %.1f s", width, height, images, time.perf_counter() - t0)
    finally:
        for route in routes:
            route.warming = False
        report.warmup_s = time.perf_counter() - start


# --- CUDA --------------------------------------------------------------------------------------


def _quantize_fp8(unet: Any, report: FastPathReport) -> None:
    if importlib.util.find_spec("torchao") is None:
        _warn(report, "PONY_FP8 needs torchao, which is not installed; the UNet stays fp16")
        return
    if torch.cuda.get_device_capability() < (8, 9):
        _warn(report, "PONY_FP8 needs a GPU with fp8 (compute capability 8.9+); the UNet stays fp16")
        return
    try:
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

            config: Any = Float8DynamicActivationFloat8WeightConfig()
        except ImportError:  # older torchao
            from torchao.quantization import float8_dynamic_activation_float8_weight

            config = float8_dynamic_activation_float8_weight()
        quantize_(unet, config)
        report.applied.append("fp8 linears (torchao)")
    except Exception as exc:
        _warn(report, f"PONY_FP8 failed ({first_line(exc, 160, with_type=True)}); the UNet stays fp16")


def accelerate(generator: Any, report: FastPathReport, *, backend: str = "inductor") -> FastPathReport:
    """CUDA-only speed-ups and the compile warm-up (no-op elsewhere). Never raises for a compile."""
    config: GeneratorConfig = generator.config
    if not str(generator.device).startswith("cuda"):
        return report
    pipe = generator.pipe
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    report.applied.append("channels-last")
    if config.fp8:
        _quantize_fp8(pipe.unet, report)
    if not config.compile or not config.warmup_sizes:
        return report
    install_compiled(generator, report, backend=backend)
    return report


def install_compiled(generator: Any, report: FastPathReport, *, backend: str = "inductor") -> None:
    """Compile the UNet and VAE decode, then warm every configured shape (any device; tests use
    `backend="eager"` on the CPU). A failure turns compiling off with a warning."""
    config: GeneratorConfig = generator.config
    mode = config.compile_mode if config.compile_mode in COMPILE_MODES else "reduce-overhead"
    if mode != config.compile_mode:
        _warn(report, f"unknown compile mode {config.compile_mode!r}; using {mode!r}")
    if config.compile_cache_dir is not None:
        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", str(Path(config.compile_cache_dir).expanduser().resolve())
        )
    cuda = str(generator.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sizes = list(dict.fromkeys(config.warmup_sizes))
    max_images = max(1, config.batch_size)
    _raise_recompile_limit(len(sizes) * max_images)
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True  # 1x1 convs as matmuls (diffusers' SD compile advice)
    report.compile_mode = mode
    graphs = cuda and backend == "inductor" and mode in CUDAGRAPH_MODES
    try:
        routes = [
            route_unet(generator.pipe.unet, mode=mode, backend=backend, cudagraphs=graphs),
            route_vae_decode(generator.pipe.vae, mode=mode, backend=backend, cudagraphs=graphs),
        ]
    except Exception as exc:
        report.compile_error = first_line(exc, 160, with_type=True)
        _warn(report, f"torch.compile is unavailable ({report.compile_error}); running eager")
        return
    report.routes = routes
    report.applied.append(f"torch.compile {mode}" + (" + CUDA graphs" if graphs else ""))
    log.info(
        "warming up %d shapes (%s at 1..%d images); first start compiles each (about a minute each)",
        len(sizes) * max_images,
        ", ".join(f"{w}x{h}" for w, h in sizes),
        max_images,
    )
    warm_up(generator, routes, sizes, max_images, report)
    if cuda:
        report.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        if report.compile_error:
            torch.cuda.empty_cache()
    log.info(
        "warm-up done in %.1f s: %d shapes compiled%s",
        report.warmup_s,
        len(report.warmed),
        f" (compile failed: {report.compile_error}; running eager)" if report.compile_error else "",
    )
