"""The result post a member sees (delivery and /pony-info build it the same way)."""

from __future__ import annotations

from pathlib import Path

import discord
import numpy as np
import pytest
from job_rows import job_row
from PIL import Image

from bot.discord_ui.result_message import build_result_message
from bot.jobs.models import Job, JobKind, JobStatus


def done_job(kind: JobKind, files: list[str]) -> Job:
    """A finished 64x64 job of ALICE's with its result files, generated in 80 s."""
    return job_row(
        id=31,
        kind=kind,
        params={"prompt": "a *pony*", "width": 64, "height": 64, "count": len(files)},
        status=JobStatus.DONE,
        started_at=1001.0,
        generated_at=1081.0,
        finished_at=1082.0,
        result_files=files,
        seeds=[42 + i for i in range(len(files))],
        gen_seconds=80.0,
    )


def noisy_pngs(folder: Path, count: int, size: int) -> list[Path]:
    """`count` incompressible PNGs of `size` x `size` pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"job31-{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def labels(view: discord.ui.View) -> list[list[tuple[str, str]]]:
    """What Discord receives for the view: per action row, (label, custom_id) of each button."""
    return [[(c["label"], c["custom_id"]) for c in row["components"]] for row in view.to_components()]


def fields(embed: discord.Embed) -> dict[str, str]:
    """Field name -> value, as the member reads them."""
    return {f.name or "": f.value or "" for f in embed.fields}


async def test_images_that_fit_go_as_png_with_every_button(tmp_path: Path) -> None:
    paths = noisy_pngs(tmp_path, 2, 64)
    post = await build_result_message(done_job(JobKind.TXT2IMG, [p.name for p in paths]), paths, 10 * 2**20)
    assert [f.filename for f in post.files] == ["job31-0.png", "job31-1.png"]
    assert post.sizes == [p.stat().st_size for p in paths]
    assert post.embed.title == "Image" and post.embed.description == "a \\*pony\\*"
    assert post.embed.footer.text == "ponybot job #31"
    shown = fields(post.embed)
    assert shown["Seeds"] == "42, 43" and shown["Size"] == "64x64" and shown["Time"] == "1 min 20 s"
    assert "Note" not in shown
    assert labels(post.view) == [
        [("Reroll", "pony:reroll:31"), ("Edit", "pony:edit:31"), ("Delete", "pony:del:31")],
        [("U1", "pony:up:31:1"), ("U2", "pony:up:31:2")],
        [("V1", "pony:var:31:1"), ("V2", "pony:var:31:2")],
    ]


async def test_images_over_the_limit_are_shrunk_and_the_embed_says_so(tmp_path: Path) -> None:
    paths = noisy_pngs(tmp_path, 1, 256)
    post = await build_result_message(done_job(JobKind.TXT2IMG, [paths[0].name]), paths, 20_000)
    assert [f.filename for f in post.files] == ["job31-0.webp"]
    assert post.sizes[0] <= 20_000
    note = fields(post.embed)["Note"]
    assert "WebP" in note or "downscaled" in note


async def test_an_upscale_gets_only_delete(tmp_path: Path) -> None:
    paths = noisy_pngs(tmp_path, 1, 64)
    post = await build_result_message(done_job(JobKind.UPSCALE, [paths[0].name]), paths, 10 * 2**20)
    assert post.embed.title == "Upscale"
    assert labels(post.view) == [[("Delete", "pony:del:31")]]


async def test_an_unreadable_image_raises_oserror(tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"
    with pytest.raises(OSError):
        await build_result_message(done_job(JobKind.TXT2IMG, [missing.name]), [missing], 10 * 2**20)
