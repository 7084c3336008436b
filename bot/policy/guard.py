"""Request guard rails: bans, allowed channels, blocked terms and default negatives, per guild.

A guild's rules are the global settings with its `/pony-admin` overrides (`bot.guild_settings`)
applied: the `Policy`. Outside age-restricted channels the blocked terms (global and the guild's)
are matched against the prompt after normalisation (NFKC, case-folded, invisible characters
removed; punctuation counts as a word break, and a term spelled out one character at a time,
"n.u.d.e", still counts) and the default negative prompt is added; age-restricted channels get their own default
negative and no term filter.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import discord

from bot.config import Settings
from bot.errors import Refusal
from bot.jobs.guild_settings import GuildSettings, GuildSettingsStore
from bot.jobs.models import QueueLimits
from bot.policy.text import normalize_for_matching
from generator.params import MAX_COUNT, GenerationParams

if TYPE_CHECKING:
    from bot.jobs.models import Job
    from bot.jobs.store_db import Source

BANNED = "You can't use ponybot in this server."
BLOCKED = "That prompt isn't allowed in this channel (it contains a blocked term)."
NO_JOB = "That job no longer exists."
NSFW_ONLY = "That job was made in an age-restricted channel; use it there."

_WORDS = re.compile(r"[^\W_]+")
#: a run of one-character words ("n u d e" after normalisation): a term spelled out
_SPELLED_RUN = re.compile(r"(?<!\S)\w(?: \w)+(?!\S)")


def channel_is_nsfw(channel: object) -> bool:
    """True for age-restricted channels (and threads inside them)."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else bool(getattr(channel, "nsfw", False))


def normalize_term(text: str) -> str:
    """Normalised text as words separated by single spaces (punctuation and `_` break words)."""
    return " ".join(_WORDS.findall(normalize_for_matching(text)))


def _unspaced_script(term: str) -> bool:
    """True for terms in scripts written without spaces (CJK): matched as substrings."""
    return any(unicodedata.east_asian_width(c) in "WF" for c in term)


def find_blocked_term(prompt: str, terms: Iterable[str]) -> str | None:
    """The first blocked term found in `prompt` (whole words, after normalisation), or None."""
    text = normalize_term(prompt)
    spelled = [m.group().replace(" ", "") for m in _SPELLED_RUN.finditer(text)]
    for term in terms:
        norm = normalize_term(term)
        if not norm:
            continue
        squashed = norm.replace(" ", "")
        if _unspaced_script(norm):
            if squashed in text.replace(" ", ""):
                return term
            continue
        if re.search(rf"(?<!\S){re.escape(norm)}(?!\S)", text):
            return term
        if len(squashed) > 1 and any(squashed in run for run in spelled):
            return term
    return None


def merge_negative(user_negative: str, default: str) -> str:
    """User's negative prompt followed by the channel's default one (not twice)."""
    user_negative, default = user_negative.strip(), default.strip()
    if default and user_negative.endswith(default):
        return user_negative
    return ", ".join(p for p in (user_negative, default) if p)


