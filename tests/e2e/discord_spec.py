"""Discord's published OpenAPI spec as a checker of the request bodies the loopback Discord receives.

``spec()`` loads ``tests/data/discord-api/openapi.json`` once per process and builds one JSON Schema
(draft 2020-12) validator per (route template, method, content type) on first use, with the spec's
``components`` resolvable through ``referencing``. ``check(method, path, body, multipart=...)`` matches
the request path (without ``/api/v10``) against the spec's path templates and validates the body
against ``paths[template][method].requestBody.content[<type>].schema`` (``multipart/form-data`` for
multipart requests, whose JSON is ``payload_json``; ``application/json`` otherwise, or when the spec
declares no multipart schema). It returns ``None`` when the spec has no body schema for the route
(the body is not validated), else the violations (empty: valid).

discord.py sends some snowflakes (attachment ids, ``message_reference.message_id``, ...) as JSON
numbers, which Discord accepts while the spec types every snowflake as a string
(``SnowflakeType``: a decimal string, ``format: snowflake``). Such ints are turned into strings
before the final validation, and only where the failing schema is that snowflake schema; every other
int stays as sent.

``STATS`` counts validated bodies and their route templates for the session summary.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from jsonschema._keywords import anyOf as _any_of
from jsonschema._keywords import oneOf as _one_of
from jsonschema.exceptions import best_match
from jsonschema.validators import extend
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["SPEC_PATH", "STATS", "DiscordSpec", "SpecStats", "SpecViolation", "spec"]

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "discord-api" / "openapi.json"
_SPEC_URI = "urn:discord-api-spec:openapi.json"
_METHODS = frozenset({"get", "put", "post", "patch", "delete"})
_MAX_NORMALISE_ROUNDS = 8
#: added to oneOf/anyOf schemas whose branches are told apart by their ``type`` property: value -> branch
_DISPATCH = "x-ponybot-dispatch"
#: added to a oneOf of consts (Discord's integer enums): the set of (type, value) it allows
_CONSTS = "x-ponybot-consts"
#: added to a oneOf of ``{"type": "null"}`` and one other branch (Discord's nullable fields): its index
_NULLABLE = "x-ponybot-nullable"

# Discord's error codes for the JSON Schema keyword that failed (the ones Discord uses in 50035
# answers; anything else is reported as BASE_TYPE_INVALID).
_ERROR_CODES = {
    "required": "BASE_TYPE_REQUIRED",
    "maximum": "NUMBER_TYPE_MAX",
    "exclusiveMaximum": "NUMBER_TYPE_MAX",
    "minimum": "NUMBER_TYPE_MIN",
    "exclusiveMinimum": "NUMBER_TYPE_MIN",
    "maxLength": "BASE_TYPE_MAX_LENGTH",
    "minLength": "BASE_TYPE_MIN_LENGTH",
    "maxItems": "BASE_TYPE_MAX_LENGTH",
    "minItems": "BASE_TYPE_MIN_LENGTH",
    "enum": "BASE_TYPE_CHOICES",
    "const": "BASE_TYPE_CHOICES",
    "pattern": "STRING_TYPE_REGEX",
    "uniqueItems": "LIST_ITEM_VALUE_DUPLICATE",
}


@dataclass(frozen=True)
class SpecViolation:
    """A request body that Discord's spec rejects."""

    method: str
    route: str  # the spec's path template, e.g. /applications/{application_id}/commands
    path: str  # the request path (without /api/v10)
    field: tuple[str | int, ...]  # where in the body; () = the body itself
    json_path: str  # the same as a JSON path, e.g. $[0].options[0].max_value
    keyword: str  # the JSON Schema keyword that failed (maximum, type, required, ...)
    message: str  # the schema's message

    @property
    def code(self) -> str:
        """Discord's error code for the field (e.g. NUMBER_TYPE_MAX)."""
        return _ERROR_CODES.get(self.keyword, "BASE_TYPE_INVALID")

    @property
    def dotted(self) -> str:
        """The field the way discord.py prints form errors: ``0.options.0.max_value``."""
        return ".".join(str(part) for part in self.field)

    def __str__(self) -> str:
        return f"{self.method} {self.route}: {self.json_path}: {self.message}"


