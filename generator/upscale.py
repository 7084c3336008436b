"""ESRGAN-family upscalers through spandrel, run in tiles so large images fit in memory.

Files: `.safetensors`, or `.pth` read with `torch.load(weights_only=True)` (no arbitrary pickle;
TorchScript `.pt` is not accepted). spandrel detects the architecture and scale from the keys.
The hires-fix fallback (no upscaler configured) lives in `generator.pipeline`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from generator.errors import Cancelled, ModelLoadError

SET_UPSCALER = (
    "Set PONY_UPSCALER to an ESRGAN .pth or .safetensors file, or leave it empty for the hires fix."
)
TILE = 256  #: input pixels per tile side
OVERLAP = 16  #: context pixels added around each tile (cropped from the output)


@dataclass
class Upscaler:
    """A loaded spandrel image model on a device."""

    model: Any  # spandrel.ImageModelDescriptor
    name: str
    scale: int
    device: str
    dtype: torch.dtype


def load_upscaler(path: str | Path, device: str, dtype: torch.dtype) -> Upscaler:
    """Load an upscaler file with spandrel; `ModelLoadError` (one line) if it cannot be used."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError, canonicalize_state_dict

    path = Path(path).expanduser()
    bad = f"Could not load upscaler {str(path)!r}"
    if not path.is_file():
        raise ModelLoadError(f"{bad}: no such file. {SET_UPSCALER}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix == ".pth":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(f"{bad}: only .pth and .safetensors files are supported. {SET_UPSCALER}")
        descriptor = ModelLoader(device="cpu").load_from_state_dict(canonicalize_state_dict(state))
    except ModelLoadError:
        raise
    except UnsupportedModelError:
        raise ModelLoadError(f"{bad}: not a model architecture spandrel knows. {SET_UPSCALER}") from None
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160].rstrip(".")
        raise ModelLoadError(f"{bad}: {line}. {SET_UPSCALER}") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.input_channels != 3:
        raise ModelLoadError(f"{bad}: not an RGB image upscaler. {SET_UPSCALER}")
    if dtype == torch.float16 and not descriptor.supports_half:
        dtype = torch.float32
    descriptor = descriptor.to(device=torch.device(device), dtype=dtype).eval()
    return Upscaler(model=descriptor, name=path.stem, scale=int(descriptor.scale), device=device, dtype=dtype)


def _tiles(size: int, tile: int) -> list[int]:
    return list(range(0, size, tile)) if size > tile else [0]


@torch.inference_mode()
def upscale_tiled(
    upscaler: Upscaler,
    image: Image.Image,
    *,
    tile: int = TILE,
    overlap: int = OVERLAP,
    progress: Callable[[int, int, Image.Image | None], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Image.Image:
    """Upscale `image` by the model's scale, `tile` pixels at a time with `overlap` of context.

    Each tile is run with `overlap` extra pixels on every side (where the image has them) and
    only its own region of the output is kept, so there are no seams from border effects.
    """
    src = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(src).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) on CPU
    _, _, h, w = x.shape
    s = upscaler.scale
    out = torch.zeros((3, h * s, w * s), dtype=torch.float32)
    ys, xs = _tiles(h, tile), _tiles(w, tile)
    total = len(ys) * len(xs)
    done = 0
    for y0 in ys:
        for x0 in xs:
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled.")
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            patch = x[:, :, py0:py1, px0:px1].to(upscaler.device, upscaler.dtype)
            result = upscaler.model(patch)[0].float().cpu()
            oy, ox = (y0 - py0) * s, (x0 - px0) * s
            out[:, y0 * s : y1 * s, x0 * s : x1 * s] = result[
                :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
            ]
            done += 1
            if progress is not None:
                progress(done, total, None)
    arr = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def tile_count(width: int, height: int, tile: int = TILE) -> int:
    """How many tiles `upscale_tiled` runs for an image of this size."""
    return math.ceil(width / tile) * math.ceil(height / tile)
