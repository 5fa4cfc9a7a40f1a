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
from lockgate.store.models import Price
from lockgate.gateway.model_router import Choice
from lockgate.gateway.prompt_features import PromptFeatures, PromptText
from lockgate.lifecycle import fallback, hedge
from lockgate.lifecycle.fallback import Attempt
from lockgate.lifecycle.target import Target
from lockgate.observability.metrics import RequestTracker
from lockgate.observability.record import RequestRecord
from lockgate.server import generation, idempotency, prompts
from lockgate.server.params import sampling_error
from lockgate.server.state import (LEASE_SCOPE_KEY, MODEL_SCOPE_KEY, PRINCIPAL_SCOPE_KEY, REPLICA_SCOPE_KEY,
                                   VERSION_SCOPE_KEY, AppState)

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
    router = app.models.routers.get(requested)
    if router is not None:  # a router model: its default's tokenizer (or its first rule's)
        check_model_access(principal, requested, router.name)
        chosen = router.default or router.rules[0].model
        return app.models.route(chosen, None, lambda name: check_model_access(principal, requested, name))
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
    # Fallbacks (lifecycle/fallback.py) and hedges (lifecycle/hedge.py): the models still to try
    # (None: not computed yet), the routing key, what was reserved, the streams of this attempt.
    _fallbacks: list[str] | None = None
    _requested: str | None = None
    _route_key: str | None = None
    _leave_target: Callable[[str], None] | None = None  # gives back the current version's hold
    _worst_tokens: int = -1  # the reservation's worst-case completion tokens (-1: nothing reserved)
    _submitted: list[FleetStream] = field(default_factory=list)
    _params: SamplingParams | None = None
    attempts: list[Attempt] = field(default_factory=list)
    _hedge_version: str | None = None  # the other version a hedge copy went to

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
    def route(self, requested: str | None, user: str | None, *, via: Choice | None = None) -> Target:
        """The version that serves this request (pinned `NAME@VERSION`, or the traffic split sticky
        on `user`, else the tenant), held until the request ends and named in the ledger. `via`: a
        router model chose `requested` (a model the caller may not use answers 404 for the router)."""
        tenant = self.principal.tenant_id if self.principal is not None else None

        def may_use(name: str) -> None:
            self.record.model = name
            if self.meter is not None:
                self.meter.model = name
            check_model_access(self.principal, via.router if via is not None else requested, name)

        self._requested, self._route_key = requested, user or tenant
        if self.meter is not None:
            self.meter.user = user
            self.meter.router = via.label if via is not None else None
        try:
            target = self.app.models.route(requested, user or tenant, may_use)
        except APIError as err:
            if not fallback.should_fall_back(err):
                raise
            target = self._fallback_target(err)
        return self._take(target)

    def _take(self, target: Target) -> Target:
        """Serve the request from `target` from now on (held until the request ends)."""
        leave = target.version.enter()
        self.lease.hold(leave)
        self.lease.hold(lambda _outcome: target.release_probe())
        self._leave_target = leave
        self.request.scope[VERSION_SCOPE_KEY] = target.version.version
        self.request.scope[MODEL_SCOPE_KEY] = target.model_name
        self.request.scope[REPLICA_SCOPE_KEY] = lambda: target.replica
        if self.meter is not None:
            self.meter.model_version = target.version.version
        self.target = target
        return target

    # ---- fallbacks --------------------------------------------------------------------------
    def _fallback_target(self, err: APIError) -> Target:
        """The next model of the request's fallback chain that can take it, after `err` from the
        current one (recorded as an attempt); `err` (or the last fallback's) when none can."""
        models = self.app.models
        chain = self._fallback_chain()
        self._attempt(err)
        tenant = self.principal.tenant if self.principal is not None else None
        while chain:
            name = chain.pop(0)
            if tenant is not None and not tenant.allows_model(name):
                continue  # not the tenant's to use: skipped, never shown
            if not self._fits_reservation(name):
                continue

            def serve_as(served: str) -> None:
                self.record.model = served
                if self.meter is not None:
                    self.meter.model = served

            try:
                target = models.route(name, self._route_key, serve_as)
            except APIError as e:
                if not fallback.should_fall_back(e):
                    raise
                err = e
                self._attempt(e)
                continue
            models.count_fallback(self.attempts[-1].model, target.model_name, self.attempts[-1].code)
            if self.meter is not None and self._worst_tokens >= 0 and self.principal is not None:
                assert self.principal.tenant is not None  # billed at the model that serves
                self.meter.price = self.app.gateway.latest(self.principal.tenant).price_for(target.model_name)
            return target
        raise err

    def _fallback_chain(self) -> list[str]:
        """The models still to try (computed once per request, then consumed as they are tried)."""
        if self._fallbacks is None:
            self._fallbacks = self.app.models.fallback_chain(self._requested)
        return self._fallbacks

    def _attempt(self, err: APIError) -> None:
        t = self.target
        version = t.version.version if t is not None and t.model_name == self.record.model else None
        a = fallback.Attempt(self.record.model or (self._requested or ""), version, err.status, err.code)
        self.attempts.append(a)
        if self.meter is not None:
            self.meter.attempts = [x.to_json() for x in self.attempts]

    def _fits_reservation(self, model: str) -> bool:
        """Once reserved, a fallback must fit what was held: its worst case at its prices (the
        reservation was made at the dearest prices of the chain; a longer context may not fit)."""
        if self.meter is None or self._worst_tokens < 0 or self.principal is None or self.principal.tenant is None:
            return True
        price = self.app.gateway.latest(self.principal.tenant).price_for(model)
        return price.cost(self.meter.prompt_tokens, self._worst_tokens) <= self.meter.reserved_usd + 1e-12

    def _chain_price(self, prompt_tokens: int, worst: int) -> Price | None:
        """The dearest prices among the request's model and its fallbacks (None: no fallbacks)."""
        chain = self._fallback_chain()
        if not chain or self.principal is None or self.principal.tenant is None:
            return None
        tenant = self.app.gateway.latest(self.principal.tenant)
        prices = [tenant.price_for(m) for m in (self.routed.model_name, *chain)]
        return max(prices, key=lambda p: p.cost(prompt_tokens, worst))

    async def with_fallbacks(self, run: Callable[[], Awaitable[Response]]) -> Response:
        """Run the route's body; when the model cannot serve the request (fallback.py says which
        failures count) before any response has started, run it again on the next fallback."""
        while True:
            try:
                return await run()
            except APIError as err:
                if not fallback.should_fall_back(err) or self.target is None:
                    raise
                old = self.target
                generation.abort_all(self._submitted)
                self._submitted.clear()
                if err.code == "first_token_timeout":
                    old.fail()  # a stall counts against the version (and its breaker)
                else:
                    old.release_probe()
                if self._leave_target is not None:
                    self._leave_target("moved")  # a drain of the old version no longer waits for it
                self._take(self._fallback_target(err))

    async def _first_token_wait(self, streams: list[FleetStream]) -> None:
        """The model's `first_token_timeout_s` while a fallback remains: no first output by then
        moves the request on (504 `first_token_timeout` when this runs out of fallbacks)."""
        timeout = self.app.models.first_token_timeout(self.routed)
        if timeout is None:
            return
        if not self._fallback_chain():
            return
        deadline = time.monotonic() + timeout
        for s in streams:
            if not await s.peek(max(0.0, deadline - time.monotonic())):
                raise fallback.first_token_timeout(self.model_name, timeout)

    async def route_prompt(self, requested: str | None, user: str | None, *, messages: list[Any] | None = None,
                           prompt: str | list[Any] | None = None) -> Target:
        """`route` for a request with a prompt (chat `messages` or a completion's `prompt`): a router
        model's name (models config `routers:`) becomes the model its rules choose from the prompt's
        features, computed on a tokenizing thread when they tokenize or detect a language. The
        caller must be allowed both the router's name and the chosen model (else 404 for the router)."""
        router = self.app.models.routers.get(requested)
        if router is None:
            return self.route(requested, user)
        check_model_access(self.principal, requested, router.name)
        tenant = self.principal.tenant if self.principal is not None else None
        tok = self.app.models.tokenizer_of(router.default or router.rules[0].model) \
            if "prompt_tokens" in router.needs else None
        features = PromptFeatures(
            lambda: PromptText.of_messages(messages) if messages is not None else PromptText.of_prompt(prompt or ""),
            tenant_id=tenant.id if tenant is not None else None, tenant_name=tenant.name if tenant is not None else None,
            headers=self.request.headers, encode=(lambda t: tok.encode(t, add_special_tokens=False)) if tok else None)
        choice = await prompts.run_blocking(router.choose, features) if router.costly else router.choose(features)
        if choice is None:
            raise bad_request(f"router model {router.name!r} has no rule for this request and no default",
                              param="model", code="no_matching_rule")
        try:
            target = self.route(choice.model, user, via=choice)
        except APIError as err:  # the chosen model was unloaded since: the router's name is what was asked for
            if err.status == 404:
                raise model_not_found(router.name) from None
            raise
        router.count(choice)
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
        if self.meter is None:
            return
        if self._worst_tokens >= 0:  # a fallback runs on what the first model reserved
            self.meter.prompt_tokens = prompt_tokens
            return
        price = self._chain_price(prompt_tokens, worst_completion_tokens)
        self.app.gateway.reserve(self.lease, self.meter, prompt_tokens, worst_completion_tokens, price)
        self._worst_tokens = worst_completion_tokens
        if price is not None and self.principal is not None and self.principal.tenant is not None:
            self.meter.price = self.app.gateway.latest(self.principal.tenant).price_for(self.model_name)

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
        if self.tracker is None:  # a fallback's second submission keeps the request's one record
            tracker = self.app.metrics.tracker(sum(len(ids) for ids in prompts_ids), self.record)
            tracker.on_tokens = self._on_tokens if self.meter is not None else None
            tracker.on_finish = self._on_finish
            self.tracker = tracker
            lease.hold(lambda outcome: tracker.finish(None, error=outcome))
        lease.accounted = True
        self._params = params
        self.app.models.hedger.note_request()
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
                self._submitted.append(stream)
        except ValueError as exc:
            generation.abort_all(streams)
            raise sampling_error(exc) from None
        except EngineUnavailableError as exc:
            generation.abort_all(streams)
            raise unavailable(str(exc), "engine_unavailable", retry_after_s=5) from None
        if not params.embed:  # embeddings never fall back (vectors of two models do not compare)
            await self._first_token_wait(streams)
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
        ttft, cls = self.record.ttft_s, self.record.cls
        if ttft is not None and cls is not None and not (self._params is not None and self._params.embed):
            # the class's TTFT p95 of generation, for hedge delays
            self.app.models.hedger.observe_ttft(cls.name, ttft)
        if self.meter is not None:
            self.meter.queue_time_s = self.record.queue_s
            times = self.record.engine_times  # speculative decoding's counts, summed over its engine requests
            self.meter.spec_draft_tokens = sum(t.num_draft_tokens for t in times)
            self.meter.spec_accepted_tokens = sum(t.num_accepted_tokens for t in times)
            self.meter.replica = self.target.replica if self.target is not None else None
            self.meter.finish(reasons, error)
        if self.target is not None:
            self.target.end(self.record, self._final_ids)

    # ---- driving the streams ------------------------------------------------------------------
    async def collect(self, streams: list[FleetStream]) -> list[RequestOutput] | Response:
        """Non-streaming routes: every stream's final output, or the response to send instead."""
        if len(streams) == 1 and self._hedge_wanted():
            streams = [await self._hedged(streams[0])]
        return await generation.collect_or_respond(self.request, streams, self.observe, self.settle)

    # ---- hedged requests (lifecycle/hedge.py) ---------------------------------------------------
    def hedge_header(self) -> bool | None:
        """The request's `x-lockgate-hedge` (None: absent); 400 for anything but a boolean."""
        raw = self.request.headers.get(hedge.HEDGE_HEADER)
        if raw is None:
            return None
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise bad_request(f"{hedge.HEDGE_HEADER} must be true or false", param=hedge.HEDGE_HEADER,
                          code="invalid_value")

    def check_hedge(self, stream: bool, params: SamplingParams) -> None:
        """A hedge asked for must be safe: not streamed (output would reach the client from one copy),
        and repeatable (greedy or seeded), else 400 naming the header."""
        if not self.hedge_header():
            return
        if stream:
            raise bad_request("a streamed request cannot be hedged (its output starts at once); drop "
                              f"{hedge.HEDGE_HEADER} or stream=false", param=hedge.HEDGE_HEADER, code="invalid_value")
        if params.temperature != 0 and params.seed is None:
            raise bad_request("only a greedy (temperature 0) or seeded request can be hedged: another copy "
                              "must give the same answer", param=hedge.HEDGE_HEADER, code="invalid_value")

    def _hedge_wanted(self) -> bool:
        asked = self.hedge_header()
        if asked is None and self.principal is not None and self.principal.tenant is not None:
            asked = self.principal.tenant.hedge  # the tenant's opt-in, for requests that are safe
        p = self._params
        return bool(asked) and p is not None and (p.temperature == 0 or p.seed is not None) and p.n == 1

    async def _hedged(self, first: FleetStream) -> FleetStream:
        """Wait the class's TTFT p95 for a first output; then, budget allowing, race a copy on another
        replica (or version): the first to produce wins, the other is aborted and never billed."""
        hedger = self.app.models.hedger
        cls = self.record.cls or self.app.config.classes.default
        if await first.peek(hedger.delay_s(cls.name, cls.ttft_s)):
            return first
        second = self._hedge_copy(first)
        if second is None:
            return first
        if self.meter is not None:
            self.meter.hedged = True
        self.lease.hold(lambda _outcome: second.abort())
        winner, loser = await hedge.first_of(first, second)
        loser.abort()
        if winner is second:
            hedger.won += 1
            if self.meter is not None and self._hedge_version is not None:
                self.meter.model_version = self._hedge_version  # the version that answered
        self.routed.use_stream(winner)
        return winner

    def _hedge_copy(self, first: FleetStream) -> FleetStream | None:
        hedger = self.app.models.hedger
        rid = f"{first.request_id}-hedge"
        if not hedger.take():
            return None
        try:
            return first.copy(rid)  # another replica of the same version
        except (EngineUnavailableError, ValueError):
            pass
        other = self.app.models.other_version(self.routed)
        if other is not None:
            try:
                self._hedge_version = other.version
                return first.copy(rid, other.fleet)
            except (EngineUnavailableError, ValueError):
                pass
        hedger.refund()  # nowhere to send it
        return None

    def closer(self, streams: list[FleetStream]) -> Callable[[], None]:
        """`SSEResponse.on_close` for streaming routes: abort in the engine, record the hang-up."""
        def on_close() -> None:
            generation.abort_all(streams)
            if self.tracker is not None:
                self.settle(None, error="client_disconnected")  # no-op when the stream completed

        return on_close

    # ---- answers that are not a token stream (serving_embeddings.py) --------------------------------
    def bill_cached(self, num_tokens: int) -> None:
        """Prompt tokens answered from a cache (the embedding cache): billed at the cached-prompt
        price, still counted in the request's prompt tokens (as OpenAI counts them)."""
        if self.meter is not None:
            self.meter.cached_tokens += num_tokens

    async def serve_without_engine(self) -> None:
        """A request answered with nothing left to run (every input from a cache): once its reservation
        is on disk, its metrics record is opened as `submit` opens it, so it settles the same way."""
        await self._reserved()
        self.record.admitted = time.monotonic()
        if self.tracker is None:
            tracker = self.app.metrics.tracker(0, self.record)  # no prompt token processed
            tracker.on_finish = self._on_finish
            self.tracker = tracker
            self.lease.hold(lambda outcome: tracker.finish(None, error=outcome))
        self.lease.accounted = True

    def answered(self) -> None:
        """The whole answer of a request that streams no tokens (embeddings) is ready: it stands for
        the first token (the record's TTFT for the class's SLO, the ledger's ttft)."""
        now = time.monotonic()
        if self.record.first_token is None:
            self.record.first_token = self.record.last_token = now
        if self.meter is not None and self.meter.first_token_at is None:
            self.meter.first_token_at = now
