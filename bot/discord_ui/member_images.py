"""Members' own images (issue #14): `/pony image:` (img2img of an upload), the hires fix option,
the Edit button's modal, and the "Re-create with ponybot" message command.

Uploads are checked before and while they download: the attachment's declared size, type and
pixel count first, then a streamed download with a byte cap (`MAX_UPLOAD_BYTES`), then Pillow
with an explicit pixel check before the pixels are decoded (decompression bombs). An accepted
source is re-encoded as a PNG (metadata dropped) at `<images>/uploads/<interaction id>.png` and
the job (kind `variation`, no parent) names it in its params (`source`, `strength`), so the job
survives restarts and Reroll/Edit run it again. The worker screens the source through the
image filter before drawing from it (`bot.runtime.sources.load_source`).

`ImageOptions` handles /pony's image, strength and hires options for `JobActions`;
`MemberImages` holds the Edit and Re-create use cases, which queue through `JobActions`.

Every refusal is a short ephemeral message (`ImageRefused`) and queues nothing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import discord
from discord import app_commands
from PIL import Image, ImageOps, UnidentifiedImageError

from bot.config import Settings
from bot.discord_ui.actions import JobActions, validate_params
from bot.discord_ui.buttons import interaction_custom_id
from bot.discord_ui.replies import tell
from bot.errors import Refusal, refusal_text
from bot.jobs.contract import JobQueueContract
from bot.jobs.extras import hires_extra, job_extras
from bot.jobs.models import Job, JobKind
from bot.policy.guard import Guard, Policy, channel_is_nsfw
from bot.policy.text import clean_prompt, escape_for_discord
from bot.runtime.engine import Engine
from bot.runtime.sources import UPLOADS_DIR, save_source
from generator.errors import InvalidParams
from generator.hires import MAX_HIRES_SCALE, MIN_HIRES_SCALE
from generator.params import ASPECTS, MAX_PROMPT_CHARS, MAX_SEED, GenerationParams, aspect_size, random_seed
from generator.samplers import SAMPLER_NAMES, schedule_error

log = logging.getLogger(__name__)

#: the largest upload accepted (bytes, declared and downloaded)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: the most pixels an upload may have (checked before decoding: decompression bombs)
MAX_UPLOAD_PIXELS = 25_000_000
DOWNLOAD_TIMEOUT_S = 30.0
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MIN_STRENGTH = 0.05
EDIT_PREFIX = "pony:edit:"
EDIT_TEMPLATE = re.compile(r"pony:edit:(?P<job>[0-9]{1,18})")
RECREATE_NAME = "Re-create with ponybot"

NOT_IMAGE = "That file isn't a PNG, JPEG or WebP image."
NO_PNG = "That message has no PNG image to re-create."
NO_PARAMETERS = "That PNG carries no generation parameters (A1111 `parameters`), so I can't re-create it."


class ImageRefused(Refusal):
    """An upload refused with a short, user-facing reason."""


# --- checking and fetching uploads ------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


def too_large_text() -> str:
    """The refusal for an upload over the byte or pixel cap."""
    return f"That image is too large; at most {_mib(MAX_UPLOAD_BYTES)} and {MAX_UPLOAD_PIXELS:,} pixels."


def check_declared(attachment: discord.Attachment) -> None:
    """Refuse from what Discord declares about the attachment, before downloading anything."""
    if attachment.size > MAX_UPLOAD_BYTES:
        raise ImageRefused(too_large_text())
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type and content_type not in IMAGE_TYPES:
        raise ImageRefused(NOT_IMAGE)
    if attachment.width and attachment.height and attachment.width * attachment.height > MAX_UPLOAD_PIXELS:
        raise ImageRefused(too_large_text())


async def download(
    url: str, *, max_bytes: int = MAX_UPLOAD_BYTES, timeout_s: float = DOWNLOAD_TIMEOUT_S
) -> bytes:
    """The body at `url`, streamed; ImageRefused past `max_bytes`, on an HTTP error or a timeout."""
    buf = bytearray()
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            if response.status != 200:
                raise ImageRefused(f"I couldn't download that image (HTTP {response.status}).")
            if response.content_length is not None and response.content_length > max_bytes:
                raise ImageRefused(too_large_text())
            async for chunk in response.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    raise ImageRefused(too_large_text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("upload download failed: %s", type(exc).__name__)
        raise ImageRefused("I couldn't download that image; try again.") from None
    return bytes(buf)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB; transparency over white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, *, max_pixels: int = MAX_UPLOAD_PIXELS) -> tuple[Image.Image, str | None]:
    """(RGB image, its A1111 `parameters` text or None); ImageRefused for non-images and bombs.

    The pixel count is read from the header and checked before any pixel is decoded.
    """
    try:
        with Image.open(io.BytesIO(data), formats=tuple(IMAGE_TYPES.values())) as im:
            if im.width * im.height > max_pixels:
                raise ImageRefused(too_large_text())
            im.load()
            text = im.info.get("parameters")
            rgb = _flatten(ImageOps.exif_transpose(im) or im)
    except Image.DecompressionBombError:
        raise ImageRefused(too_large_text()) from None
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImageRefused(NOT_IMAGE) from None
    return rgb, text if isinstance(text, str) else None


async def fetch_image(attachment: discord.Attachment) -> tuple[Image.Image, str | None]:
    """Declared checks, capped download, guarded decode (in a thread): (image, parameters text)."""
    check_declared(attachment)
    data = await download(attachment.url)
    return await asyncio.to_thread(decode, data)


def nearest_aspect(width: int, height: int) -> str:
    """The offered aspect (ASPECTS) whose shape is closest to width x height."""
    ratio = math.log(width / height)
    return min(ASPECTS, key=lambda name: abs(math.log(ASPECTS[name][0] / ASPECTS[name][1]) - ratio))


# --- the Edit modal -----------------------------------------------------------------------------


def strip_default(negative: str, default: str) -> str:
    """The member's own negative: the channel default that `merge_negative` appended, removed."""
    default = default.strip()
    if default and negative.endswith(default):
        return negative[: -len(default)].rstrip().rstrip(",").rstrip()
    return negative


