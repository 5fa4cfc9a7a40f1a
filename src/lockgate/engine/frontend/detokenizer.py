"""Incremental detokenization and stop-string matching for one sequence.

Decoding each new token on its own gets spaces and multi-byte characters wrong
(SentencePiece drops a word's leading space at the start of a decode; byte-level
BPE splits an emoji over several tokens). So every step decodes a small window:
the tokens of the previous emission as context ("prefix") plus the tokens not yet
emitted, and emits only what the window adds beyond the prefix — and nothing
while the window still ends in an incomplete character (U+FFFD).

Stop strings are matched on the decoded text. Everything emitted is final: the
longest tail that could still grow into a stop string is held back until it is
resolved, so no delta ever needs to be retracted.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from lockgate.engine.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output tokens (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class DecodingTokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: DecodingTokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []  # output tokens
        self.text = ""  # emitted output text (after stop truncation)
        self.stop_reason: str | None = None  # the stop string that ended the sequence
        self._skip_special = params.skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if context and tokenizer.decode(context, skip_special_tokens=self._skip_special).endswith(_REPLACEMENT):
            # The prompt ends mid-character (prompts given as ids can): its bytes would merge
            # with the output's, so decode the output on its own instead.
            context = []
        self._ids = context  # decoding window source: prompt tail + output
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._held = ""  # decoded but not emitted: could be the start of a stop string
        self._stops = list(params.stop or ())
        self._flushed = False

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None or self._flushed

    def append(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Add tokens; returns (text newly safe to emit, matched stop string or None).

        On a stop string, `token_ids` ends with the token that completed it; any later
        tokens in `new_token_ids` are dropped (as vLLM truncates).
        """
        if self.finished:
            return "", None  # past a stop string (or flush) nothing more is taken
        delta = ""
        for tid in new_token_ids:
            # Token by token, so a stop string is caught at the token that completes it.
            self.token_ids.append(tid)
            self._ids.append(tid)
            self._held += self._decode_step(final=False)
            emitted, stop = self._release()
            delta += emitted
            if stop is not None:
                return delta, stop
        return delta, None

    def append_hidden(self, token_ids: Sequence[int]) -> None:
        """Record tokens whose text must not show: the EOS or stop token that ended the sequence."""
        if not self.finished:
            self.token_ids.extend(token_ids)

    def flush(self) -> str:
        """The sequence ended (eos, stop token, length): release everything held back."""
        if self.finished:
            return ""
        self._held += self._decode_step(final=True)
        # The final decode may add text (a trailing incomplete character): match it too.
        emitted, stop = self._release(final=True)
        self._flushed = True
        return emitted

    def _decode_step(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""  # nothing past the prefix: both windows are the same ids, so they decode alike
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip_special)
        new_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token: keep the window so context survives
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # incomplete multi-byte character: wait for the rest of its bytes
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window source short: drop ids before the prefix.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _release(self, final: bool = False) -> tuple[str, str | None]:
        """Emit what `_held` can no longer turn into a stop string; detect a completed stop."""
        held = self._held
        if not self._stops or len(self.token_ids) < self.params.min_tokens:
            # No stop strings, or they don't count yet (vLLM ignores them before min_tokens).
            self._held = ""
            self.text += held
            return held, None
        best: tuple[int, int, str] | None = None  # (end, start, stop): earliest completion wins
        for s in self._stops:
            start = held.find(s)
            if start >= 0:
                cand = (start + len(s), start, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            end, start, s = best
            out = held[:end] if self.params.include_stop_str_in_output else held[:start]
            self._held = ""
            self.text += out
            self.stop_reason = s
            return out, s
        keep = 0 if final else self._stop_prefix_len(held)
        out = held[: len(held) - keep]
        self._held = held[len(held) - keep:]
        self.text += out
        return out, None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        n = len(text)
        for s in self._stops:
            # Candidate starts: occurrences of s[0] within the last len(s) - 1 characters.
            i = text.find(s[0], max(0, n - len(s) + 1))
            while i != -1 and n - i > best:
                if s.startswith(text[i:]):
                    best = n - i
                    break
                i = text.find(s[0], i + 1)
        return best
