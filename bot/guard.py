"""Request guard rails: blocked terms outside age-restricted channels and default negatives."""

from __future__ import annotations

import re
from dataclasses import replace

import discord

from bot.actions import Refusal
from bot.config import Settings
from bot.text import normalize_for_matching
from generator.params import GenerationParams


def channel_is_nsfw(channel: object) -> bool:
    """True for age-restricted channels (and threads inside them)."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else bool(getattr(channel, "nsfw", False))


def find_blocked_term(prompt: str, terms: list[str]) -> str | None:
    """The first blocked term found in `prompt` after normalisation (whole words, spacing-insensitive)."""
    text = normalize_for_matching(prompt)
    squashed = re.sub(r"[\W_]+", "", text)
    for term in terms:
        norm = normalize_for_matching(term)
        if not norm:
            continue
        if re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", text):
            return term
        if len(norm) >= 4 and re.sub(r"[\W_]+", "", norm) in squashed:
            return term
    return None


def merge_negative(user_negative: str, default: str) -> str:
    """User's negative prompt followed by the channel's default one."""
    parts = [p for p in (user_negative.strip(), default.strip()) if p]
    return ", ".join(parts)


class Guard:
    """Applies the channel's content rules to a request before it is queued."""

    def __init__(self, settings: Settings):
        self.settings = settings

    async def check_request(
        self, interaction: discord.Interaction, params: GenerationParams
    ) -> GenerationParams:
        """Return the params to queue (default negative added) or raise Refusal."""
        if channel_is_nsfw(interaction.channel):
            return replace(
                params, negative=merge_negative(params.negative, self.settings.nsfw_default_negative)
            )
        if find_blocked_term(params.prompt, self.settings.blocked_term_list):
            raise Refusal("That prompt isn't allowed in this channel (it contains a blocked term).")
        return replace(params, negative=merge_negative(params.negative, self.settings.default_negative))
