"""`/pony`: the slash command that queues a job. Limits are declared in the command schema and
checked again server-side.

No `from __future__ import annotations` here: discord.py reads the parameter annotations at
definition time, and the step limit comes from settings.
"""

import discord
from discord import app_commands

from bot.config import Settings
from bot.discord_ui.actions import JobActions
from bot.discord_ui.member_images import MIN_STRENGTH
from generator.extra_files import available_loras
from generator.hires import DEFAULT_HIRES_SCALE, MAX_HIRES_SCALE, MIN_HIRES_SCALE
from generator.params import (
    ASPECTS,
    MAX_CLIP_SKIP,
    MAX_COUNT,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_GUIDANCE,
)
from generator.samplers import SAMPLER_NAMES, SCHEDULES


def pony_command(settings: Settings, actions: JobActions) -> app_commands.Command:
    """Build `/pony` with limits taken from settings; `actions` serves it."""
    max_steps = settings.max_steps

    @app_commands.command(name="pony", description="Draw a picture with pony-diffusion")
    @app_commands.describe(
        prompt="What to draw; (word:1.2) gives weight",
        negative="What to avoid",
        seed="Seed for a reproducible picture (random when empty)",
        steps=f"Denoising steps (1-{max_steps}, default {settings.default_steps})",
        guidance=f"How closely to follow the prompt (default {settings.default_guidance:g})",
        count=f"Number of images (1-{MAX_COUNT}, default {settings.default_count})",
        aspect="Picture shape",
        sampler=f"Sampler (default {settings.default_sampler})",
        schedule="Noise schedule, as A1111's Schedule type (default Automatic)",
        clip_skip=f"A1111's Clip skip: 2 = penultimate CLIP layer (default {settings.clip_skip})",
        lora="A LoRA from the server's folder, added at weight 1 (or write <lora:name:0.8>)",
        image="Your own picture (PNG, JPEG or WebP) to redraw with the prompt",
        strength=f"With image: how much to redraw, 0.05-1 (default {settings.variation_strength:g})",
        hires="Hires fix: draw, upscale and refine for a larger, sharper picture",
        hires_scale=f"Hires fix upscale, {MIN_HIRES_SCALE:g}-{MAX_HIRES_SCALE:g} (default {DEFAULT_HIRES_SCALE:g})",
    )
    @app_commands.choices(
        aspect=[app_commands.Choice(name=f"{k} ({w}x{h})", value=k) for k, (w, h) in ASPECTS.items()],
        sampler=[app_commands.Choice(name=n, value=n) for n in SAMPLER_NAMES],
        schedule=[app_commands.Choice(name=label, value=key) for key, label in SCHEDULES.items()],
    )
    @app_commands.guild_only()
    async def pony(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        negative: app_commands.Range[str, 0, MAX_PROMPT_CHARS] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        steps: app_commands.Range[int, 1, max_steps] | None = None,
        guidance: app_commands.Range[float, MIN_GUIDANCE, MAX_GUIDANCE] | None = None,
        count: app_commands.Range[int, 1, MAX_COUNT] | None = None,
        aspect: str | None = None,
        sampler: str | None = None,
        schedule: str | None = None,
        clip_skip: app_commands.Range[int, 1, MAX_CLIP_SKIP] | None = None,
        lora: app_commands.Range[str, 1, 100] | None = None,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, MIN_STRENGTH, 1.0] | None = None,
        hires: bool | None = None,
        hires_scale: app_commands.Range[float, MIN_HIRES_SCALE, MAX_HIRES_SCALE] | None = None,
    ) -> None:
        await actions.pony(
            interaction,
            prompt=prompt,
            negative=negative,
            seed=seed,
            steps=steps,
            guidance=guidance,
            count=count,
            aspect=aspect,
            sampler=sampler,
            schedule=schedule,
            clip_skip=clip_skip,
            lora=lora,
            image=image,
            strength=strength,
            hires=hires,
            hires_scale=hires_scale,
        )

    @pony.autocomplete("lora")
    async def lora_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """The LoRA files whose name contains what the member typed (Discord shows at most 25)."""
        typed = current.casefold()
        names = [n for n in available_loras(settings.lora_dir) if typed in n.casefold()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    return pony
