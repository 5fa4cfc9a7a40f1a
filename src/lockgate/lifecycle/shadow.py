"""Shadow traffic: a fraction of a model's requests is also run on its shadow version.

Fire and forget: the shadow request is submitted next to the primary (same prompt
tokens and sampling parameters, the lowest priority, an unmetered pseudo-tenant)
and consumed by a background task; its answer is discarded and never billed. The
primary never waits for it, and a shadow that is saturated (`max_concurrency` in
flight), not ready or refuses the request is dropped and counted, never retried.
When both sides end, the pair is compared: greedy requests (temperature 0) by
token agreement and whether the first 32 tokens match; all by TTFT, TPOT, errors.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from lockgate.engine.sampling_params import SamplingParams
from lockgate.eval.agreement import first_tokens_match, token_agreement
from lockgate.lifecycle.settings import ShadowConfig
from lockgate.lifecycle.stats import OnEnd, Outcome, Pair, ShadowStats, outcome_of
from lockgate.lifecycle.version import ModelVersion
from lockgate.observability.record import RequestRecord

log = logging.getLogger("lockgate.lifecycle")

SHADOW_TENANT = "lockgate-shadow"  # fair share: shadows compete only with each other


class _Pairing:
    """Waits for both sides of one shadowed request, then records the comparison."""

    __slots__ = ("greedy", "stats", "primary", "shadow", "on_pair")

    def __init__(self, greedy: bool, stats: ShadowStats, on_pair: Callable[[Pair], None]) -> None:
        self.greedy = greedy
        self.stats = stats
        self.primary: tuple[Outcome, list[int]] | None = None
        self.shadow: tuple[Outcome, list[int]] | None = None
        self.on_pair = on_pair

    def primary_done(self, outcome: Outcome | None, ids: list[int]) -> None:
        if outcome is None:
            return  # the client went away: nothing to compare against
        self.primary = (outcome, ids)
        self._maybe_record()

    def shadow_done(self, outcome: Outcome, ids: list[int]) -> None:
        self.shadow = (outcome, ids)
        self._maybe_record()

    def _maybe_record(self) -> None:
        if self.primary is None or self.shadow is None:
            return
        (po, pids), (so, sids) = self.primary, self.shadow
        pair = Pair(po, so)
        if self.greedy and po.ok and so.ok:
            pair.agreement = token_agreement(pids, sids)
            pair.first_match = first_tokens_match(pids, sids)
        self.stats.record(pair)
        self.on_pair(pair)


class ShadowRunner:
    def __init__(self, lowest_priority: int) -> None:
        self.lowest_priority = lowest_priority
        self.in_flight: dict[str, int] = {}  # per model
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(self, shadow: ModelVersion, cfg: ShadowConfig, stats: ShadowStats, request_id: str,
               prompt: list[int], params: SamplingParams, on_pair: Callable[[Pair], None]) -> OnEnd | None:
        """Maybe send this request to the shadow too; returns the primary's end hook when sent."""
        if cfg.fraction <= 0 or random.random() >= cfg.fraction:
            return None
        model = shadow.name
        if not shadow.available or self.in_flight.get(model, 0) >= cfg.max_concurrency:
            stats.dropped += 1
            return None
        try:
            stream = shadow.fleet.add_request(f"{request_id}.shadow", prompt, params,
                                               priority=self.lowest_priority, tenant=SHADOW_TENANT)
        except Exception as exc:  # noqa: BLE001 - a shadow never fails its primary
            log.debug("shadow request to %s not sent: %s", shadow.spec.ref, exc)
            stats.dropped += 1
            return None
        record = RequestRecord(f"{request_id}.shadow", "shadow")  # timed as primaries are, from submission
        stats.sent += 1
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        release = shadow.enter()  # an unload drains shadows too
        pairing = _Pairing(params.temperature == 0, stats, on_pair)
        task = asyncio.get_running_loop().create_task(self._consume(model, stream, record, pairing, release))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pairing.primary_done

    async def _consume(self, model: str, stream, record: RequestRecord, pairing: _Pairing,  # noqa: ANN001
                       release: Callable[[str], None]) -> None:
        ok = False
        ids: list[int] = []
        try:
            async for out in stream:
                record.observe(out, time.monotonic())
                for c in out.outputs:
                    if c.index == 0:
                        ids = c.token_ids
                if out.finished:
                    ok = True
                    break
            # no finished output: cut short (drain, restart), a failure
        except Exception:  # noqa: BLE001 - an error is a figure, not a failure
            ok = False
        finally:
            stream.abort()
            self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)
            release("shadow")
        pairing.shadow_done(outcome_of(record, ok), list(ids))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
