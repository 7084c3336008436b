"""A1111 `parameters` metadata: format it, write it into PNGs (atomically), read and parse it.

The text is what AUTOMATIC1111 writes, so its "PNG Info" tab, Civitai and other tools read ours:

    prompt
    Negative prompt: negative
    Steps: 25, Sampler: DDIM, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 0123456789, Model: x

Values containing a comma, colon or newline are JSON-quoted, as A1111 does. "Schedule type" follows
the sampler (when not Automatic) and "Clip skip" the model (when above 1), as A1111 1.9+ writes
them; the generator appends "Lora hashes" / "TI hashes". The prompt is kept as given (tags too).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from generator.params import GenerationParams
from generator.samplers import SCHEDULES, schedule_name

NEGATIVE_PREFIX = "Negative prompt:"
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def format_fields(fields: dict[str, Any]) -> str:
    """`Key: value, Key: value` (A1111's parameter line); None and "" values are left out."""
    return ", ".join(f"{k}: {_value(v)}" for k, v in fields.items() if v is not None and v != "")


def format_parameters(
    params: GenerationParams,
    seed: int,
    *,
    model_name: str,
    model_hash: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """The A1111 text for one image made from `params` with `seed`; `extra` fields are appended."""
    values: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": params.sampler,
        "Schedule type": SCHEDULES.get(params.schedule) if params.schedule != "automatic" else None,
        "CFG scale": float(params.guidance),
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
    }
    values.update(extra or {})
    line = format_fields(values)
    lines = [params.prompt]
    if params.negative:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative}")
    lines.append(line)
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str) -> Path:
    """Write `image` as a PNG with a `parameters` text chunk; atomic (temp file, fsync, rename).

    Creates the parent folder. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)  # tEXt, or iTXt when not latin-1
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_parameters(source: str | os.PathLike[str] | Image.Image) -> str | None:
    """The `parameters` text of a PNG file or an opened image, or None if it has none."""
    if isinstance(source, Image.Image):
        value = source.info.get("parameters")
    else:
        try:
            with Image.open(source) as im:
                value = im.info.get("parameters")
        except (OSError, ValueError):
            return None
    return value if isinstance(value, str) else None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def _num(value: str | None, kind: type) -> Any:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        return None


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 text (A1111's own algorithm) into a dict.

    Keys: prompt, negative (str); steps, seed, width, height, clip_skip (int or None); cfg (float or
    None); sampler, schedule (our value, e.g. "karras"), model, model_hash (str or None); extra (dict
    of the other fields, as strings; an unknown "Schedule type" stays there).
    """
    *lines, last = text.rstrip("\n").split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].removeprefix(" ")
        (negative_lines if in_negative else prompt_lines).append(line)

    fields: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last):
        fields[key.strip()] = _unquote(value.strip())
    size = _RE_SIZE.match(fields.pop("Size", ""))
    result: dict[str, Any] = {
        "prompt": "\n".join(prompt_lines),
        "negative": "\n".join(negative_lines),
        "steps": _num(fields.pop("Steps", None), int),
        "sampler": fields.pop("Sampler", None),
        "cfg": _num(fields.pop("CFG scale", None), float),
        "seed": _num(fields.pop("Seed", None), int),
        "width": int(size.group(1)) if size else None,
        "height": int(size.group(2)) if size else None,
        "model_hash": fields.pop("Model hash", None),
        "model": fields.pop("Model", None),
        "clip_skip": _num(fields.pop("Clip skip", None), int),
        "schedule": None,
    }
    schedule = schedule_name(fields.get("Schedule type", ""))
    if schedule is not None:
        fields.pop("Schedule type")
        result["schedule"] = schedule
    result["extra"] = fields
    return result


def to_params(parsed: dict[str, Any], **overrides: Any) -> GenerationParams:
    """A count=1 `GenerationParams` from `parse_parameters` output (missing fields: defaults).

    The prompt keeps its `<lora:...>` tags (the generator applies them).
    """
    defaults = {
        f.name: getattr(GenerationParams(prompt=""), f.name) for f in dataclass_fields(GenerationParams)
    }
    values = {
        "prompt": parsed.get("prompt") or "",
        "negative": parsed.get("negative") or "",
        "seed": parsed.get("seed"),
        "steps": parsed.get("steps"),
        "guidance": parsed.get("cfg"),
        "width": parsed.get("width"),
        "height": parsed.get("height"),
        "sampler": parsed.get("sampler"),
        "clip_skip": parsed.get("clip_skip"),
        "schedule": parsed.get("schedule"),
        "count": 1,
    }
    kept = {k: v for k, v in values.items() if v is not None}
    return GenerationParams(**{**defaults, **kept, **overrides})
