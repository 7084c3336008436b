"""A loopback Discord: an aiohttp server speaking the gateway and the REST routes discord.py uses.

The real bot (or any ``discord.Client``) connects to it in-process, so end-to-end tests can run on a
machine that cannot reach discord.com. Point discord.py at it before ``start()``::

    fake = FakeDiscord()
    await fake.start()
    discord.http.Route.BASE = f"{fake.api_base}/api/v10"       # REST, interaction callbacks, webhooks
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    # or: with fake.patch_discord_py(): ...   (sets both, restores them on exit)

and build the client with a small ``guild_ready_timeout`` (a ``discord.Client`` option), e.g.
``commands.Bot(..., guild_ready_timeout=0.05)``, or ``on_ready`` waits 2 s after GUILD_CREATE.

API
---
Lifecycle: ``FakeDiscord(*, bot_token="test-token", heartbeat_interval_ms=41250,
attachment_limit=10 MiB, token_ttl=900.0, interaction_deadline=3.0, guild_id=1000000000000000100,
shards=1, max_concurrency=1)``; ``await start()`` (binds
127.0.0.1 on a free port); ``await stop()``; ``api_base`` ("http://127.0.0.1:PORT"), ``gateway_url``
("ws://127.0.0.1:PORT/gateway"); ``patch_discord_py()`` context manager.

World (fixed ids): ``application_id``, ``bot_user`` / ``bot_user_id`` (name "ponybot"), ``guild_id``,
``everyone_role_id`` (= guild id), ``mods_role_id`` (Manage Messages), ``admin_role_id`` (Manage
Guild), ``channel_id``, ``nsfw_channel_id``; users ``alice``, ``bob``, ``mod``, ``admin``, ``owner``
(``FakeUser``: ``.id``, ``.username``, ``.role_ids``; ``owner`` owns the guild); ``users``,
``channels`` (id -> ``FakeChannel``), ``roles`` (id -> role payload), ``everyone_permissions``.
Anywhere a user is taken, a ``FakeUser``, a user id or a user name works; the default is ``alice``.
``set_bot_permissions(channel_id, bits)`` sets the bot's effective permissions in a channel (a
member overwrite in GUILD_CREATE/GET channel, a CHANNEL_UPDATE event, ``app_permissions`` of later
interactions, and REST enforcement: posting needs VIEW_CHANNEL+SEND_MESSAGES, files ATTACH_FILES,
deleting others' messages MANAGE_MESSAGES); it returns a task that completes once CHANNEL_UPDATE is
sent (await it, or not; the client still applies it asynchronously after that). ``bot_permissions(channel_id)``, ``member_permissions(user, channel_id)``.
``block_dms(user)``: DMs to that user answer 403 50007.

Gateway: HELLO, heartbeat ACK, IDENTIFY -> READY + GUILD_CREATE, RESUME -> replay of missed events +
RESUMED (unknown session -> op 9), REQUEST_GUILD_MEMBERS -> one GUILD_MEMBERS_CHUNK. Message events
respect the identified intents (MESSAGE_CONTENT blanks other users' content). ``identify_count``,
``resume_count``, ``intents``, ``session_id``, ``gateway_events`` (every (name, data) dispatched),
``connected``; ``await reconnect_gateway(*, wait=True, timeout=10)`` (op 7),
``await drop_gateway(*, code=None, wait=True, timeout=15)`` (abort the TCP connection, or close with
``code``), ``await invalidate_session(*, resumable=False, wait=True, timeout=15)`` (op 9),
``await wait_until_connected(timeout=10)``.

Sharding: ``shards`` (``shard_count``) is what GET /gateway/bot recommends (``shards``, with
``session_start_limit.max_concurrency`` = ``max_concurrency``) and what the gateway serves: an
IDENTIFY must carry ``shard: [id, shard_count]`` (none is shard 0 of 1), else it is closed with
4011 Sharding required (fewer shards) or 4010 Invalid shard (id out of range, more shards, malformed).
Each shard's READY/GUILD_CREATE carry only its guilds (``shard_of(guild_id)`` = ``(guild_id >> 22)
% shard_count``); the world's guild and ``add_guild(guild_id, name)`` (bare guilds: the bot alone, no
channels) are spread that way, ``guild_id_on_shard(shard, count)`` (module function) picks an id.
Every event goes to the connection of its guild's shard (no guild: shard 0). ``identifies``
(``Identify``: shard, time), ``gateway_connections`` (sockets opened), ``shard_connected(id)``;
``connected`` means every shard; ``reconnect_gateway`` / ``drop_gateway`` / ``invalidate_session``
take ``shard=`` (default: the guild's shard); ``hold_shard(id)`` makes that shard's next IDENTIFY
or RESUME wait for ``release_shard(id)`` (the shard stays down meanwhile).

REST: every request is appended to ``requests`` (``RecordedRequest``: method, path without the
``/api/v10`` prefix, query, json (``payload_json`` for multipart), files, time, status); unknown
routes answer 404 and are also kept in ``unhandled``; a crash inside the fake answers 400 (never 5xx,
which discord.py retries) and lands in ``internal_errors``. ``requests_matching(method, path_regex)``.
Routes: users/@me, users/@me/guilds, oauth2/applications/@me, gateway, gateway/bot, application commands (PUT/GET/POST/
DELETE, global and guild; stored in ``commands`` and ``guild_commands``; ``find_command(name)``),
channel messages (POST/GET/PATCH/DELETE, list with limit/before/after/around, typing, reactions),
channels, guilds, members, users, DM channels, interaction callbacks and the interaction webhook
routes (POST /webhooks/{app}/{token}, GET/PATCH/DELETE .../messages/@original|{id}). Attachments are
served at their ``url`` (``/attachments/{channel}/{id}/{filename}``). Unknown ids answer Discord's
404 JSON (Unknown Channel 10003, Unknown Message 10008, ...). Message rules enforced with Discord's
400/413 errors: content <= 2000, <= 10 embeds (field limits, 6000 total, well-formed URLs), <= 5
action rows of <= 5 buttons (or one select), custom_id <= 100 and unique, label <= 80, <= 10 files
each <= ``attachment_limit``, no empty messages (50006), replies to unknown messages, nonce dedupe
with ``enforce_nonce``. Interaction rules: callback within ``interaction_deadline`` seconds (else
10062), once (else 40060), types 6/7 only for components; followups before the callback answer
10015; tokens expire after ``token_ttl`` or ``expire_token(token_or_interaction)`` (401 50027).
The first followup after a deferred (type 5) callback fills the "thinking" message, as on Discord
(filling it, by followup or by editing @original, does not count as an edit). Gateway MESSAGE_CREATE/
UPDATE/DELETE events are sent for the bot's own non-ephemeral messages too, as Discord does.

Spec check: every REST request body is validated against the request schema of its route in
Discord's published OpenAPI spec (``tests/data/discord-api/openapi.json``, see ``discord_spec.py``;
multipart requests: their ``payload_json``). A violation answers what Discord answers (400, 50035
"Invalid Form Body", ``errors`` naming the field) and is appended to ``spec_violations``
(``SpecViolation``: method, route template, path, field, json_path, message); the e2e conftest fails
the test that caused it. A test that sends a bad body on purpose clears ``spec_violations`` once it
has checked it; ``check_spec = False`` turns the check off for one fake. ``take_created()`` (module
function) returns the fakes created since its last call, ``created_fakes()`` the same without
forgetting them.

Driving: ``await slash(name, options=None, *, user=None, channel_id=None, subcommand=None,
validate=True)`` (``subcommand`` "sub" or "group sub"; option types from the synced schema, else
inferred from Python types: bool, int, float, str, FakeUser, FakeChannel, bytes/(filename, bytes[,
content_type]) for attachments; checks required options, choices, min/max, ``default_member_permissions``
and nsfw like the Discord client would, raising ValueError; ``validate=False`` skips those checks, as a
modified client would); ``await click(message_id, custom_id, *, user=None, values=None,
validate=True)`` (``validate=False``: a forged press, any custom_id on any known message, even a
deleted one); ``await submit_modal(interaction, values, *, user=None)``; ``await autocomplete(name, focused, typed,
options=None, *, user=None)`` -> the choices the bot answered (type 4 interaction, callback type 8);
``await context_menu(name, message_id, *, user=None)`` (a message command, right-click > Apps: type 2
with ``data.type`` 3, ``target_id`` and ``resolved.messages``; the command must be synced as type 3);
``await user_message(content, *, user=None, channel_id=None, files=None, reference=None)``
(``files``: [(filename, bytes)]). They raise RuntimeError before a bot has identified.
``FakeInteraction``: ``id``, ``token``, ``type``, ``channel_id``, ``user_id``, ``payload``,
``responses`` (``InteractionResponse``: ``type``, ``data``, ``files``, ``flags``, ``ephemeral``,
``content``), ``followups`` (``FakeMessage``), ``errors`` ((path, status, body) of rejected calls),
``modal``, ``response``, ``response_type``, ``deferred``, ``ephemeral``, ``original``, ``content``,
``await wait_response(timeout=5)``, ``await wait_followup(timeout=30, index=0)``,
``await wait_original(predicate=None, timeout=30)`` (original response no longer loading).

Messages: ``messages`` (id -> ``FakeMessage``: id, channel_id, author_id, content, embeds,
components, attachments (``FakeAttachment`` (filename, data, content_type) tuples), attachment_ids,
reference_id, created_at, edited_at, flags, nonce, deleted, history (``MessageSnapshot`` before each
edit), edits, ephemeral, loading, interaction_id, webhook_id, ``buttons()``);
``channel_messages(channel_id, include_deleted=False)``, ``await wait_for_message(predicate,
timeout=30)`` (checked on every create and edit), ``buttons(message_or_id)`` -> [(label, custom_id)].

Faults: ``fail_next(method, path_regex, status, *, times=1, body=None, retry_after=None,
apply=False, delay=0.0)`` (``method`` "*" matches any; ``path_regex`` is searched in the path
without the ``/api/v10`` prefix; 429 carries ``retry_after``, ``global`` (set ``body={"global":
True}`` for a global limit), a ``Via`` header and X-RateLimit headers so discord.py waits and retries;
``apply=True`` lets the request take effect before the error is returned, like a lost response);
``slow_next(method, path_regex, seconds, *, times=1)``; ``await delete_channel(channel_id)``
(CHANNEL_DELETE, then REST 404 Unknown Channel); ``await delete_message_externally(message_id)``
(MESSAGE_DELETE). ``hold_uploads(channel_id)`` makes every request to that channel that carries a
PNG attachment (a result upload) wait, before it takes effect, until ``release_uploads(channel_id)``
(or ``stop()``); each held request is appended to ``held_uploads``. A held upload whose client went
away meanwhile (its process was killed) never takes effect, as Discord drops an upload whose
connection broke: it is appended to ``dropped_uploads`` (status 499).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import mimetypes
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

from aiohttp import BodyPartReader, WSMsgType, web
from discord_spec import STATS as SPEC_STATS
from discord_spec import SpecViolation
from discord_spec import spec as discord_spec

__all__ = [
    "ADMINISTRATOR",
    "ATTACH_FILES",
    "DEFAULT_EVERYONE_PERMISSIONS",
    "EMBED_LINKS",
    "MANAGE_GUILD",
    "MANAGE_MESSAGES",
    "READ_MESSAGE_HISTORY",
    "SEND_MESSAGES",
    "VIEW_CHANNEL",
    "ApiError",
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeInteraction",
    "FakeMessage",
    "FakeUser",
    "Identify",
    "InteractionResponse",
    "MessageSnapshot",
    "RecordedRequest",
    "SpecViolation",
    "created_fakes",
    "guild_id_on_shard",
    "take_created",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (https://discord.com/developers/docs/topics/permissions).
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_EXTERNAL_EMOJIS = 1 << 18
CONNECT = 1 << 20
SPEAK = 1 << 21
CHANGE_NICKNAME = 1 << 26
USE_APPLICATION_COMMANDS = 1 << 31
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 53) - 1
DEFAULT_EVERYONE_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_EXTERNAL_EMOJIS
    | CONNECT
    | SPEAK
    | CHANGE_NICKNAME
    | USE_APPLICATION_COMMANDS
    | SEND_MESSAGES_IN_THREADS
)

# Gateway intents.
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

_SELECT_TYPES = frozenset({3, 5, 6, 7, 8})
_OPTION_TYPE_NAMES = {
    1: "SUB_COMMAND",
    2: "SUB_COMMAND_GROUP",
    3: "STRING",
    4: "INTEGER",
    5: "BOOLEAN",
    6: "USER",
    7: "CHANNEL",
    8: "ROLE",
    9: "MENTIONABLE",
    10: "NUMBER",
    11: "ATTACHMENT",
}


# --------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error answer in Discord's JSON shape; raised inside handlers, turned into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        code: int,
        errors: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {message} (code {code})")
        self.status = status
        self.message = message
        self.code = code
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body Discord would send."""
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def _form_error(path: tuple[str | int, ...], code: str, message: str) -> ApiError:
    """A 400 Invalid Form Body (50035) with the error nested under ``path``."""
    node: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for key in reversed(path):
        node = {str(key): node}
    return ApiError(400, "Invalid Form Body", 50035, node)


