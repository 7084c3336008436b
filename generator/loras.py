"""Per-job LoRAs from `GeneratorConfig.lora_dir` through diffusers' adapter API (peft).

Each file is loaded once, on first use, as an adapter named after it (`pipe.load_lora_weights(...,
adapter_name=...)`; diffusers converts kohya/A1111 layouts) and stays loaded. A job activates
its set with `pipe.set_adapters(names, adapter_weights=weights)` (UNet and text encoder alike,
so the prompt is encoded with them too); a job without LoRAs disables every adapter. The
few-step LoRA of fast mode is fused into the weights at load and is not one of these.

With compiled UNet routes (CUDA, `generator.fastpath`), a UNet holding adapter layers runs eager
(see `fastpath.route_unet`); a job without LoRAs unloads the adapters (their state dicts stay in
memory, so the file is read once) to get the compiled UNet back.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

from generator.errors import InvalidParams, first_line
from generator.extra_files import hashes_text, lora_files, lora_hash, resolve_lora

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "lora_"  #: adapter names are this + an index (LoRA names may hold any character)


class LoraManager:
    """The LoRA folder of one pipeline: names, cached adapters, the active set."""

    def __init__(self, pipe: Any, folder: Path | None, *, keep_loaded: bool = True) -> None:
        self.pipe = pipe
        self.folder = Path(folder).expanduser() if folder is not None else None
        #: False with compiled UNet routes: unload adapters for jobs without LoRAs
        self.keep_loaded = keep_loaded
        self._adapters: dict[str, str] = {}  #: LoRA name -> adapter name (loaded now)
        self._state: dict[str, dict[str, Any]] = {}  #: LoRA name -> state dict (when unloaded)
        self._ids: dict[str, str] = {}
        self._active: tuple[tuple[str, float], ...] = ()

    def available(self) -> list[str]:
        """LoRA names in the folder, sorted (re-read each call: files may be added while running)."""
        from generator.extra_files import available_loras

        return available_loras(self.folder)

    def resolve(self, loras: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The request's (name, weight) pairs with names as on disk; `InvalidParams` for unknown ones."""
        available = self.available()
        resolved: dict[str, float] = {}
        for name, weight in loras:
            real = resolve_lora(name, available)
            resolved[real] = resolved.get(real, 0.0) + weight
        return [(n, w) for n, w in resolved.items() if w != 0]

    def hashes(self, loras: list[tuple[str, float]]) -> str | None:
        """A1111's "Lora hashes" value for resolved LoRAs (`name: autov3`), or None for none."""
        files = lora_files(self.folder)
        pairs = [(name, lora_hash(files[name])) for name, _ in loras if name in files]
        return hashes_text(pairs) or None

    def _adapter_id(self, name: str) -> str:
        if name not in self._ids:
            self._ids[name] = f"{ADAPTER_PREFIX}{len(self._ids)}"
        return self._ids[name]

    def _load(self, name: str) -> str:
        if name in self._adapters:
            return self._adapters[name]
        if importlib.util.find_spec("peft") is None:
            raise InvalidParams("LoRAs need the peft package on the bot's machine.")
        adapter = self._adapter_id(name)
        try:
            if name not in self._state:
                from safetensors.torch import load_file

                self._state[name] = load_file(str(lora_files(self.folder)[name]), device="cpu")
            # a copy: diffusers converts (pops) the kohya keys of the dict it is given
            with warnings.catch_warnings():  # peft warns on every adapter after the first
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(dict(self._state[name]), adapter_name=adapter)
        except Exception as exc:
            self._forget(adapter)
            log.warning("LoRA %s did not load: %s", name, first_line(exc, 160))
            raise InvalidParams(f'LoRA "{name}" could not be loaded (is it an SD 1.x LoRA?).') from None
        listed = {a for adapters in self.pipe.get_list_adapters().values() for a in adapters}
        if adapter not in listed:
            raise InvalidParams(f'LoRA "{name}" has no weights for this model (is it an SD 1.x LoRA?).')
        self._adapters[name] = adapter
        if self.keep_loaded:  # never re-loaded: the adapter holds the weights
            self._state.pop(name, None)
        log.info("loaded LoRA %s", name)
        return adapter

    def _forget(self, adapter: str) -> None:
        try:
            listed = {a for adapters in self.pipe.get_list_adapters().values() for a in adapters}
            if adapter in listed:
                self.pipe.delete_adapters(adapter)
        except Exception as exc:  # pragma: no cover - clean-up after a failed load
            log.debug("could not delete adapter %s: %s", adapter, exc)

    def activate(self, loras: list[tuple[str, float]]) -> None:
        """Make exactly `loras` (resolved names, weights) active for the next pipeline calls."""
        key = tuple(loras)
        if key == self._active and (key or not self._adapters):
            return
        if not loras:
            self._deactivate()
        else:
            adapters = [self._load(name) for name, _ in loras]
            self.pipe.enable_lora()
            self.pipe.set_adapters(adapters, adapter_weights=[w for _, w in loras])
        self._active = key

    def _deactivate(self) -> None:
        if not self._adapters:
            return
        if self.keep_loaded:
            self.pipe.disable_lora()
            return
        self.pipe.unload_lora_weights()  # back to the plain modules (the compiled UNet's)
        self._adapters.clear()

    @property
    def has_adapters(self) -> bool:
        """Whether adapter layers are in the UNet now."""
        return bool(self._adapters)
