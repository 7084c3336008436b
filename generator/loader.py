"""Load the SD v1.x pipeline named by `GeneratorConfig.model`, or fail with one clear line.

`config.model` may be
  * a local diffusers folder (has `model_index.json`): loaded with `local_files_only=True`, so no
    network is touched;
  * a single `.safetensors` / `.ckpt` file: `StableDiffusionPipeline.from_single_file`. Its
    architecture is checked first from the tensor names and shapes (no weights read). A `.ckpt` is
    a pickle: it is opened once here with `torch.load(weights_only=True)` (torch's allow-list
    unpickler: tensors and plain containers only), so a file with any other pickled object is
    refused with a clear message before diffusers opens it; diffusers 0.42 then loads it again,
    also with `weights_only=True`. (Old Lightning checkpoints that pickle callback objects are
    therefore refused: convert them to .safetensors.) diffusers needs SD v1.5's config files and
    tokenizer for a single file; it fetches them from the Hugging Face hub once (then the cache);
  * a hub id (`owner/name`), with `config.revision` (default "fp16") and `config.variant`; with
    `HF_HUB_OFFLINE=1` only the local cache is used.

dtype: float16 on CUDA, float32 on CPU and MPS. `device="auto"` picks cuda, then mps, then cpu
(with a warning: that is slow). On the CPU, torch's intra-op threads are set before the weights load
(`config.cpu_threads`, default one core fewer than available) so the event loop keeps a core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generator.config import GeneratorConfig
from generator.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)

SET_MODEL = "Set PONY_MODEL to a hub id, a diffusers folder or a .safetensors file."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionPipelineSafe",
    "OnnxStableDiffusionPipeline",
}
_UNET_WEIGHTS = ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin")
_V1_KEY = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"


@dataclass
class LoadedModel:
    """A loaded pipeline and what the generator reports about it."""

    pipe: Any  # diffusers.StableDiffusionPipeline
    device: str
    dtype: torch.dtype
    model_name: str
    model_hash: str
    source: str  # "folder" | "file" | "hub"


def resolve_device(requested: str) -> str:
    """`auto` -> cuda, mps or cpu (warning: slow); an explicit device must be available."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        log.warning("No CUDA or MPS device found: generating on the CPU, which is very slow.")
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"PONY_DEVICE is {requested!r} but no CUDA GPU is available; set PONY_DEVICE=auto or cpu."
            )
        return requested
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(
                "PONY_DEVICE is 'mps' but MPS is not available; set PONY_DEVICE=auto or cpu."
            )
        return "mps"
    if requested == "cpu":
        return "cpu"
    raise ModelLoadError(f"Unknown device {requested!r}; set PONY_DEVICE to auto, cuda, mps or cpu.")


def available_cores() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one, else `os.cpu_count()`."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def cpu_threads(requested: int) -> int:
    """torch intra-op threads for a CPU generator: `requested` when above 0, else one core fewer than
    available (the event loop and the Discord heartbeat share the process), and never more than torch
    would use by itself (its default, OMP_NUM_THREADS, or what the program set)."""
    if requested > 0:
        return requested
    return max(1, min(torch.get_num_threads(), available_cores() - 1))


def set_cpu_threads(requested: int) -> int:
    """Apply `cpu_threads(requested)`; returns the count. Call it in the thread that generates: torch
    keeps the count per thread (OpenMP), and threads that first use torch afterwards inherit it."""
    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    log.info("generating on the CPU with %d torch thread(s) of %d core(s)", threads, available_cores())
    return threads