@dataclass
class SpecStats:
    """What the spec check did in this process."""

    validated: int = 0
    routes: set[str] = field(default_factory=set)
    unvalidated: int = 0
    unvalidated_routes: set[str] = field(default_factory=set)
    violations: int = 0

    def summary(self) -> str:
        """One line for the end of the test session."""
        line = f"discord spec: validated {self.validated} request bodies on {len(self.routes)} routes"
        if self.violations:
            line += f" ({self.violations} rejected)"
        if self.unvalidated:
            line += (
                f"; {self.unvalidated} bodies on {len(self.unvalidated_routes)} routes without a body"
                " schema in the spec (not validated)"
            )
        return line


STATS = SpecStats()


def _pointer_part(text: str) -> str:
    return text.replace("~", "~0").replace("/", "~1")


def _json_path(parts: Iterable[str | int]) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _is_snowflake_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("format") == "snowflake"


def _snowflake_ints(errors: Iterable[ValidationError]) -> Iterator[tuple[str | int, ...]]:
    """Paths of ints that failed only because a snowflake (string) schema wanted them as strings."""
    for error in errors:
        if (
            _is_snowflake_schema(error.schema)
            and error.validator == "type"
            and isinstance(error.instance, int)
            and not isinstance(error.instance, bool)
            and error.instance >= 0
        ):
            yield tuple(error.absolute_path)
        yield from _snowflake_ints(error.context or ())


def _discriminator_values(schema: Any) -> list[Any]:
    """The values a branch's ``type`` property may take (its single-branch ``enum``/``const``)."""
    prop = (schema.get("properties") or {}).get("type") if isinstance(schema, dict) else None
    if not isinstance(prop, dict):
        return []
    if "const" in prop:
        return [prop["const"]]
    return list(prop.get("enum") or [])


def _add_dispatch_tables(document: dict[str, Any]) -> None:
    """Mark every oneOf/anyOf over ``$ref``s to object schemas that differ in their ``type`` value, so
    validation only descends into the branch that the instance's ``type`` selects (Discord's unions
    of components, command options and callbacks are discriminated this way). A plain oneOf checks
    every branch, which makes a message with buttons take a quarter of a second."""
    schemas = document["components"]["schemas"]
    prefix = "#/components/schemas/"

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        for keyword in ("oneOf", "anyOf"):
            branches = node.get(keyword)
            if not isinstance(branches, list) or len(branches) < 2:
                continue
            if all(isinstance(b, dict) and "const" in b and not set(b) - {"const", "title", "description"}
                   for b in branches):  # fmt: skip
                node[_CONSTS] = frozenset((type(b["const"]), b["const"]) for b in branches)
                continue
            nulls = [i for i, b in enumerate(branches) if b == {"type": "null"}]
            if len(branches) == 2 and len(nulls) == 1:
                node[_NULLABLE] = 1 - nulls[0]
                continue
            refs = [b.get("$ref", "") if isinstance(b, dict) and len(b) == 1 else "" for b in branches]
            if not all(ref.startswith(prefix) for ref in refs):
                continue
            table: dict[Any, int] = {}
            ambiguous: set[Any] = set()
            for index, ref in enumerate(refs):
                for value in _discriminator_values(schemas.get(ref[len(prefix) :])):
                    if not isinstance(value, int | str) or isinstance(value, bool):
                        continue
                    if value in table:
                        ambiguous.add(value)
                    table[value] = index
            for value in ambiguous:
                del table[value]
            if table:
                node[_DISPATCH] = table
        for value in node.values():
            visit(value)

    visit(document)


def _hashable(value: Any) -> bool:
    return isinstance(value, int | str | float | bool) or value is None


