"""`GrammarCache`: compiled grammars by `StructuredOutputs.cache_key()`, LRU, bounded twice.

An entry is a compiled `LLMatcher` in its initial state (a template: each request
gets a `deep_copy`, microseconds). Bounds: `max_entries` (default 256) and
`max_bytes` (default 64 MiB) counted as each grammar's llguidance text, a proxy
for its compiled size (the lexer and parser tables live in Rust and cannot be
measured from here; they grow with the grammar). The least recently used entries
go first; an entry larger than `max_bytes` on its own is not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from llguidance import LLMatcher

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 64 << 20


@dataclass(slots=True)
class CompiledGrammar:
    template: LLMatcher  # initial state; never advanced
    nbytes: int


class GrammarCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the grammar cache needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.Lock()  # the compile worker inserts, the core loop looks up

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> CompiledGrammar | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, entry: CompiledGrammar) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if entry.nbytes > self.max_bytes:
                return
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self.nbytes -= gone.nbytes
                self.evictions += 1
