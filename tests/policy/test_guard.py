"""bot.policy.guard: blocked-term matching, per-guild policy, bans, allowed channels, job access."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bot.config import load_settings
from bot.errors import Refusal
from bot.jobs.guild_settings import GuildSettings
from bot.jobs.models import QueueLimits
from bot.jobs.queue import JobQueue
from bot.policy.guard import (
    BANNED,
    BLOCKED,
    NO_JOB,
    NSFW_ONLY,
    Guard,
    Policy,
    find_blocked_term,
    merge_negative,
    normalize_term,
)
from generator.params import GenerationParams

GUILD = 10
SFW = 100
NSFW = 101
TERMS = ["nude", "cock", "big cat", "裸体"]


@pytest.mark.parametrize(
    ("prompt", "found"),
    [
        ("a nude pony", "nude"),
        ("NUDE pony", "nude"),
        ("nu\u200bde pony", "nude"),  # zero-width space
        ("n\u200cu\u200dd\u2060e", "nude"),  # zero-width non-joiner, joiner, word joiner
        ("ｎｕｄｅ pony", "nude"),  # full-width letters
        ("\u202enude\u202c pony", "nude"),  # bidi override around it
        ("(nude:1.3), pony", "nude"),  # A1111 weight syntax
        ("n.u.d.e pony", "nude"),  # spelled out
        ("a n u d e pony", "nude"),
        ("big-cat", "big cat"),
        ("big_cat", "big cat"),
        ("BIG   CAT", "big cat"),
        ("裸体の猫", "裸体"),  # a script written without spaces: substring
        ("peacock in a garden", None),  # no Scunthorpe false positives
        ("a pony in a field", None),
        ("nudes", None),
        ("", None),
    ],
)
def test_find_blocked_term(prompt: str, found: str | None) -> None:
    assert find_blocked_term(prompt, TERMS) == found


def test_normalize_term() -> None:
    assert normalize_term("  Ｂｉｇ\u200b_Cat!! ") == "big cat"
    assert normalize_term("\u200b\u200d") == ""


def test_merge_negative_adds_the_default_once() -> None:
    assert merge_negative("blurry", "lowres") == "blurry, lowres"
    assert merge_negative("", "lowres") == "lowres"
    assert merge_negative("blurry, lowres", "lowres") == "blurry, lowres"  # a reroll does not repeat it
    assert merge_negative("blurry", "") == "blurry"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    return load_settings(
        blocked_terms="gore, nude",
        default_negative="sfw-neg",
        nsfw_default_negative="nsfw-neg",
        default_steps=20,
        max_steps=40,
        default_count=4,
        max_open_jobs_per_user=3,
        cooldown_s=2,
    )


def test_policy_merges_guild_overrides(settings: Any) -> None:
    plain = Policy.build(settings)
    assert plain.default_steps == 20 and plain.max_steps == 40 and plain.default_count == 4
    assert plain.blocked_terms == ("gore", "nude") and plain.allowed_channels == frozenset()
    assert plain.limits == QueueLimits.from_settings(settings)

    guild = GuildSettings(
        GUILD,
        allowed_channels=(SFW,),
        blocked_terms=("dragon",),
        default_negative="",
        default_steps=30,
        default_count=1,
        max_steps=25,
        max_open_jobs_per_user=1,
        cooldown_s=0.0,
    )
    policy = Policy.build(settings, guild)
    assert policy.blocked_terms == ("gore", "nude", "dragon")
    assert policy.default_negative == "" and policy.nsfw_default_negative == "nsfw-neg"
    assert policy.max_steps == 25 and policy.default_steps == 25, "default capped at the guild's max"
    assert policy.default_count == 1
    assert policy.limits.max_open_per_user == 1 and policy.limits.cooldown_s == 0.0
    assert policy.limits.max_queued == settings.max_queue, "the global queue cap stays global"
    assert Policy.build(settings, GuildSettings(GUILD, max_steps=500)).max_steps == 40, "never above global"


def test_channel_allowed_checks_thread_parents(settings: Any) -> None:
    policy = Policy.build(settings, GuildSettings(GUILD, allowed_channels=(SFW,)))
    assert policy.channel_allowed(SFW)
    assert not policy.channel_allowed(NSFW)
    assert policy.channel_allowed(555, parent_id=SFW)
    assert Policy.build(settings).channel_allowed(NSFW)


def interaction(channel_id: int = SFW, *, user_id: int = 1, nsfw: bool = False) -> Any:
    channel = SimpleNamespace(id=channel_id, nsfw=nsfw, parent_id=None)
    return SimpleNamespace(
        guild_id=GUILD, channel_id=channel_id, channel=channel, user=SimpleNamespace(id=user_id)
    )


@pytest.fixture
async def guard(settings: Any, tmp_path: Path) -> AsyncIterator[Guard]:
    queue = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits())
    try:
        yield Guard(settings, queue)
    finally:
        await queue.close()


async def test_check_request_per_channel_kind(guard: Guard) -> None:
    params = GenerationParams(prompt="a pony", negative="blurry", steps=20)
    sfw = await guard.check_request(interaction(), params)
    assert sfw.negative == "blurry, sfw-neg"
    nsfw = await guard.check_request(interaction(NSFW, nsfw=True), GenerationParams(prompt="a nude pony"))
    assert nsfw.negative == "nsfw-neg", "age-restricted channels: no term filter, their own negative"
    with pytest.raises(Refusal, match=re.escape(BLOCKED)):
        await guard.check_request(interaction(), GenerationParams(prompt="a ｎｕｄｅ pony"))


async def test_bans_allowed_channels_and_guild_limits(guard: Guard) -> None:
    store = guard.store
    assert store is not None
    await store.ban(GUILD, 7, by=1, reason="spam")
    with pytest.raises(Refusal, match=re.escape(BANNED)):
        await guard.admit(interaction(user_id=7))
    await guard.admit(interaction(user_id=8))

    await store.allow_channel(GUILD, 1, SFW)
    await store.allow_channel(GUILD, 1, 300)
    with pytest.raises(Refusal) as info:
        await guard.admit(interaction(NSFW, nsfw=True))
    assert str(info.value) == f"ponybot isn't enabled in this channel; use <#{SFW}>, <#300>."

    await store.set_values(GUILD, 1, {"max_steps": 10})
    await store.add_blocked_term(GUILD, 1, "dragon")
    with pytest.raises(Refusal, match=r"^Steps must be between 1 and 10\.$"):
        await guard.check_request(interaction(), GenerationParams(prompt="x", steps=11))
    with pytest.raises(Refusal, match=re.escape(BLOCKED)):
        await guard.check_request(interaction(), GenerationParams(prompt="a DRAGON", steps=5))
    other_guild = SimpleNamespace(**{**vars(interaction()), "guild_id": GUILD + 1})
    assert (await guard.check_request(other_guild, GenerationParams(prompt="a dragon", steps=11))).steps == 11


def test_check_job_access(settings: Any) -> None:
    guard = Guard(settings)
    channels = {SFW: SimpleNamespace(nsfw=False), NSFW: SimpleNamespace(nsfw=True)}

    def job(channel_id: int, guild_id: int = GUILD) -> Any:
        return SimpleNamespace(guild_id=guild_id, channel_id=channel_id)

    def check(job: Any, where: Any, **kwargs: Any) -> None:
        guard.check_job_access(where, job, get_channel=channels.get, **kwargs)

    check(job(SFW), interaction(SFW))
    check(job(SFW), interaction(200))  # made in a work-safe channel: fine elsewhere
    check(job(NSFW), interaction(NSFW, nsfw=True))
    check(job(SFW), interaction(NSFW, nsfw=True))
    with pytest.raises(Refusal, match=re.escape(NSFW_ONLY)):
        check(job(NSFW), interaction(SFW))
    with pytest.raises(Refusal, match=re.escape(NSFW_ONLY)):
        check(job(999), interaction(SFW))  # unknown (deleted) channel: treated as age-restricted
    check(job(NSFW), interaction(SFW), reveals=False)  # Cancel shows nothing
    with pytest.raises(Refusal, match=re.escape(NO_JOB)):
        check(job(SFW, guild_id=GUILD + 1), interaction(SFW))