def _unknown(what: str, code: int) -> ApiError:
    return ApiError(404, f"Unknown {what}", code)


def _unknown_channel() -> ApiError:
    return _unknown("Channel", 10003)


def _unknown_message() -> ApiError:
    return _unknown("Message", 10008)


def _unknown_webhook() -> ApiError:
    return _unknown("Webhook", 10015)


def _missing_permissions() -> ApiError:
    return ApiError(403, "Missing Permissions", 50013)


def _missing_access() -> ApiError:
    return ApiError(403, "Missing Access", 50001)


_DEFAULT_FAULT_BODIES: dict[int, dict[str, Any]] = {
    400: {"message": "400: Bad Request", "code": 0},
    401: {"message": "401: Unauthorized", "code": 0},
    403: {"message": "Missing Permissions", "code": 50013},
    404: {"message": "404: Not Found", "code": 0},
    413: {"message": "Request entity too large", "code": 40005},
    429: {"message": "You are being rate limited.", "global": False},
    500: {"message": "500: Internal Server Error", "code": 0},
    502: {"message": "502: Bad Gateway", "code": 0},
    503: {"message": "503: Service Unavailable", "code": 0},
    504: {"message": "504: Gateway Timeout", "code": 0},
}


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class FakeUser:
    """A user of the fake world."""

    id: int
    username: str
    role_ids: list[int] = field(default_factory=list)
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        """The user object Discord sends."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": None if self.bot else self.username.title(),
            "avatar": None,
            "public_flags": 0,
            "flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass
class FakeChannel:
    """A guild text channel (type 0) or a DM channel (type 1)."""

    id: int
    name: str
    type: int = 0
    nsfw: bool = False
    position: int = 0
    guild_id: int | None = None
    recipient_id: int | None = None
    topic: str | None = None
    bot_permissions: int | None = None
    deleted: bool = False


class FakeAttachment(NamedTuple):
    """A stored attachment; unpacks as ``(filename, data, content_type)``."""

    filename: str
    data: bytes
    content_type: str


@dataclass
class MessageSnapshot:
    """A message's state before one edit."""

    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: list[FakeAttachment]
    flags: int
    at: datetime


@dataclass(eq=False)
class FakeMessage:
    """A message as the fake stores it."""

    id: int
    channel_id: int
    author_id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    attachment_ids: list[int] = field(default_factory=list)
    reference_id: int | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    edited_at: datetime | None = None
    flags: int = 0
    nonce: str | int | None = None
    deleted: bool = False
    history: list[MessageSnapshot] = field(default_factory=list)
    interaction_id: int | None = None
    webhook_id: int | None = None
    tts: bool = False

    @property
    def edits(self) -> int:
        """How many times the message was edited."""
        return len(self.history)

    @property
    def ephemeral(self) -> bool:
        """Whether only the interacting user sees it (flags & 64)."""
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """Whether it is a deferred "thinking..." placeholder (flags & 128)."""
        return bool(self.flags & FLAG_LOADING)

    def buttons(self) -> list[tuple[str | None, str | None]]:
        """``(label, custom_id)`` of every button, in display order."""
        return [
            (c.get("label"), c.get("custom_id"))
            for c in _walk_components(self.components)
            if c.get("type") == 2
        ]

    def snapshot(self) -> MessageSnapshot:
        """The current state, for the edit history."""
        return MessageSnapshot(
            content=self.content,
            embeds=list(self.embeds),
            components=list(self.components),
            attachments=list(self.attachments),
            flags=self.flags,
            at=self.edited_at or self.created_at,
        )