@dataclass(frozen=True)
class Policy:
    """The rules for requests in one guild: global settings with the guild's overrides."""

    allowed_channels: frozenset[int]
    blocked_terms: tuple[str, ...]
    default_negative: str
    nsfw_default_negative: str
    default_steps: int
    default_count: int
    max_steps: int
    limits: QueueLimits

    @classmethod
    def build(cls, settings: Settings, guild: GuildSettings | None = None) -> Policy:
        """Merge the global settings with a guild's overrides (None = no overrides)."""
        g = guild or GuildSettings(0)
        max_steps = min(g.max_steps or settings.max_steps, settings.max_steps)
        base = QueueLimits.from_settings(settings)
        limits = replace(
            base,
            max_open_per_user=g.max_open_jobs_per_user or base.max_open_per_user,
            cooldown_s=base.cooldown_s if g.cooldown_s is None else g.cooldown_s,
        )
        return cls(
            allowed_channels=frozenset(g.allowed_channels),
            blocked_terms=(*settings.blocked_term_list, *g.blocked_terms),
            default_negative=_pick(g.default_negative, settings.default_negative),
            nsfw_default_negative=_pick(g.nsfw_default_negative, settings.nsfw_default_negative),
            default_steps=min(g.default_steps or settings.default_steps, max_steps),
            default_count=min(g.default_count or settings.default_count, MAX_COUNT),
            max_steps=max_steps,
            limits=limits,
        )

    def channel_allowed(self, channel_id: int | None, parent_id: int | None = None) -> bool:
        """True when the guild allows every channel, or this one (or the thread's parent)."""
        if not self.allowed_channels:
            return True
        return channel_id in self.allowed_channels or (
            parent_id is not None and parent_id in self.allowed_channels
        )


def _pick(override: str | None, default: str) -> str:
    return default if override is None else override


class Guard:
    """Applies a guild's rules to requests before they are queued."""

    def __init__(self, settings: Settings, queue: Source | None = None):
        self.settings = settings
        self.store = GuildSettingsStore(queue) if queue is not None else None

    async def policy(self, guild_id: int | None) -> Policy:
        """The rules for `guild_id` (the global ones outside guilds or without a store)."""
        if self.store is None or not guild_id:
            return Policy.build(self.settings)
        return Policy.build(self.settings, await self.store.get(guild_id))

    async def admit(self, interaction: discord.Interaction) -> Policy:
        """Refuse banned members and channels the guild did not allow; return the guild's policy."""
        guild_id = interaction.guild_id
        if self.store is not None and guild_id and await self.store.ban_of(guild_id, interaction.user.id):
            raise Refusal(BANNED)
        policy = await self.policy(guild_id)
        channel = interaction.channel
        if not policy.channel_allowed(interaction.channel_id, getattr(channel, "parent_id", None)):
            where = ", ".join(f"<#{c}>" for c in sorted(policy.allowed_channels))
            raise Refusal(f"ponybot isn't enabled in this channel; use {where}.")
        return policy

    def check_prompt(self, channel: object, prompt: str, policy: Policy) -> None:
        """Raise Refusal when the prompt holds a blocked term and the channel is not age-restricted."""
        if not channel_is_nsfw(channel) and find_blocked_term(prompt, policy.blocked_terms):
            raise Refusal(BLOCKED)

    async def check_request(
        self, interaction: discord.Interaction, params: GenerationParams, policy: Policy | None = None
    ) -> GenerationParams:
        """Return the params to queue (default negative added) or raise Refusal.

        Without `policy` the member and channel are checked first (`admit`).
        """
        if policy is None:
            policy = await self.admit(interaction)
        if params.steps > policy.max_steps:
            raise Refusal(f"Steps must be between 1 and {policy.max_steps}.")
        self.check_prompt(interaction.channel, params.prompt, policy)
        default = (
            policy.nsfw_default_negative if channel_is_nsfw(interaction.channel) else policy.default_negative
        )
        return replace(params, negative=merge_negative(params.negative, default))

    def check_job_access(
        self,
        interaction: discord.Interaction,
        job: Job,
        *,
        get_channel: Callable[[int], object | None],
        reveals: bool = True,
    ) -> None:
        """Raise Refusal unless the job may be used from this interaction's channel.

        The job must belong to this guild. When the action shows or re-uses the job's content
        (`reveals`) in another channel that is not age-restricted, the job's own channel must be
        known and not age-restricted either.
        """
        if job.guild_id != (interaction.guild_id or 0):
            raise Refusal(NO_JOB)
        if not reveals or job.channel_id == interaction.channel_id or channel_is_nsfw(interaction.channel):
            return
        origin = get_channel(job.channel_id)
        if origin is None or channel_is_nsfw(origin):
            raise Refusal(NSFW_ONLY)
