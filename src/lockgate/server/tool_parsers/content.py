"""`ContentText`: the content around tool calls, streamed so that the whole text's parse and the
streamed deltas agree.

Without a call, content is the text exactly. Whitespace touching a call (between content and a
call, between calls, after the last one) is dropped, and content before a call and content after
it are joined by one newline. So whitespace is held until the next character decides it.
"""
from __future__ import annotations


class ContentText:
    def __init__(self) -> None:
        self._held: list[str] = []  # a whitespace run after the last content given out
        self._given = False  # some content was given out
        self._call_since = False  # a call came after the last content given out

    def add(self, text: str) -> str:
        """Content text in; the part that can be given out now."""
        if not text:
            return ""
        body = text.rstrip()
        if not body:
            self._held.append(text)
            return ""
        tail = text[len(body):]
        out = "".join(self._held) + body
        self._held = [tail] if tail else []
        if self._call_since:
            out = out.lstrip()
            if self._given:
                out = "\n" + out
            self._call_since = False
        self._given = True
        return out

    def call(self) -> None:
        """A call came: the whitespace before it is dropped."""
        self._held.clear()
        self._call_since = True

    def finish(self) -> str:
        if self._call_since:
            return ""
        out = "".join(self._held)
        self._held.clear()
        if self._given or out:
            self._given = True
        return out
