"""`FleetStream`: one request's outputs from whichever replica serves it.

The fleet routes the request to a replica (`Router.route`, which counts it in
flight there at once) and reads that replica's `RequestStream`. If the replica
dies or stalls before the request's first output, nothing has reached the
client yet, so the request is routed again to another replica instead of
failing (at most MAX_REROUTES times). Once an output has come, a replica's death
ends the stream with its `engine_dead` error, as with one engine.
"""
from __future__ import annotations

import asyncio
from typing import Any, Protocol

from lockgate.engine.errors import EngineDeadError, EngineUnavailableError
from lockgate.engine.frontend.stream import RequestStream
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.lifecycle.replica import Replica
from lockgate.lifecycle.router import NoReplicaError, Ticket

MAX_REROUTES = 3


class Routes(Protocol):
    """What a stream needs of its fleet (fleet.py): a replica for it, and a count of re-routes."""

    ref: str

    def choose(self, hashes: list[bytes], num_tokens: int, tenant: str, tried: set[int]
               ) -> tuple[Replica, Ticket]: ...

    def note_reroute(self) -> None: ...


class FleetStream:
    __slots__ = ("request_id", "replica", "num_reroutes", "_fleet", "_prompt", "_params", "_kwargs",
                 "_hashes", "_tenant", "_inner", "_ticket", "_tried", "_started", "_breaker", "_probe", "_peeked")

    def __init__(self, fleet: Routes, request_id: str, prompt: str | list[int], params: SamplingParams,
                 kwargs: dict[str, Any], hashes: list[bytes], tenant: str) -> None:
        self.request_id = request_id
        self.replica: str = ""  # NAME@VERSION/INDEX of the replica serving it now
        self.num_reroutes = 0
        self._fleet = fleet
        self._prompt = prompt
        self._params = params
        self._kwargs = kwargs
        self._hashes = hashes
        self._tenant = tenant
        self._inner: RequestStream | None = None
        self._ticket: Ticket | None = None
        self._tried: set[int] = set()
        self._started = False
        self._breaker: Any = None  # the serving replica's circuit breaker (breaker.py)
        self._probe = False  # this request is its half-open probe
        self._peeked: RequestOutput | BaseException | None = None  # read by `peek`, returned next

    def submit(self) -> None:
        """Route to the best replica not tried yet and submit there (raises EngineUnavailableError
        when no replica can take it, ValueError for bad input)."""
        fleet = self._fleet
        num_tokens = len(self._prompt) if isinstance(self._prompt, list) else 0
        try:
            replica, ticket = fleet.choose(self._hashes, num_tokens, self._tenant, self._tried)
        except NoReplicaError:
            raise EngineUnavailableError(f"no replica of {fleet.ref} is available") from None
        self._tried.add(replica.index)
        try:
            self._inner = replica.client.add_request(self.request_id, self._prompt, self._params,
                                                     **self._kwargs)
        except BaseException:
            ticket.end()
            raise
        self._ticket = ticket
        self.replica = replica.name
        self._breaker, self._probe = replica.breaker, replica.breaker.acquire()

    def _judge(self, ok: bool | None) -> None:
        """The replica's breaker hears how this request went there (None: it says nothing)."""
        b, self._breaker = self._breaker, None
        if b is None:
            return
        if ok is None:
            if self._probe:
                b.release()
        else:
            b.record(ok, self._probe)

    def copy(self, request_id: str, fleet: Routes | None = None) -> FleetStream:
        """The same request again (a hedge), submitted on another replica of this fleet, or on
        `fleet` (another version's); EngineUnavailableError when none can take it."""
        other = FleetStream(fleet or self._fleet, request_id, self._prompt, self._params, self._kwargs,
                            self._hashes, self._tenant)
        if fleet is None:
            other._tried = set(self._tried)  # never the replica that is slow now
        other.submit()
        return other

    @property
    def done(self) -> bool:
        return self._inner is None or self._inner.done

    def abort(self) -> None:
        self._judge(None)
        if self._inner is not None:
            self._inner.abort()
        if self._ticket is not None:
            self._ticket.end()

    def __aiter__(self) -> FleetStream:
        return self

    async def peek(self, timeout_s: float | None) -> bool:
        """Wait up to `timeout_s` (None: for ever) for the first output, kept for the next read:
        True once it (or the stream's end or error) came, False at the timeout. Fallbacks and
        hedges decide with it before anything reaches the client."""
        if self._peeked is not None or self._started:
            return True
        task = asyncio.ensure_future(self._read())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        finally:
            if not task.done():
                task.cancel()
        if not done:
            return False
        exc = task.exception()
        self._peeked = exc if exc is not None else task.result()
        return True

    async def __anext__(self) -> RequestOutput:
        peeked, self._peeked = self._peeked, None
        if isinstance(peeked, BaseException):
            raise peeked
        if peeked is not None:
            return peeked
        return await self._read()

    async def _read(self) -> RequestOutput:
        while True:
            assert self._inner is not None and self._ticket is not None
            try:
                out = await self._inner.__anext__()
            except StopAsyncIteration:
                self._ticket.end()
                self._judge(None)
                raise
            except EngineDeadError:
                self._ticket.end()
                self._judge(False)
                if self._started or not self._reroute():
                    raise
                continue
            except BaseException as exc:
                self._ticket.end()
                self._judge(False if isinstance(exc, EngineUnavailableError) else None)
                raise
            if not self._started:
                self._started = True
                self._ticket.started()
            if out.finished:
                self._ticket.end()
                self._judge(True)
            return out

    def _reroute(self) -> bool:
        """The replica died before the first output: submit to another one. False when none can."""
        if self.num_reroutes >= MAX_REROUTES:
            return False
        try:
            self.submit()
        except (EngineUnavailableError, ValueError):
            return False
        self.num_reroutes += 1
        self._fleet.note_reroute()
        return True

