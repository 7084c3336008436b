"""Settings for ponybot, read from the environment and `.env` with pydantic-settings.

Every field here is documented in `.env.example` and the README. Names are `PONY_*` except the
Discord ones, which carry their conventional `DISCORD_*` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from generator.config import GeneratorConfig
from generator.params import ASPECTS, aspect_size
from generator.samplers import SAMPLER_NAMES


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """All runtime settings. Construct with `load_settings()` to get friendly errors."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
    )

    # --- Discord -------------------------------------------------------------------------------
    discord_token: SecretStr | None = Field(None, validation_alias=_env("DISCORD_TOKEN"))
    discord_api_base: str = Field("https://discord.com", validation_alias=_env("DISCORD_API_BASE"))
    discord_gateway_url: str = Field("wss://gateway.discord.gg", validation_alias=_env("DISCORD_GATEWAY_URL"))
    discord_guild_id: int | None = Field(None, validation_alias=_env("DISCORD_GUILD_ID"))
    #: gateway shards in this process: 1 (one connection), "auto" (as many as Discord recommends) or N
    shards: int | Literal["auto"] = Field(1, validation_alias=_env("PONY_SHARDS"))

    # --- Storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), validation_alias=_env("PONY_DATA_DIR"))
    db: Path | None = Field(None, validation_alias=_env("PONY_DB"))
    db_busy_timeout_ms: int = Field(
        10_000, ge=0, le=600_000, validation_alias=_env("PONY_DB_BUSY_TIMEOUT_MS")
    )
    #: PostgreSQL instead of SQLite, for GPU workers on several machines (README, "More than one GPU")
    database_url: str | None = Field(None, validation_alias=_env("PONY_DATABASE_URL"))
    #: whether `ponybot run` runs a GPU worker of its own (`ponybot run --no-worker` says no)
    local_worker: bool = Field(True, validation_alias=_env("PONY_LOCAL_WORKER"))

    # --- Model ---------------------------------------------------------------------------------
    model: str = Field("AstraliteHeart/pony-diffusion", validation_alias=_env("PONY_MODEL"))
    model_revision: str | None = Field("fp16", validation_alias=_env("PONY_MODEL_REVISION"))
    model_variant: str | None = Field(None, validation_alias=_env("PONY_MODEL_VARIANT"))
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", validation_alias=_env("PONY_DEVICE"))
    cpu_threads: int = Field(0, ge=0, le=1024, validation_alias=_env("PONY_CPU_THREADS"))
    upscaler: Path | None = Field(None, validation_alias=_env("PONY_UPSCALER"))
    #: A1111's "Clip skip" for /pony when the member gives none (1 = off, 2 = penultimate CLIP layer)
    clip_skip: int = Field(1, ge=1, le=12, validation_alias=_env("PONY_CLIP_SKIP"))
    #: folder of LoRA .safetensors files that `<lora:name:weight>` tags pick by file name
    lora_dir: Path | None = Field(None, validation_alias=_env("PONY_LORA_DIR"))
    #: folder of textual-inversion embeddings; a file's name used as a word brings its vectors
    embeddings_dir: Path | None = Field(None, validation_alias=_env("PONY_EMBEDDINGS_DIR"))
    compile: bool = Field(True, validation_alias=_env("PONY_COMPILE"))
    compile_mode: Literal["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"] = Field(
        "reduce-overhead", validation_alias=_env("PONY_COMPILE_MODE")
    )
    warmup_sizes: str = Field("auto", validation_alias=_env("PONY_WARMUP_SIZES"))
    fuse_qkv: bool = Field(False, validation_alias=_env("PONY_FUSE_QKV"))
    fp8: bool = Field(False, validation_alias=_env("PONY_FP8"))
    fast_lora: Path | None = Field(None, validation_alias=_env("PONY_FAST_LORA"))
    fast_sampler: Literal["LCM", "TCD"] = Field("LCM", validation_alias=_env("PONY_FAST_SAMPLER"))
    fast_steps: int = Field(4, ge=1, le=50, validation_alias=_env("PONY_FAST_STEPS"))
    fast_guidance: float = Field(1.0, ge=1.0, le=30.0, validation_alias=_env("PONY_FAST_GUIDANCE"))

    # --- Generation defaults and limits --------------------------------------------------------
    default_sampler: str = Field("DDIM", validation_alias=_env("PONY_DEFAULT_SAMPLER"))
    default_steps: int = Field(25, ge=1, le=150, validation_alias=_env("PONY_DEFAULT_STEPS"))
    max_steps: int = Field(50, ge=1, le=150, validation_alias=_env("PONY_MAX_STEPS"))
    default_guidance: float = Field(7.0, ge=1.0, le=30.0, validation_alias=_env("PONY_DEFAULT_GUIDANCE"))
    default_count: int = Field(4, ge=1, le=4, validation_alias=_env("PONY_DEFAULT_COUNT"))
    base_resolution: int = Field(
        512, ge=64, le=2048, multiple_of=64, validation_alias=_env("PONY_BASE_RESOLUTION")
    )
    max_pixels: int = Field(768 * 768, ge=64 * 64, validation_alias=_env("PONY_MAX_PIXELS"))
    variation_strength: float = Field(0.6, gt=0.0, le=1.0, validation_alias=_env("PONY_VARIATION_STRENGTH"))
    hires_strength: float = Field(0.35, gt=0.0, le=1.0, validation_alias=_env("PONY_HIRES_STRENGTH"))
    default_negative: str = Field(
        "nsfw, nude, lowres, bad anatomy, worst quality, low quality",
        validation_alias=_env("PONY_DEFAULT_NEGATIVE"),
    )
    nsfw_default_negative: str = Field(
        "lowres, bad anatomy, worst quality, low quality",
        validation_alias=_env("PONY_NSFW_DEFAULT_NEGATIVE"),
    )
    blocked_terms: str = Field("", validation_alias=_env("PONY_BLOCKED_TERMS"))
    nsfw_classifier: Path | None = Field(None, validation_alias=_env("PONY_NSFW_CLASSIFIER"))
    nsfw_labels: str = Field("nsfw,porn,hentai,sexy", validation_alias=_env("PONY_NSFW_LABELS"))
    nsfw_threshold: float = Field(0.5, ge=0.0, le=1.0, validation_alias=_env("PONY_NSFW_THRESHOLD"))

    # --- Queue ---------------------------------------------------------------------------------
    max_open_jobs_per_user: int = Field(3, ge=1, validation_alias=_env("PONY_MAX_OPEN_JOBS_PER_USER"))
    max_queue: int = Field(100, ge=1, validation_alias=_env("PONY_MAX_QUEUE"))
    cooldown_s: float = Field(3.0, ge=0, validation_alias=_env("PONY_COOLDOWN_S"))
    max_attempts: int = Field(3, ge=1, validation_alias=_env("PONY_MAX_ATTEMPTS"))
    lease_s: float = Field(120.0, gt=0, validation_alias=_env("PONY_LEASE_S"))
    retry_backoff_s: float = Field(5.0, ge=0, validation_alias=_env("PONY_RETRY_BACKOFF_S"))
    job_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("PONY_JOB_TIMEOUT_S"))
    shutdown_grace_s: float = Field(30.0, ge=0, validation_alias=_env("PONY_SHUTDOWN_GRACE_S"))
    batch_size: int = Field(4, ge=1, le=16, validation_alias=_env("PONY_BATCH_SIZE"))

    # --- Operations ----------------------------------------------------------------------------
    metrics_port: int | None = Field(None, ge=1, le=65535, validation_alias=_env("PONY_METRICS_PORT"))
    metrics_host: str = Field("127.0.0.1", validation_alias=_env("PONY_METRICS_HOST"))
    log_json: bool = Field(False, validation_alias=_env("PONY_LOG_JSON"))
    log_level: str = Field("INFO", validation_alias=_env("PONY_LOG_LEVEL"))
    retention_days: float = Field(30.0, gt=0, validation_alias=_env("PONY_RETENTION_DAYS"))
    retention_max_gb: float = Field(20.0, gt=0, validation_alias=_env("PONY_RETENTION_MAX_GB"))
    retention_every_min: float = Field(60.0, gt=0, validation_alias=_env("PONY_RETENTION_EVERY_MIN"))
    health_stuck_s: float = Field(300.0, gt=0, validation_alias=_env("PONY_HEALTH_STUCK_S"))

    @field_validator("default_sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler; choose one of: {', '.join(SAMPLER_NAMES)}")
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "all", "none"):
            return value
        for item in value.split(","):
            w, _, h = item.strip().partition("x")
            if not (w.isdigit() and h.isdigit() and int(w) >= 64 and int(h) >= 64):
                raise ValueError("use auto, all, none, or sizes like 512x512,512x768")
            if int(w) % 64 or int(h) % 64:
                raise ValueError(f"{item.strip()}: width and height must be multiples of 64")
        return value

    @field_validator("shards", mode="before")
    @classmethod
    def _shards(cls, value: object) -> int | str:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit() or int(text) < 1:
            raise ValueError("use auto (the count Discord recommends) or a whole number of shards, 1 or more")
        return int(text)

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: object) -> str | None:
        text = str(value).strip() if value is not None else ""
        if not text:
            return None
        if not text.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a PostgreSQL URL such as postgresql://ponybot:PASSWORD@db-host/ponybot")
        return text

    @field_validator("discord_api_base", "discord_gateway_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a URL such as https://discord.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _steps_in_range(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError("PONY_DEFAULT_STEPS must not exceed PONY_MAX_STEPS")
        if self.fast_steps > self.max_steps:
            raise ValueError("PONY_FAST_STEPS must not exceed PONY_MAX_STEPS")
        too_big = [f"{w}x{h}" for w, h in self.warmup_size_list if w * h > self.max_pixels]
        if self.warmup_sizes not in ("auto", "all") and too_big:
            raise ValueError(f"PONY_WARMUP_SIZES {too_big[0]} is larger than PONY_MAX_PIXELS")
        return self

    @property
    def warmup_size_list(self) -> tuple[tuple[int, int], ...]:
        """The sizes compiled and warmed at start-up (CUDA): `auto` = the square aspect at
        `PONY_BASE_RESOLUTION` (the common case; about 1 min per batch size to warm); `all` = every
        aspect choice that fits `PONY_MAX_PIXELS`; `none` = no compiled path."""
        if self.warmup_sizes == "none":
            return ()
        if self.warmup_sizes == "auto":
            return (aspect_size("square", self.base_resolution),)
        if self.warmup_sizes == "all":
            sizes = [aspect_size(a, self.base_resolution) for a in ASPECTS]
            return tuple(dict.fromkeys((w, h) for w, h in sizes if w * h <= self.max_pixels))
        pairs = (item.strip().partition("x") for item in self.warmup_sizes.split(","))
        return tuple(dict.fromkeys((int(w), int(h)) for w, _, h in pairs))

    @property
    def db_path(self) -> Path:
        """The SQLite file: `PONY_DB`, or `jobs.sqlite3` inside the data folder."""
        return self.db if self.db is not None else self.data_dir / "jobs.sqlite3"

    @property
    def images_dir(self) -> Path:
        """Where generated PNGs are written."""
        return self.data_dir / "images"

    @property
    def nsfw_label_list(self) -> list[str]:
        """`PONY_NSFW_LABELS` split on commas, blanks dropped."""
        return [t.strip() for t in self.nsfw_labels.split(",") if t.strip()]

    @property
    def blocked_term_list(self) -> list[str]:
        """`PONY_BLOCKED_TERMS` split on commas, blanks dropped."""
        return [t.strip() for t in self.blocked_terms.split(",") if t.strip()]

    def generator_config(self) -> GeneratorConfig:
        """The subset the Discord-free generator needs."""
        return GeneratorConfig(
            model=self.model,
            revision=self.model_revision,
            variant=self.model_variant,
            device=self.device,
            upscaler=self.upscaler,
            lora_dir=self.lora_dir,
            embeddings_dir=self.embeddings_dir,
            compile=self.compile,
            max_pixels=self.max_pixels,
            max_steps=self.max_steps,
            variation_strength=self.variation_strength,
            hires_strength=self.hires_strength,
            cpu_threads=self.cpu_threads,
            compile_mode=self.compile_mode,
            warmup_sizes=self.warmup_size_list,
            batch_size=self.batch_size,
            fuse_qkv=self.fuse_qkv,
            fp8=self.fp8,
            compile_cache_dir=self.data_dir / "compile-cache",
            fast_lora=self.fast_lora,
            fast_sampler=self.fast_sampler,
            fast_steps=self.fast_steps,
            fast_guidance=self.fast_guidance,
        )


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line naming it."""


#: settings whose bad value is never echoed in the error (they hold a token or a password)
_SECRET_SETTINGS = frozenset({"DISCORD_TOKEN", "PONY_DATABASE_URL"})


def _env_name(loc: tuple) -> str:
    field = str(loc[0]) if loc else ""
    info = Settings.model_fields.get(field)
    alias = getattr(info, "validation_alias", None) if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field.upper() or "settings"


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise `SettingsError` with one line naming the first bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if not loc:
            raise SettingsError(f"Invalid settings: {msg}") from None
        name = _env_name(loc)
        given = err.get("input")
        shown = "" if name in _SECRET_SETTINGS or isinstance(given, dict) else f" (got {given!r})"
        raise SettingsError(f"Invalid setting {name}: {msg}{shown}") from None