@dataclass
class RecordedRequest:
    """One HTTP request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[FakeAttachment]
    time: float
    status: int | None = None


@dataclass
class InteractionResponse:
    """One interaction callback (``POST /interactions/{id}/{token}/callback``)."""

    type: int
    data: dict[str, Any] | None
    files: list[FakeAttachment]
    time: float

    @property
    def flags(self) -> int:
        """Message flags of the response data."""
        return int((self.data or {}).get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        """Whether the response asked to be ephemeral (flags & 64)."""
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def content(self) -> str | None:
        """The ``content`` of the response data, if any."""
        return (self.data or {}).get("content")


class FakeInteraction:
    """An interaction the fake dispatched, and everything the bot answered to it."""

    def __init__(
        self,
        fake: FakeDiscord,
        *,
        id: int,
        token: str,
        type: int,
        channel_id: int,
        user_id: int,
        payload: dict[str, Any],
        message_id: int | None = None,
    ) -> None:
        self._fake = fake
        self.id = id
        self.token = token
        self.type = type
        self.channel_id = channel_id
        self.user_id = user_id
        self.payload = payload
        self.message_id = message_id
        self.created = time.monotonic()
        self.expired = False
        self.responses: list[InteractionResponse] = []
        self.followups: list[FakeMessage] = []
        self.errors: list[tuple[str, int, dict[str, Any]]] = []
        self.original_message_id: int | None = None
        self.modal: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<FakeInteraction id={self.id} type={self.type} responses={[r.type for r in self.responses]}>"

    @property
    def response(self) -> InteractionResponse | None:
        """The callback, once the bot answered."""
        return self.responses[0] if self.responses else None

    @property
    def response_type(self) -> int | None:
        """The callback type: 4 message, 5 deferred, 6 deferred update, 7 update, 9 modal."""
        return self.responses[0].type if self.responses else None

    @property
    def deferred(self) -> bool:
        """Whether the callback was a defer (type 5 or 6)."""
        return self.response_type in (5, 6)

    @property
    def ephemeral(self) -> bool:
        """Whether the reply is ephemeral (the callback's flags & 64, or the original message's)."""
        original = self.original
        if original is not None and original.id != self.message_id:
            return original.ephemeral
        return bool(self.response and self.response.ephemeral)

    @property
    def original(self) -> FakeMessage | None:
        """The original response message (for component updates: the component's message)."""
        if self.original_message_id is None:
            return None
        return self._fake.messages.get(self.original_message_id)

    @property
    def content(self) -> str | None:
        """The text the user sees now: the original message's content, else the callback's."""
        original = self.original
        if original is not None:
            return original.content
        return self.response.content if self.response else None

    async def wait_response(self, timeout: float = 5.0) -> InteractionResponse:
        """Wait for the callback."""
        return await self._fake._wait_until(lambda: self.response, timeout, f"a response to {self!r}")

    async def wait_followup(self, timeout: float = 30.0, *, index: int = 0) -> FakeMessage:
        """Wait for the ``index``-th followup message."""
        return await self._fake._wait_until(
            lambda: self.followups[index] if len(self.followups) > index else None,
            timeout,
            f"followup #{index} of {self!r}",
        )

    async def wait_original(
        self, predicate: Callable[[FakeMessage], bool] | None = None, timeout: float = 30.0
    ) -> FakeMessage:
        """Wait until the original response exists, is no longer loading and satisfies ``predicate``."""

        def check() -> FakeMessage | None:
            message = self.original
            if message is None or message.loading:
                return None
            if predicate is not None and not predicate(message):
                return None
            return message

        return await self._fake._wait_until(check, timeout, f"the original response of {self!r}")


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int | None
    times: int
    body: dict[str, Any] | None = None
    retry_after: float | None = None
    apply: bool = False
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and self.pattern.search(path) is not None


@dataclass
class _Session:
    id: str
    intents: int | None
    shard_id: int = 0
    seq: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None


@dataclass
class _Request:
    """What a route handler gets."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: dict[int, FakeAttachment]


class Identify(NamedTuple):
    """One IDENTIFY the gateway accepted: its ``shard`` ([id, count] as sent, None when it sent
    none) and when (``time.monotonic()``)."""

    shard: tuple[int, int] | None
    time: float


_Handler = Callable[..., Awaitable[Any]]

_CREATED: list[FakeDiscord] = []


def take_created() -> list[FakeDiscord]:
    """The FakeDiscord instances created since the last call (the e2e conftest checks their
    ``spec_violations`` after each test)."""
    created = list(_CREATED)
    _CREATED.clear()
    return created


def created_fakes() -> list[FakeDiscord]:
    """The FakeDiscord instances created since the last ``take_created()`` (kept)."""
    return list(_CREATED)


# --------------------------------------------------------------------------------------------------
# Helpers


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _walk_components(components: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    """Every component, depth first (rows, containers, sections, labels, accessories)."""
    for component in components or []:
        yield component
        yield from _walk_components(component.get("components"))
        for key in ("component", "accessory"):
            child = component.get(key)
            if isinstance(child, dict):
                yield from _walk_components([child])


def _guess_content_type(filename: str, data: bytes) -> str:
    guessed, _ = mimetypes.guess_type(filename)
    if guessed:
        return guessed
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def _image_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    try:
        from PIL import Image  # optional: only for non-PNG images

        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def guild_id_on_shard(shard_id: int, shard_count: int, *, near: int = 1_000_000_000_000_000_100) -> int:
    """The smallest guild id >= ``near`` that Discord puts on shard ``shard_id`` of ``shard_count``
    (``(guild_id >> 22) % shard_count == shard_id``)."""
    guild_id = near
    while (guild_id >> 22) % shard_count != shard_id:
        guild_id += 1 << 22
    return guild_id


def _as_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _form_error((what,), "NUMBER_TYPE_COERCE", f"Value {value!r} is not snowflake.") from None


# --------------------------------------------------------------------------------------------------
# The server


class FakeDiscord:
    """A loopback Discord with one guild (plus optional bare ones); see the module docstring for the API."""

    def __init__(
        self,
        *,
        bot_token: str = "test-token",
        heartbeat_interval_ms: int = 41250,
        attachment_limit: int = 10 * 1024 * 1024,
        token_ttl: float = 900.0,
        interaction_deadline: float | None = 3.0,
        guild_id: int = 1_000_000_000_000_000_100,
        shards: int = 1,
        max_concurrency: int = 1,
    ) -> None:
        self.bot_token = bot_token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.attachment_limit = attachment_limit
        self.token_ttl = token_ttl
        self.interaction_deadline = interaction_deadline
        self.shard_count = shards
        self.max_concurrency = max_concurrency

        self.application_id = 1_000_000_000_000_000_001
        self.bot_user = FakeUser(self.application_id, "ponybot", bot=True)
        self.bot_user_id = self.bot_user.id
        self.guild_id = guild_id
        self.other_guilds: dict[int, str] = {}
        self.guild_name = "Pony Test Guild"
        self.everyone_role_id = self.guild_id
        self.mods_role_id = 1_000_000_000_000_000_101
        self.admin_role_id = 1_000_000_000_000_000_102
        self.channel_id = 1_000_000_000_000_000_110
        self.nsfw_channel_id = 1_000_000_000_000_000_111
        self.everyone_permissions = DEFAULT_EVERYONE_PERMISSIONS
        self.roles: dict[int, dict[str, Any]] = {
            self.everyone_role_id: self._role(self.everyone_role_id, "@everyone", 0, None),
            self.mods_role_id: self._role(self.mods_role_id, "Mods", 1, MANAGE_MESSAGES),
            self.admin_role_id: self._role(self.admin_role_id, "Admins", 2, MANAGE_GUILD),
        }
        self.alice = FakeUser(1_000_000_000_000_000_201, "alice")
        self.bob = FakeUser(1_000_000_000_000_000_202, "bob")
        self.mod = FakeUser(1_000_000_000_000_000_203, "mod", [self.mods_role_id])
        self.admin = FakeUser(1_000_000_000_000_000_204, "admin", [self.admin_role_id])
        self.owner = FakeUser(1_000_000_000_000_000_205, "owner")
        self.users: dict[int, FakeUser] = {
            u.id: u for u in (self.bot_user, self.alice, self.bob, self.mod, self.admin, self.owner)
        }
        self.channels: dict[int, FakeChannel] = {
            self.channel_id: FakeChannel(self.channel_id, "general", position=0, guild_id=self.guild_id),
            self.nsfw_channel_id: FakeChannel(
                self.nsfw_channel_id, "nsfw", nsfw=True, position=1, guild_id=self.guild_id
            ),
        }
        self._joined_at = datetime(2024, 1, 1, tzinfo=UTC)

        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.internal_errors: list[Exception] = []
        self.spec_violations: list[SpecViolation] = []
        self.check_spec = True
        self.commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.gateway_events: list[tuple[str, dict[str, Any]]] = []
        self.identify_count = 0
        self.identifies: list[Identify] = []
        self.resume_count = 0
        self.gateway_connections = 0
        self.intents: int | None = None

        self._by_token: dict[str, FakeInteraction] = {}
        self._cdn: dict[int, FakeAttachment] = {}
        self._nonces: dict[tuple[int, int, str], tuple[int, float]] = {}
        self._dm_blocked: set[int] = set()
        self._faults: list[_Fault] = []
        self._sessions: dict[int, _Session] = {}  # shard id -> its gateway session
        self._held_shards: dict[int, asyncio.Event] = {}
        self._held_upload_channels: dict[int, asyncio.Event] = {}
        self.held_uploads: list[RecordedRequest] = []
        self.dropped_uploads: list[RecordedRequest] = []
        self._sockets: dict[web.WebSocketResponse, web.Request] = {}
        self._send_lock = asyncio.Lock()
        self._cond = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_snowflake = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._build_routes()
        if self.check_spec:
            discord_spec()  # load it now (once per process), not inside the first request
        _CREATED.append(self)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Serve on 127.0.0.1, on a free port."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway_handler)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close every gateway socket and stop serving."""
        for gate in self._held_upload_channels.values():
            gate.set()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server stopping")
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base(self) -> str:
        """``http://127.0.0.1:PORT``; discord.py's ``Route.BASE`` is this plus ``/api/v10``."""
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def gateway_url(self) -> str:
        """``ws://127.0.0.1:PORT/gateway``."""
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"ws://127.0.0.1:{self._port}/gateway"

    @contextlib.contextmanager
    def patch_discord_py(self) -> Iterator[None]:
        """Point discord.py's REST base and default gateway here; restore them on exit."""
        import discord  # only here: the fake itself does not need discord.py
        import yarl

        old_base = discord.http.Route.BASE
        old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = f"{self.api_base}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE = old_base
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    # ---------------------------------------------------------------- world

    def _role(self, role_id: int, name: str, position: int, permissions: int | None) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "permissions": str(permissions if permissions is not None else self.everyone_permissions),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def _snowflake(self) -> int:
        value = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        value = max(value, self._last_snowflake + 1)
        self._last_snowflake = value
        return value

    def _user(self, user: FakeUser | int | str | None) -> FakeUser:
        if user is None:
            return self.alice
        if isinstance(user, FakeUser):
            return user
        if isinstance(user, str):
            for candidate in self.users.values():
                if candidate.username == user:
                    return candidate
            raise ValueError(f"no user named {user!r}")
        try:
            return self.users[int(user)]
        except KeyError:
            raise ValueError(f"no user with id {user}") from None

    def _guild_members(self) -> list[FakeUser]:
        return list(self.users.values())

    def add_guild(self, guild_id: int, name: str = "Other Guild") -> None:
        """Add a bare guild (the bot alone, no channels) that its shard's READY and GUILD_CREATE carry."""
        self.other_guilds[guild_id] = name

    def shard_of(self, guild_id: int) -> int:
        """The shard whose connection gets this guild's events: ``(guild_id >> 22) % shard_count``."""
        return (guild_id >> 22) % self.shard_count

    def set_bot_permissions(self, channel_id: int, permissions: int) -> asyncio.Task[None] | None:
        """Set the bot's permissions in a channel; returns the task sending CHANNEL_UPDATE, if any."""
        channel = self.channels[channel_id]
        channel.bot_permissions = permissions
        if self._session is None:
            return None
        return self._spawn(
            self._dispatch("CHANNEL_UPDATE", self._channel_payload(channel)),
        )

    def bot_permissions(self, channel_id: int | None) -> int:
        """The bot's effective permissions in a channel."""
        channel = self.channels.get(channel_id) if channel_id is not None else None
        if channel is not None and channel.bot_permissions is not None:
            return channel.bot_permissions
        return self.everyone_permissions

    def member_permissions(self, user: FakeUser | int | str, channel_id: int | None = None) -> int:
        """A member's permissions (the guild owner and administrators have all)."""
        member = self._user(user)
        if member.id == self.bot_user.id:
            return self.bot_permissions(channel_id)
        if member.id == self.owner.id:
            return ALL_PERMISSIONS
        permissions = self.everyone_permissions
        for role_id in member.role_ids:
            permissions |= int(self.roles[role_id]["permissions"])
        if permissions & ADMINISTRATOR:
            return ALL_PERMISSIONS
        return permissions

    def block_dms(self, user: FakeUser | int | str) -> None:
        """Make DMs to this user fail with 403 50007 (user closed their DMs)."""
        self._dm_blocked.add(self._user(user).id)

    def _spawn(self, coro: Awaitable[_T]) -> asyncio.Task[_T]:
        task: asyncio.Task[_T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- payloads

    def _channel_payload(self, channel: FakeChannel, *, with_guild_id: bool = True) -> dict[str, Any]:
        if channel.type == 1:
            recipient = self.users[channel.recipient_id or 0]
            return {
                "id": str(channel.id),
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [recipient.payload()],
            }
        overwrites = []
        if channel.bot_permissions is not None:
            overwrites.append(
                {
                    "id": str(self.bot_user.id),
                    "type": 1,
                    "allow": str(channel.bot_permissions),
                    "deny": str(ALL_PERMISSIONS & ~channel.bot_permissions),
                }
            )
        data: dict[str, Any] = {
            "id": str(channel.id),
            "type": channel.type,
            "name": channel.name,
            "position": channel.position,
            "permission_overwrites": overwrites,
            "nsfw": channel.nsfw,
            "topic": channel.topic,
            "parent_id": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }
        if with_guild_id:
            data["guild_id"] = str(self.guild_id)
        return data

    def _member_payload(
        self,
        user: FakeUser,
        *,
        with_user: bool = True,
        channel_id: int | None = None,
        permissions: bool = False,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(r) for r in user.role_ids],
            "joined_at": _iso(self._joined_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = user.payload()
        if permissions:
            data["permissions"] = str(self.member_permissions(user, channel_id))
        return data

    def _guild_payload(self, *, full: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.guild_id),
            "name": self.guild_name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": list(self.roles.values()),
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
        }
        if full:
            data.update(
                {
                    "unavailable": False,
                    "joined_at": _iso(self._joined_at),
                    "large": False,
                    "member_count": len(self._guild_members()),
                    "members": [self._member_payload(u) for u in self._guild_members()],
                    "channels": [
                        self._channel_payload(c, with_guild_id=False)
                        for c in self.channels.values()
                        if c.type != 1 and not c.deleted
                    ],
                    "threads": [],
                    "presences": [],
                    "voice_states": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                }
            )
        return data

    def _other_guild_payload(self, guild_id: int) -> dict[str, Any]:
        data = self._guild_payload(full=True)
        data.update(
            id=str(guild_id),
            name=self.other_guilds[guild_id],
            roles=[self._role(guild_id, "@everyone", 0, None)],
            member_count=1,
            members=[self._member_payload(self.bot_user)],
            channels=[],
        )
        return data

    def _attachment_url(self, channel_id: int, attachment_id: int, filename: str) -> str:
        return f"{self.api_base}/attachments/{channel_id}/{attachment_id}/{quote(filename)}"

    def _attachment_payload(
        self, channel_id: int, attachment_id: int, attachment: FakeAttachment, *, ephemeral: bool = False
    ) -> dict[str, Any]:
        url = self._attachment_url(channel_id, attachment_id, attachment.filename)
        data: dict[str, Any] = {
            "id": str(attachment_id),
            "filename": attachment.filename,
            "size": len(attachment.data),
            "url": url,
            "proxy_url": url,
            "content_type": attachment.content_type,
        }
        if attachment.content_type.startswith("image/"):
            size = _image_size(attachment.data)
            if size is not None:
                data["width"], data["height"] = size
        if ephemeral:
            data["ephemeral"] = True
        return data

    def _message_payload(
        self, message: FakeMessage, *, gateway: bool = False, nested: bool = False
    ) -> dict[str, Any]:
        channel = self.channels.get(message.channel_id)
        author = self.users.get(message.author_id) or FakeUser(message.author_id, "unknown")
        interaction = self.interactions.get(message.interaction_id) if message.interaction_id else None
        message_type = 0
        if message.reference_id is not None:
            message_type = 19
        elif (
            interaction is not None
            and interaction.type == 2
            and message.id == interaction.original_message_id
        ):
            message_type = 20
        data: dict[str, Any] = {
            "id": str(message.id),
            "type": message_type,
            "channel_id": str(message.channel_id),
            "author": author.payload(),
            "content": message.content,
            "timestamp": _iso(message.created_at),
            "edited_timestamp": _iso(message.edited_at),
            "tts": message.tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [
                self._attachment_payload(message.channel_id, aid, att, ephemeral=message.ephemeral)
                for aid, att in zip(message.attachment_ids, message.attachments, strict=True)
            ],
            "embeds": message.embeds,
            "components": message.components,
            "pinned": False,
            "flags": message.flags,
        }
        if message.nonce is not None:
            data["nonce"] = message.nonce
        if channel is not None and channel.type != 1:
            data["guild_id"] = str(self.guild_id)
            if gateway and message.webhook_id is None:
                data["member"] = self._member_payload(author, with_user=False)
        if message.webhook_id is not None:
            data["webhook_id"] = str(message.webhook_id)
            data["application_id"] = str(self.application_id)
        if interaction is not None:
            user = self.users[interaction.user_id]
            metadata: dict[str, Any] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": user.payload(),
                "authorizing_integration_owners": {"0": str(self.guild_id)},
            }
            if interaction.type == 2:
                metadata["name"] = interaction.payload["data"]["name"]
                metadata["command_type"] = interaction.payload["data"].get("type", 1)
            if interaction.message_id is not None:
                metadata["interacted_message_id"] = str(interaction.message_id)
            if interaction.original_message_id is not None and message.id != interaction.original_message_id:
                metadata["original_response_message_id"] = str(interaction.original_message_id)
            data["interaction_metadata"] = metadata
        if message.reference_id is not None:
            data["message_reference"] = {
                "type": 0,
                "message_id": str(message.reference_id),
                "channel_id": str(message.channel_id),
            }
            if channel is not None and channel.type != 1:
                data["message_reference"]["guild_id"] = str(self.guild_id)
            if not nested:
                referenced = self.messages.get(message.reference_id)
                data["referenced_message"] = (
                    None
                    if referenced is None or referenced.deleted
                    else self._message_payload(referenced, nested=True)
                )
        return data

    # ---------------------------------------------------------------- waiting

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _wait_until(self, check: Callable[[], _T | None], timeout: float, what: str) -> _T:
        result = check()
        if result:
            return result
        async with self._cond:
            try:
                return await asyncio.wait_for(self._cond.wait_for(check), timeout)  # type: ignore[arg-type]
            except TimeoutError:
                raise TimeoutError(f"FakeDiscord: timed out after {timeout:g}s waiting for {what}") from None

    async def wait_for_message(
        self, predicate: Callable[[FakeMessage], bool], timeout: float = 30.0
    ) -> FakeMessage:
        """The first message (by id) satisfying ``predicate``, now or after a later create or edit."""

        def check() -> FakeMessage | None:
            for message in sorted(self.messages.values(), key=lambda m: m.id):
                if predicate(message):
                    return message
            return None

        return await self._wait_until(check, timeout, "a matching message")

    async def wait_until_connected(self, timeout: float = 10.0) -> None:
        """Wait until a bot has identified and its socket is open."""
        await self._wait_until(lambda: self.connected, timeout, "a gateway connection")

    # ---------------------------------------------------------------- message queries

    def channel_messages(
        self, channel_id: int, include_deleted: bool = False, *, include_ephemeral: bool = True
    ) -> list[FakeMessage]:
        """The messages of a channel, oldest first."""
        return [
            m
            for m in sorted(self.messages.values(), key=lambda m: m.id)
            if m.channel_id == channel_id
            and (include_deleted or not m.deleted)
            and (include_ephemeral or not m.ephemeral)
        ]

    def buttons(self, message: FakeMessage | int) -> list[tuple[str | None, str | None]]:
        """``(label, custom_id)`` of every button on a message."""
        if not isinstance(message, FakeMessage):
            message = self.messages[int(message)]
        return message.buttons()

    def requests_matching(self, method: str, path_regex: str) -> list[RecordedRequest]:
        """Recorded requests with this method ("*" for any) whose path matches ``path_regex``."""
        pattern = re.compile(path_regex)
        return [
            r
            for r in self.requests
            if (method == "*" or r.method == method.upper()) and pattern.search(r.path)
        ]

    def find_command(self, name: str, *, guild_id: int | None = None) -> dict[str, Any] | None:
        """A registered chat-input command: the guild's first, then the global ones."""
        for command in [*self.guild_commands.get(guild_id or self.guild_id, []), *self.commands]:
            if command["name"] == name and command.get("type", 1) == 1:
                return command
        return None

    # ---------------------------------------------------------------- faults

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        times: int = 1,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
        apply: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (see the module docstring)."""
        self._faults.append(
            _Fault(method.upper(), re.compile(path_regex), status, times, body, retry_after, apply, delay)
        )

    def slow_next(self, method: str, path_regex: str, seconds: float, *, times: int = 1) -> None:
        """Delay the next ``times`` matching requests by ``seconds`` before handling them normally."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), None, times, delay=seconds))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _fault_response(self, fault: _Fault) -> web.Response:
        status = fault.status or 500
        body = dict(_DEFAULT_FAULT_BODIES.get(status, {"message": f"{status}: Error", "code": 0}))
        body.update(fault.body or {})
        headers = {"Via": "1.1 google"}
        if status == 429:
            retry_after = fault.retry_after if fault.retry_after is not None else body.get("retry_after", 0.1)
            body["retry_after"] = retry_after
            body.setdefault("global", False)
            bucket = hashlib.sha1(f"{fault.method} {fault.pattern.pattern}".encode()).hexdigest()[:16]
            headers.update(
                {
                    "Retry-After": str(max(1, math.ceil(retry_after))),
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                    "X-RateLimit-Bucket": bucket,
                    "X-RateLimit-Scope": "global" if body["global"] else "user",
                }
            )
            if body["global"]:
                headers["X-RateLimit-Global"] = "true"
        return self._json(body, status, headers)

    def hold_uploads(self, channel_id: int) -> None:
        """Hold every PNG upload to this channel until ``release_uploads`` (see the module docstring)."""
        self._held_upload_channels[channel_id] = asyncio.Event()

    def release_uploads(self, channel_id: int) -> None:
        """Let the held uploads to this channel (and later ones) go on."""
        gate = self._held_upload_channels.pop(channel_id, None)
        if gate is not None:
            gate.set()

    def _upload_gate(self, path: str, files: list[FakeAttachment]) -> asyncio.Event | None:
        match = re.match(r"/channels/(\d+)/", path)
        if match is None or not any(f.filename.endswith(".png") for f in files):
            return None
        return self._held_upload_channels.get(int(match.group(1)))

    async def _held(self, request: web.Request, record: RecordedRequest, gate: asyncio.Event) -> bool:
        """Wait at a held upload; False when its client went away meanwhile (never takes effect)."""
        self.held_uploads.append(record)
        await self._notify()
        await gate.wait()
        if request.transport is None or request.transport.is_closing():
            self.dropped_uploads.append(record)
            await self._notify()
            return False
        return True

    async def delete_channel(self, channel_id: int) -> None:
        """Delete a channel: CHANNEL_DELETE, then REST answers 404 Unknown Channel."""
        channel = self.channels[channel_id]
        channel.deleted = True
        await self._dispatch("CHANNEL_DELETE", self._channel_payload(channel))
        await self._notify()

    async def delete_message_externally(self, message_id: int) -> None:
        """Delete a message as a moderator would: MESSAGE_DELETE."""
        message = self.messages[message_id]
        await self._delete_message(message)

    def expire_token(self, token: str | FakeInteraction) -> None:
        """Expire an interaction token now: its webhook calls answer 401 Invalid Webhook Token."""
        interaction = token if isinstance(token, FakeInteraction) else self._by_token[token]
        interaction.expired = True

    # ---------------------------------------------------------------- gateway

    @property
    def _session(self) -> _Session | None:
        """The session of the shard serving the (full) guild; with one shard, the session."""
        return self._sessions.get(self.shard_of(self.guild_id))

    @property
    def connected(self) -> bool:
        """Whether a bot session has an open socket (on every shard, when sharded)."""
        return all(self.shard_connected(shard) for shard in range(self.shard_count))

    def shard_connected(self, shard_id: int) -> bool:
        """Whether shard ``shard_id`` has an identified session with an open socket."""
        session = self._sessions.get(shard_id)
        return session is not None and session.ws is not None and not session.ws.closed

    @property
    def session_id(self) -> str | None:
        """The current gateway session id (of the guild's shard, when sharded)."""
        return self._session.id if self._session else None

    def hold_shard(self, shard_id: int) -> None:
        """Keep shard ``shard_id`` down: its next IDENTIFY or RESUME is answered only after
        ``release_shard(shard_id)`` (its events wait for the RESUME meanwhile)."""
        self._held_shards.setdefault(shard_id, asyncio.Event())

    def release_shard(self, shard_id: int) -> None:
        """Answer shard ``shard_id``'s waiting IDENTIFY or RESUME, and later ones at once."""
        held = self._held_shards.pop(shard_id, None)
        if held is not None:
            held.set()

    def _token_ok(self, token: Any) -> bool:
        if not isinstance(token, str):
            return False
        return token.removeprefix("Bot ") == self.bot_token

    async def _send_raw(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        if ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(json.dumps(frame, separators=(",", ":")))

    async def _dispatch(
        self, event: str, data: dict[str, Any], *, intent: int | None = None, shard: int | None = None
    ) -> None:
        """Send a DISPATCH (op 0) to the session of ``shard`` (default: the shard of the event's
        ``guild_id``; shard 0 without one, as Discord sends DMs), or keep it for a RESUME when
        disconnected."""
        self.gateway_events.append((event, data))
        if shard is None:
            guild_id = data.get("guild_id")
            shard = self.shard_of(int(guild_id)) if guild_id is not None else 0
        session = self._sessions.get(shard)
        if session is None:
            return
        if intent is not None and session.intents is not None and not session.intents & intent:
            return
        async with self._send_lock:
            session.seq += 1
            frame = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.log.append(frame)
            if session.ws is not None:
                await self._send_raw(session.ws, frame)

    def _current_ws(self, shard: int | None = None) -> web.WebSocketResponse:
        session = self._session if shard is None else self._sessions.get(shard)
        if session is None or session.ws is None or session.ws.closed:
            raise RuntimeError("no bot is connected to the gateway")
        return session.ws

    async def reconnect_gateway(
        self, *, wait: bool = True, timeout: float = 10.0, shard: int | None = None
    ) -> None:
        """Send op 7 RECONNECT (to ``shard``; default: the guild's); the client reconnects and
        resumes. Waits for the RESUME if ``wait``."""
        ws = self._current_ws(shard)
        before = self.resume_count
        await self._send_raw(ws, {"op": 7, "d": None, "s": None, "t": None})
        if wait:
            await self._wait_until(lambda: self.resume_count > before and self.connected, timeout, "RESUME")

    async def drop_gateway(
        self, *, code: int | None = None, wait: bool = True, timeout: float = 15.0, shard: int | None = None
    ) -> None:
        """Kill the gateway connection (of ``shard``; default: the guild's) (TCP abort, or a close
        frame with ``code``); the client resumes."""
        ws = self._current_ws(shard)
        before = self.resume_count
        if code is None:
            transport = self._sockets[ws].transport
            if transport is not None:
                transport.abort()
        else:
            self._spawn(ws.close(code=code, message=b"fake drop"))
        if wait:
            await self._wait_until(lambda: self.resume_count > before and self.connected, timeout, "RESUME")

    async def invalidate_session(
        self, *, resumable: bool = False, wait: bool = True, timeout: float = 15.0, shard: int | None = None
    ) -> None:
        """Send op 9 INVALID_SESSION (to ``shard``; default: the guild's); a non-resumable one makes
        the client IDENTIFY again."""
        ws = self._current_ws(shard)
        identifies, resumes = self.identify_count, self.resume_count
        await self._send_raw(ws, {"op": 9, "d": resumable, "s": None, "t": None})
        if wait:
            await self._wait_until(
                lambda: (self.identify_count > identifies or self.resume_count > resumes) and self.connected,
                timeout,
                "a new gateway session",
            )

    async def _gateway_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets[ws] = request
        self.gateway_connections += 1
        hello = {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake"]}}
        await self._send_raw(ws, {**hello, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                await self._gateway_op(ws, frame)
        except Exception:
            log.exception("fake gateway: handler failed")
        finally:
            self._sockets.pop(ws, None)
            for session in self._sessions.values():
                if session.ws is ws:
                    session.ws = None
            with contextlib.suppress(Exception):
                await self._notify()
        return ws

    async def _gateway_op(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == 1:
            await self._send_raw(ws, {"op": 11, "d": None, "s": None, "t": None})
        elif op in (2, 6):
            await self._start_session(ws, op, data or {})
        elif op == 8:
            await self._request_members(data or {})
        elif op in (3, 4):
            pass  # presence and voice state updates are accepted and ignored
        else:
            await ws.close(code=4001, message=b"Unknown opcode.")

    async def _start_session(self, ws: web.WebSocketResponse, op: int, data: dict[str, Any]) -> None:
        """IDENTIFY (op 2) or RESUME (op 6); a held shard's waits for ``release_shard`` (in a task,
        so the socket keeps answering heartbeats)."""
        if op == 2:
            shard = data.get("shard")
            shard_id = shard[0] if isinstance(shard, list) and shard and isinstance(shard[0], int) else 0
        else:
            session = next((s for s in self._sessions.values() if s.id == data.get("session_id")), None)
            shard_id = session.shard_id if session is not None else -1
        start = self._identify if op == 2 else self._resume
        held = self._held_shards.get(shard_id)
        if held is None:
            await start(ws, data)
            return

        async def when_released() -> None:
            await held.wait()
            await start(ws, data)

        self._spawn(when_released())

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if not self._token_ok(data.get("token")):
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = data.get("shard")
        if shard is None:
            shard_id, shard_total = 0, 1
        elif (
            isinstance(shard, list)
            and len(shard) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shard)
            and 0 <= shard[0] < shard[1]
        ):
            shard_id, shard_total = shard
        else:
            await ws.close(code=4010, message=b"Invalid shard.")
            return
        if shard_total < self.shard_count:
            await ws.close(code=4011, message=b"Sharding required.")
            return
        if shard_total != self.shard_count:  # the fake serves exactly `shard_count` shards
            await ws.close(code=4010, message=b"Invalid shard.")
            return
        self.identify_count += 1
        self.identifies.append(Identify(None if shard is None else (shard_id, shard_total), time.monotonic()))
        self.intents = data.get("intents")
        session = _Session(id=secrets.token_hex(16), intents=self.intents, shard_id=shard_id)
        async with self._send_lock:
            self._sessions[shard_id] = session
            session.ws = ws
        guild_ids = [g for g in (self.guild_id, *self.other_guilds) if self.shard_of(g) == shard_id]
        ready = {
            "v": 10,
            "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": str(g), "unavailable": True} for g in guild_ids],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "auth": {},
            "_trace": ["fake"],
        }
        if shard is not None:
            ready["shard"] = shard
        await self._dispatch("READY", ready, shard=shard_id)
        for guild_id in guild_ids:
            guild = self._guild_payload(full=True) if guild_id == self.guild_id else None
            await self._dispatch("GUILD_CREATE", guild or self._other_guild_payload(guild_id), shard=shard_id)
        await self._notify()

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if not self._token_ok(data.get("token")):
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        session = next((s for s in self._sessions.values() if s.id == data.get("session_id")), None)
        if session is None:
            await self._send_raw(ws, {"op": 9, "d": False, "s": None, "t": None})
            return
        seq = int(data.get("seq") or 0)
        async with self._send_lock:
            for frame in session.log:
                if frame["s"] > seq:
                    await self._send_raw(ws, frame)
            session.seq += 1
            resumed = {"op": 0, "t": "RESUMED", "s": session.seq, "d": {"_trace": ["fake"]}}
            session.log.append(resumed)
            await self._send_raw(ws, resumed)
            session.ws = ws
        self.resume_count += 1
        await self._notify()

    async def _request_members(self, data: dict[str, Any]) -> None:
        query = (data.get("query") or "").lower()
        user_ids = {int(u) for u in data.get("user_ids") or []}
        members = [
            self._member_payload(u)
            for u in self._guild_members()
            if (not user_ids or u.id in user_ids) and u.username.lower().startswith(query)
        ]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: dict[str, Any] = {
            "guild_id": str(self.guild_id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        await self._dispatch("GUILD_MEMBERS_CHUNK", chunk)

    # ---------------------------------------------------------------- HTTP plumbing

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # Content-Type must be exactly application/json: discord.py compares the header verbatim, and
        # aiohttp's json_response would append "; charset=utf-8".
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        return web.Response(status=status, body=json.dumps(data).encode(), headers=all_headers)

    def _build_routes(self) -> list[tuple[str, re.Pattern[str], _Handler, bool]]:
        """(method, path pattern, handler, needs the bot token)."""
        app = r"(?P<app_id>\d+)"
        chan = r"(?P<channel_id>\d+)"
        msg = r"(?P<message_id>\d+)"
        guild = r"(?P<guild_id>\d+)"
        token = r"(?P<token>[^/]+)"
        table: list[tuple[str, str, _Handler, bool]] = [
            ("GET", r"/users/@me", self._r_get_me, True),
            ("GET", r"/oauth2/applications/@me", self._r_app_info, True),
            ("GET", r"/applications/@me", self._r_app_info, True),
            ("GET", r"/gateway", self._r_gateway, False),
            ("GET", r"/gateway/bot", self._r_gateway_bot, True),
            ("PUT", rf"/applications/{app}/commands", self._r_put_commands, True),
            ("GET", rf"/applications/{app}/commands", self._r_get_commands, True),
            ("POST", rf"/applications/{app}/commands", self._r_post_command, True),
            ("DELETE", rf"/applications/{app}/commands/(?P<command_id>\d+)", self._r_delete_command, True),
            ("PUT", rf"/applications/{app}/guilds/{guild}/commands", self._r_put_commands, True),
            ("GET", rf"/applications/{app}/guilds/{guild}/commands", self._r_get_commands, True),
            ("POST", rf"/applications/{app}/guilds/{guild}/commands", self._r_post_command, True),
            (
                "DELETE",
                rf"/applications/{app}/guilds/{guild}/commands/(?P<command_id>\d+)",
                self._r_delete_command,
                True,
            ),
            ("POST", rf"/channels/{chan}/messages", self._r_post_message, True),
            ("GET", rf"/channels/{chan}/messages", self._r_list_messages, True),
            ("GET", rf"/channels/{chan}/messages/{msg}", self._r_get_message, True),
            ("PATCH", rf"/channels/{chan}/messages/{msg}", self._r_edit_message, True),
            ("DELETE", rf"/channels/{chan}/messages/{msg}", self._r_delete_message, True),
            ("PUT", rf"/channels/{chan}/messages/{msg}/reactions/[^/]+/@me", self._r_reaction, True),
            ("DELETE", rf"/channels/{chan}/messages/{msg}/reactions/[^/]+/@me", self._r_reaction, True),
            ("POST", rf"/channels/{chan}/typing", self._r_typing, True),
            ("GET", rf"/channels/{chan}", self._r_get_channel, True),
            ("GET", rf"/guilds/{guild}", self._r_get_guild, True),
            ("GET", rf"/guilds/{guild}/channels", self._r_guild_channels, True),
            ("GET", rf"/guilds/{guild}/roles", self._r_guild_roles, True),
            ("GET", rf"/guilds/{guild}/members/(?P<user_id>\d+)", self._r_get_member, True),
            ("POST", r"/users/@me/channels", self._r_create_dm, True),
            ("GET", r"/users/@me/guilds", self._r_my_guilds, True),
            ("GET", r"/users/(?P<user_id>\d+)", self._r_get_user, True),
            (
                "POST",
                r"/interactions/(?P<interaction_id>\d+)/" + token + "/callback",
                self._r_callback,
                False,
            ),
            ("POST", rf"/webhooks/{app}/{token}", self._r_followup, False),
            (
                "GET",
                rf"/webhooks/{app}/{token}/messages/(?P<message_id>@original|\d+)",
                self._r_hook_get,
                False,
            ),
            (
                "PATCH",
                rf"/webhooks/{app}/{token}/messages/(?P<message_id>@original|\d+)",
                self._r_hook_edit,
                False,
            ),
            (
                "DELETE",
                rf"/webhooks/{app}/{token}/messages/(?P<message_id>@original|\d+)",
                self._r_hook_delete,
                False,
            ),
        ]
        return [
            (method, re.compile(pattern + r"/?"), handler, auth) for method, pattern, handler, auth in table
        ]

    async def _read_body(self, request: web.Request) -> tuple[Any, dict[int, FakeAttachment]]:
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            files: dict[int, FakeAttachment] = {}
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                name = part.name or ""
                if name == "payload_json":
                    payload = json.loads(await part.text())
                elif match := re.fullmatch(r"files?\[(\d+)\]|file(\d*)", name):
                    index = int(match.group(1) or match.group(2) or 0)
                    data = bytes(await part.read())
                    filename = part.filename or f"file{index}"
                    files[index] = FakeAttachment(filename, data, _guess_content_type(filename, data))
            return payload, files
        raw = await request.read()
        if not raw:
            return None, {}
        try:
            return json.loads(raw), {}
        except ValueError:
            raise ApiError(400, "The request body contains invalid JSON.", 50109) from None

    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/attachments/"):
            return await self._serve_attachment(request)
        match = re.fullmatch(r"/api(?:/v\d+)?(/.*)", path)
        sub = match.group(1) if match else path
        record = RecordedRequest(request.method, sub, dict(request.query), None, [], time.monotonic())
        self.requests.append(record)
        try:
            body, files = await self._read_body(request)
            record.json = body
            record.files = [files[i] for i in sorted(files)]
            self._check_spec(
                request.method, sub, body, multipart=request.content_type.startswith("multipart/")
            )
            gate = self._upload_gate(sub, record.files)
            if gate is not None and not await self._held(request, record, gate):
                record.status = 499  # client closed the connection: nobody reads an answer
                return web.Response(status=499)
            response = await self._route(
                request, sub, _Request(request.method, sub, dict(request.query), body, files)
            )
        except ApiError as error:
            response = self._json(error.body(), error.status, error.headers)
        except Exception as error:
            # A bug in the fake: answer 400 (not 5xx, which discord.py retries with back-off) and keep it.
            log.exception("fake discord: %s %s crashed", request.method, sub)
            self.internal_errors.append(error)
            response = self._json({"message": f"fake discord crashed: {error!r}", "code": 0}, 400)
        if response.status == 404 and getattr(response, "_fake_unhandled", False):
            self.unhandled.append(record)
        record.status = response.status
        return response

    def _check_spec(self, method: str, path: str, body: Any, *, multipart: bool) -> None:
        """Answer 400 50035, as Discord does, to a body that its route's schema in the spec rejects."""
        if not self.check_spec or body is None:
            return
        violations = discord_spec().check(method, path, body, multipart=multipart, stats=SPEC_STATS)
        if not violations:
            return
        self.spec_violations.extend(violations)
        first = violations[0]
        log.warning("fake discord: %s violates Discord's spec", first)
        raise _form_error(first.field, first.code, first.message)

    async def _route(self, request: web.Request, path: str, req: _Request) -> web.StreamResponse:
        fault = self._take_fault(req.method, path)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status is not None and not fault.apply:
            return self._fault_response(fault)
        for method, pattern, handler, needs_auth in self._routes:
            found = pattern.fullmatch(path)
            if found is None or method != req.method:
                continue
            if needs_auth and not self._token_ok(request.headers.get("Authorization")):
                raise ApiError(401, "401: Unauthorized", 0)
            result = await handler(req, **found.groupdict())
            if fault is not None and fault.status is not None:
                return self._fault_response(fault)
            if isinstance(result, web.StreamResponse):
                return result
            if result is None:
                return web.Response(status=204)
            return self._json(result)
        log.warning("fake discord: unhandled %s %s", req.method, path)
        response = self._json({"message": "404: Not Found", "code": 0}, 404)
        response._fake_unhandled = True  # type: ignore[attr-defined]
        return response

    async def _serve_attachment(self, request: web.Request) -> web.Response:
        match = re.fullmatch(r"/attachments/\d+/(\d+)/[^/]+", request.path)
        attachment = self._cdn.get(int(match.group(1))) if match else None
        self.requests.append(RecordedRequest("GET", request.path, {}, None, [], time.monotonic()))
        if attachment is None:
            self.requests[-1].status = 404
            return web.Response(status=404, text="Not Found")
        self.requests[-1].status = 200
        return web.Response(body=attachment.data, headers={"Content-Type": attachment.content_type})

    # ---------------------------------------------------------------- lookups

    def _channel(self, channel_id: str | int) -> FakeChannel:
        channel = self.channels.get(int(channel_id))
        if channel is None or channel.deleted:
            raise _unknown_channel()
        return channel

    def _message(
        self, channel: FakeChannel, message_id: str | int, *, allow_ephemeral: bool = False
    ) -> FakeMessage:
        message = self.messages.get(int(message_id))
        if (
            message is None
            or message.deleted
            or message.channel_id != channel.id
            or (message.ephemeral and not allow_ephemeral)
        ):
            raise _unknown_message()
        return message

    def _require(self, channel: FakeChannel, permissions: int) -> None:
        if channel.type == 1:
            return
        granted = self.bot_permissions(channel.id)
        if not granted & VIEW_CHANNEL:
            raise _missing_access()
        if granted & permissions != permissions:
            raise _missing_permissions()

    # ---------------------------------------------------------------- validation

    def _check_url(self, path: tuple[str | int, ...], url: Any) -> None:
        if url is None:
            return
        if not isinstance(url, str) or not re.match(r"(https?|attachment)://\S+$", url):
            raise _form_error(path, "URL_TYPE_INVALID_URL", "Not a well formed URL.")

    def _check_length(self, path: tuple[str | int, ...], value: Any, limit: int) -> int:
        if value is None:
            return 0
        text = str(value)
        if len(text) > limit:
            raise _form_error(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")
        return len(text)

    def _check_embed(self, index: int, embed: dict[str, Any]) -> int:
        base: tuple[str | int, ...] = ("embeds", index)
        total = self._check_length((*base, "title"), embed.get("title"), 256)
        total += self._check_length((*base, "description"), embed.get("description"), 4096)
        self._check_url((*base, "url"), embed.get("url"))
        color = embed.get("color")
        if color is not None and not 0 <= int(color) <= 0xFFFFFF:
            raise _form_error((*base, "color"), "NUMBER_TYPE_MAX", "int value should be <= 16777215.")
        fields = embed.get("fields") or []
        if len(fields) > 25:
            raise _form_error((*base, "fields"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        for i, embed_field in enumerate(fields):
            for key, limit in (("name", 256), ("value", 1024)):
                value = embed_field.get(key)
                if value is None or str(value) == "":
                    raise _form_error(
                        (*base, "fields", i, key), "BASE_TYPE_REQUIRED", "This field is required"
                    )
                total += self._check_length((*base, "fields", i, key), value, limit)
        footer = embed.get("footer") or {}
        total += self._check_length((*base, "footer", "text"), footer.get("text"), 2048)
        self._check_url((*base, "footer", "icon_url"), footer.get("icon_url"))
        author = embed.get("author") or {}
        total += self._check_length((*base, "author", "name"), author.get("name"), 256)
        self._check_url((*base, "author", "url"), author.get("url"))
        self._check_url((*base, "author", "icon_url"), author.get("icon_url"))
        for key in ("image", "thumbnail"):
            media = embed.get(key)
            if media is not None:
                self._check_url((*base, key, "url"), media.get("url"))
        return total

    def _check_component(
        self, path: tuple[str | int, ...], component: dict[str, Any], seen: set[str]
    ) -> None:
        ctype = component.get("type")
        custom_id = component.get("custom_id")
        if ctype == 2:
            style = component.get("style")
            if style == 5:
                if not component.get("url") or custom_id is not None:
                    raise _form_error(
                        path, "BUTTON_COMPONENT_INVALID_URL", "Link buttons need a url, not a custom_id"
                    )
                self._check_url((*path, "url"), component.get("url"))
            elif style != 6 and not custom_id:
                raise _form_error((*path, "custom_id"), "BASE_TYPE_REQUIRED", "This field is required")
            self._check_length((*path, "label"), component.get("label"), 80)
        elif ctype in _SELECT_TYPES:
            if not custom_id:
                raise _form_error((*path, "custom_id"), "BASE_TYPE_REQUIRED", "This field is required")
            options = component.get("options") or []
            if len(options) > 25:
                raise _form_error(
                    (*path, "options"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
                )
            self._check_length((*path, "placeholder"), component.get("placeholder"), 150)
        if custom_id is not None:
            if not 1 <= len(str(custom_id)) <= 100:
                raise _form_error(
                    (*path, "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            if custom_id in seen:
                raise _form_error(
                    (*path, "custom_id"),
                    "COMPONENT_CUSTOM_ID_DUPLICATED",
                    "Component custom id cannot be duplicated",
                )
            seen.add(custom_id)

    def _check_components(self, components: Any, flags: int) -> None:
        if not components:
            return
        seen: set[str] = set()
        if flags & FLAG_COMPONENTS_V2:
            every = list(_walk_components(components))
            if len(every) > 40:
                raise _form_error(("components",), "BASE_TYPE_MAX_LENGTH", "Must be 40 or fewer in length.")
            for i, component in enumerate(every):
                self._check_component(("components", i), component, seen)
            return
        if len(components) > 5:
            raise _form_error(("components",), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
        for i, row in enumerate(components):
            if row.get("type") != 1:
                raise _form_error(
                    ("components", i, "type"),
                    "UNION_TYPE_CHOICES",
                    'Value of field "type" must be one of (1,).',
                )
            children = row.get("components") or []
            if not children:
                raise _form_error(
                    ("components", i, "components"), "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length."
                )
            if len(children) > 5:
                raise _form_error(
                    ("components", i, "components"), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."
                )
            if len(children) > 1 and any(c.get("type") in _SELECT_TYPES for c in children):
                raise _form_error(
                    ("components", i, "components"),
                    "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                    "The specified component exceeds the maximum width",
                )
            for j, child in enumerate(children):
                self._check_component(("components", i, "components", j), child, seen)

    def _validate_payload(self, payload: dict[str, Any], files: dict[int, FakeAttachment]) -> None:
        content = payload.get("content")
        if content is not None and not isinstance(content, str):
            raise _form_error(("content",), "BASE_TYPE_STRING", "Must be a string.")
        self._check_length(("content",), content, 2000)
        embeds = payload.get("embeds")
        if embeds:
            if len(embeds) > 10:
                raise _form_error(("embeds",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
            total = sum(self._check_embed(i, embed) for i, embed in enumerate(embeds))
            if total > 6000:
                raise _form_error(
                    ("embeds",), "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"
                )
        flags = int(payload.get("flags") or 0)
        if flags & FLAG_COMPONENTS_V2 and (payload.get("content") or payload.get("embeds")):
            raise _form_error(
                ("content",),
                "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                "The 'content' and 'embeds' fields cannot be used when using MessageFlags.IS_COMPONENTS_V2",
            )
        self._check_components(payload.get("components"), flags)
        for attachment in files.values():
            if len(attachment.data) > self.attachment_limit:
                raise ApiError(413, "Request entity too large", 40005)
        if len(files) > 10:
            raise _form_error(("files",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")

    def _normalize_embeds(
        self,
        embeds: list[dict[str, Any]] | None,
        channel_id: int,
        attachments: list[tuple[int, FakeAttachment]],
    ) -> list[dict[str, Any]]:
        by_name = {att.filename: (aid, att) for aid, att in attachments}
        result = []
        for embed in embeds or []:
            embed = {"type": "rich", **embed}
            for key in ("image", "thumbnail"):
                media = embed.get(key)
                url = (media or {}).get("url") or ""
                if url.startswith("attachment://") and url[len("attachment://") :] in by_name:
                    aid, att = by_name[url[len("attachment://") :]]
                    resolved = self._attachment_url(channel_id, aid, att.filename)
                    embed[key] = {**media, "url": resolved, "proxy_url": resolved}
            result.append(embed)
        return result

    @staticmethod
    def _normalize_components(components: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Copy the components, numbering those without an ``id`` as Discord does."""
        copied: list[dict[str, Any]] = json.loads(json.dumps(components or []))
        used = {c["id"] for c in _walk_components(copied) if isinstance(c.get("id"), int)}
        next_id = 1
        for component in _walk_components(copied):
            if component.get("id") is None:
                while next_id in used:
                    next_id += 1
                component["id"] = next_id
                used.add(next_id)
        return copied

    def _resolve_attachments(
        self,
        listed: list[dict[str, Any]] | None,
        files: dict[int, FakeAttachment],
        existing: list[tuple[int, FakeAttachment]],
    ) -> list[tuple[int, FakeAttachment]]:
        """Apply the ``attachments`` list: keep listed existing ids, add uploaded ``files[n]``."""
        existing_by_id = dict(existing)
        result: list[tuple[int, FakeAttachment]] = []
        used: set[int] = set()
        if listed is None:
            result = list(existing)
        else:
            for i, entry in enumerate(listed):
                try:
                    attachment_id = int(entry.get("id"))
                except (TypeError, ValueError):
                    raise _form_error(
                        ("attachments", i, "id"), "NUMBER_TYPE_COERCE", "Not a snowflake."
                    ) from None
                if attachment_id in existing_by_id:
                    result.append((attachment_id, existing_by_id[attachment_id]))
                elif attachment_id in files and attachment_id not in used:
                    upload = files[attachment_id]
                    filename = entry.get("filename") or upload.filename
                    attachment = FakeAttachment(
                        filename, upload.data, _guess_content_type(filename, upload.data)
                    )
                    result.append((self._snowflake(), attachment))
                    used.add(attachment_id)
                else:
                    raise _form_error(
                        ("attachments", i, "id"),
                        "ATTACHMENT_NOT_FOUND",
                        f"Unknown attachment id {attachment_id}",
                    )
        for index in sorted(files):
            if index not in used:
                result.append((self._snowflake(), files[index]))
        if len(result) > 10:
            raise _form_error(("attachments",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        return result

    @staticmethod
    def _is_empty(message: FakeMessage) -> bool:
        return not (message.content or message.embeds or message.attachments or message.components)

    # ---------------------------------------------------------------- message operations

    async def _create_message(
        self,
        channel: FakeChannel,
        *,
        author: FakeUser,
        payload: dict[str, Any],
        files: dict[int, FakeAttachment],
        interaction: FakeInteraction | None = None,
        extra_flags: int = 0,
        allow_empty: bool = False,
    ) -> FakeMessage:
        self._validate_payload(payload, files)
        nonce = payload.get("nonce")
        nonce_key = (channel.id, author.id, str(nonce))
        if nonce is not None and payload.get("enforce_nonce"):
            previous = self._nonces.get(nonce_key)
            if previous is not None and time.monotonic() - previous[1] < 300:
                return self.messages[previous[0]]
        reference_id = None
        reference = payload.get("message_reference")
        if reference and reference.get("message_id") is not None:
            target = self.messages.get(_as_int(reference["message_id"], "message_reference"))
            ref_channel = int(reference.get("channel_id") or channel.id)
            if target is None or target.deleted or target.ephemeral or target.channel_id != ref_channel:
                if reference.get("fail_if_not_exists", True):
                    raise _form_error(
                        ("message_reference",), "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                    )
            else:
                reference_id = target.id
        flags = int(payload.get("flags") or 0)
        flags &= FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
        flags |= extra_flags
        attachments = self._resolve_attachments(payload.get("attachments"), files, [])
        message = FakeMessage(
            id=self._snowflake(),
            channel_id=channel.id,
            author_id=author.id,
            content=payload.get("content") or "",
            embeds=self._normalize_embeds(payload.get("embeds"), channel.id, attachments),
            components=self._normalize_components(payload.get("components")),
            attachments=[att for _, att in attachments],
            attachment_ids=[aid for aid, _ in attachments],
            reference_id=reference_id,
            flags=flags,
            nonce=nonce,
            interaction_id=interaction.id if interaction is not None else None,
            webhook_id=self.application_id if interaction is not None else None,
            tts=bool(payload.get("tts")),
        )
        if not allow_empty and self._is_empty(message):
            raise ApiError(400, "Cannot send an empty message", 50006)
        self._cdn.update(attachments)
        self.messages[message.id] = message
        if nonce is not None:
            self._nonces[nonce_key] = (message.id, time.monotonic())
        await self._announce("MESSAGE_CREATE", message)
        return message

    async def _announce(self, event: str, message: FakeMessage) -> None:
        """Send a MESSAGE_* event for a non-ephemeral message and wake waiters."""
        if not message.ephemeral:
            channel = self.channels.get(message.channel_id)
            intent = (
                INTENT_DIRECT_MESSAGES if channel is not None and channel.type == 1 else INTENT_GUILD_MESSAGES
            )
            if event == "MESSAGE_DELETE":
                data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
                if channel is not None and channel.type != 1:
                    data["guild_id"] = str(self.guild_id)
            else:
                data = self._message_payload(message, gateway=True)
                if message.author_id != self.bot_user.id and not self._sees_content():
                    data.update(content="", embeds=[], attachments=[], components=[])
            await self._dispatch(event, data, intent=intent)
        await self._notify()

    def _sees_content(self) -> bool:
        session = self._session
        return session is None or session.intents is None or bool(session.intents & INTENT_MESSAGE_CONTENT)

    async def _edit_message(
        self, message: FakeMessage, payload: dict[str, Any], files: dict[int, FakeAttachment]
    ) -> None:
        self._validate_payload(payload, files)
        existing = list(zip(message.attachment_ids, message.attachments, strict=True))
        attachments = self._resolve_attachments(payload.get("attachments"), files, existing)
        content = (payload["content"] or "") if "content" in payload else message.content
        embeds = (
            self._normalize_embeds(payload["embeds"], message.channel_id, attachments)
            if "embeds" in payload
            else message.embeds
        )
        components = (
            self._normalize_components(payload["components"])
            if "components" in payload
            else message.components
        )
        if not (content or embeds or components or attachments):
            raise ApiError(400, "Cannot send an empty message", 50006)
        snapshot = message.snapshot()
        was_loading = message.loading
        message.content, message.embeds, message.components = content, embeds, components
        if payload.get("flags") is not None:
            toggled = int(payload["flags"]) & FLAG_SUPPRESS_EMBEDS
            message.flags = (message.flags & ~FLAG_SUPPRESS_EMBEDS) | toggled
        message.attachments = [att for _, att in attachments]
        message.attachment_ids = [aid for aid, _ in attachments]
        self._cdn.update(attachments)
        if was_loading:
            # Filling a deferred "thinking" placeholder is not an edit.
            message.flags &= ~FLAG_LOADING
        else:
            message.history.append(snapshot)
            message.edited_at = datetime.now(UTC)
        await self._announce("MESSAGE_UPDATE", message)

    async def _delete_message(self, message: FakeMessage) -> None:
        message.deleted = True
        await self._announce("MESSAGE_DELETE", message)

    async def user_message(
        self,
        content: str,
        *,
        user: FakeUser | int | str | None = None,
        channel_id: int | None = None,
        files: list[tuple[str, bytes]] | None = None,
        reference: int | None = None,
    ) -> FakeMessage:
        """A member posts a message (MESSAGE_CREATE; content blanked without the MESSAGE_CONTENT intent)."""
        author = self._user(user)
        channel = self._channel(channel_id or self.channel_id)
        uploads = {
            i: FakeAttachment(name, data, _guess_content_type(name, data))
            for i, (name, data) in enumerate(files or [])
        }
        payload: dict[str, Any] = {"content": content}
        if reference is not None:
            payload["message_reference"] = {"message_id": str(reference)}
        return await self._create_message(channel, author=author, payload=payload, files=uploads)

    # ---------------------------------------------------------------- REST: identity, gateway

    async def _r_get_me(self, req: _Request) -> dict[str, Any]:
        return {
            **self.bot_user.payload(),
            "verified": True,
            "mfa_enabled": False,
            "locale": "en-US",
            "email": None,
        }

    async def _r_app_info(self, req: _Request) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_user.username,
            "description": "",
            "icon": None,
            "rpc_origins": [],
            "bot_public": False,
            "bot_require_code_grant": False,
            "owner": self.owner.payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user.payload(),
            "summary": "",
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "tags": [],
            "approximate_guild_count": 1,
        }

    async def _r_gateway(self, req: _Request) -> dict[str, Any]:
        return {"url": self.gateway_url}

    async def _r_gateway_bot(self, req: _Request) -> dict[str, Any]:
        return {
            "url": self.gateway_url,
            "shards": self.shard_count,
            "session_start_limit": {
                "total": 1000,
                "remaining": 999,
                "reset_after": 86400000,
                "max_concurrency": self.max_concurrency,
            },
        }

    # ---------------------------------------------------------------- REST: application commands

    def _check_app(self, app_id: str) -> None:
        if int(app_id) != self.application_id:
            raise ApiError(403, "Missing Access", 50001)

    def _check_options(
        self, path: tuple[str | int, ...], options: list[dict[str, Any]], depth: int = 0
    ) -> None:
        if len(options) > 25:
            raise _form_error((*path, "options"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        seen_optional = False
        names: set[str] = set()
        for i, option in enumerate(options):
            here = (*path, "options", i)
            name = option.get("name", "")
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
                raise _form_error(
                    (*here, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if name in names:
                raise _form_error(
                    (*here, "name"),
                    "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS",
                    "Option name already exists",
                )
            names.add(name)
            if not 1 <= len(option.get("description", "")) <= 100:
                raise _form_error(
                    (*here, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            if len(option.get("choices") or []) > 25:
                raise _form_error(
                    (*here, "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
                )
            if option.get("type") in (1, 2):
                if depth >= 2 or (option["type"] == 2 and depth >= 1):
                    raise _form_error((*here, "type"), "APPLICATION_COMMAND_OPTION_TYPE_INVALID", "Too deep")
                self._check_options(here, option.get("options") or [], depth + 1)
                continue
            if option.get("required"):
                if seen_optional:
                    raise _form_error(
                        (*here, "required"),
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be placed before non-required options",
                    )
            else:
                seen_optional = True

    def _store_commands(
        self, body: Any, existing: list[dict[str, Any]], guild_id: int | None
    ) -> list[dict[str, Any]]:
        if not isinstance(body, list):
            raise _form_error((), "BASE_TYPE_ARRAY", "Must be an array.")
        if len(body) > 100:
            raise _form_error((), "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        seen: set[tuple[int, str]] = set()
        stored = []
        for i, command in enumerate(body):
            stored.append(self._command_record((i,), command, existing, guild_id, seen))
        return stored

    def _command_record(
        self,
        path: tuple[str | int, ...],
        command: dict[str, Any],
        existing: list[dict[str, Any]],
        guild_id: int | None,
        seen: set[tuple[int, str]],
    ) -> dict[str, Any]:
        ctype = int(command.get("type", 1))
        name = command.get("name", "")
        if ctype == 1 and (not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower()):
            raise _form_error((*path, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if not 1 <= len(name) <= 32:
            raise _form_error((*path, "name"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")
        if (ctype, name) in seen:
            raise _form_error(
                (*path, "name"),
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                f"Application command names must be unique: {name}",
            )
        seen.add((ctype, name))
        description = command.get("description") or ""
        if ctype == 1 and not 1 <= len(description) <= 100:
            raise _form_error(
                (*path, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        self._check_options(path, command.get("options") or [])
        previous = next((c for c in existing if c["name"] == name and c.get("type", 1) == ctype), None)
        record = {
            **command,
            "id": previous["id"] if previous else str(self._snowflake()),
            "application_id": str(self.application_id),
            "version": str(self._snowflake()),
            "type": ctype,
            "name": name,
            "description": description,
            "options": command.get("options") or [],
            "default_member_permissions": command.get("default_member_permissions"),
            "nsfw": bool(command.get("nsfw", False)),
        }
        if guild_id is not None:
            record["guild_id"] = str(guild_id)
        return record

    async def _r_put_commands(
        self, req: _Request, app_id: str, guild_id: str | None = None
    ) -> list[dict[str, Any]]:
        self._check_app(app_id)
        if guild_id is not None:
            if int(guild_id) != self.guild_id:
                raise _unknown("Guild", 10004)
            gid = int(guild_id)
            self.guild_commands[gid] = self._store_commands(req.json, self.guild_commands.get(gid, []), gid)
            return self.guild_commands[gid]
        self.commands = self._store_commands(req.json, self.commands, None)
        return self.commands

    async def _r_get_commands(
        self, req: _Request, app_id: str, guild_id: str | None = None
    ) -> list[dict[str, Any]]:
        self._check_app(app_id)
        if guild_id is not None:
            return self.guild_commands.get(int(guild_id), [])
        return self.commands

    async def _r_post_command(
        self, req: _Request, app_id: str, guild_id: str | None = None
    ) -> dict[str, Any]:
        self._check_app(app_id)
        current = self.guild_commands.setdefault(int(guild_id), []) if guild_id else self.commands
        if not isinstance(req.json, dict):
            raise _form_error((), "BASE_TYPE_DICT", "Must be an object.")
        record = self._command_record((), req.json, current, int(guild_id) if guild_id else None, set())
        current[:] = [c for c in current if c["id"] != record["id"]] + [record]
        return record

    async def _r_delete_command(
        self, req: _Request, app_id: str, command_id: str, guild_id: str | None = None
    ) -> None:
        self._check_app(app_id)
        current = self.guild_commands.get(int(guild_id), []) if guild_id else self.commands
        if not any(c["id"] == command_id for c in current):
            raise _unknown("application command", 10063)
        current[:] = [c for c in current if c["id"] != command_id]

    # ---------------------------------------------------------------- REST: channels and messages

    async def _r_post_message(self, req: _Request, channel_id: str) -> dict[str, Any]:
        channel = self._channel(channel_id)
        payload = req.json or {}
        if channel.type == 1:
            if channel.recipient_id in self._dm_blocked:
                raise ApiError(403, "Cannot send messages to this user", 50007)
        else:
            self._require(channel, SEND_MESSAGES | (ATTACH_FILES if req.files else 0))
        message = await self._create_message(channel, author=self.bot_user, payload=payload, files=req.files)
        return self._message_payload(message)

    async def _r_list_messages(self, req: _Request, channel_id: str) -> list[dict[str, Any]]:
        channel = self._channel(channel_id)
        self._require(channel, READ_MESSAGE_HISTORY)
        limit = max(1, min(int(req.query.get("limit", 50)), 100))
        visible = self.channel_messages(channel.id, include_ephemeral=False)
        if "before" in req.query:
            before = int(req.query["before"])
            chosen = [m for m in visible if m.id < before][-limit:]
        elif "after" in req.query:
            after = int(req.query["after"])
            chosen = [m for m in visible if m.id > after][:limit]
        elif "around" in req.query:
            around = int(req.query["around"])
            older = [m for m in visible if m.id < around]
            newer = [m for m in visible if m.id >= around]
            half = limit // 2
            chosen = older[-(limit - min(half, len(newer))) :] + newer[: max(half, limit - len(older))]
            chosen = chosen[-limit:]
        else:
            chosen = visible[-limit:]
        return [self._message_payload(m) for m in reversed(chosen)]

    async def _r_get_message(self, req: _Request, channel_id: str, message_id: str) -> dict[str, Any]:
        channel = self._channel(channel_id)
        self._require(channel, READ_MESSAGE_HISTORY)
        return self._message_payload(self._message(channel, message_id))

    async def _r_edit_message(self, req: _Request, channel_id: str, message_id: str) -> dict[str, Any]:
        channel = self._channel(channel_id)
        message = self._message(channel, message_id)
        if message.author_id != self.bot_user.id:
            raise ApiError(403, "Cannot edit a message authored by another user", 50005)
        if req.files:
            self._require(channel, ATTACH_FILES)
        await self._edit_message(message, req.json or {}, req.files)
        return self._message_payload(message)

    async def _r_delete_message(self, req: _Request, channel_id: str, message_id: str) -> None:
        channel = self._channel(channel_id)
        message = self._message(channel, message_id)
        if message.author_id != self.bot_user.id:
            self._require(channel, MANAGE_MESSAGES)
        await self._delete_message(message)

    async def _r_reaction(self, req: _Request, channel_id: str, message_id: str) -> None:
        channel = self._channel(channel_id)
        self._message(channel, message_id)
        self._require(channel, ADD_REACTIONS | READ_MESSAGE_HISTORY)

    async def _r_typing(self, req: _Request, channel_id: str) -> None:
        self._channel(channel_id)

    async def _r_my_guilds(self, req: _Request) -> list[dict[str, Any]]:
        return [
            {
                "id": str(self.guild_id),
                "name": self.guild_name,
                "icon": None,
                "banner": None,
                "owner": False,
                "permissions": str(self.everyone_permissions),
                "features": [],
            }
        ]

    async def _r_get_channel(self, req: _Request, channel_id: str) -> dict[str, Any]:
        return self._channel_payload(self._channel(channel_id))

    def _check_guild(self, guild_id: str) -> None:
        if int(guild_id) != self.guild_id:
            raise _unknown("Guild", 10004)

    async def _r_get_guild(self, req: _Request, guild_id: str) -> dict[str, Any]:
        self._check_guild(guild_id)
        data = self._guild_payload(full=False)
        data.update(approximate_member_count=len(self._guild_members()), approximate_presence_count=0)
        return data

    async def _r_guild_channels(self, req: _Request, guild_id: str) -> list[dict[str, Any]]:
        self._check_guild(guild_id)
        return [self._channel_payload(c) for c in self.channels.values() if c.type != 1 and not c.deleted]

    async def _r_guild_roles(self, req: _Request, guild_id: str) -> list[dict[str, Any]]:
        self._check_guild(guild_id)
        return list(self.roles.values())

    async def _r_get_member(self, req: _Request, guild_id: str, user_id: str) -> dict[str, Any]:
        self._check_guild(guild_id)
        user = self.users.get(int(user_id))
        if user is None:
            raise _unknown("Member", 10007)
        return self._member_payload(user)

    async def _r_get_user(self, req: _Request, user_id: str) -> dict[str, Any]:
        user = self.users.get(int(user_id))
        if user is None:
            raise _unknown("User", 10013)
        return user.payload()

    async def _r_create_dm(self, req: _Request) -> dict[str, Any]:
        recipient = (req.json or {}).get("recipient_id")
        user = self.users.get(_as_int(recipient, "recipient_id"))
        if user is None:
            raise _unknown("User", 10013)
        for channel in self.channels.values():
            if channel.type == 1 and channel.recipient_id == user.id:
                return self._channel_payload(channel)
        channel = FakeChannel(self._snowflake(), "", type=1, recipient_id=user.id)
        self.channels[channel.id] = channel
        return self._channel_payload(channel)

    # ---------------------------------------------------------------- interactions: driving

    async def _send_interaction(
        self,
        itype: int,
        data: dict[str, Any],
        user: FakeUser,
        channel: FakeChannel,
        message: FakeMessage | None = None,
    ) -> FakeInteraction:
        if self._session is None:
            raise RuntimeError("no bot has identified on the gateway yet")
        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        channel_payload = self._channel_payload(channel)
        channel_payload["permissions"] = str(self.member_permissions(user, channel.id))
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": itype,
            "token": token,
            "version": 1,
            "data": data,
            "guild_id": str(self.guild_id),
            "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(channel.id),
            "channel": channel_payload,
            "member": self._member_payload(user, channel_id=channel.id, permissions=True),
            "app_permissions": str(self.bot_permissions(channel.id)),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            "attachment_size_limit": self.attachment_limit,
        }
        if message is not None:
            payload["message"] = self._message_payload(message)
        interaction = FakeInteraction(
            self,
            id=interaction_id,
            token=token,
            type=itype,
            channel_id=channel.id,
            user_id=user.id,
            payload=payload,
            message_id=message.id if message is not None else None,
        )
        self.interactions[interaction_id] = interaction
        self._by_token[token] = interaction
        await self._dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _interaction_channel(self, channel_id: int | None) -> FakeChannel:
        channel = self.channels.get(channel_id or self.channel_id)
        if channel is None or channel.deleted or channel.type == 1:
            raise ValueError(f"no guild text channel {channel_id}")
        return channel

    async def slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser | int | str | None = None,
        channel_id: int | None = None,
        subcommand: str | None = None,
        validate: bool = True,
    ) -> FakeInteraction:
        """A member runs ``/name [subcommand] options...`` (INTERACTION_CREATE type 2).

        ``validate=False`` sends what a modified client could: no check of required options,
        choices, min/max, lengths, ``default_member_permissions`` or nsfw (types still follow the schema).
        """
        member = self._user(user)
        channel = self._interaction_channel(channel_id)
        command = self.find_command(name)
        schema: list[dict[str, Any]] | None = None
        if command is not None:
            required = command.get("default_member_permissions")
            if (
                validate
                and required is not None
                and self.member_permissions(member, channel.id) & int(required) != int(required)
            ):
                raise ValueError(
                    f"{member.username} cannot see /{name} (default_member_permissions={required})"
                )
            if validate and command.get("nsfw") and not channel.nsfw:
                raise ValueError(f"/{name} is age-restricted and #{channel.name} is not")
            schema = command.get("options") or []
        path = subcommand.split() if subcommand else []
        containers: list[tuple[str, int]] = []
        for depth, part in enumerate(path):
            if schema is not None:
                spec = next((o for o in schema if o["name"] == part and o.get("type") in (1, 2)), None)
                if spec is None:
                    raise ValueError(f"/{name} has no subcommand {part!r}")
                containers.append((part, spec["type"]))
                schema = spec.get("options") or []
            else:
                containers.append((part, 1 if depth == len(path) - 1 else 2))
        if schema is not None and any(o.get("type") in (1, 2) for o in schema):
            raise ValueError(f"/{name} {subcommand or ''} needs a subcommand".replace("  ", " "))
        resolved: dict[str, dict[str, Any]] = {}
        built = self._build_options(schema, options or {}, resolved, channel, validate=validate)
        for part, ptype in reversed(containers):
            built = [{"type": ptype, "name": part, "options": built}]
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._snowflake()),
            "name": name,
            "type": 1,
            "options": built,
        }
        if resolved:
            data["resolved"] = resolved
        if command is not None and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._send_interaction(2, data, member, channel)

    async def autocomplete(
        self,
        name: str,
        focused: str,
        typed: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser | int | str | None = None,
        channel_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """A member types ``typed`` into option ``focused`` of ``/name`` (INTERACTION_CREATE type 4,
        APPLICATION_COMMAND_AUTOCOMPLETE); returns the choices the bot answered (callback type 8).

        Discord sends the options filled so far, unvalidated, with the focused one as a string.
        """
        member = self._user(user)
        channel = self._interaction_channel(channel_id)
        command = self.find_command(name)
        if command is None:
            raise ValueError(f"no command /{name} synced")
        spec = next((o for o in command.get("options") or [] if o["name"] == focused), None)
        if spec is None or not spec.get("autocomplete"):
            raise ValueError(f"/{name} option {focused!r} has no autocomplete")
        built = [
            {"type": self._infer_option_type(value), "name": key, "value": value}
            for key, value in (options or {}).items()
        ]
        built.append({"type": spec["type"], "name": focused, "value": typed, "focused": True})
        data = {"id": command["id"], "name": name, "type": 1, "options": built}
        interaction = await self._send_interaction(4, data, member, channel)
        response = await interaction.wait_response()
        if response.type != 8:
            raise AssertionError(f"autocomplete answered with callback type {response.type}")
        return list((response.data or {}).get("choices") or [])

    async def context_menu(
        self,
        name: str,
        message_id: int,
        *,
        user: FakeUser | int | str | None = None,
    ) -> FakeInteraction:
        """A member uses the message command ``name`` on a message (right-click > Apps):
        INTERACTION_CREATE type 2 with ``data.type`` 3, ``target_id`` and ``resolved.messages``."""
        member = self._user(user)
        message = self.messages.get(int(message_id))
        if message is None or message.deleted:
            raise ValueError(f"no message {message_id}")
        command = next(
            (
                c
                for c in [*self.commands, *self.guild_commands.get(self.guild_id, [])]
                if c["name"] == name and c.get("type") == 3
            ),
            None,
        )
        if command is None:
            raise ValueError(f"no message command {name!r} synced")
        channel = self._interaction_channel(message.channel_id)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": str(message.id),
            "resolved": {"messages": {str(message.id): self._message_payload(message)}},
        }
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._send_interaction(2, data, member, channel)

    @staticmethod
    def _infer_option_type(value: Any) -> int:
        if isinstance(value, bool):
            return 5
        if isinstance(value, int):
            return 4
        if isinstance(value, float):
            return 10
        if isinstance(value, FakeUser):
            return 6
        if isinstance(value, FakeChannel):
            return 7
        if isinstance(value, bytes | bytearray | FakeAttachment | tuple):
            return 11
        return 3

    def _build_options(
        self,
        schema: list[dict[str, Any]] | None,
        values: dict[str, Any],
        resolved: dict[str, dict[str, Any]],
        channel: FakeChannel,
        *,
        validate: bool = True,
    ) -> list[dict[str, Any]]:
        specs = {o["name"]: o for o in schema or []}
        built = []
        for name, value in values.items():
            if schema is not None and name not in specs:
                raise ValueError(f"no option {name!r}; the command has {sorted(specs)}")
            spec = specs.get(name, {})
            otype = spec.get("type") or self._infer_option_type(value)
            built.append(
                {
                    "name": name,
                    "type": otype,
                    "value": self._option_value(
                        name, otype, value, spec, resolved, channel, validate=validate
                    ),
                }
            )
        if schema is not None and validate:
            missing = [o["name"] for o in schema if o.get("required") and o["name"] not in values]
            if missing:
                raise ValueError(f"missing required options {missing}")
        return built

    def _option_value(
        self,
        name: str,
        otype: int,
        value: Any,
        spec: dict[str, Any],
        resolved: dict[str, dict[str, Any]],
        channel: FakeChannel,
        *,
        validate: bool = True,
    ) -> Any:
        kind = _OPTION_TYPE_NAMES.get(otype, str(otype))
        if otype == 3:
            if not isinstance(value, str):
                raise ValueError(f"option {name!r} is a {kind}, got {value!r}")
            if validate and (
                len(value) < int(spec.get("min_length") or 0)
                or len(value) > int(spec.get("max_length") or 6000)
            ):
                raise ValueError(f"option {name!r}: length {len(value)} outside the allowed range")
        elif otype in (4, 10):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (otype == 4 and not isinstance(value, int))
            ):
                raise ValueError(f"option {name!r} is a {kind}, got {value!r}")
            if validate and spec.get("min_value") is not None and value < spec["min_value"]:
                raise ValueError(f"option {name!r}: {value} < min_value {spec['min_value']}")
            if validate and spec.get("max_value") is not None and value > spec["max_value"]:
                raise ValueError(f"option {name!r}: {value} > max_value {spec['max_value']}")
        elif otype == 5:
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} is a {kind}, got {value!r}")
        elif otype == 6 or (otype == 9 and (isinstance(value, FakeUser | str) or int(value) in self.users)):
            user = self._user(value)
            resolved.setdefault("users", {})[str(user.id)] = user.payload()
            resolved.setdefault("members", {})[str(user.id)] = self._member_payload(
                user, with_user=False, channel_id=channel.id, permissions=True
            )
            return str(user.id)
        elif otype in (8, 9):
            role = self.roles.get(int(value))
            if role is None:
                raise ValueError(f"option {name!r}: no role {value}")
            resolved.setdefault("roles", {})[str(role["id"])] = role
            return str(role["id"])
        elif otype == 7:
            target = value if isinstance(value, FakeChannel) else self.channels.get(int(value))
            if target is None or target.deleted:
                raise ValueError(f"option {name!r}: no channel {value}")
            data = self._channel_payload(target)
            data["permissions"] = str(self.member_permissions(self.alice, target.id))
            resolved.setdefault("channels", {})[str(target.id)] = data
            return str(target.id)
        elif otype == 11:
            attachment = self._upload_from(value)
            attachment_id = self._snowflake()
            self._cdn[attachment_id] = attachment
            resolved.setdefault("attachments", {})[str(attachment_id)] = self._attachment_payload(
                channel.id, attachment_id, attachment, ephemeral=True
            )
            return str(attachment_id)
        else:
            raise ValueError(f"option {name!r}: unsupported option type {otype}")
        choices = spec.get("choices")
        if validate and choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {name!r}: {value!r} is not one of {[c['value'] for c in choices]}")
        return value

    @staticmethod
    def _upload_from(value: Any) -> FakeAttachment:
        if isinstance(value, FakeAttachment):
            return value
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
            filename = "upload.png" if data.startswith(b"\x89PNG") else "upload.bin"
            return FakeAttachment(filename, data, _guess_content_type(filename, data))
        if isinstance(value, tuple) and len(value) in (2, 3):
            filename, data = value[0], bytes(value[1])
            content_type = value[2] if len(value) == 3 else _guess_content_type(filename, data)
            return FakeAttachment(filename, data, content_type)
        raise ValueError(f"cannot make an attachment of {value!r}")

    async def click(
        self,
        message_id: int,
        custom_id: str,
        *,
        user: FakeUser | int | str | None = None,
        values: list[str] | None = None,
        validate: bool = True,
    ) -> FakeInteraction:
        """A member uses a component of a message (INTERACTION_CREATE type 3).

        ``validate=False`` forges the press the way a modified client could: any ``custom_id``
        (sent as a button) on any message the fake knows, deleted or not.
        """
        message = self.messages.get(int(message_id))
        if message is None or (message.deleted and validate):
            raise ValueError(f"no message {message_id}")
        component = next(
            (c for c in _walk_components(message.components) if c.get("custom_id") == custom_id), None
        )
        if component is None and not validate:
            component = {"type": 2, "custom_id": custom_id}
        if component is None:
            raise ValueError(
                f"message {message_id} has no component {custom_id!r}; buttons: {message.buttons()}"
            )
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if component.get("id") is not None:
            data["id"] = component["id"]
        if component["type"] in _SELECT_TYPES:
            data["values"] = list(values or [])
        channel = self._channel(message.channel_id)
        return await self._send_interaction(3, data, self._user(user), channel, message)

    async def submit_modal(
        self,
        interaction: FakeInteraction,
        values: dict[str, str],
        *,
        user: FakeUser | int | str | None = None,
    ) -> FakeInteraction:
        """A member fills in the modal the bot answered ``interaction`` with (INTERACTION_CREATE type 5)."""
        modal = interaction.modal
        if modal is None:
            raise ValueError(f"{interaction!r} was not answered with a modal")
        inputs = {c["custom_id"]: c for c in _walk_components(modal.get("components")) if c.get("type") == 4}
        unknown = set(values) - set(inputs)
        if unknown:
            raise ValueError(f"the modal has no inputs {sorted(unknown)}; it has {sorted(inputs)}")
        missing = [cid for cid, c in inputs.items() if c.get("required", True) and cid not in values]
        if missing:
            raise ValueError(f"required modal inputs missing: {missing}")
        rows = []
        for component in modal.get("components") or []:
            inner = component.get("component") if component.get("type") == 18 else None
            children = [inner] if inner else component.get("components") or []
            submitted = [
                {
                    "type": 4,
                    "id": c.get("id"),
                    "custom_id": c["custom_id"],
                    "value": values.get(c["custom_id"], ""),
                }
                for c in children
                if c.get("type") == 4
            ]
            if not submitted:
                continue
            if component.get("type") == 18:
                rows.append({"type": 18, "id": component.get("id"), "component": submitted[0]})
            else:
                rows.append({"type": 1, "id": component.get("id"), "components": submitted})
        data = {"custom_id": modal["custom_id"], "components": rows}
        message = self.messages.get(interaction.message_id) if interaction.message_id else None
        member = self._user(user if user is not None else interaction.user_id)
        return await self._send_interaction(5, data, member, self._channel(interaction.channel_id), message)

    # ---------------------------------------------------------------- interactions: REST side

    def _webhook_interaction(self, app_id: str, token: str) -> FakeInteraction:
        if int(app_id) != self.application_id:
            raise _unknown_webhook()
        interaction = self._by_token.get(token)
        if (
            interaction is None
            or interaction.expired
            or time.monotonic() - interaction.created > self.token_ttl
        ):
            raise ApiError(401, "Invalid Webhook Token", 50027)
        return interaction

    @contextlib.contextmanager
    def _recording_errors(self, interaction: FakeInteraction, path: str) -> Iterator[None]:
        try:
            yield
        except ApiError as error:
            interaction.errors.append((path, error.status, error.body()))
            raise

    async def _r_callback(self, req: _Request, interaction_id: str, token: str) -> Any:
        interaction = self.interactions.get(int(interaction_id))
        if interaction is None or interaction.token != token:
            raise _unknown("interaction", 10062)
        with self._recording_errors(interaction, req.path):
            return await self._callback(req, interaction)

    async def _callback(self, req: _Request, interaction: FakeInteraction) -> Any:
        if interaction.responses:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        deadline = self.interaction_deadline
        if deadline is not None and time.monotonic() - interaction.created > deadline:
            raise _unknown("interaction", 10062)
        body = req.json or {}
        rtype = body.get("type")
        data = body.get("data")
        channel = self._channel(interaction.channel_id)
        component_message = self.messages.get(interaction.message_id) if interaction.message_id else None
        message: FakeMessage | None = None
        if rtype in (6, 7) and interaction.type not in (3, 5):
            raise _form_error(
                ("type",), "INTERACTION_RESPONSE_TYPE_INVALID", "Interaction response type is invalid"
            )
        if rtype in (6, 7) and (component_message is None or component_message.deleted):
            raise _unknown_message()
        if rtype == 4:
            extra = int((data or {}).get("flags") or 0) & FLAG_EPHEMERAL
            message = await self._create_message(
                channel,
                author=self.bot_user,
                payload=data or {},
                files=req.files,
                interaction=interaction,
                extra_flags=extra,
            )
        elif rtype == 5:
            extra = FLAG_LOADING | (int((data or {}).get("flags") or 0) & FLAG_EPHEMERAL)
            message = await self._create_message(
                channel,
                author=self.bot_user,
                payload={},
                files={},
                interaction=interaction,
                extra_flags=extra,
                allow_empty=True,
            )
        elif rtype == 6:
            message = component_message
        elif rtype == 7 and component_message is not None:
            await self._edit_message(component_message, data or {}, req.files)
            message = component_message
        elif rtype == 9:
            self._check_modal(data or {})
            interaction.modal = data
        elif rtype not in (1, 8):
            raise _form_error(
                ("type",), "INTERACTION_RESPONSE_TYPE_INVALID", f"Invalid response type {rtype}"
            )
        if message is not None:
            interaction.original_message_id = message.id
        interaction.responses.append(
            InteractionResponse(rtype, data, [req.files[i] for i in sorted(req.files)], time.monotonic())
        )
        await self._notify()
        if req.query.get("with_response") not in ("1", "true", "True"):
            return None
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_loading": rtype == 5,
                "response_message_ephemeral": bool(message is not None and message.ephemeral),
            }
        }
        if message is not None:
            answer["interaction"]["response_message_id"] = str(message.id)
        if message is not None and rtype in (4, 5, 7):
            answer["resource"] = {"type": rtype, "message": self._message_payload(message)}
        return answer

    def _check_modal(self, data: dict[str, Any]) -> None:
        self._check_length(("data", "title"), data.get("title"), 45)
        if not data.get("title"):
            raise _form_error(("data", "title"), "BASE_TYPE_REQUIRED", "This field is required")
        custom_id = data.get("custom_id") or ""
        if not 1 <= len(custom_id) <= 100:
            raise _form_error(
                ("data", "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        components = data.get("components") or []
        if not 1 <= len(components) <= 5:
            raise _form_error(
                ("data", "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
            )

    def _hook_message(self, interaction: FakeInteraction, message_id: str) -> FakeMessage:
        if not interaction.responses:
            raise _unknown_webhook()
        if message_id == "@original":
            if interaction.original_message_id is None:
                raise _unknown_message()
            wanted = interaction.original_message_id
        else:
            wanted = int(message_id)
            own = {interaction.original_message_id, *(m.id for m in interaction.followups)}
            if wanted not in own:
                raise _unknown_message()
        message = self.messages.get(wanted)
        if message is None or message.deleted:
            raise _unknown_message()
        return message

    async def _r_followup(self, req: _Request, app_id: str, token: str) -> Any:
        interaction = self._webhook_interaction(app_id, token)
        with self._recording_errors(interaction, req.path):
            if not interaction.responses:
                raise _unknown_webhook()
            payload = req.json or {}
            original = interaction.original
            if (
                interaction.response_type == 5
                and original is not None
                and original.loading
                and not original.deleted
            ):
                # Discord fills the deferred "thinking" message with the first followup.
                await self._edit_message(original, payload, req.files)
                message = original
            else:
                channel = self._channel(interaction.channel_id)
                message = await self._create_message(
                    channel,
                    author=self.bot_user,
                    payload=payload,
                    files=req.files,
                    interaction=interaction,
                    extra_flags=int(payload.get("flags") or 0) & FLAG_EPHEMERAL,
                )
            interaction.followups.append(message)
            await self._notify()
        if req.query.get("wait") in ("1", "true", "True"):
            return self._message_payload(message)
        return None

    async def _r_hook_get(self, req: _Request, app_id: str, token: str, message_id: str) -> dict[str, Any]:
        interaction = self._webhook_interaction(app_id, token)
        with self._recording_errors(interaction, req.path):
            return self._message_payload(self._hook_message(interaction, message_id))

    async def _r_hook_edit(self, req: _Request, app_id: str, token: str, message_id: str) -> dict[str, Any]:
        interaction = self._webhook_interaction(app_id, token)
        with self._recording_errors(interaction, req.path):
            message = self._hook_message(interaction, message_id)
            await self._edit_message(message, req.json or {}, req.files)
            return self._message_payload(message)

    async def _r_hook_delete(self, req: _Request, app_id: str, token: str, message_id: str) -> None:
        interaction = self._webhook_interaction(app_id, token)
        with self._recording_errors(interaction, req.path):
            await self._delete_message(self._hook_message(interaction, message_id))
