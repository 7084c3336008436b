"""What A1111/Civitai prompts carry besides words: `<lora:...>` tags, `AND`, other `<tag:...>`. No torch.

`parse_prompt(text)` returns the text to encode (tags removed, as A1111 removes them: the spaces
and commas around a tag stay), the LoRAs it asks for and notes
on what was dropped, so the bot can validate a request, compute its batch key and show
"ignored: AND" before anything is queued. The generator runs the same function.

- `<lora:name>`, `<lora:name:weight>` (A1111's built-in Lora extension; `<lyco:...>` is its alias):
  weight defaults to 1; a tag naming the same LoRA again adds its weight (A1111 applies it twice).
  A third argument (A1111's separate UNet weight, `te=`/`unet=`/`dyn=` arguments) is not
  supported: the first weight is used for the whole LoRA and a note says so.
- `AND` (A1111's composable diffusion) is not supported: the sub-prompts are joined with ", "
  into one prompt (their `:weight` suffixes dropped) and a note says "ignored: AND".
- `<hypernet:...>` and any other `<word:...>` tag (A1111's extra-network syntax) are removed and
  noted. Tags in the negative prompt are removed and noted (A1111 applies none from there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from generator.errors import InvalidParams

#: A1111's extra-network tag (`modules/extra_networks.re_extra_net`)
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
#: A1111's composable-diffusion separator and a sub-prompt's trailing weight
RE_AND = re.compile(r"\bAND\b")
_RE_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
LORA_TAGS = frozenset({"lora", "lyco"})
MAX_LORAS = 5  #: most distinct LoRAs in one prompt
MAX_LORA_WEIGHT = 10.0  #: |weight| bound of one LoRA


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as the generator encodes it.

    `text`: the prompt without tags (A1111 schedule and weight syntax kept); `loras`: (name,
    weight) pairs in first-mention order; `notes`: short user-facing lines ("ignored: AND").
    """

    text: str
    loras: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()


def _lora_weight(tag: str, args: list[str]) -> float:
    if len(args) < 2 or not args[1].strip():
        return 1.0
    try:
        weight = float(args[1])
    except ValueError:
        raise InvalidParams(f"LoRA weight must be a number: {tag}") from None
    if not abs(weight) <= MAX_LORA_WEIGHT:
        raise InvalidParams(
            f"LoRA weight must be between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}: {tag}"
        )
    return weight


def _join_and(text: str, notes: list[str]) -> str:
    if not RE_AND.search(text):
        return text
    notes.append("ignored: AND")
    parts = []
    for sub in RE_AND.split(text):
        m = _RE_AND_WEIGHT.search(sub)
        sub = (m.group(1) if m else sub).strip().strip(",").strip()
        if sub:
            parts.append(sub)
    return ", ".join(parts)


def parse_prompt(text: str, *, negative: bool = False) -> ParsedPrompt:
    """Split `text` into what is encoded, the LoRAs (not for a `negative` prompt) and notes.

    Raises `InvalidParams` for a LoRA weight that is not a number or out of range, and for more
    than `MAX_LORAS` distinct LoRAs.

    >>> parse_prompt("a pony <lora:add_detail:0.8>, <lora:bar>")
    ParsedPrompt(text='a pony , ', loras=(('add_detail', 0.8), ('bar', 1.0)), notes=())
    """
    weights: dict[str, float] = {}
    notes: list[str] = []

    def strip(m: re.Match[str]) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        tag = m.group(0)
        name = args[0].strip()
        if kind.lower() in LORA_TAGS and not negative:
            weight = _lora_weight(tag, args)
            if not name:
                raise InvalidParams(f"A LoRA tag needs a name: {tag}")
            weights[name] = weights.get(name, 0.0) + weight
            if len(args) > 2:
                notes.append(f"ignored: extra LoRA arguments in {tag}")
        elif kind.lower() in LORA_TAGS:
            notes.append(f"ignored: {tag} in the negative prompt")
        elif kind.lower() == "hypernet":
            notes.append(f"ignored: hypernetwork {tag}")
        else:
            notes.append(f"ignored: {tag}")
        return ""

    stripped = RE_EXTRA_NET.sub(strip, text)
    if len(weights) > MAX_LORAS:
        raise InvalidParams(f"At most {MAX_LORAS} LoRAs per prompt (got {len(weights)}).")
    cleaned = _join_and(stripped, notes)
    return ParsedPrompt(cleaned, tuple(weights.items()), tuple(dict.fromkeys(notes)))


def parse_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """(text without tags, [(LoRA name, weight), ...]) of a prompt."""
    parsed = parse_prompt(text)
    return parsed.text, list(parsed.loras)


def prompt_notes(prompt: str, negative: str = "") -> list[str]:
    """The notes of a request's prompt and negative prompt (what the generator ignores)."""
    return list(dict.fromkeys([*parse_prompt(prompt).notes, *parse_prompt(negative, negative=True).notes]))


def lora_key(loras: Iterable[tuple[str, float]]) -> str:
    """A canonical text of a LoRA set ("" for none): equal sets give equal keys."""
    return ",".join(f"{name}:{weight:g}" for name, weight in sorted(loras) if weight != 0)


def embedding_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A case-insensitive regex matching any of the embedding `names` as a word (longest first).

    Like A1111, which matches an embedding's CLIP tokens in the prompt's: a name starting (ending)
    with a letter must not be preceded (followed) by a letter; whitespace in a name matches any.
    """
    alternatives = []
    for name in sorted(set(names), key=lambda n: (-len(n), n)):
        if not name:
            continue
        body = r"\s+".join(re.escape(part) for part in name.split())
        left = r"(?<![^\W\d_])" if name[0].isalpha() else ""
        right = r"(?![^\W\d_])" if name[-1].isalpha() else ""
        alternatives.append(f"{left}{body}{right}")
    if not alternatives:
        return None
    return re.compile("|".join(alternatives), re.IGNORECASE)


def embedding_key(text: str) -> str:
    """The form in which an embedding name and a match of `embedding_pattern` compare equal."""
    return " ".join(text.lower().split())
