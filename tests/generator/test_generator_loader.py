"""generator.loader through Generator.load: folders, errors with one clear line, hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from generator.config import GeneratorConfig
from generator.errors import ModelLoadError
from generator.loader import load_pipeline, model_name_for, resolve_device
from generator.pipeline import Generator


def _load_error(model: str, **kw: object) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(GeneratorConfig(model=model, device="cpu", **kw))
    text = str(info.value)
    assert "\n" not in text
    return text


def test_loads_tiny_folder(generator: Generator, tiny_model_dir: Path) -> None:
    assert generator.device == "cpu"
    assert generator.dtype_name == "float32"
    assert generator.model_name == "tiny-pony"
    unet = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert generator.model_hash == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    assert generator.pipe.safety_checker is None
    assert type(generator.pipe.scheduler).__name__ == "DDIMScheduler"


def test_missing_path(tmp_path: Path) -> None:
    text = _load_error(str(tmp_path / "nope"))
    assert "no such file or folder" in text
    assert "Set PONY_MODEL" in text
    assert "no such file or folder" in _load_error("./missing-model.safetensors")


def test_random_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    text = _load_error(str(tmp_path))
    assert "not a diffusers folder" in text and "Set PONY_MODEL" in text


def test_sdxl_folder_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    text = _load_error(str(tmp_path))
    assert "StableDiffusionXLPipeline" in text and "not Stable Diffusion v1.x" in text


def test_non_sd_safetensors_refused(tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "random.safetensors"))
    assert "not a Stable Diffusion v1.x checkpoint" in _load_error(str(tmp_path / "random.safetensors"))
    xl = {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(2),
    }
    save_file(xl, str(tmp_path / "xl.safetensors"))
    assert "xl_base" in _load_error(str(tmp_path / "xl.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors at all")
    assert "not a valid .safetensors file" in _load_error(str(tmp_path / "broken.safetensors"))


class _Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (Path.touch, (self.marker,))


def test_ckpt_with_pickled_code_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": _Payload(marker)}, ckpt)
    text = _load_error(str(ckpt))
    assert "refused for safety" in text and ".safetensors" in text
    assert not marker.exists()


def test_hub_id_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _load_error("nobody-here/no-such-model", revision="fp16")
    assert "'nobody-here/no-such-model'" in text
    assert "local cache" in text and "PONY_MODEL" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_pipeline(GeneratorConfig(model=str(tiny_model_dir), device="cuda"))
    assert resolve_device("cpu") == "cpu"


def test_model_names(tmp_path: Path) -> None:
    f = tmp_path / "ponyV6.safetensors"
    f.write_bytes(b"x")
    assert model_name_for(str(f)) == "ponyV6"
    assert model_name_for("AstraliteHeart/pony-diffusion") == "pony-diffusion"
    assert model_name_for(str(tmp_path) + os.sep) == tmp_path.name
