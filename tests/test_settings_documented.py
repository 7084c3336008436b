"""Every setting is documented: in .env.example (with a comment) and in the README table."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices

from bot.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def env_names() -> list[str]:
    names = []
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        assert isinstance(alias, AliasChoices)
        names.append(str(alias.choices[0]))
    return names


def test_every_setting_is_in_env_example_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for name in env_names():
        index = next((i for i, line in enumerate(lines) if line.startswith(f"{name}=")), None)
        assert index is not None, f"{name} missing from .env.example"
        above = index - 1
        while above >= 0 and "=" in lines[above] and not lines[above].startswith("#"):
            above -= 1  # settings grouped under one comment
        assert above >= 0 and lines[above].startswith("#"), f"{name} in .env.example has no comment above it"


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in env_names() if f"`{name}`" not in readme]
    assert missing == []


def test_env_example_loads_as_valid_settings(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.model == "AstraliteHeart/pony-diffusion"
    assert settings.discord_token is None
