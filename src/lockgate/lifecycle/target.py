"""`Target`: what serves one request, as the registry answers it (`ModelRegistry.route`).

A target is one model version's engines as a single request sees them: the
version, its fleet of replicas (fleet.py) and engine config, its admission
queue and the model's served names. The request pipeline tokenizes, checks,
sheds and submits against it without knowing how many models, versions or
replicas there are; the fleet picks the replica of each engine request at
submission, once its prompt's tokens (and so its cached prefix) are known.
Two things ride along, invisible to the routes:

- a fraction of requests is mirrored to the model's shadow version (shadow.py);
- TEST ONLY: `fail_fraction` fails that fraction of the version's requests at
  submission (503 `engine_unavailable`), to exercise automatic rollback.

When the request ends, `end` feeds its outcome (timed once, by the request's
`RequestRecord`) to the version's stats and rollback rules, and its tokens to
the shadow comparisons.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import EngineUnavailableError
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.tokenizer import Tokenizer
from lockgate.errors import unavailable
from lockgate.gateway.admission import Admission
from lockgate.lifecycle.fleet import Fleet
from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.lifecycle.stats import OnEnd, Outcome, outcome_of
from lockgate.lifecycle.version import ModelVersion
from lockgate.observability.record import RequestRecord

# A request's failure reasons (the request record's `error`) that count against its version;
# the others (a client that left, a refused request) say nothing about the version.
VERSION_FAILURES = frozenset({"engine_dead", "engine_unavailable", "internal"})

OnOutcome = Callable[[ModelVersion, Outcome, bool], None]  # (version, outcome, a half-open probe)
Mirror = Callable[[ModelVersion, str, list[int], SamplingParams], OnEnd | None]


@dataclass(slots=True)
class Target:
    version: ModelVersion
    names: tuple[str, ...]  # the model's served name, then its aliases
    on_outcome: OnOutcome
    mirror: Mirror
    _paired: list[tuple[str, OnEnd]] = field(default_factory=list)  # (engine request id, its shadow pairing)
    _streams: list[FleetStream] = field(default_factory=list)
    _judged: bool = False  # the outcome is already recorded (an injected fault)
    probe: bool = False  # the version's half-open breaker let this request through to probe it

    @property
    def fleet(self) -> Fleet:
        return self.version.fleet

    @property
    def engine_config(self) -> EngineConfig:
        return self.version.engine_config

    @property
    def admission(self) -> Admission:
        return self.version.admission

    @property
    def model_name(self) -> str:
        return self.names[0]

    @property
    def max_model_len(self) -> int:
        return self.version.fleet.max_model_len

    @property
    def healthy(self) -> bool:
        return self.version.fleet.healthy

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.version.fleet.tokenizer
        if tok is None:
            raise unavailable("the model is still loading", "engine_unavailable", retry_after_s=5)
        return tok

    @property
    def vocab_size(self) -> int:
        """Token ids this model knows: the tokenizer's, or the model's embedding rows if more."""
        vocab = self.tokenizer.vocab_size
        config = self.version.fleet.model_config
        return max(vocab, config.vocab_size) if config is not None else vocab

    @property
    def replica(self) -> str | None:
        """The replica(s) serving the request (`NAME@VERSION/INDEX`, comma-separated when its
        prompts went to several), as they stand now (a re-route changes it); None before submission."""
        names = list(dict.fromkeys(s.replica for s in self._streams if s.replica))
        return ",".join(names) if names else None

    @property
    def mirrored(self) -> bool:
        """Some of the request's engine requests went to the shadow too (their tokens are compared)."""
        return bool(self._paired)

    async def activate(self) -> None:
        """An autoscaled version at zero replicas (or with every replica still loading): wait for one,
        up to its activation timeout, then 503 with Retry-After. At once when a replica is up."""
        fleet = self.fleet
        cfg = fleet.autoscale
        if cfg is None or fleet.num_ready > 0:
            return
        if fleet.held >= self.admission.bounds.max_requests:
            raise unavailable(f"{fleet.held} requests already wait for a replica of {self.version.spec.ref} to "
                              "start; retry shortly", "engine_unavailable", retry_after_s=_retry_s(fleet))
        try:
            await fleet.activate(cfg.activation_timeout_s)
        except EngineUnavailableError as exc:
            raise unavailable(str(exc), "engine_unavailable", retry_after_s=_retry_s(fleet)) from None

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, **kwargs: object
               ) -> FleetStream:
        """One engine request on this version (mirrored to the shadow when its fraction says so)."""
        v = self.version
        if v.inject_fault():
            self._judged = True
            self.on_outcome(v, Outcome(False), self.probe)
            self.probe = False
            raise EngineUnavailableError(f"injected fault (test-only fail_fraction of {v.spec.ref}); "
                                         "the request was not run")
        stream = self.fleet.add_request(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]
        self._streams.append(stream)
        paired = self.mirror(v, request_id, prompt, params)
        if paired is not None:
            self._paired.append((request_id, paired))
        return stream

    def end(self, record: RequestRecord, final_ids: Mapping[str, list[int]]) -> None:
        """The request ended (its record is filled): the version's outcome, the shadow pairs'
        primary side (choice 0's tokens of each engine request)."""
        if record.error is None:
            outcome: Outcome | None = outcome_of(record, ok=True)
        elif record.error in VERSION_FAILURES:
            outcome = outcome_of(record, ok=False)
        else:
            outcome = None
        if outcome is not None and not self._judged:
            self._judged = True
            self.on_outcome(self.version, outcome, self.probe)
            self.probe = False
        self.release_probe()
        for request_id, paired in self._paired:
            paired(outcome, final_ids.get(request_id, []))
        self._paired.clear()


    def use_stream(self, stream: FleetStream) -> None:
        """A hedge won: the request's replica is the winner's from now on."""
        self._streams = [stream]

    def fail(self) -> None:
        """The request left this version for a reason that says it is failing (no first token in
        time): one failure for its stats and breaker, once."""
        if not self._judged:
            self._judged = True
            self.on_outcome(self.version, Outcome(False), self.probe)
            self.probe = False

    def release_probe(self) -> None:
        """The request ends (or moves to a fallback) without judging the version: a half-open probe
        slot it held is free again (held on the request's lease, so it never leaks)."""
        if self.probe:
            self.probe = False
            if not self._judged:
                self.version.breaker.release()


def _retry_s(fleet: Fleet) -> int:
    """Retry-After for a request that found no replica: the latest cold start, 10 s before any."""
    last = fleet.cold_starts[-1] if fleet.cold_starts else 10.0
    return max(1, min(300, math.ceil(last)))
