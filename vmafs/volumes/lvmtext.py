"""The LVM2 text metadata format (what ``vgcfgbackup`` writes and every PV's
metadata area holds), parsed into nested dicts.

Grammar, as LVM's own config parser reads it::

    file    := item*
    item    := KEY '=' value | KEY '{' item* '}'
    value   := STRING | NUMBER | '[' [scalar (',' scalar)*] ']'

``#`` starts a comment to the end of the line.  The text is untrusted
guest data: nesting deeper than :data:`MAX_DEPTH`, numbers longer than
:data:`MAX_DIGITS`, unterminated strings, duplicate keys and anything
else unexpected raise :class:`~vmafs.errors.LvmError` naming the line.
Parsing is linear in the text and never recursive beyond MAX_DEPTH.
"""

from __future__ import annotations

import re

from ..errors import LvmError

MAX_DEPTH = 16
MAX_DIGITS = 20
MAX_LIST = 65536

Value = "str | int | float | list | dict"

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\f\v]+) |
    (?P<newline>\n) |
    (?P<comment>\#[^\n]*) |
    (?P<string>"(?:[^"\\\n]|\\.)*") |
    (?P<number>-?[0-9][0-9.]*(?![A-Za-z0-9_.+\-])) |
    (?P<key>[A-Za-z0-9_.+\-]+) |
    (?P<punct>[={}\[\],])
    """,
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(.)")


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        self.where = where
        self._tokenize(text)
        self.pos = 0

    def error(self, message: str, line: int | None = None) -> LvmError:
        if line is None:
            line = self.tokens[self.pos][2] if self.pos < len(self.tokens) else self._last_line
        return LvmError(f"LVM metadata line {line}: {message}", volume=self.where)

    def _tokenize(self, text: str) -> None:
        line = 1
        pos = 0
        n = len(text)
        while pos < n:
            m = _TOKEN.match(text, pos)
            if m is None:
                ch = text[pos]
                if ch == '"':
                    raise self.error("unterminated string", line)
                raise self.error(f"unexpected character {ch!r}", line)
            kind = m.lastgroup
            if kind == "newline":
                line += 1
            elif kind not in ("space", "comment"):
                self.tokens.append((kind, m.group(), line))  # type: ignore[arg-type]
            pos = m.end()
        self._last_line = line

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, want: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise self.error("unexpected end of text" + (f" (expected {want!r})" if want else ""))
        if want is not None and tok[1] != want:
            raise self.error(f"expected {want!r}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def section(self, depth: int, closing: bool) -> dict:
        if depth > MAX_DEPTH:
            raise self.error(f"sections nested deeper than {MAX_DEPTH}")
        out: dict = {}
        while True:
            tok = self.peek()
            if tok is None:
                if closing:
                    raise self.error("unexpected end of text (a '{' is not closed)")
                return out
            if tok[1] == "}" and tok[0] == "punct":
                if not closing:
                    raise self.error("'}' without '{'")
                self.pos += 1
                return out
            kind, key, line = self.take()
            if kind not in ("key", "number"):
                raise self.error(f"expected a name, found {key!r}", line)
            if key in out:
                raise self.error(f"{key!r} given twice", line)
            op = self.take()
            if op[1] == "{":
                out[key] = self.section(depth + 1, True)
            elif op[1] == "=":
                out[key] = self.value()
            else:
                raise self.error(f"expected '=' or '{{' after {key!r}, found {op[1]!r}")

    def value(self):
        kind, text, line = self.take()
        if kind == "punct" and text == "[":
            items: list = []
            while True:
                tok = self.peek()
                if tok is not None and tok[1] == "]":
                    self.pos += 1
                    return items
                if items:
                    self.take(",")
                    tok = self.peek()
                    if tok is not None and tok[1] == "]":  # a trailing comma
                        continue
                if len(items) >= MAX_LIST:
                    raise self.error(f"list longer than {MAX_LIST} items")
                kind, text, line = self.take()
                items.append(self.scalar(kind, text, line))
        return self.scalar(kind, text, line)

    def scalar(self, kind: str, text: str, line: int):
        if kind == "string":
            return _ESCAPE.sub(r"\1", text[1:-1])
        if kind == "number":
            digits = text.lstrip("-")
            if len(digits) > MAX_DIGITS:
                raise self.error(f"number {text[:24]}... is longer than {MAX_DIGITS} digits", line)
            try:
                return int(text) if "." not in text else float(text)
            except ValueError:
                raise self.error(f"malformed number {text!r}", line) from None
        raise self.error(f"expected a value, found {text!r}", line)


def parse(text: str, where: str) -> dict:
    """Parse LVM metadata *text*; *where* names the volume it came from for errors."""
    return _Parser(text, where).section(0, False)