def dtype_for(device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (fp16 on CPU is slow, on MPS it is fragile)."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Full sha256 hex of a file (cached in memory by path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def short_hash(path: str | os.PathLike[str]) -> str:
    """A1111's model hash: the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


def _unet_file(folder: Path, variant: str | None) -> Path | None:
    variants = [f".{variant}", ""] if variant else [""]
    for v in variants:
        for pattern in _UNET_WEIGHTS:
            candidate = folder / "unet" / pattern.format(v=v)
            if candidate.is_file():
                return candidate
    return None


def _hub_hash(repo_id: str, revision: str | None, variant: str | None) -> str:
    """Hash of the cached unet weights; the blob name is the sha256 for LFS files. "" if unknown."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for v in [f".{variant}", ""] if variant else [""]:
            for pattern in _UNET_WEIGHTS:
                found = try_to_load_from_cache(repo_id, f"unet/{pattern.format(v=v)}", revision=revision)
                if isinstance(found, str) and os.path.isfile(found):
                    blob = Path(found).resolve().name
                    if re.fullmatch(r"[0-9a-f]{64}", blob):
                        return blob[:10]
                    return short_hash(found)
    except Exception as exc:  # the hash is informative only
        log.debug("no hub hash for %s: %s", repo_id, exc)
    return ""


def _kind_of(model: str) -> tuple[str, Path | None]:
    p = Path(model).expanduser()
    if p.is_dir():
        return "folder", p
    if p.is_file():
        return "file", p
    looks_like_path = (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.lower().endswith(SINGLE_FILE_SUFFIXES + _PICKLE_SUFFIXES)
        or model.count("/") > 1
    )
    if not looks_like_path and _HUB_ID.match(model):
        return "hub", None
    raise ModelLoadError(f"Could not load model {model!r}: no such file or folder. {SET_MODEL}")


def model_name_for(model: str) -> str:
    """The name shown in metadata: folder name, file stem, or the hub id's last part."""
    p = Path(model.rstrip("/\\")).expanduser()
    if p.is_file():
        return p.stem
    return p.name or model


def _check_components(pipe: Any, model: str) -> None:
    """Refuse pipelines that are not SD v1.x-shaped (inpainting UNet, mismatched encoder, ...)."""
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    problems = []
    if unet.config.in_channels != 4 or unet.config.out_channels != 4:
        problems.append(f"its UNet takes {unet.config.in_channels} channels (an inpainting model?)")
    if getattr(vae.config, "latent_channels", 4) != 4:
        problems.append("its VAE does not have 4 latent channels")
    if unet.config.cross_attention_dim != te.config.hidden_size:
        problems.append("its UNet and text encoder do not match")
    if problems:
        raise ModelLoadError(
            f"Could not load model {model!r}: not a Stable Diffusion v1.x model ({problems[0]}). {SET_MODEL}"
        )


def _load_folder(folder: Path, config: GeneratorConfig, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline

    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"Could not load model {config.model!r}: {folder} is not a diffusers folder "
            f"(no model_index.json). {SET_MODEL}"
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {config.model!r}: unreadable model_index.json ({first_line(exc)}). {SET_MODEL}"
        ) from None
    if class_name not in _SD_PIPELINES:
        raise ModelLoadError(
            f"Could not load model {config.model!r}: it is a {class_name or 'unknown'} model, "
            f"not Stable Diffusion v1.x. {SET_MODEL}"
        )
    return StableDiffusionPipeline.from_pretrained(
        folder,
        dtype=dtype,
        variant=config.variant,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _shapes_of(path: Path, model: str) -> dict[str, torch.Tensor]:
    """Tensor name -> meta tensor of the right shape, without reading the weights (safely)."""
    bad = f"Could not load model {model!r}"
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise ModelLoadError(
                f"{bad}: not a valid .safetensors file ({first_line(exc)}). {SET_MODEL}"
            ) from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ or "unpickl" in str(exc).lower():
            raise ModelLoadError(
                f"{bad}: the .ckpt contains pickled objects other than plain weights, which are refused "
                "for safety. Convert it to .safetensors, or set PONY_MODEL to a .safetensors file."
            ) from None
        raise ModelLoadError(f"{bad}: not a readable checkpoint ({first_line(exc)}). {SET_MODEL}") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{bad}: the checkpoint holds no state dict. {SET_MODEL}")
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items() if torch.is_tensor(v)}


def _load_file(path: Path, config: GeneratorConfig, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"Could not load model {config.model!r}: only .safetensors and .ckpt files are supported. {SET_MODEL}"
        )
    shapes = _shapes_of(path, config.model)
    kind = infer_diffusers_model_type(shapes) if shapes else "empty"
    if _V1_KEY not in shapes or kind != "v1":
        looks = f" (it looks like {kind})" if _V1_KEY in shapes or kind != "v1" else ""
        raise ModelLoadError(
            f"Could not load model {config.model!r}: not a Stable Diffusion v1.x checkpoint{looks}. {SET_MODEL}"
        )
    del shapes
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            dtype=dtype,
            local_files_only=_offline(),
            safety_checker=None,
            requires_safety_checker=False,
            load_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        text = str(exc)
        if any(s in text for s in ("offline", "Connection", "cache", "connect", "resolve", "Hub")):
            raise ModelLoadError(
                f"Could not load model {config.model!r}: loading a single file needs Stable Diffusion v1.5's "
                "config files from the Hugging Face hub once, and they are not cached (offline?). "
                "Connect once, or set PONY_MODEL to a diffusers folder."
            ) from None
        raise


def _load_hub(config: GeneratorConfig, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return StableDiffusionPipeline.from_pretrained(
            config.model,
            revision=config.revision,
            variant=config.variant,
            dtype=dtype,
            local_files_only=_offline(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"Could not load model {config.model!r}: it has no revision {config.revision!r}. "
            "Set PONY_MODEL_REVISION to an existing branch (e.g. main) or leave it empty."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"Could not load model {config.model!r}: no such model on the Hugging Face hub. {SET_MODEL}"
        ) from None
    except Exception as exc:
        text = str(exc)
        if _offline():
            reason = "it is not in the local cache and HF_HUB_OFFLINE is set"
        elif any(
            s in text for s in ("cached", "cache", "connect", "Connection", "resolve", "offline", "network")
        ):
            reason = "the Hugging Face hub could not be reached and it is not in the local cache"
        else:
            reason = first_line(exc, 160).rstrip(".")
        raise ModelLoadError(
            f"Could not load model {config.model!r}: {reason}. Check the network and the id, "
            "or set PONY_MODEL to a local diffusers folder or .safetensors file."
        ) from None


def load_pipeline(config: GeneratorConfig) -> LoadedModel:
    """Load `config.model` on the configured device. Raises `ModelLoadError` with one line."""
    model = (config.model or "").strip()
    if not model:
        raise ModelLoadError(f"No model configured. {SET_MODEL}")
    kind, path = _kind_of(model)
    device = resolve_device(config.device)
    dtype = dtype_for(device)
    if device == "cpu":
        set_cpu_threads(config.cpu_threads)
    try:
        if kind == "folder":
            assert path is not None
            pipe = _load_folder(path, config, dtype)
            unet = _unet_file(path, config.variant)
            model_hash = short_hash(unet) if unet else ""
        elif kind == "file":
            assert path is not None
            pipe = _load_file(path, config, dtype)
            model_hash = short_hash(path)
        else:
            pipe = _load_hub(config, dtype)
            model_hash = _hub_hash(model, config.revision, config.variant)
        _check_components(pipe, model)
        pipe = pipe.to(device)
    except ModelLoadError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"Could not load model {model!r}: the GPU ran out of memory.") from None
    except Exception as exc:
        log.debug("model load failed", exc_info=True)
        raise ModelLoadError(f"Could not load model {model!r}: {first_line(exc)}. {SET_MODEL}") from None
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe,
        device=device,
        dtype=dtype,
        model_name=model_name_for(model),
        model_hash=model_hash,
        source=kind,
    )
