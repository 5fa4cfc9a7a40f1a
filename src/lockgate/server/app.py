"""The FastAPI application: routes, error handlers, guard middleware, engine life cycle."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import lockgate
from lockgate.engine.client import AsyncEngineClient, EngineUnavailableError
from lockgate.engine.config import EngineConfig
from lockgate.lifecycle.build import ModelPlan, build_registry, single
from lockgate.lifecycle.metrics import engine_state
from lockgate.server.config import DEFAULT_MODEL_NAME, ServerConfig
from lockgate.server.context import ServerContext
from lockgate.server.errors import install_error_handlers
from lockgate.server.metrics import ServerMetrics
from lockgate.server.middleware import GuardMiddleware
from lockgate.server.openapi import install_openapi
from lockgate.server.admin_routes import admin_router
from lockgate.server.model_routes import model_router
from lockgate.server.model_select import ModelVersionHeader
from lockgate.server.routes import router

log = logging.getLogger("lockgate.server")


def served_names(engine_config: EngineConfig, server_config: ServerConfig) -> list[str]:
    """As vLLM: the `model` argument as given, unless names are configured."""
    if server_config.served_model_names:
        return list(server_config.served_model_names)
    return [engine_config.model or DEFAULT_MODEL_NAME]


def build_app(engine_config: EngineConfig, server_config: ServerConfig, plan: ModelPlan | None = None) -> FastAPI:
    """`plan`: the models and versions to serve (lifecycle/build.py); None: `engine_config`'s one model."""
    plan = plan or single(engine_config, served_names(engine_config, server_config))
    first = plan.first_engine_config(engine_config)
    client = AsyncEngineClient(first, startup_timeout_s=server_config.engine_startup_timeout_s,
                               stall_timeout_s=server_config.engine_stall_timeout_s)
    names = [plan.specs[0].name, *plan.specs[0].aliases]
    metrics = ServerMetrics(names[0], lambda: engine_state(ctx.models))  # summed over every version
    ctx = ServerContext(server_config, first, client, metrics, names)
    ctx.models, model_admin = build_registry(ctx, plan, engine_config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.gateway.start()  # opens the store; settles what a killed process left
        try:
            await ctx.models.start()  # an EngineStartError here makes uvicorn exit: nothing to serve
            mode = "keyed" if ctx.gateway.keyed else "open (no keys)"
            served = ", ".join(v.spec.ref for v in ctx.models.versions())
            log.info("serving %s (max_model_len %d); gateway %s", served, client.max_model_len, mode)
            try:
                yield
            finally:
                await ctx.models.shutdown()
        finally:
            await ctx.gateway.stop()  # after the engine: in-flight requests have settled
            ctx.observer.close()  # flush the request log and batched traces

    app = FastAPI(title="lockgate", version=lockgate.__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx
    app.state.model_admin = model_admin
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(model_router)
    install_openapi(app)
    app.add_middleware(ModelVersionHeader)  # inside the guard: it sees the version the route chose
    app.add_middleware(GuardMiddleware, ctx=ctx)
    return app


async def drain(ctx: ServerContext, timeout_s: float) -> None:
    """Refuse new requests (503), let in-flight ones finish for up to `timeout_s`, then
    cut the rest short with a clear error. Returns when no request is left."""
    ctx.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    log.info("draining: %d request(s) in flight, waiting up to %.0f s", ctx.inflight, timeout_s)
    while ctx.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.inflight > 0:
        log.warning("drain timeout: cancelling %d request(s) still in flight", ctx.inflight)
        for c in ctx.models.clients():
            c.fail_all(EngineUnavailableError("the server is shutting down; the request was cut short"))
        end = loop.time() + 5.0
        while ctx.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.05)
    log.info("drained")
