"""Members' own images (issue #14): `/pony image:`, the Edit button, "Re-create with ponybot" and
the hires fix, through the loopback Discord, as the member sees them."""

from __future__ import annotations

import io

from conftest import is_result
from fake_discord import FakeDiscord, FakeMessage
from PIL import Image
from PIL.PngImagePlugin import PngInfo

RECREATE = "Re-create with ponybot"
A1111_TEXT = (
    "a pony in a flower field\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 0123abcd"
)


def picture(size: tuple[int, int], fmt: str = "PNG", parameters: str | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 120, 40))
    image.paste((30, 90, 200), (0, 0, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buf, fmt, pnginfo=info)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def opened(message: FakeMessage, n: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(message.attachments[n].data))


async def result_after(fake: FakeDiscord, before: set[int]) -> FakeMessage:
    return await fake.wait_for_message(lambda m: is_result(m) and m.id not in before, timeout=90)


async def answer(interaction) -> str:
    message = await interaction.wait_followup()
    assert message.ephemeral
    return message.content


async def no_jobs(bot) -> bool:
    return sum((await bot.queue.counts()).values()) == 0


def button_id(message: FakeMessage, label: str) -> str:
    return next(cid for lab, cid in message.buttons() if lab == label)


# --- 1. /pony image: --------------------------------------------------------------------------


async def test_own_image_png_jpeg_webp_runs_img2img_at_the_nearest_size(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT="1")
    cases = [
        (("wide.png", picture((300, 200))), None, (128, 64), 0.6),  # 3:2 -> landscape (768x512 at base 64)
        (("tall.jpg", picture((200, 300), "JPEG")), 0.5, (64, 128), 0.5),  # 2:3 -> portrait
        (("sq.webp", picture((120, 110), "WEBP")), 0.05, (64, 64), 0.05),  # ~1:1 -> square
    ]
    for number, (upload, strength, size, shown) in enumerate(cases, start=1):
        before = set(fake.messages)
        options = {"prompt": "a pony, oil painting", "image": upload}
        if strength is not None:
            options["strength"] = strength
        text = await answer(await fake.slash("pony", options))
        assert text.startswith(f"Queued as job #{number}"), text
        result = await result_after(fake, before)
        assert result.embeds[0]["title"] == "Variations"
        assert opened(result).size == size
        parameters = opened(result).info["parameters"]
        assert parameters.startswith("a pony, oil painting")
        assert f"Denoising strength: {shown:g}" in parameters and f"Size: {size[0]}x{size[1]}" in parameters
        fields = {f["name"]: f["value"] for f in result.embeds[0]["fields"]}
        assert fields["Source"] == f"uploaded image, strength {shown:g}"
        job = await bot.queue.get(number)
        assert job.kind == "variation" and job.parent_id is None
        assert (bot.settings.images_dir / job.params["source"]).is_file()  # kept: survives restarts

    # Reroll of an upload job draws from the same upload again
    before = set(fake.messages)
    click = await fake.click(result.id, button_id(result, "Reroll"))
    assert (await answer(click)).startswith("Queued as job #4")
    reroll = await result_after(fake, before)
    job = await bot.queue.get(4)
    assert job.kind == "variation" and job.params["source"] == (await bot.queue.get(3)).params["source"]
    assert opened(reroll).size == (64, 64)


async def test_bad_uploads_are_refused_before_anything_is_queued(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()

    text = await answer(
        await fake.slash("pony", {"prompt": "x", "image": ("notes.txt", b"hello", "text/plain")})
    )
    assert text == "That file isn't a PNG, JPEG or WebP image."

    # declared as a PNG, but not one
    text = await answer(
        await fake.slash("pony", {"prompt": "x", "image": ("fake.png", b"not really", "image/png")})
    )
    assert text == "That file isn't a PNG, JPEG or WebP image."

    # too many bytes, by the declared size (refused before the download)
    big = picture((64, 64)) + b"\0" * (21 * 1024 * 1024)
    downloads = len(fake.requests_matching("GET", r"^/attachments/"))
    text = await answer(await fake.slash("pony", {"prompt": "x", "image": ("big.png", big)}))
    assert text.startswith("That image is too large")
    assert len(fake.requests_matching("GET", r"^/attachments/")) == downloads

    # a decompression bomb: 30 megapixels in a few kB; declared dimensions refuse it first ...
    bomb_buf = io.BytesIO()
    Image.new("1", (6000, 5000)).save(bomb_buf, "PNG")
    bomb = bomb_buf.getvalue()
    assert len(bomb) < 100_000
    text = await answer(await fake.slash("pony", {"prompt": "x", "image": ("bomb.png", bomb)}))
    assert text.startswith("That image is too large")
    # ... and without declared dimensions, Pillow's header check refuses it before decoding
    text = await answer(await fake.slash("pony", {"prompt": "x", "image": ("bomb.png", bomb, "")}))
    assert text.startswith("That image is too large")

    # a URL that errors
    class Gone(dict):
        def __setitem__(self, key, value) -> None:
            pass

    saved, fake._cdn = fake._cdn, Gone()
    try:
        text = await answer(await fake.slash("pony", {"prompt": "x", "image": ("ok.png", picture((64, 64)))}))
    finally:
        fake._cdn = saved
    assert text == "I couldn't download that image (HTTP 404)."

    # strength without an image; image together with hires
    text = await answer(await fake.slash("pony", {"prompt": "x", "strength": 0.5}))
    assert text.startswith("`strength` goes with `image`")
    text = await answer(await fake.slash("pony", {"prompt": "x", "image": picture((64, 64)), "hires": True}))
    assert text.startswith("The hires fix works on new pictures only")

    assert await no_jobs(bot)
    assert not list((bot.settings.images_dir / "uploads").glob("*.png"))  # nothing left behind


async def test_a_flagged_upload_is_not_drawn_from(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT="1")
    screened: list[int] = []

    async def flag_everything(job, result) -> None:
        screened.append(job.id)
        for item in result.images:
            item.image = Image.new("RGB", item.image.size, (128, 128, 128))

    bot.worker.screen = flag_everything
    text = await answer(await fake.slash("pony", {"prompt": "x", "image": picture((64, 64))}))
    assert text.startswith("Queued as job #1")
    failed = await fake.wait_for_message(
        lambda m: bool(m.embeds) and m.embeds[0]["title"] == "Failed", timeout=60
    )
    reason = {f["name"]: f["value"] for f in failed.embeds[0]["fields"]}["Reason"]
    assert reason == "The image filter hid your uploaded image, so nothing was drawn from it."
    assert screened == [1] and not failed.attachments


# --- 2. Edit ------------------------------------------------------------------------------------


async def make_result(fake: FakeDiscord, **options) -> FakeMessage:
    before = set(fake.messages)
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 7, **options})
    await interaction.wait_followup()
    return await result_after(fake, before)


