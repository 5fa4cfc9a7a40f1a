"""`JsonValue`: one JSON value read from text fed in pieces, validated as it arrives and written
back in one canonical form, so a call's arguments can be streamed before the value is complete.

The canonical form is `json.dumps(json.loads(text), ensure_ascii=False)` token by token:
`", "` and `": "` separators, no other whitespace, strings re-escaped as `json.dumps` escapes
them (and a lone surrogate as `\\udXXX`, which UTF-8 cannot carry), numbers as Python writes
their value. Two differences, because a streamed token cannot be taken back: a repeated key is
kept (json.loads keeps the last), and a number Python cannot write back (an integer over
`int`'s digit limit, a float that overflows) keeps the model's text. Both are still valid JSON.
Nesting is bounded (`MAX_DEPTH`) so that whoever parses the arguments with `json.loads` can.
"""
from __future__ import annotations

import math
import re

MAX_DEPTH = 256
WS = " \t\n\r"  # JSON's whitespace (RFC 8259), shared by every parser here
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER_CHARS = re.compile(r"[0-9+\-.eE]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\\"\ud800-\udfff]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_UNESCAPE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_HEX = frozenset("0123456789abcdefABCDEF")

# parser states
_VALUE, _OBJ_FIRST, _OBJ_KEY, _COLON, _AFTER, _ARR_FIRST, _STRING, _NUMBER_S, _LITERAL, _DONE = range(10)


def _escape_one(m: re.Match[str]) -> str:
    c = m.group()
    return _SHORT.get(c) or f"\\u{ord(c):04x}"


def encode_chars(s: str) -> str:
    """A string's characters as `json.dumps(s, ensure_ascii=False)` writes them between its quotes."""
    return _NEEDS_ESCAPE.sub(_escape_one, s)


def canonical_number(token: str) -> str | None:
    """The number as Python writes its value; None if the token is not a JSON number."""
    if _NUMBER.fullmatch(token) is None:
        return None
    if "." not in token and "e" not in token and "E" not in token:
        try:
            return str(int(token))
        except ValueError:  # over int's digit limit: json.loads would refuse it; the text is valid JSON
            return token
    value = float(token)
    return repr(value) if math.isfinite(value) else token


