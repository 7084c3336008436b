"""bot/ops/doctor.py pieces that need no subprocess: the permission algorithm, the metrics port check."""

from __future__ import annotations

import io
import socket

from bot.config import load_settings
from bot.ops.doctor import Report, channel_permissions, check_metrics
from bot.ops.metrics import Health, Metrics, MetricsServer
from bot.policy.permissions import missing_permissions

GUILD = 100
BOT = 7
ROLE = 200
VIEW, SEND, EMBED, ATTACH, HISTORY = 1 << 10, 1 << 11, 1 << 14, 1 << 15, 1 << 16
NEEDED = VIEW | SEND | EMBED | ATTACH | HISTORY


def guild(everyone: int, role: int = 0, owner: int = 1) -> dict:
    return {
        "id": str(GUILD),
        "owner_id": str(owner),
        "roles": [
            {"id": str(GUILD), "permissions": str(everyone)},
            {"id": str(ROLE), "permissions": str(role)},
        ],
    }


def channel(*overwrites: tuple[int, int, int, int]) -> dict:
    """Overwrites as (id, type, allow, deny); type 0 = role, 1 = member."""
    return {
        "id": "300",
        "permission_overwrites": [
            {"id": str(i), "type": t, "allow": str(a), "deny": str(d)} for i, t, a, d in overwrites
        ],
    }


def missing(g: dict, roles: list[int], ch: dict) -> list[str]:
    return missing_permissions(channel_permissions(g, [str(r) for r in roles], BOT, ch))


def test_base_permissions_from_everyone_and_roles() -> None:
    assert missing(guild(NEEDED), [], channel()) == []
    assert missing(guild(VIEW | SEND), [], channel()) == [
        "Attach Files",
        "Embed Links",
        "Read Message History",
    ]
    assert missing(guild(VIEW | SEND), [ROLE], channel()) == [
        "Attach Files",
        "Embed Links",
        "Read Message History",
    ]
    assert missing(guild(VIEW | SEND, role=EMBED | ATTACH | HISTORY), [ROLE], channel()) == []


def test_owner_and_administrator_have_everything() -> None:
    denied = channel((GUILD, 0, 0, NEEDED))
    assert missing(guild(0, owner=BOT), [], denied) == []
    assert missing(guild(0, role=1 << 3), [ROLE], denied) == []  # ADMINISTRATOR


def test_overwrites_apply_everyone_then_roles_then_member() -> None:
    g = guild(NEEDED)
    assert missing(g, [], channel((GUILD, 0, 0, ATTACH))) == ["Attach Files"]
    # a role allow beats the @everyone deny; a member deny beats both
    assert missing(g, [ROLE], channel((GUILD, 0, 0, ATTACH), (ROLE, 0, ATTACH, 0))) == []
    assert missing(g, [ROLE], channel((ROLE, 0, ATTACH, 0), (BOT, 1, 0, ATTACH))) == ["Attach Files"]
    # a role overwrite for a role the bot does not have changes nothing
    assert missing(g, [], channel((ROLE, 0, 0, NEEDED))) == []
    # the member allow beats a role deny
    assert missing(g, [ROLE], channel((ROLE, 0, 0, VIEW), (BOT, 1, VIEW, 0))) == []
    assert missing(g, [], channel((BOT, 1, 0, VIEW)))[0] == "View Channel"


async def test_metrics_port_free_in_use_and_served_by_ponybot(monkeypatch) -> None:
    for name in ("PONY_METRICS_PORT", "PONY_METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()
    report = Report(out)
    await check_metrics(load_settings(_env_file=None), report)
    assert out.getvalue().startswith("ok  metrics: off")

    with socket.socket() as blocker:  # another program holds the port
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        await check_metrics(load_settings(_env_file=None, metrics_port=port), report)
    assert out.getvalue().splitlines()[-1].startswith(f"FAIL metrics 127.0.0.1:{port}: the port is used by")

    health = Health()
    health.set_gateway(True)
    server = MetricsServer(Metrics(), health.check)
    await server.start("127.0.0.1", 0)
    port = server.port
    try:
        await check_metrics(load_settings(_env_file=None, metrics_port=port), report)
        assert out.getvalue().splitlines()[-1] == (
            f"ok  metrics 127.0.0.1:{port}: a running ponybot serves it and reports healthy"
        )
    finally:
        await server.stop()
    await check_metrics(load_settings(_env_file=None, metrics_port=port), report)
    assert out.getvalue().splitlines()[-1].startswith(f"ok  metrics 127.0.0.1:{port}: free")
    assert report.failures == 1
