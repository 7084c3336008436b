"""Tiny random models on disk, offline: an SD v1.x pipeline and an ESRGAN x4 upscaler.

They have the real architectures (diffusers/transformers/spandrel classes) at toy sizes, so tests,
`ponybot generate --model <tiny>` and the CPU benchmark exercise the real code paths in well under a
second per image. The weights are random: images are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

#: the model card's DDIM settings (AstraliteHeart/pony-diffusion; SD v1.x training betas)
MODEL_CARD_SCHEDULER: dict = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode table as a vocabulary: every byte, alone and word-final, plus specials."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny random SD v1.x diffusers folder at `path` (created); return `path`.

    UNet (32, 64) channels with cross-attention dim 32, a 4-level VAE with 8 channels (the real
    8x latent factor, so any multiple of 64 works), a 2-layer CLIP text encoder of width 32 with 77
    positions and a byte-level BPE tokenizer, the model card's DDIM scheduler, no safety checker.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
        )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            hidden_act="quick_gelu",
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    with torch.no_grad():  # like CLIP's trained final norm: outputs with a non-zero mean
        for name, param in text_encoder.named_parameters():
            if name.endswith("final_layer_norm.bias"):
                param.normal_(0.0, 0.5)
    scheduler = DDIMScheduler(**MODEL_CARD_SCHEDULER)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_esrgan(path: Path, seed: int = 0) -> Path:
    """Write a tiny random ESRGAN x4 (RRDBNet, 8 filters, 1 block) state dict; return `path`.

    The format follows the suffix: `.safetensors`, else `torch.save` (`.pth`). The keys are the
    classic ESRGAN layout (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`, ...) that
    spandrel detects as ESRGAN.
    """
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def write_random_lora(
    model_dir: Path, path: Path, *, rank: int = 4, seed: int = 0, scale: float = 0.5
) -> Path:
    """Write a random LoRA for the UNet of the diffusers folder `model_dir` to `path` (.safetensors).

    The layout is what `StableDiffusionPipeline.save_lora_weights` writes (and what LCM-LoRA,
    TCD and Hyper-SD files use): rank-`rank` adapters on every attention's to_q/to_k/to_v/to_out.0,
    with random up and down weights (`scale` their standard deviation) so that fusing it changes
    the images. Needs peft. For tests and benchmarks of the fast mode: the images are noise.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", torch_dtype=torch.float32)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=True,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers, weight_name=path.name, safe_serialization=True
    )
    return path
