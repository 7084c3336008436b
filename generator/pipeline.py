"""The Generator: txt2img, batched txt2img, variations (img2img) and upscales on one SD v1.x model.

One Generator is driven from one thread (the bot's engine thread); calls do not overlap.

Determinism: image i of a request uses its own `torch.Generator` seeded `seed + i` (on the
pipeline's device; a CPU generator on MPS), so a request, or `params.single(i)`, re-creates the
same pixels on the same device. On CPU that holds exactly even across batch sizes: the UNet is run
image by image inside a batched call (oneDNN/MKL kernels are not batch-size invariant; on a CPU a
batch gains nothing anyway), and the VAE always decodes one image at a time. On CUDA a batch runs
as one UNet batch for speed, and a batched image may differ from its single re-run in the last bits.

Speed set-up per device (few-step LoRA, SDPA, torch.compile + CUDA graphs, warm-up) lives in
`generator.fastpath`; a call never holds more than `config.batch_size` images.

What A1111/Civitai prompts carry: `<lora:name:weight>` tags select per-job LoRAs
(`generator.loras`; all requests of a batch share one set), embedding words bring their vectors
(`generator.embeddings`), `[from:to:when]` / `[a|b]` swap the encodings between steps
(`generator.conditioning`), and what is not supported is dropped with a note
(`generator.prompt_syntax`); the A1111 text keeps the prompt as given.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from generator import fastpath
from generator.conditioning import ScheduledEmbeds, StepConditioning, encode_scheduled, pad_pair
from generator.config import GeneratorConfig
from generator.embeddings import Embeddings
from generator.errors import BadOutput, Cancelled, InvalidParams, OutOfMemory, first_line, is_oom
from generator.fastpath import FastPathReport
from generator.loader import LoadedModel, load_pipeline
from generator.loras import LoraManager
from generator.metadata import format_fields, format_parameters, read_parameters, to_params
from generator.metadata import parse_parameters as _parse
from generator.params import (
    MAX_CLIP_SKIP,
    MAX_GUIDANCE,
    MAX_SEED,
    MIN_GUIDANCE,
    GenerationParams,
    validate,
)
from generator.preview import latents_to_preview
from generator.prompt_syntax import parse_prompt, prompt_notes
from generator.prompts import encode_text
from generator.samplers import SAMPLER_NAMES, schedule_error
from generator.schedulers import SAMPLER_CALL_KWARGS, make_scheduler
from generator.upscale import Upscaler, load_upscaler, upscale_tiled

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, Image.Image | None], None]
CancelFn = Callable[[], bool]

BLANK_MESSAGE = "The model produced a blank image; try another seed or prompt."
OOM_MESSAGE = "The GPU ran out of memory; try a smaller size or fewer images."
CANCELLED_MESSAGE = "Cancelled."
BLANK_EPSILON = 1e-3  #: a decoded image whose brightest value (0..1) is below this is blank
PREVIEW_INTERVAL_S = 0.5  #: previews are computed at most this often (always on the first step)
HIRES_SCALE = 2


@dataclass
class ImageResult:
    """One generated image and the A1111 text describing it."""

    image: Image.Image
    seed: int
    parameters: str


@dataclass
class GenerationResult:
    """The images of one request, the seconds they took, their size, and notes on ignored syntax.

    `notes` are short lines such as "ignored: AND" (`prompt_syntax.prompt_notes`).
    """

    images: list[ImageResult]
    seconds: float
    width: int
    height: int
    notes: list[str] = field(default_factory=list)


def _seed(seed: int, i: int) -> int:
    return (seed + i) % (MAX_SEED + 1)


def _is_blank(decoded: torch.Tensor) -> bool:
    x = decoded.detach().float()
    if not torch.isfinite(x).all():
        return True
    return bool(((x / 2 + 0.5).clamp(0, 1).amax() < BLANK_EPSILON).item())


def _part_progress(progress: ProgressFn | None, part: int, parts: int) -> ProgressFn | None:
    """Report steps of call `part` of `parts` sequential pipeline calls as one overall count."""
    if progress is None or parts == 1:
        return progress

    def report(step: int, total: int, preview: Image.Image | None) -> None:
        progress(part * total + step, parts * total, preview)

    return report


class Generator:
    """A loaded model and the operations the bot needs. Create with `Generator.load(config)`."""

    config: GeneratorConfig
    device: str
    dtype_name: str
    model_name: str
    model_hash: str

    def __init__(
        self, config: GeneratorConfig, loaded: LoadedModel, upscaler: Upscaler | None = None
    ) -> None:
        # from its own module: to a type checker `diffusers.StableDiffusionImg2ImgPipeline` is the
        # placeholder class diffusers' lazy __init__ imports when torch is missing
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
            StableDiffusionImg2ImgPipeline,
        )

        self.config = config
        self.pipe = loaded.pipe
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.dtype_name = "float16" if loaded.dtype == torch.float16 else "float32"
        self.model_name = loaded.model_name
        self.model_hash = loaded.model_hash
        self.upscaler = upscaler
        self._img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
        self._img2img.set_progress_bar_config(disable=True)
        self._scheduler_base = dict(self.pipe.scheduler.config)
        self._cfg = True  # whether the running call uses classifier-free guidance (2 UNet rows per image)
        #: A1111 "Lora hashes" text of the fused few-step LoRA (fast mode), or None
        self.fast_lora: str | None = None
        self._samplers: tuple[str, ...] = SAMPLER_NAMES
        self.fast_path: FastPathReport | None = None
        self.embeddings = Embeddings.load(self.pipe, config.embeddings_dir)
        self.loras = LoraManager(self.pipe, config.lora_dir)
        self._prepare_for_device()
        # compiled UNet routes need the plain modules back for jobs without LoRAs
        self.loras.keep_loaded = not (self.fast_path is not None and self.fast_path.routes)

    @classmethod
    def load(cls, config: GeneratorConfig) -> Generator:
        """Load the model (and upscaler, if configured). Raises `ModelLoadError` with one clear line."""
        loaded = load_pipeline(config)
        upscaler = load_upscaler(config.upscaler, loaded.device, loaded.dtype) if config.upscaler else None
        return cls(config, loaded, upscaler)

    # -- device set-up ---------------------------------------------------------------------------

    def _prepare_for_device(self) -> None:
        """Per-device speed and determinism set-up (see `generator.fastpath`).

        Every device: the optional few-step LoRA (fast mode), SDPA attention, optional fused QKV.
        CUDA: channels-last, optional fp8, torch.compile + CUDA graphs with the start-up warm-up.
        CPU: the UNet runs image by image inside a batch (exact batch-size invariance).
        """
        report = fastpath.prepare_model(self.pipe, self.config, self.device)
        if report.fast_lora is not None:
            self.fast_lora = report.fast_lora
            self._samplers = (*SAMPLER_NAMES, self.config.fast_sampler)
        if self.device == "cpu":
            self._install_per_image_unet()
        self.fast_path = fastpath.accelerate(self, report)
        log.info("%s", self.fast_path.summary())

    def _effective(self, params: GenerationParams) -> GenerationParams:
        """The request as it runs: in fast mode with the fast sampler, steps and guidance."""
        if self.fast_lora is None:
            return params
        c = self.config
        return replace(
            params, sampler=c.fast_sampler, steps=c.fast_steps, guidance=c.fast_guidance, schedule="automatic"
        )

    def _check(self, params: GenerationParams) -> GenerationParams:
        return validate(
            self._effective(params),
            max_pixels=self.config.max_pixels,
            max_steps=self.config.max_steps,
            samplers=self._samplers,
            loras=self.available_loras(),
        )

    def available_loras(self) -> list[str]:
        """The LoRA names `<lora:name>` may use (files of `config.lora_dir`), sorted."""
        return self.loras.available()

    def available_embeddings(self) -> list[str]:
        """The loaded textual-inversion embedding names (words of the prompts), sorted."""
        return self.embeddings.names()

    def _install_per_image_unet(self) -> None:
        """Run the UNet one image (its uncond + cond rows) at a time: batch-size invariant on CPU."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unet = self.pipe.unet
        forward = unet.forward

        def per_image_forward(
            sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kw: Any
        ):
            rows = 2 if self._cfg else 1
            n = sample.shape[0]
            images = n // rows
            batched_extras = kw.get("timestep_cond") is not None or kw.get("added_cond_kwargs")
            if images <= 1 or n % rows or batched_extras:
                return forward(sample, timestep, encoder_hidden_states, **kw)
            return_dict = kw.pop("return_dict", True)
            out = torch.empty_like(sample)
            for i in range(images):
                idx = [i + k * images for k in range(rows)]
                t = timestep
                if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == n:
                    t = t[idx]
                out[idx] = forward(sample[idx], t, encoder_hidden_states[idx], return_dict=False, **kw)[0]
            return UNet2DConditionOutput(sample=out) if return_dict else (out,)

        unet.forward = per_image_forward

    # -- building blocks -------------------------------------------------------------------------

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        device = "cpu" if self.device == "mps" else self.device
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn device OOM into `OutOfMemory` after freeing the cache, so the next call works."""
        try:
            yield
        except Exception as exc:
            if not is_oom(exc):
                raise
            log.warning("out of memory: %s", first_line(exc))
            del exc
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemory(OOM_MESSAGE) from None

    def _sample(
        self,
        *,
        conditioning: StepConditioning,
        seeds: list[int],
        steps: int,
        guidance: float,
        sampler: str,
        schedule: str = "automatic",
        width: int | None = None,
        height: int | None = None,
        init_image: Image.Image | None = None,
        strength: float | None = None,
        progress: ProgressFn | None = None,
        want_preview: bool = False,
        should_cancel: CancelFn | None = None,
    ) -> torch.Tensor:
        """One pipeline call (txt2img, or img2img when `init_image` is given) -> final latents.

        `conditioning` gives each image's prompt and negative encodings per step: the UNet call
        after step i gets those of step i + 1 (through `callback_on_step_end`).
        """
        if should_cancel is not None and should_cancel():
            raise Cancelled(CANCELLED_MESSAGE)
        scheduler = make_scheduler(sampler, self._scheduler_base, schedule)
        if hasattr(scheduler, "noise_sampler_seed"):  # DPM++ SDE: a Brownian tree per image seed
            scheduler.noise_sampler_seed = list(seeds)
        self.pipe.scheduler = scheduler
        self._img2img.scheduler = scheduler
        self._cfg = guidance > 1.0
        last_preview = [-math.inf]
        prompt_embeds, negative_embeds = conditioning.at(1)

        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if should_cancel is not None and should_cancel():
                raise Cancelled(CANCELLED_MESSAGE)
            out: dict[str, Any] = {}
            embeds = conditioning.update(i + 2, pipe.do_classifier_free_guidance)
            if embeds is not None:
                out["prompt_embeds"] = embeds
            if progress is not None:
                preview = None
                now = time.monotonic()
                if want_preview and now - last_preview[0] >= PREVIEW_INTERVAL_S:
                    preview = latents_to_preview(tensors["latents"])
                    last_preview[0] = now
                progress(i + 1, pipe.num_timesteps, preview)
            return out

        kwargs: dict[str, Any] = {
            "prompt_embeds": prompt_embeds.to(self.device, self.dtype),
            "negative_prompt_embeds": negative_embeds.to(self.device, self.dtype),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": self._generators(seeds),
            "output_type": "latent",
            "callback_on_step_end": on_step_end,
            **SAMPLER_CALL_KWARGS.get(sampler, {}),
        }
        if init_image is None:
            out = self.pipe(width=width, height=height, **kwargs)
        else:
            out = self._img2img(image=init_image, strength=strength, **kwargs)
        return out.images

    @torch.no_grad()
    def _vae_decode(self, latents: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        vae = self.pipe.vae
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        if not fp32:
            return vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0]
        if vae.dtype == torch.float32:
            return vae.decode(latents.float() / scale + shift, return_dict=False)[0]
        # A float32 copy for this rare retry: the shared half-precision weights stay where they are
        # (compiled code and CUDA graphs hold their addresses). The class's own decode bypasses the
        # compiled route installed on the instance. Plain nn.Module.to: diffusers' override warns.
        vae32 = torch.nn.Module.to(copy.deepcopy(vae), torch.float32)
        try:
            return type(vae32).decode(vae32, latents.float() / scale + shift, return_dict=False)[0]
        finally:
            del vae32

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode one image at a time; a NaN/black decode is retried once with the VAE in fp32."""
        images = []
        for i in range(latents.shape[0]):
            lat = latents[i : i + 1]
            decoded = self._vae_decode(lat)
            if _is_blank(decoded):
                log.warning("blank or NaN decode; retrying with the VAE in float32")
                decoded = self._vae_decode(lat, fp32=True)
                if _is_blank(decoded):
                    raise BadOutput(BLANK_MESSAGE)
            images.append(self.pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0])
        return images

    def _use_loras(self, params: GenerationParams) -> list[tuple[str, float]]:
        """Activate the prompt's LoRAs (none: all off) for the coming calls; returns them resolved."""
        loras = self.loras.resolve(list(parse_prompt(params.prompt).loras))
        self.loras.activate(loras)
        return loras

    def _schedule_steps(self, params: GenerationParams, steps: int) -> int:
        """Steps of the prompt schedule: A1111 counts both model calls of a second-order step."""
        return steps * int(
            getattr(make_scheduler(params.sampler, self._scheduler_base, params.schedule), "order", 1)
        )

    def _conditioning(
        self, params: GenerationParams, steps: int, cache: dict[tuple[str, int], torch.Tensor]
    ) -> tuple[ScheduledEmbeds, ScheduledEmbeds]:
        """The prompt's and negative's encodings over `steps` schedule steps, padded to one length.

        `cache` holds encodings by (text, clip skip) for the call (the active LoRAs are fixed).
        """

        def encode(text: str) -> torch.Tensor:
            key = (text, params.clip_skip)
            if key not in cache:
                cache[key] = encode_text(self.pipe, text, params.clip_skip).to(self.device, self.dtype)
            return cache[key]

        pos = encode_scheduled(parse_prompt(params.prompt).text, steps, encode)
        neg = encode_scheduled(parse_prompt(params.negative, negative=True).text, steps, encode)
        return pad_pair(pos, neg, encode(""))

    def _parameters(self, params: GenerationParams, seed: int, extra: dict[str, Any] | None = None) -> str:
        extra = {**(extra or {}), **self._hashes(params)}
        return format_parameters(
            params, seed, model_name=self.model_name, model_hash=self.model_hash, extra=extra
        )

    def _hashes(self, params: GenerationParams) -> dict[str, str]:
        """A1111's "Lora hashes" (fast-mode LoRA first) and "TI hashes" of a request."""
        out: dict[str, str] = {}
        job = self.loras.hashes(self.loras.resolve(list(parse_prompt(params.prompt).loras)))
        loras = ", ".join(h for h in (self.fast_lora, job) if h)
        if loras:
            out["Lora hashes"] = loras
        ti = self.embeddings.hashes(parse_prompt(params.prompt).text, params.negative)
        if ti:
            out["TI hashes"] = ti
        return out

    # -- txt2img ---------------------------------------------------------------------------------

    def txt2img(
        self,
        params: GenerationParams,
        *,
        progress: ProgressFn | None = None,
        want_preview: bool = False,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """Generate `params.count` images, image i with seed `params.seed + i`."""
        params = self._check(params)
        return self._txt2img_many([params], progress, want_preview, should_cancel)[0]

    def txt2img_batch(
        self,
        requests: list[GenerationParams],
        *,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> list[GenerationResult]:
        """Run requests sharing `batch_key()` in one pipeline call; results equal the unbatched ones.

        Each result's `seconds` is the batch time shared out by image count. Prompts whose
        encodings differ in length (over 75 tokens) run in separate calls, so that no request's
        conditioning is padded differently than when run alone, and no call holds more than
        `config.batch_size` images (the memory bound; the compiled shapes are warmed up to it).
        """
        if not requests:
            return []
        checked = [self._check(p) for p in requests]
        if len({p.batch_key() for p in checked}) != 1:
            raise InvalidParams(
                "Requests in one batch must share size, steps, sampler, guidance, clip skip, schedule and LoRAs."
            )
        return self._txt2img_many(checked, progress, False, should_cancel)

    def _txt2img_many(
        self,
        requests: list[GenerationParams],
        progress: ProgressFn | None,
        want_preview: bool,
        should_cancel: CancelFn | None,
    ) -> list[GenerationResult]:
        start = time.perf_counter()
        first = requests[0]
        with self._guard():
            self._use_loras(first)
            steps = self._schedule_steps(first, first.steps)
            cache: dict[tuple[str, int], torch.Tensor] = {}
            encoded = [self._conditioning(p, steps, cache) for p in requests]
            # (request, image index) entries grouped by conditioning length, then cut into calls
            # of at most `config.batch_size` images (the memory bound and the warmed shapes)
            groups: dict[int, list[tuple[int, int]]] = {}
            for r, (pos, _) in enumerate(encoded):
                groups.setdefault(pos.length, []).extend((r, i) for i in range(requests[r].count))
            cap = max(1, self.config.batch_size)
            calls = [entries[k : k + cap] for entries in groups.values() for k in range(0, len(entries), cap)]
            images: dict[int, list[Image.Image]] = {r: [] for r in range(len(requests))}
            for c, chunk in enumerate(calls):
                conditioning = StepConditioning(
                    [encoded[r][0] for r, _ in chunk], [encoded[r][1] for r, _ in chunk]
                )
                seeds = [_seed(requests[r].seed, i) for r, i in chunk]
                step_progress = _part_progress(progress, c, len(calls))
                latents = self._sample(
                    conditioning=conditioning,
                    seeds=seeds,
                    steps=first.steps,
                    guidance=first.guidance,
                    sampler=first.sampler,
                    schedule=first.schedule,
                    width=first.width,
                    height=first.height,
                    progress=step_progress,
                    want_preview=want_preview,
                    should_cancel=should_cancel,
                )
                for (r, _), image in zip(chunk, self._decode(latents), strict=True):
                    images[r].append(image)
        seconds = time.perf_counter() - start
        total_images = sum(p.count for p in requests)
        results = []
        for r, p in enumerate(requests):
            items = [
                ImageResult(image=im, seed=_seed(p.seed, i), parameters=self._parameters(p, _seed(p.seed, i)))
                for i, im in enumerate(images[r])
            ]
            notes = prompt_notes(p.prompt, p.negative)
            results.append(
                GenerationResult(items, seconds * p.count / total_images, p.width, p.height, notes)
            )
        return results

    # -- img2img ---------------------------------------------------------------------------------

    def _img2img_images(
        self,
        params: GenerationParams,
        init: Image.Image,
        strength: float,
        progress: ProgressFn | None,
        want_preview: bool,
        should_cancel: CancelFn | None,
    ) -> list[Image.Image]:
        self._use_loras(params)
        steps = max(params.steps, math.ceil(1 / strength))  # at least one step survives the strength cut
        pos, neg = self._conditioning(params, self._schedule_steps(params, steps), {})
        latents = self._sample(
            conditioning=StepConditioning([pos] * params.count, [neg] * params.count),
            seeds=[_seed(params.seed, i) for i in range(params.count)],
            steps=steps,
            guidance=params.guidance,
            sampler=params.sampler,
            schedule=params.schedule,
            init_image=init,
            strength=strength,
            progress=progress,
            want_preview=want_preview,
            should_cancel=should_cancel,
        )
        return self._decode(latents)

    def variation(
        self,
        image: Image.Image,
        params: GenerationParams,
        *,
        strength: float | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """`params.count` img2img variations of `image` (resized to the params' size), seeds seed + i.

        `strength` defaults to `config.variation_strength` (0 keeps the image, 1 ignores it).
        """
        params = self._check(params)
        strength = self.config.variation_strength if strength is None else float(strength)
        if not 0.0 < strength <= 1.0:
            raise InvalidParams("Variation strength must be above 0 and at most 1.")
        start = time.perf_counter()
        init = image.convert("RGB")
        if init.size != (params.width, params.height):
            init = init.resize((params.width, params.height), Image.Resampling.LANCZOS)
        with self._guard():
            images = self._img2img_images(params, init, strength, progress, False, should_cancel)
        extra = {"Denoising strength": strength}
        items = [
            ImageResult(im, _seed(params.seed, i), self._parameters(params, _seed(params.seed, i), extra))
            for i, im in enumerate(images)
        ]
        notes = prompt_notes(params.prompt, params.negative)
        return GenerationResult(items, time.perf_counter() - start, params.width, params.height, notes)

    # -- upscale ---------------------------------------------------------------------------------

    def _usable(self, params: GenerationParams) -> GenerationParams:
        """Clamp params that may come from foreign metadata into what this generator runs."""
        sampler = params.sampler if params.sampler in SAMPLER_NAMES else SAMPLER_NAMES[0]
        return replace(
            params,
            seed=params.seed % (MAX_SEED + 1),
            steps=min(max(params.steps, 1), self.config.max_steps),
            guidance=min(max(params.guidance, MIN_GUIDANCE), MAX_GUIDANCE),
            sampler=sampler,
            clip_skip=min(max(params.clip_skip, 1), MAX_CLIP_SKIP),
            schedule="automatic" if schedule_error(sampler, params.schedule) else params.schedule,
        )

    def upscale(
        self,
        image: Image.Image,
        params: GenerationParams | None = None,
        *,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """One upscaled image: the configured ESRGAN (tiled, its scale), or the hires fix.

        Hires fix (no upscaler configured): Lanczos 2x, then img2img at `config.hires_strength`
        with the params' prompt, seed, steps, sampler and guidance. `params` default to the
        image's own A1111 metadata, if any. The metadata keeps the original Size (as A1111 does)
        and adds "Upscaler: name" or "Hires upscale: 2".
        """
        start = time.perf_counter()
        source = image.convert("RGB")
        known = params is not None
        if params is None:
            text = read_parameters(image)
            known = bool(text)
            params = to_params(_parse(text)) if text else GenerationParams(prompt="")
            if not text:
                params = replace(params, width=source.width, height=source.height)
        params = self._effective(self._usable(replace(params, count=1)))
        with self._guard():
            if self.upscaler is not None:
                out = upscale_tiled(self.upscaler, source, progress=progress, should_cancel=should_cancel)
                extra: dict[str, Any] = {"Upscaler": self.upscaler.name, "Upscale by": self.upscaler.scale}
                if not known:  # nothing is known about how the source was made: just the upscale
                    result = ImageResult(out, params.seed, format_fields(extra))
                    return GenerationResult([result], time.perf_counter() - start, out.width, out.height)
            else:
                strength = self.config.hires_strength
                width = max(8, source.width * HIRES_SCALE // 8 * 8)
                height = max(8, source.height * HIRES_SCALE // 8 * 8)
                big = source.resize((width, height), Image.Resampling.LANCZOS)
                out = self._img2img_images(params, big, strength, progress, False, should_cancel)[0]
                extra = {
                    "Hires upscale": HIRES_SCALE,
                    "Hires upscaler": "Lanczos",
                    "Denoising strength": strength,
                }
        result = ImageResult(out, params.seed, self._parameters(params, params.seed, extra))
        return GenerationResult([result], time.perf_counter() - start, out.width, out.height)

    # -- hires fix (issue #14) -------------------------------------------------------------------

    def txt2img_hires(
        self,
        params: GenerationParams,
        *,
        scale: float = 2.0,
        strength: float | None = None,
        progress: ProgressFn | None = None,
        want_preview: bool = False,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """A1111's hires fix: `params.count` images drawn at the params' size, each upscaled by
        `scale` (Lanczos, in pixels) and refined by img2img at `strength` (default
        `config.hires_strength`) with the same prompt, seed, steps and sampler.

        The images are `generator.hires.hires_size` large (at most `config.max_pixels`); their
        metadata keeps the base Size and adds Denoising strength, Hires upscale, Hires steps and
        Hires upscaler, as A1111 writes them. Progress counts both passes as one.
        """
        from generator.hires import HIRES_UPSCALER, hires_size

        params = self._check(params)
        strength = self.config.hires_strength if strength is None else float(strength)
        if not 0.0 < strength <= 1.0:
            raise InvalidParams("Hires strength must be above 0 and at most 1.")
        width, height = hires_size(params.width, params.height, scale)
        if width * height > self.config.max_pixels:
            raise InvalidParams(
                f"The hires size {width}x{height} is too large; at most {self.config.max_pixels} pixels."
            )
        start = time.perf_counter()
        refine_steps = max(params.steps, math.ceil(1 / strength))
        refine = max(1, min(int(refine_steps * strength), refine_steps))  # img2img steps that run
        total = params.steps + params.count * refine

        def base_progress(step: int, steps: int, preview: Image.Image | None) -> None:
            if progress is not None:
                progress(min(step, params.steps), total, preview)

        base = self._txt2img_many([params], base_progress, want_preview, should_cancel)[0]
        items = []
        extra = {
            "Denoising strength": strength,
            "Hires upscale": round(scale, 2),
            "Hires steps": params.steps,
            "Hires upscaler": HIRES_UPSCALER,
        }
        for i, item in enumerate(base.images):
            done = params.steps + i * refine

            def part(step: int, steps: int, preview: Image.Image | None, done: int = done) -> None:
                if progress is not None:
                    progress(done + min(refine, round(step * refine / max(steps, 1))), total, None)

            single = params.single(i)
            big = item.image.resize((width, height), Image.Resampling.LANCZOS)
            with self._guard():
                image = self._img2img_images(single, big, strength, part, False, should_cancel)[0]
            items.append(ImageResult(image, single.seed, self._parameters(params, single.seed, extra)))
        return GenerationResult(items, time.perf_counter() - start, width, height, base.notes)
