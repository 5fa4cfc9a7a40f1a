"""`GrammarCompiler`: compiles grammars on a worker thread, never on the core loop's step.

The core submits a request's `StructuredOutputs` and gets a `CompileJob` at once; the
request is not scheduled until the job is done (`scheduler.py`), while every other
request keeps running. Jobs for the same grammar are shared (one compile for the
`n` children, or for many requests sending one schema). Queued jobs are taken round
robin between tenants, and a tenant has at most `max_queued_per_tenant` compiles
queued: past that its new constrained requests fail at once (the others' compiles
never wait behind thousands of one tenant's schemas). llguidance releases the GIL
while it compiles.

A compile has `timeout_s`. llguidance's limits (`grammar.parser_limits`) bound a
grammar's size and lexer work but not every compile: a 200 KB schema of 8000 optional
properties with `additionalProperties: false` passes them and compiles in ~14 s
(measured on the 2-core CI machine; most schemas take milliseconds, llguidance builds
its lexer lazily). A compile cannot be interrupted, so the core loop (`expire`, every
step while requests wait for compiles) fails a job over the limit, with its requests,
and starts another worker for the queue; the abandoned thread finishes its compile,
discards it, and exits (or takes over the queue when no other worker is left). At most
`max_threads` threads are alive; the grammar is remembered as too slow (refused at once).

The llguidance tokenizer is built on the first worker before its first job (about 0.3 s
for a 49k vocabulary, not counted against the limit), so a core that never sees a
constrained request never pays for it.
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

DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_MAX_QUEUED_PER_TENANT = 64
# Worker threads alive at most: one taking jobs, the others finishing over-limit compiles.
MAX_COMPILE_THREADS = 4
_TOO_SLOW_KEYS = 256


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


def _failed(key: tuple, spec: StructuredOutputs, error: str) -> CompileJob:
    job = CompileJob(key, spec)
    job.error, job.done = error, True
    return job


class GrammarCompiler:
    def __init__(self, make_tokenizer: Callable[[], LLTokenizer], cache: GrammarCache, *,
                 timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 max_queued_per_tenant: int = DEFAULT_MAX_QUEUED_PER_TENANT,
                 max_threads: int = MAX_COMPILE_THREADS) -> None:
        self.make_tokenizer = make_tokenizer
        self.cache = cache
        self.timeout_s = timeout_s
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_threads = max_threads
        self.compile_fn: Callable[[LLTokenizer, StructuredOutputs], CompiledGrammar] = compile_grammar
        self.tokenizer: LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._queues: OrderedDict[str, deque[CompileJob]] = OrderedDict()  # tenant -> its queued jobs
        self._inflight: dict[tuple, CompileJob] = {}
        self._cond = threading.Condition()  # the queues, and "a job finished" for an idle core
        self._running: dict[int, tuple[CompileJob, float]] = {}  # worker id -> (its job, monotonic start)
        self._active: set[int] = set()  # workers that take jobs (not abandoned to an over-limit compile)
        self._alive = 0  # worker threads alive, abandoned ones included
        self._next_worker = 0
        self._too_slow: OrderedDict[tuple, str] = OrderedDict()  # grammars over the limit (bounded)
        self._closed = False
        self.num_compiled = 0
        self.num_failed = 0
        self.num_timed_out = 0
        self.num_rejected = 0
        self.compile_seconds = 0.0

    # ---- the core loop's side -------------------------------------------------------
    def submit(self, spec: StructuredOutputs, tenant: str = "") -> CompileJob:
        """The job for `spec`: finished at once on a cache hit, else queued (or the one in flight);
        already failed when the grammar is known too slow or the tenant's queue is full."""
        key = spec.cache_key()
        compiled = self.cache.get(key)
        if compiled is not None:
            return CompileJob.finished(key, spec, compiled)
        with self._cond:
            job = self._inflight.get(key)
            if job is not None:
                return job
            slow = self._too_slow.get(key)
            if slow is not None:
                self.num_rejected += 1
                return _failed(key, spec, slow)
            queue = self._queues.get(tenant)
            if queue is not None and len(queue) >= self.max_queued_per_tenant:
                self.num_rejected += 1
                return _failed(key, spec, (
                    f"structured_outputs.{spec.kind}: too many grammar compiles queued for this tenant "
                    f"({self.max_queued_per_tenant}); retry when earlier ones finish"))
            job = self._inflight[key] = CompileJob(key, spec)
            self._queues.setdefault(tenant, deque()).append(job)
            if not self._active and self._alive < self.max_threads:
                self._start_worker()
            self._cond.notify_all()
        return job

    @property
    def num_queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def expire(self, now: float | None = None) -> None:
        """Fail the running compiles over the time limit (their requests fail with them) and let
        another worker take the queue. Called by the core loop while requests wait for compiles."""
        if not self._running:
            return
        now = time.monotonic() if now is None else now
        with self._cond:
            for wid, (job, started) in list(self._running.items()):
                if now - started <= self.timeout_s or job.done:
                    continue
                del self._running[wid]
                self._active.discard(wid)  # abandoned: it discards the compile when it ends
                message = (f"structured_outputs.{job.spec.kind}: grammar compile exceeded the "
                           f"{self.timeout_s:g} s limit")
                job.error, job.done = message, True
                self._inflight.pop(job.key, None)
                self._too_slow[job.key] = message
                while len(self._too_slow) > _TOO_SLOW_KEYS:
                    self._too_slow.popitem(last=False)
                self.num_timed_out += 1
                log.warning("grammar compile over the %g s limit (%s): its requests failed", self.timeout_s,
                            job.spec.kind)
                if not self._active and self._alive < self.max_threads:
                    self._start_worker()
            self._cond.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` or until a job finishes (an idle core waiting for its only work)."""
        with self._cond:
            if self._inflight:
                self._cond.wait(timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- the workers --------------------------------------------------------------------
    def _start_worker(self) -> None:
        """Under the lock."""
        wid = self._next_worker
        self._next_worker += 1
        self._active.add(wid)
        self._alive += 1
        threading.Thread(target=self._run, args=(wid,), name=f"grammar-compiler-{wid}", daemon=True).start()

    def _next(self, wid: int) -> CompileJob | None:
        with self._cond:
            if wid not in self._active:
                if self._active or self._closed:
                    return None  # abandoned, and another worker has the queue: this thread ends
                self._active.add(wid)  # the last one alive takes the queue back
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            tenant, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            del self._queues[tenant]
            if queue:  # round robin: this tenant's next job waits behind every other tenant's
                self._queues[tenant] = queue
            self._running[wid] = (job, time.monotonic())
            return job

    def _run(self, wid: int) -> None:
        try:
            try:
                self._tokenizer()  # before the first job's clock starts
            except ValueError:
                pass  # every job reports it
            while (job := self._next(wid)) is not None:
                self._compile(wid, job)
        finally:
            with self._cond:
                self._alive -= 1
                self._active.discard(wid)

    def _compile(self, wid: int, job: CompileJob) -> None:
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
        with self._cond:
            self.compile_seconds += time.monotonic() - t0
            if self._running.pop(wid, None) is None:
                return  # over the limit: the job already failed (`expire`); the compile is dropped
            if compiled is not None:
                self.cache.put(job.key, compiled)
            job.compiled, job.error = compiled, error
            job.done = True
            del self._inflight[job.key]
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
