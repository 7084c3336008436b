"""The embeds a member sees on a job's message: queued, generating, result, failed, retrying."""

from __future__ import annotations

from typing import Any

import discord
from job_rows import ALICE, job_row

from bot.discord_ui import messages
from bot.jobs.models import Job, JobKind, JobStatus


def make_job(
    *,
    job_id: int = 7,
    kind: JobKind = JobKind.TXT2IMG,
    status: JobStatus = JobStatus.QUEUED,
    params: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    gen_seconds: float | None = None,
    error: str | None = None,
) -> Job:
    """A job row as the queue returns it (only what the embeds read is interesting)."""
    return job_row(
        id=job_id,
        kind=kind,
        status=status,
        params=params,
        seeds=seeds or [],
        gen_seconds=gen_seconds,
        error=error,
    )


def fields(embed: discord.Embed) -> dict[str, str]:
    """Field name -> value, as the member reads them."""
    return {f.name or "": f.value or "" for f in embed.fields}


def test_queued_embed_names_the_kind_position_eta_and_requester() -> None:
    embed = messages.queued_embed(make_job(), position=3, eta_s=80)
    assert embed.title == "Image queued"
    assert embed.description == "a pony"
    assert embed.footer.text == "ponybot job #7"
    assert fields(embed) == {"Queue": "#3 in the queue, about 1 min 20 s", "Requested by": f"<@{ALICE}>"}
    assert embed.colour == messages.COLOR_WAITING


def test_queued_embed_without_a_position_says_waiting_and_unknown_eta() -> None:
    embed = messages.queued_embed(make_job(kind=JobKind.UPSCALE), position=None, eta_s=None)
    assert embed.title == "Upscale queued"
    assert fields(embed)["Queue"] == "waiting, about unknown"


def test_prompt_echo_escapes_markdown_and_mentions_and_is_capped() -> None:
    embed = messages.queued_embed(make_job(params={"prompt": "**bold** @everyone _x_"}), 1, 5)
    assert embed.description == "\\*\\*bold\\*\\* @\u200beveryone \\_x\\_"
    long = messages.queued_embed(make_job(params={"prompt": "p" * 5000}), 1, 5)
    assert long.description is not None
    assert len(long.description) == messages.PROMPT_ECHO_LIMIT and long.description.endswith("…")


def test_progress_embed_shows_a_bar_and_step_counts() -> None:
    embed = messages.progress_embed(make_job(kind=JobKind.VARIATION), 5, 10)
    assert embed.title == "Variations: generating"
    assert fields(embed)["Progress"] == f"`{'█' * 10}{'░' * 10}` step 5 of 10"
    assert embed.image.url is None
    with_preview = messages.progress_embed(make_job(), 0, 0, has_preview=True)
    assert fields(with_preview)["Progress"] == f"`{'░' * 20}` step 0 of 0"
    assert with_preview.image.url == "attachment://preview.jpg"
    assert with_preview.footer.text == "ponybot job #7"


def test_result_embed_lists_the_generation_parameters() -> None:
    job = make_job(
        job_id=12,
        status=JobStatus.DONE,
        params={
            "negative": "blurry <@123456789012345678>",
            "sampler": "Euler",
            "schedule": "karras",
            "guidance": 6.5,
        },
        seeds=[42, 43],
        gen_seconds=61.4,
    )
    embed = messages.result_embed(job)
    assert embed.title == "Image"
    assert embed.footer.text == "ponybot job #12"
    assert embed.colour == messages.COLOR_DONE
    assert fields(embed) == {
        "Negative": "blurry <@\u200b123456789012345678>",
        "Seeds": "42, 43",
        "Steps": "20",
        "Sampler": "Euler (Karras)",
        "Guidance": "6.5",
        "Size": "512x768",
        "Time": "1 min 1 s",
        "Requested by": f"<@{ALICE}>",
    }


def test_result_embed_single_seed_falls_back_to_the_requested_one_and_measured_size() -> None:
    embed = messages.result_embed(make_job(status=JobStatus.DONE), image_size=(1024, 1536))
    got = fields(embed)
    assert got["Seed"] == "42" and "Seeds" not in got
    assert got["Sampler"] == "DDIM"
    assert got["Size"] == "1024x1536"
    assert got["Time"] == "-"
    assert "Negative" not in got and "Hires fix" not in got and "LoRA" not in got


def test_result_embed_notes_hires_clip_skip_source_loras_and_ignored_syntax() -> None:
    job = make_job(
        status=JobStatus.DONE,
        params={
            "prompt": "a <lora:cute_style:0.8> pony AND a cat",
            "clip_skip": 2,
            "hires": {"scale": 1.5, "strength": 0.45},
            "source": "uploads/7.png",
            "strength": 0.6,
        },
        seeds=[5],
    )
    got = fields(messages.result_embed(job))
    assert got["Hires fix"] == "1.5x, strength 0.45"
    assert got["Clip skip"] == "2"
    assert got["Source"] == "uploaded image, strength 0.6"
    assert got["LoRA"] == "cute\\_style 0.8"
    assert got["Note"] == "ignored: AND"


def test_result_embed_of_an_old_row_with_an_invalid_prompt_still_renders() -> None:
    embed = messages.result_embed(make_job(status=JobStatus.DONE, params={"prompt": "<lora:bad:x>"}))
    got = fields(embed)
    assert "LoRA" not in got and "Note" not in got
    assert got["Size"] == "512x768"


def test_upscale_result_is_titled_upscale() -> None:
    assert messages.result_embed(make_job(kind=JobKind.UPSCALE, status=JobStatus.DONE)).title == "Upscale"


def test_failure_embed_shows_the_reason_escaped() -> None:
    job = make_job(status=JobStatus.FAILED, error="Out of memory for **this** size")
    embed = messages.failure_embed(job)
    assert embed.title == "Failed"
    assert embed.colour == messages.COLOR_FAILED
    assert embed.footer.text == "ponybot job #7"
    assert fields(embed) == {
        "Reason": "Out of memory for \\*\\*this\\*\\* size",
        "Requested by": f"<@{ALICE}>",
    }


def test_failure_embed_of_dead_job_without_error_says_unknown() -> None:
    embed = messages.failure_embed(make_job(status=JobStatus.DEAD))
    assert embed.title == "Failed"
    assert fields(embed)["Reason"] == "Unknown error."


def test_cancelled_embed() -> None:
    embed = messages.failure_embed(make_job(status=JobStatus.CANCELLED, error="Cancelled."))
    assert embed.title == "Cancelled"
    assert embed.colour == messages.COLOR_CANCELLED
    assert fields(embed)["Reason"] == "Cancelled."
    assert fields(messages.failure_embed(make_job(status=JobStatus.CANCELLED)))["Reason"] == "Cancelled."


def test_requeued_embed_says_why() -> None:
    embed = messages.requeued_embed(make_job(error="GPU busy_now"))
    assert embed.title == "Retrying soon"
    assert fields(embed) == {"Why": "GPU busy\\_now", "Requested by": f"<@{ALICE}>"}
    assert fields(messages.requeued_embed(make_job()))["Why"] == "A temporary problem."
    assert embed.footer.text == messages.footer_text(7) == "ponybot job #7"
