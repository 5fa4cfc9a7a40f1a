"""The request pipeline: the one sequence every inference route follows.

    0 charge     one request of the tenant's rpm per call, whatever its answer (the guard middleware)
    1 open       the caller (authenticated by the guard middleware), its request record and usage meter
    2 route      the target: `ModelRegistry.route` -> model version and its engine (404 for a model the
                 tenant may not use, whatever its state); the version is held until the request ends
    3 reserve    the tenant's limits and budget for the worst case (gateway), after tokenization
    4 shed       SLO admission against the target's live queue (429 queue_full / slo_unattainable)
    5 submit     the engine requests, once the budget reservation is on disk;
      observe    every output as it streams (tokens, timing: the request's one clock);
      settle     how it ended: the ledger row, metrics, the version's outcome

Everything taken along the way is held on the request's `Lease`, so a failure
anywhere gives it all back exactly once. The routes (serving_*.py) only
translate between OpenAI's shapes and these steps.
"""
from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import EngineUnavailableError
from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.errors import APIError, bad_request, model_not_found, unavailable
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import Principal
from lockgate.gateway.classes import PriorityClass
from lockgate.gateway.gateway import Gateway
from lockgate.gateway.lease import Lease
from lockgate.lifecycle.target import Target
from lockgate.observability.metrics import RequestTracker
from lockgate.observability.record import RequestRecord
from lockgate.server import generation, idempotency, prompts
from lockgate.server.params import sampling_error
from lockgate.server.state import LEASE_SCOPE_KEY, PRINCIPAL_SCOPE_KEY, REPLICA_SCOPE_KEY, VERSION_SCOPE_KEY, AppState

PRIORITY_HEADER = "x-lockgate-priority"


INFERENCE_PATHS = frozenset({"/tokenize", "/detokenize"})  # besides every /v1/ route


async def charge_call(gateway: Gateway, scope: MutableMapping[str, Any], path: str) -> APIError | None:
    """Every call a tenant's key makes on an inference route (`/v1/*`, `/tokenize`, `/detokenize`)
    costs one request of its rpm, whatever its answer: a malformed, oversized or refused call is not
    free. Called by the guard middleware once the key is known; the 429 to send, or None."""
    principal: Principal | None = scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None or not (path.startswith("/v1/") or path in INFERENCE_PATHS):
        return None
    try:
        if gateway.shared:  # the limit is the sum over every instance: counted in the store
            await gateway.charge_shared(principal)
        else:
            gateway.charge_request(principal)
    except APIError as err:
        return err
    return None


def check_model_access(principal: Principal | None, requested: str | None, served: str) -> None:
    """A model the caller's tenant may not use answers exactly as a model that does not exist
    (whatever version was named, whatever its state): checked before anything about it is shown."""
    tenant = principal.tenant if principal is not None else None
    if tenant is not None and not tenant.allows_model(served):
        raise model_not_found(requested or served)


def _uuid4_hex() -> str:
    """`uuid.uuid4().hex` (16 random bytes with the version and variant bits set), a third the cost."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def _url_path(request: Request) -> str:
    """`request.url.path` without building the URL: the scope's path as is, unless it holds a
    character the URL escapes."""
    path: str = request.scope["path"]
    return request.url.path if ("?" in path or "#" in path or "\\" in path) else path


def route_only(request: Request, app: AppState, requested: str | None) -> Target:
    """The target of a request that runs nothing (`/tokenize`, `/detokenize`): its model's
    tokenizer and limits, for a caller that may use the model."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return app.models.route(requested, None, lambda name: check_model_access(principal, requested, name))


