"""Prompt encodings over the sampling steps (A1111 prompt editing and alternation).

A prompt's schedule (`prompt_schedule.prompt_schedule`) names the text used up to each end step;
each distinct text is encoded once. During a pipeline call `StepConditioning` hands the UNet the
rows for the coming step through `callback_on_step_end` (diffusers' StableDiffusion pipelines take
a replaced `prompt_embeds` from it: `[negative rows; positive rows]` under CFG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from generator.prompt_schedule import prompt_schedule, text_index
from generator.prompts import pad_to_length

EncodeFn = Callable[[str], torch.Tensor]


@dataclass
class ScheduledEmbeds:
    """One prompt's encodings: `embeds[k]` (1, L, dim) is used up to step `ends[k]` (1-based)."""

    ends: list[int]
    embeds: list[torch.Tensor]

    @property
    def length(self) -> int:
        """The longest encoding's token count."""
        return max(e.shape[1] for e in self.embeds)

    @property
    def changes(self) -> bool:
        """Whether the encoding changes during sampling."""
        return len(self.embeds) > 1

    def index(self, step: int) -> int:
        """Which encoding step `step` (1-based) uses."""
        return text_index(self.ends, step)

    def at(self, step: int) -> torch.Tensor:
        """The encoding step `step` (1-based) uses."""
        return self.embeds[self.index(step)]

    def padded(self, length: int, empty: torch.Tensor) -> ScheduledEmbeds:
        """The same, every encoding padded with `empty` (one 77-token chunk) to `length` tokens."""
        return ScheduledEmbeds(self.ends, [pad_to_length(e, length, empty) for e in self.embeds])

    def to(self, device: str | torch.device, dtype: torch.dtype) -> ScheduledEmbeds:
        """The same on `device` in `dtype`."""
        return ScheduledEmbeds(self.ends, [e.to(device, dtype) for e in self.embeds])


def encode_scheduled(text: str, steps: int, encode: EncodeFn) -> ScheduledEmbeds:
    """Encode each text of `text`'s schedule over `steps` steps (consecutive equal texts merged)."""
    ends: list[int] = []
    texts: list[str] = []
    for end, part in prompt_schedule(text, steps):
        if texts and texts[-1] == part:
            ends[-1] = end
        else:
            ends.append(end)
            texts.append(part)
    return ScheduledEmbeds(ends, [encode(t) for t in texts])


def pad_pair(
    pos: ScheduledEmbeds, neg: ScheduledEmbeds, empty: torch.Tensor
) -> tuple[ScheduledEmbeds, ScheduledEmbeds]:
    """Pad a prompt's and its negative's encodings to their common longest length."""
    length = max(pos.length, neg.length)
    return pos.padded(length, empty), neg.padded(length, empty)


class StepConditioning:
    """The rows of one pipeline call (one prompt and one negative per image) at each step."""

    def __init__(self, prompts: list[ScheduledEmbeds], negatives: list[ScheduledEmbeds]) -> None:
        if len(prompts) != len(negatives):
            raise ValueError("one negative per prompt")
        self.prompts = prompts
        self.negatives = negatives
        self.changes = any(p.changes for p in prompts + negatives)
        self._current = self._indices(1)

    def _indices(self, step: int) -> tuple[int, ...]:
        return tuple(c.index(step) for c in self.prompts + self.negatives)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt rows, negative rows) for step `step` (1-based)."""
        pos = torch.cat([p.at(step) for p in self.prompts])
        neg = torch.cat([n.at(step) for n in self.negatives])
        return pos, neg

    def update(self, step: int, cfg: bool) -> torch.Tensor | None:
        """The UNet's `prompt_embeds` for step `step` if they differ from the previous step's, else None."""
        if not self.changes:
            return None
        indices = self._indices(step)
        if indices == self._current:
            return None
        self._current = indices
        pos, neg = self.at(step)
        return torch.cat([neg, pos]) if cfg else pos
