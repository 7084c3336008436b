"""generator.fastpath on the CPU: what is skipped, the compiled routes and their eager fallbacks,
fused QKV, fp8 without torchao, and the few-step LoRA fast mode.

The CUDA-only steps cannot run here. The compiled routes are exercised with torch.compile's
"eager" backend (dynamo traces the real UNet and VAE, no inductor), which checks the shape routing,
the warm-up and every fallback; the inductor/CUDA-graph path itself is measured on a GPU by
`benchmarks/bench_latency.py`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from result_images import same_images

from generator import fastpath
from generator.config import GeneratorConfig
from generator.errors import ModelLoadError, OutOfMemory
from generator.metadata import parse_parameters
from generator.params import GenerationParams
from generator.pipeline import GenerationResult, Generator
from generator.tiny import write_random_lora


def _px(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(im.image).astype(np.int16) for im in result.images]


def _config(model: Path, **kw: object) -> GeneratorConfig:
    return GeneratorConfig(model=str(model), device="cpu", revision=None, **kw)


@pytest.fixture
def fresh(tiny_model_dir: Path) -> Generator:
    """A generator of its own (these tests replace its UNet/VAE entry points)."""
    return Generator.load(_config(tiny_model_dir, warmup_sizes=((64, 64),), batch_size=2))


@pytest.fixture(scope="module")
def lora_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-4 LoRA for the tiny UNet, saved as diffusers saves LoRAs."""
    return write_random_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "fast-lora.safetensors")


# --- what runs on the CPU ----------------------------------------------------------------------