@dataclass(slots=True)
class Pipeline:
    app: AppState
    request: Request
    lease: Lease
    request_id: str
    principal: Principal | None
    meter: Meter | None
    record: RequestRecord
    target: Target | None = None
    tracker: RequestTracker | None = None
    _final_ids: dict[str, list[int]] = field(default_factory=dict)  # choice 0's tokens per engine request

    # ---- 1 open -----------------------------------------------------------------------------
    @classmethod
    def open(cls, request: Request, app: AppState, id_prefix: str) -> Pipeline:
        """The caller's record and meter, opened before the body is read (a malformed body from a
        tenant is counted: a refusal, as nothing was reserved)."""
        lease: Lease = request.scope[LEASE_SCOPE_KEY]
        principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
        request_id = f"{id_prefix}-{_uuid4_hex()}"
        meter = app.gateway.open_meter(lease, principal, request_id) if principal is not None else None
        record = app.observer.open(request_id, _url_path(request), principal)
        record.meter = meter
        lease.record = record  # closed by the guard middleware when the request ends
        return cls(app, request, lease, request_id, principal, meter, record)

    def note(self, stream: bool, prompt: object) -> None:
        """For the request log: streamed or not, and the prompt (kept only with --log-prompts)."""
        self.record.stream = stream
        if self.app.config.log_prompts:
            self.record.prompt = prompt

    def checkpoint(self, point: str) -> None:
        """TEST ONLY fault points (`x-lockgate-fault`), see gateway/lease.py."""
        self.lease.checkpoint(point)

    # ---- 2 route ----------------------------------------------------------------------------
    def route(self, requested: str | None, user: str | None) -> Target:
        """The version that serves this request (pinned `NAME@VERSION`, or the traffic split sticky
        on `user`, else the tenant), held until the request ends and named in the ledger."""
        tenant = self.principal.tenant_id if self.principal is not None else None

        def may_use(name: str) -> None:
            self.record.model = name
            if self.meter is not None:
                self.meter.model = name
            check_model_access(self.principal, requested, name)

        target = self.app.models.route(requested, user or tenant, may_use)
        self.lease.hold(target.version.enter())
        self.request.scope[VERSION_SCOPE_KEY] = target.version.version
        self.request.scope[REPLICA_SCOPE_KEY] = lambda: target.replica
        if self.meter is not None:
            self.meter.model_version = target.version.version
            self.meter.user = user
        self.target = target
        return target

    @property
    def routed(self) -> Target:
        assert self.target is not None, "route() first"
        return self.target

    @property
    def model_name(self) -> str:
        """The served name of the routed model (what responses say in `model`)."""
        return self.routed.model_name

    @property
    def engine_config(self) -> EngineConfig:
        return self.routed.engine_config

    @property
    def max_model_len(self) -> int:
        return self.routed.max_model_len

    def decode(self, ids: list[int]) -> str:
        """Token ids as text, special tokens kept (an echoed token-id prompt)."""
        return self.routed.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens kept (a prompt token that has no logprob entry)."""
        return self.routed.tokenizer.decode([token_id], skip_special_tokens=False)

    async def idempotent(self, stream: bool, run: Callable[[], Awaitable[Response]]) -> Response:
        """`Idempotency-Key`: a retry gets the stored answer and is billed once (idempotency.py)."""
        return await idempotency.idempotent(self.request, self.app.gateway, self.meter, stream,
                                            self.request_id, run)

    # ---- what the tenant may ask for ----------------------------------------------------------
    def cap(self, params: SamplingParams, param: str) -> SamplingParams:
        """The tenant's (and key's) cap on max_tokens: fills it in when absent, refuses more."""
        if self.principal is None:
            return params
        cap = self.app.gateway.max_tokens_cap(self.principal)
        if cap is None:
            return params
        if params.max_tokens is None:
            return params.replace(max_tokens=cap)
        if params.max_tokens > cap:
            raise bad_request(f"{param} must be <= {cap} for this API key, got {params.max_tokens}",
                              param=param, code="max_tokens_exceeded")
        return params

    def classify(self, body_priority: int | str | None) -> tuple[PriorityClass, int]:
        """The request's class and engine priority: its tenant's class unless it asks for a lower
        one (header `x-lockgate-priority` or body `priority`, a class name or an integer); higher is 403."""
        cls, value = self._priority(body_priority)
        self.record.cls = cls  # from here on the request counts for its class's SLO
        if self.meter is not None:
            self.meter.priority_class = cls.name
        return cls, value

    def _priority(self, body_priority: int | str | None) -> tuple[PriorityClass, int]:
        classes = self.app.config.classes
        tenant = self.principal.tenant if self.principal is not None else None
        base = (classes.get(tenant.priority) or classes.default) if tenant is not None else None
        asked = body_priority
        header = self.request.headers.get(PRIORITY_HEADER)
        if header is not None:
            if body_priority is not None and body_priority != header:
                raise bad_request("the x-lockgate-priority header and the body's priority disagree",
                                  param="priority", code="invalid_value")
            asked = header
        if asked is None:
            cls = base or classes.default
            return cls, cls.rank
        if isinstance(asked, str):
            found = classes.get(asked)
            if found is None:
                shown = asked if len(asked) <= 64 and asked.isprintable() else "(invalid)"
                raise bad_request(f"unknown priority class {shown!r}; one of {', '.join(classes.names)}",
                                  param="priority", code="invalid_value")
            cls, value = found, found.rank
        else:
            cls, value = classes.of_priority(asked), asked
        if base is not None and value < base.rank:
            raise APIError(403, f"priority {asked!r} is above this API key's class {base.name!r}",
                           param="priority", code="priority_not_allowed")
        return cls, value

    # ---- prompts against the target ------------------------------------------------------------
    def check_ready(self) -> None:
        """503 while the server drains or the target's engine restarts (again after any await)."""
        if self.app.draining:
            self.app.metrics.reject("draining")
            raise unavailable("the server is shutting down", "server_draining")
        if not self.routed.healthy:
            self.app.metrics.reject("engine_unavailable")
            raise unavailable("the engine is unavailable (restarting); retry shortly", "engine_unavailable",
                              retry_after_s=5)

    async def encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        return await prompts.encode(self.routed, text, add_special_tokens, param)

    async def check_prompt_chars(self, text: str, param: str) -> None:
        await prompts.check_prompt_chars(self.routed, text, param)

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        prompts.check_context(self.routed, num_prompt_tokens, max_tokens, param)

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          continue_final: bool, kwargs: dict[str, Any] | None) -> str:
        return await prompts.render_chat_async(self.routed, messages, add_generation_prompt, continue_final, kwargs)

    # ---- 3 reserve, 4 shed ----------------------------------------------------------------------
    def reserve(self, prompt_tokens: int, worst_completion_tokens: int) -> None:
        """The tenant's tokens per minute, concurrency slot and budget for the worst case (429/402
        style refusals from the gateway); each is held on the lease."""
        if self.meter is not None:
            self.app.gateway.reserve(self.lease, self.meter, prompt_tokens, worst_completion_tokens)

    def shed(self, num_requests: int, num_tokens: int, cls: PriorityClass, priority: int) -> None:
        """SLO admission: queue bounds and the class's predicted wait on the target's queue (429);
        in memory, nothing taken."""
        self.lease.checkpoint("admit")
        self.routed.admission.check(num_requests, num_tokens, cls, priority)

    # ---- 5 submit, observe, settle ----------------------------------------------------------------
    async def submit(self, prompts_ids: list[list[int]], texts: list[str | None], params: SamplingParams,
                     priority: int) -> list[FleetStream]:
        """One engine request per prompt, all or nothing, once the reservation is on disk; every
        stream and the request's metrics are held on the lease from the moment they exist."""
        await self._reserved()
        await self.routed.activate()  # an autoscaled version at zero: held while a replica starts
        self.check_ready()
        lease = self.lease
        lease.checkpoint("track")
        self.record.admitted = time.monotonic()  # admission ends: the engine takes over
        tracker = self.app.metrics.tracker(sum(len(ids) for ids in prompts_ids), self.record)
        tracker.on_tokens = self._on_tokens if self.meter is not None else None
        tracker.on_finish = self._on_finish
        self.tracker = tracker
        lease.hold(lambda outcome: tracker.finish(None, error=outcome))
        lease.accounted = True
        lease.checkpoint("submit")
        tenant, weight = self._fair_share()
        salt = self.principal.tenant_id if self.principal is not None else None  # no tenant can time another's
        streams: list[FleetStream] = []
        try:
            for i, (ids, text) in enumerate(zip(prompts_ids, texts)):
                rid = self.request_id if len(prompts_ids) == 1 else f"{self.request_id}-{i}"
                stream = self.routed.submit(rid, ids, params, prompt_text=text, priority=priority, cache_salt=salt,
                                        tenant=tenant, tenant_weight=weight)
                lease.hold(lambda _outcome, s=stream: s.abort())
                streams.append(stream)
        except ValueError as exc:
            generation.abort_all(streams)
            raise sampling_error(exc) from None
        except EngineUnavailableError as exc:
            generation.abort_all(streams)
            raise unavailable(str(exc), "engine_unavailable", retry_after_s=5) from None
        lease.checkpoint("respond")
        return streams

    async def _reserved(self) -> None:
        """The budget reservation is on disk (a kill from here on is settled as `interrupted`)."""
        if self.meter is None or self.meter.reservation is None:
            return
        try:
            await self.meter.reservation
        except APIError:  # a shared store refused (429) or could not answer (503): nothing was reserved
            self.meter.reservation = None  # settles as a refusal, not a ledger row
            raise
        except Exception:  # noqa: BLE001 - nothing may run unrecorded
            raise unavailable("the usage ledger is not writable; the request was not run", "ledger_unavailable",
                              retry_after_s=5) from None

    def _fair_share(self) -> tuple[str, float]:
        """Fair-share identity and weight for the engine (open mode: one shared tenant)."""
        if self.principal is None or self.principal.tenant is None:
            return "", 1.0
        return self.principal.tenant_id, self.principal.tenant.weight

    def observe(self, out: RequestOutput) -> None:
        """One engine output on its way to the client."""
        assert self.tracker is not None
        self.tracker.on_output(out)
        if self.target is not None and self.target.mirrored:  # only shadow pairs compare tokens
            for c in out.outputs:
                if c.index == 0:
                    self._final_ids[out.request_id] = c.token_ids

    def settle(self, finish_reasons: list[str | None] | None, error: str | None = None) -> None:
        """Once: how the request ended (`error` set: a failure) into its record, metrics, the
        ledger and the version's outcome. Later calls (the lease's release) are no-ops."""
        assert self.tracker is not None
        self.tracker.finish(finish_reasons, error)

    def _on_tokens(self, num_new: int, num_cached: int) -> None:
        assert self.meter is not None
        self.app.gateway.on_tokens(self.meter, num_new, num_cached)

    def _on_finish(self, reasons: list[str | None] | None, error: str | None) -> None:
        if self.meter is not None:
            self.meter.queue_time_s = self.record.queue_s
            self.meter.replica = self.target.replica if self.target is not None else None
            self.meter.finish(reasons, error)
        if self.target is not None:
            self.target.end(self.record, self._final_ids)

    # ---- driving the streams ------------------------------------------------------------------
    async def collect(self, streams: list[FleetStream]) -> list[RequestOutput] | Response:
        """Non-streaming routes: every stream's final output, or the response to send instead."""
        return await generation.collect_or_respond(self.request, streams, self.observe, self.settle)

    def closer(self, streams: list[FleetStream]) -> Callable[[], None]:
        """`SSEResponse.on_close` for streaming routes: abort in the engine, record the hang-up."""
        def on_close() -> None:
            generation.abort_all(streams)
            if self.tracker is not None:
                self.settle(None, error="client_disconnected")  # no-op when the stream completed

        return on_close
