"""A1111 prompt editing `[from:to:when]` and alternation `[a|b]`: the per-step prompt texts. No torch.

A port of A1111's `modules/prompt_parser.get_learned_conditioning_prompt_schedules` without lark.
Its grammar (Earley, lark) is:

    !start: (prompt | /[][():]/+)*
    prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
    !emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
    alternate: "[" prompt ("|" [prompt])+ "]"
    plain: /([^\\\\\\[\\]():|]|\\\\.)+/

Here a recursive-descent parser reads the same language, preferring a bracket structure over
stray brackets (what lark resolves to): a `(` or `[` that opens no structure is literal text at
the top level. Text that cannot be read at all (a `|` outside brackets, a trailing backslash) has
one entry for every step, as in A1111. Emphasis brackets stay in the texts (`(a [b:c:0.5]:1.2)`
gives `(a b:1.2)` then `(a c:1.2)`); `generator.prompts` reads their weights.

"when" follows A1111's formula (its "old" prompt editing timeline, which is also what the new one
gives for every value below 1 and every integer): `v = float(when); if v < 1: v *= steps;
step = min(steps, int(v))`; a step below 1 adds no change. Alternation changes at every step:
step s uses option `(s - 1) % len(options)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

_RE_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_RE_WS = re.compile(r"\s*")
_STRAY = "[]():"
_SPECIAL = "\\[]():|"


class _ParseError(Exception):
    pass


@dataclass
class _Scheduled:
    before: _Prompt | None
    after: _Prompt
    when_text: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[_Prompt]


@dataclass
class _Emphasized:
    open: str
    inner: _Prompt
    weight: _Prompt | None
    close: str


@dataclass
class _Prompt:
    parts: list[_Node] = field(default_factory=list)


_Node = Union[str, _Scheduled, _Alternate, _Emphasized, _Prompt]  # noqa: UP007 - runtime alias


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text

    def start(self) -> _Prompt:
        top = _Prompt()
        pos = 0
        while pos < len(self.s):
            prompt, pos = self.prompt(pos)
            top.parts.append(prompt)
            if pos >= len(self.s):
                break
            if self.s[pos] not in _STRAY:
                raise _ParseError(f"unexpected {self.s[pos]!r}")
            top.parts.append(self.s[pos])  # a bracket or colon that opens no structure: literal
            pos += 1
        return top

    def prompt(self, pos: int) -> tuple[_Prompt, int]:
        """The longest run of prompt elements from `pos` (possibly empty)."""
        out = _Prompt()
        while pos < len(self.s):
            c = self.s[pos]
            if c in "([":
                node = self.structure(pos)
                if node is None:
                    break
                element, pos = node
                out.parts.append(element)
            elif c in "]):|":
                break
            else:
                start = pos
                while pos < len(self.s) and self.s[pos] not in _SPECIAL[1:]:
                    if self.s[pos] == "\\":
                        if pos + 1 >= len(self.s):
                            raise _ParseError("trailing backslash")
                        pos += 1
                    pos += 1
                out.parts.append(self.s[start:pos])
        return out, pos

    def structure(self, pos: int) -> tuple[_Node, int] | None:
        if self.s[pos] == "(":
            return self.round(pos)
        return self.square(pos)

    def round(self, pos: int) -> tuple[_Node, int] | None:
        inner, p = self.prompt(pos + 1)
        if p < len(self.s) and self.s[p] == ")":
            return _Emphasized("(", inner, None, ")"), p + 1
        if p < len(self.s) and self.s[p] == ":":
            weight, q = self.prompt(p + 1)
            if q < len(self.s) and self.s[q] == ")":
                return _Emphasized("(", inner, weight, ")"), q + 1
        return None

    def number_close(self, pos: int) -> tuple[str, int] | None:
        """`[WHITESPACE] NUMBER [WHITESPACE] "]"` from `pos`: (number text, position after `]`)."""
        p = _RE_WS.match(self.s, pos).end()  # type: ignore[union-attr]
        m = _RE_NUMBER.match(self.s, p)
        if m is None:
            return None
        q = _RE_WS.match(self.s, m.end()).end()  # type: ignore[union-attr]
        if q < len(self.s) and self.s[q] == "]":
            return m.group(0), q + 1
        return None

    def square(self, pos: int) -> tuple[_Node, int] | None:
        first, p = self.prompt(pos + 1)
        if p >= len(self.s):
            return None
        c = self.s[p]
        if c == "]":
            return _Emphasized("[", first, None, "]"), p + 1
        if c == "|":
            options = [first]
            while p < len(self.s) and self.s[p] == "|":
                option, p = self.prompt(p + 1)
                options.append(option)
            if p < len(self.s) and self.s[p] == "]":
                return _Alternate(options), p + 1
            return None
        if c == ":":
            closed = self.number_close(p + 1)
            if closed is not None:
                return _Scheduled(None, first, closed[0]), closed[1]
            second, q = self.prompt(p + 1)
            if q < len(self.s) and self.s[q] == ":":
                closed = self.number_close(q + 1)
                if closed is not None:
                    return _Scheduled(first, second, closed[0]), closed[1]
        return None


def _walk(node: _Node):
    yield node
    if isinstance(node, _Prompt):
        for part in node.parts:
            yield from _walk(part)
    elif isinstance(node, _Scheduled):
        if node.before is not None:
            yield from _walk(node.before)
        yield from _walk(node.after)
    elif isinstance(node, _Alternate):
        for option in node.options:
            yield from _walk(option)
    elif isinstance(node, _Emphasized):
        yield from _walk(node.inner)
        if node.weight is not None:
            yield from _walk(node.weight)


def _collect_steps(steps: int, tree: _Prompt) -> list[int]:
    found = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            v = float(node.when_text)
            if v < 1:
                v *= steps
            node.when = min(steps, int(v))
            if node.when >= 1:
                found.add(node.when)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
    return sorted(found)


def _text_at(node: _Node | None, step: int) -> str:
    if node is None:
        return ""
    if isinstance(node, str):
        return node
    if isinstance(node, _Prompt):
        return "".join(_text_at(p, step) for p in node.parts)
    if isinstance(node, _Scheduled):
        return _text_at(node.before if step <= node.when else node.after, step)
    if isinstance(node, _Alternate):
        return _text_at(node.options[(step - 1) % len(node.options)], step)
    weight = "" if node.weight is None else ":" + _text_at(node.weight, step)
    return node.open + _text_at(node.inner, step) + weight + node.close


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_step, text), ...] for one prompt: `text` is used up to and including `end_step`."""
    try:
        tree = _Parser(prompt).start()
    except _ParseError:
        return [(steps, prompt)]
    return [(t, _text_at(tree, t)) for t in _collect_steps(steps, tree)]


def get_learned_conditioning_prompt_schedules(prompts: list[str], steps: int) -> list[list[list]]:
    """A1111's function of that name: for each prompt a list of [end_step, text] pairs.

    >>> get_learned_conditioning_prompt_schedules(["a [b:c:0.5]"], 10)
    [[[5, 'a b'], [10, 'a c']]]
    """
    cache = {p: [[end, text] for end, text in prompt_schedule(p, steps)] for p in set(prompts)}
    return [[list(entry) for entry in cache[p]] for p in prompts]


def text_index(schedule: list[tuple[int, str]] | list[int], step: int) -> int:
    """Index of the entry used at 1-based `step`: the first whose end step is >= `step`.

    Takes a schedule or its end steps. Step s is the s-th model evaluation, so `[a:b:0.5]` over 10
    steps gives `a` for steps 1-5 and `b` for 6-10, as A1111 documents it. (A1111's sampler counts
    evaluations from 0 in this lookup, which applies each change one evaluation late.)
    """
    ends = [e if isinstance(e, int) else e[0] for e in schedule]
    for i, end in enumerate(ends):
        if step <= end:
            return i
    return len(ends) - 1