def test_cpu_gets_sdpa_and_nothing_cuda_only(generator: Generator) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    report = generator.fast_path
    assert report is not None
    assert report.applied == ["sdpa"]  # no channels-last, fp8 or compile off CUDA
    assert report.compile_mode is None and report.routes == [] and report.warmed == []
    for model in (generator.pipe.unet, generator.pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
        assert not hasattr(model, "_hf_hook")  # no CPU offload
    assert generator.pipe.unet.forward.__name__ == "per_image_forward"  # not a compiled route
    assert "fast path on cpu: sdpa" in report.summary()


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_accelerate_skips_non_cuda_devices_without_touching_anything(device: str) -> None:
    config = GeneratorConfig(compile=True, fp8=True, warmup_sizes=((512, 512),))
    fake = SimpleNamespace(device=device, config=config, pipe=None)  # any access to pipe would raise
    report = fastpath.FastPathReport(device=device, applied=["sdpa"])
    assert fastpath.accelerate(fake, report) is report
    assert report.applied == ["sdpa"] and report.warnings == []


def test_fp8_without_torchao_warns_and_keeps_the_unet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = fastpath.importlib.util.find_spec
    monkeypatch.setattr(
        fastpath.importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    report = fastpath.FastPathReport(device="cuda")
    unet = torch.nn.Linear(4, 4)
    before = unet.weight.clone()
    with caplog.at_level(logging.WARNING):
        fastpath._quantize_fp8(unet, report)
    assert "torchao" in report.warnings[0] and "torchao" in caplog.text
    assert torch.equal(unet.weight, before)


# --- compiled routes ---------------------------------------------------------------------------


def test_compiled_routes_serve_warmed_shapes_with_the_same_pixels(
    generator: Generator, fresh: Generator, params: GenerationParams
) -> None:
    report = fresh.fast_path
    assert report is not None
    fastpath.install_compiled(fresh, report, backend="eager")
    assert report.compile_error is None
    assert report.warmed == [(64, 64, 1), (64, 64, 2)]
    unet, vae = report.routes
    assert unet.keys and vae.keys
    warm_calls = unet.compiled_calls

    two = replace(params, count=2, sampler="Euler")  # float timesteps share the DDIM-warmed graph
    assert same_images(fresh.txt2img(two), generator.txt2img(two))
    assert unet.compiled_calls == warm_calls + two.steps and unet.eager_calls == 0
    assert same_images(fresh.txt2img(params), generator.txt2img(params))
    assert unet.eager_calls == 0

    # a size that was not warmed runs eager: no compile in the middle of the queue
    other = replace(params, width=128)
    assert same_images(fresh.txt2img(other), generator.txt2img(other))
    assert unet.eager_calls == other.steps and vae.eager_calls == 1


def test_compile_failure_in_warm_up_falls_back_to_eager(
    generator: Generator,
    fresh: Generator,
    params: GenerationParams,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("inductor exploded\nlong traceback")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    report = fresh.fast_path
    assert report is not None
    with caplog.at_level(logging.WARNING):
        fastpath.install_compiled(fresh, report, backend="eager")
    assert report.compile_error == "RuntimeError: inductor exploded"
    assert report.warmed == []
    assert all(r.error for r in report.routes)
    assert "runs eager from now on" in caplog.text
    assert "compile off: RuntimeError: inductor exploded" in report.summary()
    assert same_images(fresh.txt2img(params), generator.txt2img(params))


def test_compile_failure_after_warm_up_reruns_eager(
    generator: Generator, fresh: Generator, params: GenerationParams, caplog: pytest.LogCaptureFixture
) -> None:
    report = fresh.fast_path
    assert report is not None
    fastpath.install_compiled(fresh, report, backend="eager")
    unet = report.routes[0]
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("recompile blew up")

    unet.compiled = failing
    with caplog.at_level(logging.WARNING):
        result = fresh.txt2img(params)
    assert same_images(result, generator.txt2img(params))
    assert calls == [1]  # tried once, then eager for good
    assert unet.error == "RuntimeError: recompile blew up"
    assert "UNet failed (RuntimeError: recompile blew up)" in caplog.text


def test_torch_compile_unavailable_keeps_eager(
    fresh: Generator, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compile(fn, **kw):
        raise RuntimeError("Python 3.14 is not supported by dynamo")

    monkeypatch.setattr(torch, "compile", no_compile)
    report = fresh.fast_path
    assert report is not None
    fastpath.install_compiled(fresh, report, backend="eager")
    assert report.compile_error is not None and "not supported" in report.compile_error
    assert fresh.pipe.unet.forward.__name__ == "per_image_forward"
    assert len(fresh.txt2img(params).images) == 1


def test_out_of_memory_in_warm_up_skips_larger_batches_only(
    fresh: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = fresh.txt2img_batch

    def limited(requests, **kw):
        if len(requests) > 1:
            raise OutOfMemory("The GPU ran out of memory")
        return original(requests, **kw)

    monkeypatch.setattr(fresh, "txt2img_batch", limited)
    report = fresh.fast_path
    assert report is not None
    fastpath.install_compiled(fresh, report, backend="eager")
    assert report.compile_error is None
    assert report.warmed == [(64, 64, 1)]
    assert any("ran out of memory" in w for w in report.warnings)
    assert all(r.error is None for r in report.routes)


def test_fp32_retry_leaves_the_shared_half_precision_vae_alone(fresh: Generator) -> None:
    """Compiled code and CUDA graphs hold the VAE's weight addresses: the NaN retry must not move them."""
    vae = fresh.pipe.vae
    torch.nn.Module.to(vae, torch.bfloat16)  # stands in for fp16 on CUDA
    report = fresh.fast_path
    assert report is not None
    fastpath.install_compiled(fresh, report, backend="eager")
    route = report.routes[1]
    before = {name: p.data_ptr() for name, p in vae.named_parameters()}
    calls = route.compiled_calls + route.eager_calls
    decoded = fresh._vae_decode(torch.zeros(1, 4, 8, 8), fp32=True)
    assert decoded.dtype == torch.float32
    assert {name: p.data_ptr() for name, p in vae.named_parameters()} == before
    assert vae.dtype == torch.bfloat16
    assert route.compiled_calls + route.eager_calls == calls  # the float32 copy decodes on its own


# --- fused QKV -----------------------------------------------------------------------------------


def test_fused_qkv_is_an_option_that_keeps_the_images(
    generator: Generator, tiny_model_dir: Path, params: GenerationParams
) -> None:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    fused = Generator.load(_config(tiny_model_dir, fuse_qkv=True))
    assert fused.fast_path is not None and "fused qkv" in fused.fast_path.applied
    assert {type(p) for p in fused.pipe.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    a, b = _px(fused.txt2img(params)), _px(generator.txt2img(params))
    assert all(np.abs(x - y).max() <= 2 for x, y in zip(a, b, strict=True))  # float rounding only


# --- fast mode: a few-step LoRA ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["LCM", "TCD"])
def test_fast_lora_mode_runs_its_sampler_steps_and_guidance(
    generator: Generator, tiny_model_dir: Path, lora_file: Path, params: GenerationParams, sampler: str
) -> None:
    fast = Generator.load(_config(tiny_model_dir, fast_lora=lora_file, fast_sampler=sampler, fast_steps=2))
    assert fast.fast_lora is not None and fast.fast_lora.startswith("fast-lora: ")
    assert fast.fast_path is not None and f"({sampler}, 2 steps)" in fast.fast_path.applied[0]
    assert fast.pipe.get_list_adapters() == {}  # fused into the weights, adapter dropped

    steps: list[tuple[int, int]] = []
    request = replace(params, steps=25, guidance=7.0, sampler="DPM++ 2M")
    result = fast.txt2img(request, progress=lambda s, n, pv: steps.append((s, n)))
    assert steps == [(1, 2), (2, 2)]
    parsed = parse_parameters(result.images[0].parameters)
    assert (parsed["sampler"], parsed["steps"], parsed["cfg"]) == (sampler, 2, 1.0)
    assert parsed["extra"]["Lora hashes"] == fast.fast_lora

    # the metadata re-creates the image in fast mode; the plain model refuses the fast sampler
    from generator.metadata import to_params

    assert same_images(fast.txt2img(to_params(parsed)), result)
    with pytest.raises(Exception, match="Unknown sampler"):
        generator.txt2img(to_params(parsed))
    variation = fast.variation(result.images[0].image, request, strength=0.5)
    assert "Sampler: " + sampler in variation.images[0].parameters


def test_fused_lora_matches_the_unfused_adapter(
    tiny_model_dir: Path, lora_file: Path, params: GenerationParams
) -> None:
    config = _config(tiny_model_dir, fast_sampler="LCM", fast_steps=3)
    fused = Generator.load(replace(config, fast_lora=lora_file))
    reference = Generator.load(config)  # the same LoRA as a live (unfused) peft adapter
    reference.pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    reference.fast_lora = fused.fast_lora
    reference._samplers = fused._samplers
    plain = Generator.load(config)

    a = _px(fused.txt2img(params))[0]
    b = _px(reference.txt2img(params))[0]
    c = _px(plain.txt2img(replace(params, sampler="DDIM", steps=3, guidance=1.0)))[0]
    assert np.abs(a - b).max() <= 2  # float rounding of merged vs separate weights
    assert np.abs(a - c).mean() > 5  # the LoRA does change the images


def test_fast_lora_errors_are_one_clear_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    def error(path: Path) -> str:
        with pytest.raises(ModelLoadError) as info:
            Generator.load(_config(tiny_model_dir, fast_lora=path))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such file" in error(tmp_path / "missing.safetensors")
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"x")
    assert "only .safetensors" in error(pickle)
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in error(tmp_path / "empty")
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_something_else.lora_down.weight": torch.zeros(4, 8)}, str(other))
    assert error(other).startswith("Could not load PONY_FAST_LORA")


def test_fast_lora_needs_peft(tiny_model_dir: Path, lora_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fastpath.importlib.util.find_spec
    monkeypatch.setattr(
        fastpath.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="needs the peft package"):
        Generator.load(_config(tiny_model_dir, fast_lora=lora_file))


# --- settings ------------------------------------------------------------------------------------


def test_settings_feed_the_fast_path(tmp_path: Path) -> None:
    from bot.config import load_settings

    s = load_settings(_env_file=None, data_dir=tmp_path, base_resolution=512)
    config = s.generator_config()
    assert config.compile_mode == "reduce-overhead"
    assert config.warmup_sizes == ((512, 512),)  # auto: the square size only
    every = load_settings(_env_file=None, base_resolution=512, warmup_sizes="all").generator_config()
    assert every.warmup_sizes == ((512, 512), (512, 768), (768, 512), (448, 832), (832, 448))
    assert config.batch_size == 4 and not config.fuse_qkv and not config.fp8 and config.fast_lora is None
    assert config.compile_cache_dir == tmp_path / "compile-cache"

    small = load_settings(
        _env_file=None, base_resolution=256, max_pixels=256 * 384, batch_size=2, warmup_sizes="all"
    )
    assert small.generator_config().warmup_sizes == ((256, 256), (256, 384), (384, 256))
    assert small.generator_config().batch_size == 2
    assert load_settings(_env_file=None, warmup_sizes="none").generator_config().warmup_sizes == ()
    chosen = load_settings(
        _env_file=None, warmup_sizes="512x512, 512x768", fast_lora=tmp_path / "l.safetensors"
    )
    assert chosen.generator_config().warmup_sizes == ((512, 512), (512, 768))
    assert chosen.generator_config().fast_lora == tmp_path / "l.safetensors"


def test_unet_route_runs_eager_while_lora_adapters_are_loaded(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    route = fastpath.route_unet(unet, mode="default", backend="eager")
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    route.warming = True
    with torch.no_grad():
        unet(sample, 10, states)
        route.warming = False
        unet(sample, 10, states)
        assert route.compiled_calls == 2
        unet.peft_config = {"lora_0": object()}  # what diffusers sets when an adapter is loaded
        unet(sample, 10, states)
        assert route.compiled_calls == 2  # eager: a changed module tree never recompiles mid-queue
        del unet.peft_config
        unet(sample, 10, states)
        assert route.compiled_calls == 3


def test_fuse_qkv_is_off_with_a_lora_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = replace(_config(tiny_model_dir), fuse_qkv=True, lora_dir=tmp_path)
    g = Generator.load(config)
    assert g.fast_path is not None and "fused qkv" not in g.fast_path.applied
    assert any("fused QKV projections are off" in w for w in g.fast_path.warnings)
