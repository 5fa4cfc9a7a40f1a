"""The gateway's part in an inference route: the caller's model access, caps, limits, budget, meter.

The guard middleware charges every inference call one request of the tenant's
rpm (`charge_request`) as soon as its key is known. `Gate.open` runs first in a
route (so even a malformed body from a tenant is counted: a refusal counter, as
the request never reserved anything); `admit` takes the tenant's tokens per
minute, concurrency slot and budget reservation after tokenization, when the
worst case is known; `reserved` waits until the reservation is on disk, before
anything is generated.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from lockgate.engine.sampling_params import SamplingParams
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import Principal
from lockgate.gateway.gateway import Gateway
from lockgate.gateway.lease import Lease
from lockgate.server.context import PRINCIPAL_SCOPE_KEY, ServerContext
from lockgate.server.errors import APIError, bad_request, model_not_found, unavailable
from lockgate.gateway.classes import PriorityClass
from lockgate.observability.record import RequestRecord
from lockgate.server.metrics import RequestTracker

PRIORITY_HEADER = "x-lockgate-priority"


TOKEN_PATHS = frozenset({"/tokenize", "/detokenize"})


def charge_request(gateway: Gateway, scope: MutableMapping[str, Any], path: str) -> APIError | None:
    """Every call a tenant's key makes on an inference route (`/v1/*`, `/tokenize`, `/detokenize`)
    costs one request of its rpm, whatever its answer: a malformed, oversized or refused call is not
    free. Called by the guard middleware once the key is known; the 429 to send, or None."""
    principal: Principal | None = scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None or not (path.startswith("/v1/") or path in TOKEN_PATHS):
        return None
    try:
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


@dataclass(slots=True)
class Gate:
    ctx: ServerContext
    lease: Lease
    principal: Principal | None
    meter: Meter | None
    record: RequestRecord
    priority_header: str | None = None

    @classmethod
    def open(cls, request: Request, ctx: ServerContext, lease: Lease, request_id: str) -> Gate:
        principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
        meter = ctx.gateway.open_meter(lease, principal, request_id) if principal is not None else None
        record = ctx.observer.open(request_id, request.url.path, principal)
        record.meter = meter
        lease.record = record  # closed by the guard middleware when the request ends
        return cls(ctx, lease, principal, meter, record, request.headers.get(PRIORITY_HEADER))

    def note(self, stream: bool, prompt: object) -> None:
        """For the request log: streamed or not, and the prompt (kept only with --log-prompts)."""
        self.record.stream = stream
        if self.ctx.config.log_prompts:
            self.record.prompt = prompt

    @property
    def cache_salt(self) -> str | None:
        """Prefix-cache entries are salted per tenant: no tenant can time another's prompts."""
        return self.principal.tenant_id if self.principal is not None else None

    def check_model(self, requested: str | None, served: str) -> None:
        self.record.model = served
        if self.meter is not None:
            self.meter.model = served
        check_model_access(self.principal, requested, served)

    def cap(self, params: SamplingParams, param: str) -> SamplingParams:
        """The tenant's (and key's) cap on max_tokens: fills it in when absent, refuses more."""
        if self.principal is None:
            return params
        cap = self.ctx.gateway.max_tokens_cap(self.principal)
        if cap is None:
            return params
        if params.max_tokens is None:
            return params.replace(max_tokens=cap)
        if params.max_tokens > cap:
            raise bad_request(f"{param} must be <= {cap} for this API key, got {params.max_tokens}",
                              param=param, code="max_tokens_exceeded")
        return params

    def priority(self, body_priority: int | str | None) -> tuple[PriorityClass, int]:
        """The request's class and engine priority: its tenant's class unless it asks for a lower
        one (header `x-lockgate-priority` or body `priority`, a class name or an integer); higher is 403."""
        cls, value = self._priority(body_priority)
        self.record.cls = cls  # from here on the request counts for its class's SLO
        return cls, value

    def _priority(self, body_priority: int | str | None) -> tuple[PriorityClass, int]:
        classes = self.ctx.config.classes
        tenant = self.principal.tenant if self.principal is not None else None
        base = (classes.get(tenant.priority) or classes.default) if tenant is not None else None
        asked = body_priority
        if self.priority_header is not None:
            if body_priority is not None and body_priority != self.priority_header:
                raise bad_request("the x-lockgate-priority header and the body's priority disagree",
                                  param="priority", code="invalid_value")
            asked = self.priority_header
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

    @property
    def tenant(self) -> tuple[str, float]:
        """Fair-share identity and weight for the engine (open mode: one shared tenant)."""
        if self.principal is None or self.principal.tenant is None:
            return "", 1.0
        return self.principal.tenant_id, self.principal.tenant.weight

    def admit(self, prompt_tokens: int, worst_completion_tokens: int) -> None:
        if self.meter is not None:
            self.ctx.gateway.admit(self.lease, self.meter, prompt_tokens, worst_completion_tokens)

    async def reserved(self) -> None:
        """The budget reservation is on disk (a kill from here on is settled as `interrupted`)."""
        if self.meter is None or self.meter.reservation is None:
            return
        try:
            await self.meter.reservation
        except Exception:  # noqa: BLE001 - nothing may run unrecorded
            raise unavailable("the usage ledger is not writable; the request was not run", "ledger_unavailable",
                              retry_after_s=5) from None

    def track(self, tracker: RequestTracker) -> None:
        """Feed the meter from the request's metrics record (tokens as they stream, how it ended,
        the engine's queue time)."""
        meter = self.meter
        if meter is None:
            return
        gw = self.ctx.gateway
        record = self.record

        def finish(reasons: list[str | None] | None, error: str | None) -> None:
            meter.queue_time_s = record.queue_s
            meter.finish(reasons, error)

        tracker.on_tokens = lambda n, cached: gw.on_tokens(meter, n, cached)
        tracker.on_finish = finish
