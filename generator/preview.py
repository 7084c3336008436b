"""Progress previews: SD v1 latents -> small RGB images by a fixed linear map (no extra weights).

The 4x3 matrix is A1111's "Approx cheap" factors for SD v1 latents; one latent pixel becomes one
RGB pixel, so a 512x512 request gives a 64x64 preview per image (a batch is tiled in a grid).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

#: latent channel -> (R, G, B); rows are the 4 SD v1 latent channels
SD1_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


@torch.no_grad()
def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """(B, 4, h, w) latents (unscaled, as the sampler holds them) -> B RGB images of h x w."""
    lat = latents.detach().float().cpu()
    rgb = torch.einsum("bchw,cr->brhw", lat, SD1_LATENT_RGB)
    rgb = ((rgb + 1) / 2).clamp(0, 1).nan_to_num(0.0)
    arr = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def latents_to_preview(latents: torch.Tensor, *, scale: int = 1) -> Image.Image:
    """One preview for a batch: the images in a near-square grid, enlarged `scale` times (nearest)."""
    images = latents_to_images(latents)
    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (w * cols, h * rows))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    if scale > 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)
    return sheet