class JsonValue:
    """Reads one JSON value. `feed(text, pos)` consumes from `text[pos:]` until the value ends (or
    the text does) and returns where it stopped; `take()` gives the canonical text produced since
    the last `take`. A number at the top ends at the first character that cannot continue it
    (not consumed), or at `end()`. `error` says why the text is not JSON; `done` that it ended."""

    def __init__(self, decode: bool = False) -> None:
        self.done = False
        self.error: str | None = None
        self.kind: str | None = None  # the value's first character: '{', '[', '"', '-'/digit, 't'/'f'/'n'
        self.decoded: list[str] | None = [] if decode else None  # a top-level string's characters
        self._out: list[str] = []
        self._stack: list[str] = []  # open containers: '{' or '['
        self._state = _VALUE
        self._key = False  # the string being read is an object key
        self._esc = ""  # a partial escape sequence, from its backslash
        self._high: int | None = None  # a \uD800-\uDBFF escape waiting for its low half
        self._token: list[str] = []  # a number's or literal's characters so far
        self._literal = ""

    def take(self) -> str:
        out = "".join(self._out)
        self._out.clear()
        return out

    def text(self) -> str:
        """A top-level string's decoded text (with `decode=True`)."""
        return "".join(self.decoded or ())

    def end(self) -> None:
        """The input ended: a number at the top completes here; anything else open stays not done."""
        if self._state == _NUMBER_S and not self._stack and self.error is None:
            self._finish_number()

    def _fail(self, why: str) -> None:
        self.error = why
        self._state = _DONE

    def _value_done(self) -> None:
        if self._stack:
            self._state = _AFTER
        else:
            self._state = _DONE
            self.done = True

    def feed(self, text: str, pos: int = 0) -> int:
        n = len(text)
        out = self._out
        while pos < n and self._state != _DONE:
            state = self._state
            if state == _STRING:
                pos = self._string(text, pos)
                continue
            if state == _NUMBER_S:
                m = _NUMBER_CHARS.match(text, pos)
                if m is not None:
                    self._token.append(m.group())
                    pos = m.end()
                    if pos == n:
                        break
                self._finish_number()
                continue
            if state == _LITERAL:
                want = self._literal[len("".join(self._token)):]
                got = text[pos:pos + len(want)]
                if not want.startswith(got):
                    self._fail(f"invalid literal, expected {self._literal}")
                    break
                self._token.append(got)
                pos += len(got)
                if len(got) == len(want):
                    out.append(self._literal)
                    self._token.clear()
                    self._value_done()
                continue
            c = text[pos]
            if c in WS:
                pos += 1
                continue
            if state in (_VALUE, _ARR_FIRST):
                if state == _ARR_FIRST and c == "]":
                    pos += 1
                    self._close("[")
                    continue
                pos = self._start_value(c, pos)
            elif state in (_OBJ_FIRST, _OBJ_KEY):
                if c == '"':
                    self._key = True
                    self._state = _STRING
                    out.append('"')
                    pos += 1
                elif c == "}" and state == _OBJ_FIRST:
                    pos += 1
                    self._close("{")
                else:
                    self._fail("expected a property name in double quotes")
            elif state == _COLON:
                if c != ":":
                    self._fail("expected ':' after a property name")
                    break
                out.append(": ")
                pos += 1
                self._state = _VALUE
            elif state == _AFTER:
                top = self._stack[-1]
                if c == ",":
                    out.append(", ")
                    pos += 1
                    self._state = _OBJ_KEY if top == "{" else _VALUE
                elif c == ("}" if top == "{" else "]"):
                    pos += 1
                    self._close(top)
                else:
                    self._fail(f"expected ',' or {'}' if top == '{' else ']'}")
        return pos

    def _start_value(self, c: str, pos: int) -> int:
        if self.kind is None:
            self.kind = c
        if c == "{" or c == "[":
            if len(self._stack) >= MAX_DEPTH:
                self._fail(f"nested deeper than {MAX_DEPTH}")
                return pos
            self._stack.append(c)
            self._out.append(c)
            self._state = _OBJ_FIRST if c == "{" else _ARR_FIRST
        elif c == '"':
            self._key = False
            self._state = _STRING
            self._out.append('"')
        elif c == "-" or "0" <= c <= "9":
            self._state = _NUMBER_S
            return pos  # the number's characters are read by the number state
        elif c in _LITERALS:
            self._literal = _LITERALS[c]
            self._state = _LITERAL
            return pos
        else:
            self._fail(f"unexpected character {c!r}")
            return pos
        return pos + 1

    def _close(self, opener: str) -> None:
        self._stack.pop()
        self._out.append("}" if opener == "{" else "]")
        self._value_done()

    def _finish_number(self) -> None:
        token = "".join(self._token)
        self._token.clear()
        number = canonical_number(token)
        if number is None:
            self._fail(f"invalid number {token[:40]!r}")
            return
        self._out.append(number)
        self._value_done()

    def _chars(self, s: str) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            self._chars(chr(high))
        self._out.append(encode_chars(s))
        if self.decoded is not None and not self._stack:
            self.decoded.append(s)

    def _string(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n:
            if self._esc:
                if len(self._esc) == 1:  # the escape's letter decides its length
                    self._esc += text[pos]
                    pos += 1
                need = 6 if self._esc[1] == "u" else 2
                take = text[pos:pos + need - len(self._esc)]
                self._esc += take
                pos += len(take)
                if len(self._esc) < need:
                    return pos
                esc, self._esc = self._esc, ""
                if not self._escape(esc):
                    return pos
                continue
            c = text[pos]
            if c == '"':
                pos += 1
                if self._high is not None:
                    self._chars("")
                self._out.append('"')
                if self._key:
                    self._state = _COLON
                else:
                    self._value_done()
                return pos
            if c == "\\":
                self._esc = "\\"
                pos += 1
                continue
            m = _PLAIN.match(text, pos)
            if m is None:
                self._fail("control character in a string")
                return pos
            self._chars(m.group())
            pos = m.end()
        return pos

    def _escape(self, esc: str) -> bool:
        letter = esc[1]
        if letter != "u":
            char = _UNESCAPE.get(letter)
            if char is None:
                self._fail(f"invalid escape {esc!r}")
                return False
            self._chars(char)
            return True
        digits = esc[2:]
        if len(digits) != 4 or not all(d in _HEX for d in digits):
            self._fail(f"invalid escape {esc!r}")
            return False
        unit = int(digits, 16)
        if self._high is not None and 0xDC00 <= unit <= 0xDFFF:  # a surrogate pair: one character
            high, self._high = self._high, None
            self._chars(chr(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00)))
        elif 0xD800 <= unit <= 0xDBFF:
            if self._high is not None:
                self._chars("")  # the earlier high half stays alone
            self._high = unit
        else:
            self._chars(chr(unit))
        return True
