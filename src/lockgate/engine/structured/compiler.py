"""`GrammarCompiler`: compiles grammars on one worker thread, never on the core loop's step.

The core submits a request's `StructuredOutputs` and gets a `CompileJob` at once; the
request is not scheduled until the job is done (`scheduler.py`), while every other
request keeps running. Jobs for the same grammar are shared (one compile for the
`n` children, or for many requests sending one schema). Queued jobs are taken round
robin between tenants, so one tenant sending thousands of distinct schemas delays its
own compiles, not the others'. llguidance releases the GIL while it compiles.

The llguidance tokenizer is built on this thread with the first job (about 0.3 s for
a 49k vocabulary), so a core that never sees a constrained request never pays for it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from llguidance import LLMatcher, LLTokenizer

from lockgate.engine.structured.cache import CompiledGrammar, GrammarCache
from lockgate.engine.structured.grammar import parser_limits, to_grammar
from lockgate.engine.structured_params import StructuredOutputs

log = logging.getLogger(__name__)


class CompileJob:
    """One grammar's compile: `done` once `compiled` or `error` is set (written by the worker only)."""

    __slots__ = ("key", "spec", "done", "compiled", "error")

    def __init__(self, key: tuple, spec: StructuredOutputs) -> None:
        self.key = key
        self.spec = spec
        self.done = False
        self.compiled: CompiledGrammar | None = None
        self.error: str | None = None

    @classmethod
    def finished(cls, key: tuple, spec: StructuredOutputs, compiled: CompiledGrammar) -> CompileJob:
        job = cls(key, spec)
        job.compiled, job.done = compiled, True
        return job


def compile_grammar(tokenizer: LLTokenizer, spec: StructuredOutputs) -> CompiledGrammar:
    """The matcher template of `spec`; ValueError (naming the field) when it does not compile."""
    grammar = to_grammar(spec)
    matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())
    if matcher.is_error():
        err = matcher.get_error().strip()
        raise ValueError(f"structured_outputs.{spec.kind} is invalid: {err[:400]}")
    return CompiledGrammar(template=matcher, nbytes=len(grammar))


class GrammarCompiler:
    def __init__(self, make_tokenizer: Callable[[], LLTokenizer], cache: GrammarCache) -> None:
        self.make_tokenizer = make_tokenizer
        self.cache = cache
        self.compile_fn: Callable[[LLTokenizer, StructuredOutputs], CompiledGrammar] = compile_grammar
        self.tokenizer: LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._queues: OrderedDict[str, deque[CompileJob]] = OrderedDict()  # tenant -> its queued jobs
        self._inflight: dict[tuple, CompileJob] = {}
        self._cond = threading.Condition()  # the queues, and "a job finished" for an idle core
        self._thread: threading.Thread | None = None
        self._closed = False
        self.num_compiled = 0
        self.num_failed = 0
        self.compile_seconds = 0.0

    # ---- the core loop's side -------------------------------------------------------
    def submit(self, spec: StructuredOutputs, tenant: str = "") -> CompileJob:
        """The job for `spec`: finished at once on a cache hit, else queued (or the one in flight)."""
        key = spec.cache_key()
        compiled = self.cache.get(key)
        if compiled is not None:
            return CompileJob.finished(key, spec, compiled)
        with self._cond:
            job = self._inflight.get(key)
            if job is not None:
                return job
            job = self._inflight[key] = CompileJob(key, spec)
            self._queues.setdefault(tenant, deque()).append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grammar-compiler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    @property
    def num_queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` or until a job finishes (an idle core waiting for its only work)."""
        with self._cond:
            if self._inflight:
                self._cond.wait(timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- the worker -------------------------------------------------------------------
    def _next(self) -> CompileJob | None:
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            tenant, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            del self._queues[tenant]
            if queue:  # round robin: this tenant's next job waits behind every other tenant's
                self._queues[tenant] = queue
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            t0 = time.monotonic()
            compiled, error = None, None
            try:
                tokenizer = self._tokenizer()
                compiled = self.compile_fn(tokenizer, job.spec)
            except ValueError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a compile bug fails its requests, not the core
                log.exception("grammar compile failed")
                error = f"structured_outputs.{job.spec.kind} could not be compiled: {type(exc).__name__}"
            if compiled is not None:
                self.cache.put(job.key, compiled)
            with self._cond:
                job.compiled, job.error = compiled, error
                job.done = True
                del self._inflight[job.key]
                self.compile_seconds += time.monotonic() - t0
                if error is None:
                    self.num_compiled += 1
                else:
                    self.num_failed += 1
                self._cond.notify_all()

    def _tokenizer(self) -> LLTokenizer:
        if self.tokenizer is None:
            if self._tokenizer_error is not None:
                raise ValueError(self._tokenizer_error)
            t0 = time.monotonic()
            try:
                self.tokenizer = self.make_tokenizer()
            except Exception as exc:  # noqa: BLE001 - reported to every constrained request
                self._tokenizer_error = f"structured outputs are not available for this model: {exc}"
                log.exception("llguidance tokenizer could not be built")
                raise ValueError(self._tokenizer_error) from None
            log.info("structured outputs: llguidance tokenizer built in %.2f s (%d tokens)",
                     time.monotonic() - t0, self.tokenizer.vocab_size)
        return self.tokenizer
