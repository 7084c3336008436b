"""PONY_DATABASE_URL and PONY_LOCAL_WORKER: the settings of several machines on one queue."""

from __future__ import annotations

import pytest

from bot.config import SettingsError, load_settings


def test_database_url_unset_or_empty_means_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PONY_DATABASE_URL", raising=False)
    assert load_settings().database_url is None
    monkeypatch.setenv("PONY_DATABASE_URL", "  ")
    assert load_settings().database_url is None


@pytest.mark.parametrize("url", ["postgresql://ponybot:pw@db:5432/ponybot", "postgres://db/ponybot"])
def test_postgresql_urls_are_taken(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("PONY_DATABASE_URL", url)
    assert load_settings().database_url == url


def test_other_url_is_one_line_naming_the_setting_without_echoing_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PONY_DATABASE_URL", "mysql://ponybot:hunter2@db/ponybot")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("Invalid setting PONY_DATABASE_URL: must be a PostgreSQL URL")
    assert "hunter2" not in message and "\n" not in message


def test_local_worker_defaults_on_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PONY_LOCAL_WORKER", raising=False)
    assert load_settings().local_worker is True
    monkeypatch.setenv("PONY_LOCAL_WORKER", "false")
    assert load_settings().local_worker is False