def edit_modal(job: Job, negative: str) -> discord.ui.Modal:
    """The Edit form for a job, prefilled. Not kept in discord.py's modal store (stopped before it
    is sent): its submission is handled statelessly by `MemberImages.submit_edit`, so a form
    opened before a restart still works."""
    params = GenerationParams.from_dict(job.params)
    modal = discord.ui.Modal(title=f"Edit job #{job.id}", custom_id=f"{EDIT_PREFIX}{job.id}")
    fields = (
        ("prompt", "Prompt", discord.TextStyle.paragraph, params.prompt, True, MAX_PROMPT_CHARS),
        ("negative", "Negative prompt", discord.TextStyle.paragraph, negative, False, MAX_PROMPT_CHARS),
        ("seed", "Seed (empty = random)", discord.TextStyle.short, str(params.seed), False, 10),
        ("steps", "Steps", discord.TextStyle.short, str(params.steps), True, 3),
    )
    for custom_id, label, style, value, required, max_length in fields:
        modal.add_item(
            discord.ui.TextInput(
                label=label,
                custom_id=custom_id,
                style=style,
                default=value[:max_length] or None,
                required=required,
                max_length=max_length,
            )
        )
    modal.stop()
    return modal


def _walk_inputs(components: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for component in components or []:
        if component.get("type") == 4:
            yield component
        yield from _walk_inputs(component.get("components") or [])
        inner = component.get("component")
        if isinstance(inner, dict):
            yield from _walk_inputs([inner])


def modal_values(data: dict[str, Any]) -> dict[str, str]:
    """custom_id -> submitted text of a modal submission's inputs."""
    return {
        str(c.get("custom_id")): str(c.get("value") or "") for c in _walk_inputs(data.get("components") or [])
    }


def parse_whole(text: str, what: str, low: int, high: int) -> int:
    """An integer typed into the form, or InvalidParams naming the field and the range."""
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidParams(f"{what} must be a whole number between {low} and {high}.") from None
    if not low <= value <= high:
        raise InvalidParams(f"{what} must be between {low} and {high}.")
    return value


# --- Re-create: A1111 parameters ----------------------------------------------------------------


def _first_png(message: discord.Message) -> discord.Attachment | None:
    for attachment in message.attachments:
        content_type = (attachment.content_type or "").split(";")[0].strip().lower()
        if content_type == "image/png" or (not content_type and attachment.filename.lower().endswith(".png")):
            return attachment
    return None


def found_text(
    filename: str, params: GenerationParams, hires: dict[str, Any] | None, notes: list[str]
) -> str:
    """What the member is shown of the parameters read from a PNG."""
    lines = [
        f"Found in `{escape_for_discord(filename, 100)}`:",
        f"**Prompt:** {escape_for_discord(params.prompt, 600)}",
    ]
    if params.negative:
        lines.append(f"**Negative:** {escape_for_discord(params.negative, 300)}")
    settings = (
        f"Steps {params.steps}, Sampler {params.sampler}, CFG {params.guidance:g}, Seed {params.seed},"
        f" Size {params.width}x{params.height}"
    )
    if hires:
        settings += f", Hires {hires['scale']:g}x"
    lines.append(settings)
    lines.extend(f"*{note}*" for note in notes)
    return "\n".join(lines)


def recreate_command(images: MemberImages) -> app_commands.ContextMenu:
    """The message command "Re-create with ponybot" (right-click a message > Apps)."""

    async def recreate(interaction: discord.Interaction, message: discord.Message) -> None:
        await images.recreate(interaction, message)

    return app_commands.guild_only(app_commands.ContextMenu(name=RECREATE_NAME, callback=recreate))


# --- use cases ----------------------------------------------------------------------------------


class ImageOptions:
    """/pony's `image`, `strength`, `hires` and `hires_scale` options (`JobActions`' PonyExtras).

    A saved upload is shared through `queue` (`share_files`), so a worker on another machine can
    read it.
    """

    def __init__(self, settings: Settings, queue: JobQueueContract):
        self.settings = settings
        self.queue = queue

    def forget_source(self, rel: str) -> None:
        """Delete a saved upload whose job was refused (best effort)."""
        path = Path(rel)
        if path.parts[:1] == (UPLOADS_DIR,) and ".." not in path.parts:
            (self.settings.images_dir / path).unlink(missing_ok=True)

    async def pony_extras(
        self,
        interaction: discord.Interaction,
        params: GenerationParams,
        *,
        image: discord.Attachment | None,
        strength: float | None,
        hires: bool | None,
        hires_scale: float | None,
        aspect: str | None,
    ) -> tuple[JobKind, GenerationParams, dict[str, Any], str | None]:
        """(kind, params, extra params, note) for /pony's image/strength/hires options."""
        s = self.settings
        want_hires = bool(hires) or (hires is None and hires_scale is not None)
        if image is None:
            if strength is not None:
                raise Refusal("`strength` goes with `image` (how much of your picture to redraw).")
            if not want_hires:
                return JobKind.TXT2IMG, params, {}, None
            extra, note = hires_extra(params, hires_scale, s.hires_strength, s.max_pixels)
            return JobKind.TXT2IMG, params, extra, note
        if want_hires:
            raise Refusal("The hires fix works on new pictures only; leave out `image` or `hires`.")
        picture, _ = await fetch_image(image)
        if aspect is None:
            width, height = aspect_size(nearest_aspect(*picture.size), s.base_resolution)
            params = validate_params(s, replace(params, width=width, height=height))
        key = interaction.id
        rel = await asyncio.to_thread(save_source, s.images_dir, key, picture)
        try:
            await self.queue.share_files([rel])
        except BaseException:
            self.forget_source(rel)  # nothing is queued: do not keep the file
            raise
        value = s.variation_strength if strength is None else float(strength)
        return JobKind.VARIATION, params, {"source": rel, "strength": value}, None


class MemberImages:
    """The Edit and Re-create use cases; refusals and the queued answer go through `JobActions`."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: JobQueueContract,
        engine: Engine,
        guard: Guard,
        actions: JobActions,
        client: discord.Client,
    ):
        self.settings = settings
        self.queue = queue
        self.engine = engine
        self.guard = guard
        self.actions = actions
        self.client = client

    # Edit -------------------------------------------------------------------------------------

    async def open_edit(self, interaction: discord.Interaction, job_id: int) -> None:
        """The Edit button: answer with the prefilled modal (a modal can't follow a defer)."""
        job = await self.queue.get(job_id)
        try:
            if job is None:
                raise Refusal("That job no longer exists.")
            self.guard.check_job_access(interaction, job, get_channel=self.client.get_channel)
            if job.kind == JobKind.UPSCALE:
                raise Refusal("An upscale can't be edited.")
            policy = await self.guard.policy(interaction.guild_id)
        except (Refusal, sqlite3.OperationalError) as exc:
            await tell(interaction, refusal_text(exc))  # not deferred: the answer is the response
            return
        default = (
            policy.nsfw_default_negative if channel_is_nsfw(interaction.channel) else policy.default_negative
        )
        negative = strip_default(GenerationParams.from_dict(job.params).negative, default)
        await interaction.response.send_modal(edit_modal(job, negative))

    async def submit_edit(self, interaction: discord.Interaction) -> None:
        """The Edit form was sent: queue the job again with the changed values."""
        actions = self.actions
        match = EDIT_TEMPLATE.fullmatch(interaction_custom_id(interaction))
        if match is None:
            await interaction.response.send_message("That form isn't valid.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        values = modal_values(dict(interaction.data or {}))
        job = await self.queue.get(int(match["job"]))
        try:
            if job is None:
                raise Refusal("That job no longer exists.")
            self.guard.check_job_access(interaction, job, get_channel=self.client.get_channel)
            if job.kind == JobKind.UPSCALE:
                raise Refusal("An upscale can't be edited.")
            policy = await self.guard.admit(interaction)
            seed_text = values.get("seed", "").strip()
            seed = random_seed() if not seed_text else parse_whole(seed_text, "Seed", 0, MAX_SEED)
            steps = parse_whole(values.get("steps", ""), "Steps", 1, policy.max_steps)
            base = GenerationParams.from_dict(job.params)
            params = replace(
                base,
                prompt=clean_prompt(values.get("prompt", "")),
                negative=clean_prompt(values.get("negative", "")),
                seed=seed,
                steps=steps,
            )
            params = actions.validate_params(params, policy)
            params = await self.guard.check_request(interaction, params, policy)
        except (InvalidParams, Refusal, sqlite3.OperationalError) as exc:
            await actions.tell_refusal(interaction, exc, "guard check")
            return
        extra = job_extras(job)
        if job.kind == JobKind.VARIATION:
            parent_id, image_index = job.parent_id, job.image_index
        else:
            parent_id, image_index = job.id, None
        await actions.submit(
            interaction,
            kind=job.kind,
            params=params,
            parent_id=parent_id,
            image_index=image_index,
            reply_to=interaction.message,
            policy=policy,
            extra=extra,
        )

    # Re-create with ponybot -------------------------------------------------------------------

    async def recreate(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Read A1111 parameters from the message's PNG, show them, and queue them."""
        actions = self.actions
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            policy = await self.guard.admit(interaction)
            attachment = _first_png(message)
            if attachment is None:
                raise Refusal(NO_PNG)
            _, text = await fetch_image(attachment)
            if not text or not text.strip():
                raise Refusal(NO_PARAMETERS)
            params, hires, notes = self._params_from_text(text, policy)
            params = await self.guard.check_request(interaction, params, policy)
        except (InvalidParams, Refusal, sqlite3.OperationalError) as exc:
            await actions.tell_refusal(interaction, exc, "guard check")
            return
        extra: dict[str, Any] = {}
        if hires is not None:
            try:
                extra, note = hires_extra(
                    params, hires, self.settings.hires_strength, self.settings.max_pixels
                )
            except InvalidParams as exc:
                extra, note = {}, f"Hires fix left out: {exc}"
            if note:
                notes.append(note)
        shown = found_text(attachment.filename, params, extra.get("hires"), notes)
        await actions.submit(
            interaction, kind=JobKind.TXT2IMG, params=params, policy=policy, extra=extra, note=shown
        )

    def _params_from_text(
        self, text: str, policy: Policy
    ) -> tuple[GenerationParams, float | None, list[str]]:
        """GenerationParams (validated) from A1111 text, what could not be kept noted; the hires scale."""
        from generator.metadata import parse_parameters

        s = self.settings
        parsed = parse_parameters(text)
        prompt = clean_prompt(parsed.get("prompt") or "")
        if not prompt.strip():
            raise Refusal(NO_PARAMETERS)
        notes: list[str] = []
        steps = parsed.get("steps") or policy.default_steps
        if steps > policy.max_steps:
            notes.append(f"Steps lowered from {steps} to {policy.max_steps}, this server's limit.")
            steps = policy.max_steps
        guidance = parsed.get("cfg") or s.default_guidance
        if not 1.0 <= guidance <= 30.0:
            guidance = min(max(guidance, 1.0), 30.0)
            notes.append(f"CFG scale kept within 1-30 ({guidance:g}).")
        sampler = parsed.get("sampler") or s.default_sampler
        if sampler not in SAMPLER_NAMES:
            notes.append(f"Sampler {sampler!r} isn't offered here; using {s.default_sampler}.")
            sampler = s.default_sampler
        schedule = parsed.get("schedule") or "automatic"
        if schedule_error(sampler, schedule):
            schedule = "automatic"
        width, height = parsed.get("width"), parsed.get("height")
        if not (width and height and width % 64 == 0 and height % 64 == 0 and width * height <= s.max_pixels):
            shape = nearest_aspect(width, height) if width and height else "square"
            new_w, new_h = aspect_size(shape, s.base_resolution)
            if width and height:
                notes.append(f"Size {width}x{height} isn't offered here; using {new_w}x{new_h}.")
            width, height = new_w, new_h
        seed = parsed.get("seed")
        if seed is None or not 0 <= seed <= MAX_SEED:
            seed = random_seed()
            notes.append("No usable seed; using a random one.")
        clip_skip = parsed.get("clip_skip") or 1
        generator = self.engine.generator
        model_hash = parsed.get("model_hash")
        if (
            model_hash
            and generator is not None
            and str(model_hash).lower() != str(generator.model_hash).lower()
        ):
            notes.append(
                f"Made with another model (hash {escape_for_discord(str(model_hash), 20)}); expect a different picture."
            )
        params = GenerationParams(
            prompt=prompt,
            negative=clean_prompt(parsed.get("negative") or ""),
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            count=1,
            sampler=sampler,
            clip_skip=min(max(int(clip_skip), 1), 12),
            schedule=schedule,
        )
        params = validate_params(s, params, policy)
        hires = None
        raw = (parsed.get("extra") or {}).get("Hires upscale")
        if raw:
            try:
                hires = min(max(float(raw), MIN_HIRES_SCALE), MAX_HIRES_SCALE)
            except ValueError:
                hires = None
        return params, hires, notes
