"""Tiny random models on disk, offline: an SD v1.x pipeline, an ESRGAN x4 upscaler, and random
LoRAs (diffusers and kohya layouts) and textual-inversion embeddings for that pipeline.

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

    # from their own modules: to a type checker the names of diffusers' lazy __init__ are the
    # placeholder classes it imports when torch is missing (no save_pretrained, not the real types)
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
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
        # diffusers annotates these two without `| None`, though None is how a pipeline has no checker
        # (unused-ignore: where mypy is set to skip diffusers, everything from it is Any)
        safety_checker=None,  # type: ignore[arg-type, unused-ignore]
        feature_extractor=None,  # type: ignore[arg-type, unused-ignore]
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


def write_random_kohya_lora(
    model_dir: Path,
    path: Path,
    *,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.5,
    text_encoder: bool = True,
) -> Path:
    """Write a random LoRA in kohya's layout (what Civitai and A1111 users have) to `path` (.safetensors).

    Keys `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` on every UNet
    attention's to_q/to_k/to_v/to_out.0, and with `text_encoder` `lora_te_<module>...` on every
    CLIP attention's q/k/v/out_proj, with kohya's training metadata header. Random weights
    (`scale` their standard deviation). For tests: the images are noise.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    models: list[tuple[str, torch.nn.Module, tuple[str, ...]]] = [
        ("lora_unet", UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet"), _UNET_TARGETS)
    ]
    if text_encoder:
        te = CLIPTextModel.from_pretrained(Path(model_dir) / "text_encoder")
        models.append(("lora_te", te, ("q_proj", "k_proj", "v_proj", "out_proj")))
    state: dict[str, torch.Tensor] = {}
    for prefix, model, targets in models:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.endswith(targets):
                continue
            key = f"{prefix}_{name.replace('.', '_')}"
            down = torch.randn((rank, module.in_features), generator=generator) * scale
            up = torch.randn((module.out_features, rank), generator=generator) * scale
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_random_embedding(model_dir: Path, path: Path, *, vectors: int = 2, seed: int = 0) -> Path:
    """Write a random textual-inversion embedding of `vectors` vectors for `model_dir`'s text encoder.

    The format follows the suffix, as A1111/Civitai files have it: `.safetensors` holds
    `{"emb_params": (vectors, dim)}`; `.pt`/`.bin` an A1111 dict (`string_to_param["*"]`, name, step).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn((vectors, int(config["hidden_size"])), generator=generator)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": emb.contiguous()}, str(path))
    else:
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": path.stem, "step": 0}
        torch.save(data, path)
    return path
