"""The FastAPI application: routes, error handlers, guard middleware, engine life cycle."""
from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import lockgate
from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import EngineUnavailableError
from lockgate.engine.generation_defaults import checkpoint_source, resolve
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.gateway.response_cache import ResponseCache
from lockgate.lifecycle.build import ModelPlan, build_registry, single
from lockgate.lifecycle.registry import EngineOptions
from lockgate.lifecycle.metrics import engine_state
from lockgate.lifecycle.version import ModelVersion
from lockgate.server.config import DEFAULT_MODEL_NAME, ServerConfig
from lockgate.server.errors import install_error_handlers
from lockgate.observability.metrics import ServerMetrics
from lockgate.observability.observer import Observer
from lockgate.server.direct import DirectRoutes
from lockgate.server.docs_ui import install_docs
from lockgate.server.middleware import GuardMiddleware
from lockgate.server.openapi import install_openapi
from lockgate.server.admin_routes import admin_router
from lockgate.server.alert_routes import alert_router
from lockgate.server.alerting import build_alerts
from lockgate.server.anomaly_routes import anomaly_router
from lockgate.server.model_routes import model_router
from lockgate.server.routes import router
from lockgate.server.schema_routes import schema_router
from lockgate.server.state import AppState

log = logging.getLogger("lockgate.server")


def served_names(engine_config: EngineConfig, server_config: ServerConfig) -> list[str]:
    """As vLLM: the `model` argument as given, unless names are configured."""
    if server_config.served_model_names:
        return list(server_config.served_model_names)
    return [engine_config.model or DEFAULT_MODEL_NAME]


def log_sampling_defaults(versions: Iterable[ModelVersion]) -> None:
    """What a request that leaves temperature, top_p, ... out gets, per version (its generation config)."""
    for v in versions:
        cfg = v.fleet.model_config
        try:
            defaults = resolve(v.engine_config.generation_config, cfg.sampling_defaults if cfg else None,
                               checkpoint_source(v.engine_config.model))
        except ValueError as exc:  # a version's own generation_config path (serve checks the flag's at once)
            log.error("%s: sampling defaults ignored: %s", v.spec.ref, exc)
            continue
        log.info("%s: sampling defaults for requests that leave them out: %s", v.spec.ref, defaults.describe())


def build_app(engine_config: EngineConfig, server_config: ServerConfig, plan: ModelPlan | None = None) -> FastAPI:
    """`plan`: the models and versions to serve (lifecycle/build.py); None: `engine_config`'s one model."""
    plan = plan or single(engine_config, served_names(engine_config, server_config), server_config.replicas)
    cfg = server_config
    metrics = ServerMetrics(plan.specs[0].name, lambda: engine_state(state.models))  # summed over every version
    metrics.max_queued.labels(plan.specs[0].name).set(cfg.max_queued_requests)
    gateway = Gateway(GatewayConfig(cfg.data_dir, cfg.admin_key, cfg.store_url, cfg.api_workers))
    observer = Observer.from_config(cfg, metrics, cfg.classes)
    options = EngineOptions(cfg.classes, cfg.slo_admission, cfg.max_queued_requests, cfg.max_queued_tokens,
                            cfg.engine_startup_timeout_s, cfg.engine_stall_timeout_s, cfg.router_policy)
    models, model_admin = build_registry(plan, engine_config, options, metrics, gateway)
    models.hedger.budget = cfg.hedge_budget  # hedged requests' share of traffic, at most
    state = AppState(cfg, metrics, gateway, observer, models)
    if cfg.response_cache_bytes:  # off by default: benchmarks and evaluations never hit it unknowingly
        state.response_cache = ResponseCache(cfg.response_cache_bytes, cfg.response_cache_ttl_s)
    alerts = build_alerts(cfg, gateway, metrics)  # budget alerts and webhooks (None: another worker's job)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()  # opens the store; settles what a killed process left
        if alerts is not None:
            alerts.start()
        try:
            await models.start()  # an EngineStartError here makes uvicorn exit: nothing to serve
            mode = "keyed" if gateway.keyed else "open (no keys)"
            served = ", ".join(v.spec.ref for v in models.versions())
            first = next(models.versions()).fleet
            log.info("serving %s (max_model_len %d); gateway %s", served, first.max_model_len, mode)
            log_sampling_defaults(models.versions())
            # What start-up built lives as long as the server: out of the cyclic GC's sight, a full
            # collection no longer walks it (tens of ms, every few thousand requests, on the event loop).
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()  # collectable again (in-process test servers come and go)
                await models.shutdown()
        finally:
            if alerts is not None:
                await alerts.stop()  # before the store closes
            await gateway.stop()  # after the engine: in-flight requests have settled
            observer.close()  # flush the request log and batched traces

    # FastAPI's own OpenTelemetry hooks off: lockgate traces its requests itself (observability/tracing.py),
    # and the hooks' per-request check of the global providers costs CPU on every call.
    # /docs is docs_ui.py's: Swagger UI from local files (FastAPI's own loads it from a CDN).
    app = FastAPI(title="lockgate", version=lockgate.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.lockgate = state
    app.state.model_admin = model_admin
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(alert_router)
    app.include_router(anomaly_router)
    app.include_router(model_router)
    app.include_router(schema_router)
    install_openapi(app)
    install_docs(app)
    # The hot inference routes run straight from the guard (direct.py); the rest through FastAPI's stack.
    app.add_middleware(GuardMiddleware, state=state, direct=DirectRoutes(app, router.routes))
    return app


async def drain(state: AppState, timeout_s: float) -> None:
    """Refuse new requests (503), let in-flight ones finish for up to `timeout_s`, then
    cut the rest short with a clear error. Returns when no request is left."""
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    log.info("draining: %d request(s) in flight, waiting up to %.0f s", state.inflight, timeout_s)
    while state.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight > 0:
        log.warning("drain timeout: cancelling %d request(s) still in flight", state.inflight)
        for c in state.models.fleets():
            c.fail_all(EngineUnavailableError("the server is shutting down; the request was cut short"))
        end = loop.time() + 5.0
        while state.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.05)
    log.info("drained")
