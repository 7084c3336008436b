"""The "about" text: model, licence, its use restrictions in short, credits, bot version.

Serving the model to a Discord server is Distribution under CreativeML Open RAIL-M, so users must
be told the use-based restrictions apply; see LICENSE-MODEL.md for the full list.
"""

from __future__ import annotations

from importlib import metadata

LICENCE_NAME = "CreativeML Open RAIL-M"
LICENCE_URL = "https://huggingface.co/spaces/CompVis/stable-diffusion-license"
EMBED_LIMIT = 4096

#: Attachment A of CreativeML Open RAIL-M, shortened (LICENSE-MODEL.md has the full wording).
USE_RESTRICTIONS: tuple[str, ...] = (
    "break any applicable law or regulation",
    "exploit or harm minors in any way, or try to",
    "generate or spread verifiably false information to harm others",
    "generate or spread personal identifiable information that can be used to harm someone",
    "defame, disparage or harass others",
    "make fully automated decisions that adversely affect someone's legal rights or create or"
    " change binding obligations",
    "discriminate against or harm people based on social behaviour or personal or personality"
    " characteristics",
    "exploit the vulnerabilities of a group (age, social, physical or mental characteristics)"
    " to distort someone's behaviour in a harmful way",
    "discriminate against people based on legally protected characteristics",
    "give medical advice or interpret medical results",
    "produce information for justice, law-enforcement, immigration or asylum processes"
    " (e.g. predicting that someone will commit a crime)",
)

PONY_DIFFUSION_CREDITS = (
    "pony-diffusion was fine-tuned by **AstraliteHeart** from an early waifu-diffusion checkpoint"
    " built on **Stable Diffusion v1-4** (CompVis, with Stability AI and Runway), on pony images"
    " tagged on derpibooru. Thanks to Waifu-Diffusion for fine-tuning help and NovelAI for compute."
)


def bot_version() -> str:
    """ponybot's installed version, or `unknown` when it runs from a source tree."""
    try:
        return metadata.version("ponybot")
    except metadata.PackageNotFoundError:
        return "unknown"


def _model_label(model: str) -> str:
    """Hub ids as given; local files or folders by their last part (no server paths in Discord)."""
    text = model.strip()
    local = text.startswith(("/", ".", "~")) or "\\" in text or text.endswith((".safetensors", ".ckpt"))
    if local:
        text = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "local model"
    return text.replace("`", "'")[:100]


def about_text(model: str, version: str | None = None) -> str:
    """Markdown for an embed description (at most 4096 characters); `version` defaults to ours."""
    version = (version or bot_version())[:50]
    label = _model_label(model)
    if "pony-diffusion" in model.lower():
        credits = PONY_DIFFUSION_CREDITS
    else:
        credits = "See the model's own card for its authors and training data."
    restrictions = "\n".join(f"- {item}" for item in USE_RESTRICTIONS)
    text = (
        f"**ponybot** {version}: a self-hosted image bot.\n"
        f"**Model:** `{label}` (a Stable Diffusion v1.x model)\n"
        f"**Licence:** [{LICENCE_NAME}]({LICENCE_URL})\n\n"
        f"**Credits**\n{credits}\n\n"
        "**By using this bot you agree not to use it or its images to:**\n"
        f"{restrictions}\n\n"
        "You are responsible for the images you make and how you use them. "
        f"Full terms: {LICENCE_URL}"
    )
    if len(text) > EMBED_LIMIT:  # safety net; the text is about 1.6k characters
        text = text[: EMBED_LIMIT - 1] + "…"
    return text