async def test_edit_opens_a_prefilled_form_and_queues_the_changed_job(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    original = await make_result(fake, negative="ugly")
    labels = [label for label, _ in original.buttons()]
    assert labels == ["Reroll", "Edit", "Delete", "U1", "U2", "V1", "V2"]
    assert all(len(cid) <= 100 for _, cid in original.buttons())

    press = await fake.click(original.id, button_id(original, "Edit"), user=fake.bob)
    await press.wait_response()
    assert press.response_type == 9  # the modal itself, no defer first
    inputs = {
        c["custom_id"]: c
        for row in press.modal["components"]
        for c in (row.get("components") or [row.get("component")])
        if c and c.get("type") == 4
    }
    assert press.modal["title"] == "Edit job #1"
    assert {k: v.get("value") for k, v in inputs.items()} == {
        "prompt": "a pony",
        "negative": "ugly",
        "seed": "7",
        "steps": "3",
    }

    # invalid values are refused like /pony, nothing queued
    for values, refusal in [
        ({"prompt": "a pony", "steps": "lots"}, "Steps must be a whole number between 1 and"),
        ({"prompt": "a pony", "steps": "999"}, "Steps must be between 1 and"),
        ({"prompt": "a pony", "steps": "3", "seed": "-4"}, "Seed must be between 0 and"),
    ]:
        sent = await fake.submit_modal(press, values, user=fake.bob)
        assert (await answer(sent)).startswith(refusal)
    assert await bot.queue.get(2) is None

    before = set(fake.messages)
    sent = await fake.submit_modal(
        press, {"prompt": "a pony on the moon", "negative": "", "seed": "42", "steps": "2"}, user=fake.bob
    )
    assert (await answer(sent)).startswith("Queued as job #2")
    edited = await result_after(fake, before)
    assert edited.reference_id == original.id
    parameters = opened(edited).info["parameters"]
    prompt, negative, settings = parameters.split("\n")
    assert prompt == "a pony on the moon" and settings.startswith("Steps: 2,") and "Seed: 42," in settings
    assert negative == f"Negative prompt: {bot.settings.default_negative}"  # the channel's default, as /pony
    job = await bot.queue.get(2)
    assert job.user_id == fake.bob.id and job.parent_id == 1 and job.kind == "txt2img"


async def test_edit_of_an_upload_redraws_the_same_upload(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT="1")
    before = set(fake.messages)
    await answer(
        await fake.slash("pony", {"prompt": "a pony", "image": picture((300, 200)), "strength": 0.4})
    )
    first = await result_after(fake, before)
    press = await fake.click(first.id, button_id(first, "Edit"))
    await press.wait_response()
    before = set(fake.messages)
    sent = await fake.submit_modal(press, {"prompt": "a zebra", "seed": "5", "steps": "3"})
    assert (await answer(sent)).startswith("Queued as job #2")
    edited = await result_after(fake, before)
    assert opened(edited).size == (128, 64)
    assert "Denoising strength: 0.4" in opened(edited).info["parameters"]
    job = await bot.queue.get(2)
    assert job.kind == "variation" and job.params["source"] == (await bot.queue.get(1)).params["source"]


# --- 3. Re-create with ponybot ------------------------------------------------------------------


async def test_recreate_our_own_result_gives_the_same_picture(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    await start_bot()
    assert [c["type"] for c in fake.commands if c["name"] == RECREATE] == [3]  # a message command
    original = await make_result(fake)
    before = set(fake.messages)
    used = await fake.context_menu(RECREATE, original.id, user=fake.bob)
    text = await answer(used)
    assert text.startswith("Found in `ponybot-1-1.png`:\n**Prompt:** a pony\n")
    assert "Steps 3, Sampler DDIM, CFG 7, Seed 7, Size 64x64" in text
    assert text.splitlines()[-1].startswith("Queued as job #2")
    again = await result_after(fake, before)
    assert len(again.attachments) == 1
    assert opened(again).tobytes() == opened(original, 0).tobytes()  # same seed, same pixels (CPU)


async def test_recreate_reads_a1111_text_and_says_what_it_changed(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MAX_PIXELS=str(128 * 128), PONY_MAX_STEPS="5")
    posted = await fake.user_message(
        "look what I made",
        user=fake.bob,
        files=[("00012-123.png", picture((512, 512), parameters=A1111_TEXT))],
    )
    before = set(fake.messages)
    text = await answer(await fake.context_menu(RECREATE, posted.id))
    assert "**Prompt:** a pony in a flower field" in text and "**Negative:** blurry" in text
    assert "Steps 5, Sampler Euler a, CFG 7, Seed 123, Size 64x64" in text
    assert "Steps lowered from 20 to 5" in text and "Size 512x512 isn't offered here; using 64x64." in text
    assert "Made with another model (hash 0123abcd)" in text
    assert "Queued as job #1" in text
    result = await result_after(fake, before)
    parameters = opened(result).info["parameters"]
    assert parameters.startswith("a pony in a flower field\nNegative prompt: blurry")
    assert "Sampler: Euler a," in parameters and "Seed: 123," in parameters
    assert (await bot.queue.get(1)).user_id == fake.alice.id

    # a message without a PNG, and a PNG without parameters: clear answers, nothing queued
    plain = await fake.user_message("just words")
    assert (
        await answer(await fake.context_menu(RECREATE, plain.id))
        == "That message has no PNG image to re-create."
    )
    bare = await fake.user_message("no metadata", files=[("photo.png", picture((64, 64)))])
    text = await answer(await fake.context_menu(RECREATE, bare.id))
    assert text.startswith("That PNG carries no generation parameters")
    assert await bot.queue.get(2) is None


# --- 4. hires fix -------------------------------------------------------------------------------


async def test_hires_fix_draws_larger_and_records_it(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    before = set(fake.messages)
    text = await answer(await fake.slash("pony", {"prompt": "a pony", "seed": 3, "hires": True}))
    assert text.startswith("Queued as job #1")
    result = await result_after(fake, before)
    assert [opened(result, n).size for n in range(2)] == [(128, 128), (128, 128)]
    parameters = opened(result).info["parameters"]
    assert "Size: 64x64," in parameters and "Seed: 3," in parameters
    assert "Denoising strength: 0.35, Hires upscale: 2, Hires steps: 3, Hires upscaler: Lanczos" in parameters
    fields = {f["name"]: f["value"] for f in result.embeds[0]["fields"]}
    assert fields["Hires fix"] == "2x, strength 0.35" and fields["Size"] == "128x128"
    assert (await bot.queue.get(1)).params["hires"] == {"scale": 2.0, "strength": 0.35}


async def test_hires_fix_respects_the_pixel_limit(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MAX_PIXELS=str(96 * 96), PONY_DEFAULT_COUNT="1")
    before = set(fake.messages)
    text = await answer(await fake.slash("pony", {"prompt": "a pony", "hires_scale": 2.0}))
    assert text.startswith(
        "Hires scale lowered to 1.5x (96x96) to stay under the pixel limit.\nQueued as job #1"
    )
    result = await result_after(fake, before)
    assert opened(result).size == (96, 96)
    assert "Hires upscale: 1.5," in opened(result).info["parameters"]

    text = await answer(await fake.slash("pony", {"prompt": "a pony", "aspect": "wide", "hires": True}))
    assert text.startswith("128x64 is already at the pixel limit")
    assert await bot.queue.get(2) is None


async def test_retention_deletes_old_uploads_and_a_rerun_then_says_so(
    discord_server: FakeDiscord, start_bot
) -> None:
    import os
    import time

    from bot.jobs.db import connect
    from bot.jobs.retention import prune

    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT="1")
    before = set(fake.messages)
    await answer(await fake.slash("pony", {"prompt": "a pony", "image": picture((64, 64))}))
    result = await result_after(fake, before)
    source = bot.settings.images_dir / (await bot.queue.get(1)).params["source"]
    later = time.time() + 3 * 86400
    conn = await connect(bot.settings.db_path)
    try:
        await prune(conn, bot.settings.images_dir, max_age_s=86400, max_bytes=10**12, now=time.time())
        assert source.is_file()  # a recent job still names it
        os.utime(source, (later - 7200, later - 7200))
        await prune(conn, bot.settings.images_dir, max_age_s=86400, max_bytes=10**12, now=later)
    finally:
        await conn.close()
    assert not source.exists()
    click = await fake.click(result.id, button_id(result, "Reroll"))
    assert (await answer(click)).startswith("Queued as job #2")
    failed = await fake.wait_for_message(
        lambda m: bool(m.embeds) and m.embeds[0]["title"] == "Failed", timeout=60
    )
    reason = {f["name"]: f["value"] for f in failed.embeds[0]["fields"]}["Reason"]
    assert reason == "The uploaded image is no longer kept; upload it again."


async def test_hires_jobs_are_never_batched(tmp_path) -> None:
    from bot.jobs.models import QueueLimits
    from bot.jobs.queue import JobQueue
    from generator.params import GenerationParams

    queue = await JobQueue.open(tmp_path / "q.db", QueueLimits(max_open_per_user=10))
    try:
        plain = GenerationParams(prompt="a pony").to_dict()
        for n, extra in enumerate([{}, {"hires": {"scale": 2.0, "strength": 0.35}}, {}]):
            await queue.enqueue(kind="txt2img", params={**plain, **extra}, channel_id=1, user_id=n + 1)
        batches = [[j.id for j in await queue.claim_batch("w", 4)] for _ in range(2)]
        assert batches == [[1, 3], [2]]
    finally:
        await queue.close()