def _dispatching(keyword: Any) -> Any:
    """oneOf/anyOf with shortcuts that give the same verdict: a known const, a nullable field, and only
    the branch that the ``type`` value selects."""

    def validate(validator: Any, branches: list[Any], instance: Any, schema: dict[str, Any]) -> Any:
        consts = schema.get(_CONSTS)
        if consts is not None and _hashable(instance) and (type(instance), instance) in consts:
            return  # one of the allowed values (anything else: the plain keyword says why not)
        other = schema.get(_NULLABLE)
        if other is not None:
            if instance is not None:  # the null branch fails, so the other one decides
                yield from validator.descend(instance, branches[other], schema_path=other)
            return
        table = schema.get(_DISPATCH)
        if table is not None and isinstance(instance, dict):
            value = instance.get("type")
            index = table.get(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
            if index is not None:
                yield from validator.descend(instance, branches[index], schema_path=index)
                return
        yield from keyword(validator, branches, instance, schema)

    return validate


_Validator = extend(Draft202012Validator, {"oneOf": _dispatching(_one_of), "anyOf": _dispatching(_any_of)})


def _most_specific(errors: list[ValidationError]) -> ValidationError:
    """The error to report: jsonschema's best match, followed down into a union whose branches all
    failed alike (e.g. content too long for both webhook body shapes), so the field is named."""
    error = best_match(errors)
    while error.validator in ("anyOf", "oneOf") and error.context:
        consts = error.schema.get(_CONSTS) if isinstance(error.schema, dict) else None
        if consts:  # an integer enum: say which values it allows
            allowed = sorted((value for _, value in consts), key=repr)
            error.message = f"{error.instance!r} is not one of {allowed}"
            error.validator = "enum"  # type: ignore[misc]
            return error
        error = best_match(error.context)
    return error


def _stringify(body: Any, path: Sequence[str | int]) -> None:
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = str(node[path[-1]])


class DiscordSpec:
    """Discord's OpenAPI document: route templates and their request-body validators."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        _add_dispatch_tables(document)
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry: Registry[Any] = Registry().with_resource(_SPEC_URI, resource)
        templates = sorted(document["paths"], key=lambda t: (t.count("{"), -len(t)))
        self._templates = [
            (template, re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))))
            for template in templates
        ]
        self._validators: dict[tuple[str, str, str], Any] = {}

    def route(self, path: str) -> str | None:
        """The spec's path template for a request path (literal segments win over parameters)."""
        path = path.rstrip("/") or "/"
        for template, pattern in self._templates:
            if pattern.fullmatch(path):
                return template
        return None

    def validator(self, template: str, method: str, *, multipart: bool) -> Any:
        """The validator of the route's request body, or None when the spec declares none."""
        key = (template, method.lower(), "multipart" if multipart else "json")
        if key not in self._validators:
            self._validators[key] = self._build_validator(template, method.lower(), multipart)
        return self._validators[key]

    def _build_validator(self, template: str, method: str, multipart: bool) -> Any:
        operation = self.document["paths"][template].get(method) if method in _METHODS else None
        content = ((operation or {}).get("requestBody") or {}).get("content") or {}
        kinds = ["multipart/form-data", "application/json"] if multipart else ["application/json"]
        kind = next((k for k in kinds if "schema" in content.get(k, {})), None)
        if kind is None:
            return None
        pointer = "/".join(
            ["", "paths", _pointer_part(template), method, "requestBody", "content", _pointer_part(kind)]
        )
        return _Validator({"$ref": f"{_SPEC_URI}#{pointer}/schema"}, registry=self._registry)

    def check(
        self, method: str, path: str, body: Any, *, multipart: bool = False, stats: SpecStats | None = None
    ) -> list[SpecViolation] | None:
        """Validate one request body; None when the spec has no body schema for it. ``stats`` (the
        loopback Discord passes ``STATS``) counts it."""
        template = self.route(path)
        validator = None if template is None else self.validator(template, method, multipart=multipart)
        if validator is None or template is None:
            if stats is not None:
                stats.unvalidated += 1
                stats.unvalidated_routes.add(f"{method.upper()} {template or path}")
            return None
        if stats is not None:
            stats.validated += 1
            stats.routes.add(f"{method.upper()} {template}")
        errors = list(validator.iter_errors(body))
        rounds = 0
        while errors and rounds < _MAX_NORMALISE_ROUNDS:
            fixes = sorted(set(_snowflake_ints(errors)), key=len)
            if not fixes:
                break
            if rounds == 0:
                body = copy.deepcopy(body)
            for fix in fixes:
                if fix:
                    _stringify(body, fix)
            errors = list(validator.iter_errors(body))
            rounds += 1
        if not errors:
            return []
        error = _most_specific(errors)
        where: tuple[str | int, ...] = tuple(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [name for name in error.validator_value if name not in error.instance]
            where += tuple(missing[:1])
        if stats is not None:
            stats.violations += 1
        return [
            SpecViolation(
                method=method.upper(),
                route=template,
                path=path,
                field=where,
                json_path=_json_path(where),
                keyword=str(error.validator),
                message=error.message if len(error.message) <= 300 else error.message[:297] + "...",
            )
        ]


@functools.cache
def spec() -> DiscordSpec:
    """The vendored spec, loaded once per process."""
    if not SPEC_PATH.is_file():
        raise FileNotFoundError(f"{SPEC_PATH} is missing: the loopback Discord needs Discord's OpenAPI spec")
    return DiscordSpec(json.loads(SPEC_PATH.read_text(encoding="utf-8")))
