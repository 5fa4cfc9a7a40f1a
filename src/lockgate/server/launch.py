"""Start the server: `serve(...)` from Python, `serve_command` for the `lockgate serve` CLI
(registered with `ServeCommand`, for `--ray`'s optional value).

With `--ray` the Ray cluster is started or joined before the models are built, and left
(stopped, if this process started it) after the server has stopped.

SIGTERM drains (new requests 503 at once, in-flight ones finish up to the drain
timeout, then both processes exit with status 0); SIGINT (Ctrl-C) stops the
way uvicorn does, and a second Ctrl-C forces the exit (server/draining.py).

`--api-workers N` (N > 1): this process binds the port and forks N API workers that share it,
the engine cores and the store (server/workers.py); it only supervises them. 1, the default,
is the single process as always.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from lockgate.engine.config import EngineConfig
from lockgate.engine.generation_defaults import resolve as resolve_generation_defaults
from lockgate.gateway.embedding_cache import DEFAULT_TTL_S as EMBEDDING_CACHE_TTL_S
from lockgate.gateway.response_cache import DEFAULT_TTL_S, parse_bytes
from lockgate.server.listening import PortUnavailable
from lockgate.store.files import UnsafeDataDir, check_private_dir

# What serving needs (FastAPI, uvicorn, the lifecycle) is imported when serving starts, not here:
# `lockgate --help` and the admin commands import this module for serve's options alone.
if TYPE_CHECKING:
    import uvicorn

    from lockgate.server.config import ServerConfig
    from lockgate.server.worker import WorkerContext

log = logging.getLogger("lockgate.server")

__all__ = ["ServeCommand", "serve", "serve_command"]


def check_store_url(url: str) -> None:
    """ValueError (exit 2) for a store URL lockgate cannot use, before anything starts."""
    from lockgate.store.postgres import split_url
    from lockgate.store.store_error import StoreError

    try:
        split_url(url)
    except StoreError as e:
        raise ValueError(f"--store: {e}") from None


def has_tenants(data_dir: str) -> bool:
    """Whether the store under `data_dir` holds tenants (then keys are required, whatever the flags)."""
    from lockgate.gateway.gateway import DB_NAME

    db = Path(data_dir) / DB_NAME
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM tenants").fetchone()[0] > 0
        except sqlite3.Error:
            return False


def serve(model: str | list[str] | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          config: str | None = None,
          served_model_name: list[str] | str | None = None, admin_key: str | None = None,
          data_dir: str = "./lockgate-data", insecure_no_auth: bool = False,
          max_request_body_bytes: int = 4 * 1024 * 1024, max_queued_requests: int = 256,
          max_queued_tokens: int = 262_144, drain_timeout_s: float = 30.0, max_n: int = 16,
          log_level: str = "info", access_log: bool = True, engine_stall_timeout_s: float = 60.0,
          class_config: str | None = None, server_options: dict[str, Any] | None = None,
          replicas: int = 1, ray: str | None = None, api_workers: int = 1, **engine_options: Any) -> int:
    """Serve `model` (None: the embedded SmolLM2) until stopped; returns the exit status.

    `model` may also be a list of `NAME=PATH` / `NAME@VERSION=PATH` values, and `config` a models
    file (lifecycle/models_config.py): several models and versions, each in its own engine.

    `engine_options` are `EngineConfig` fields (max_model_len, max_num_seqs, kv_cache_memory_gb, ...;
    the server schedules by priority class unless `scheduling_policy="fcfs"`); `class_config` a
    priority-class file (YAML or JSON, gateway/classes.py); `server_options` more `ServerConfig`
    fields (allowed_origins, header_timeout_s, slo_admission, ...). `ray`: replicas as Ray actors
    ("local" starts a cluster here, "auto" or HOST:PORT joins one; lifecycle/ray_cluster.py).
    `api_workers`: API processes on the one port, sharing the engine cores (server/workers.py).
    The port is bound first of all (one in use raises `PortUnavailable` at once, before the option
    checks) and listened on once the options are checked, before anything loads.
    """
    from lockgate.server.listening import bind_port, reserve

    # Before the option checks, which import the lifecycle (most of a second): a port in use fails at
    # once. Held unlistened until they pass (a client is refused meanwhile, not left waiting).
    held = reserve(host, port)
    try:
        from lockgate.gateway.classes import ClassTable
        from lockgate.lifecycle.build import plan_from_args
        from lockgate.lifecycle.ray_cluster import check_address, require_ray
        from lockgate.lifecycle.ray_cluster import join as join_ray
        from lockgate.lifecycle.spec import check_replicas
        from lockgate.server.config import ServerConfig
        from lockgate.server.origins import is_loopback_name
        from lockgate.server.workers import check_api_workers

        check_api_workers(api_workers)
        if api_workers > 1 and ray is not None:
            raise ValueError("--api-workers above 1 does not work with --ray yet: the workers attach to engine cores "
                             "on this machine")
        if ray is not None:  # at once, before anything loads: Ray missing or a bad address
            check_address(ray)
            require_ray()
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
        models = [model] if isinstance(model, str) else list(model or [])
        check_replicas(replicas, "--replicas")
        plan = plan_from_args(models, config, names, replicas)  # None: one plain model, as before
        model = models[0] if plan is None and models else None
        if model is not None and not Path(model).exists():
            raise ValueError(f"model path {model!r} does not exist")
        engine_options.setdefault("scheduling_policy", "priority")
        engine_config = EngineConfig(model=model, **engine_options)
        if engine_config.generation_config not in ("auto", "vllm"):  # a path: read now, not after the load
            resolve_generation_defaults(engine_config.generation_config, None)
        if engine_config.speculative_config is not None and plan is None:  # a draft's path and tokenizer, now
            from lockgate.engine.spec.draft_check import check_draft

            check_draft(engine_config)
        classes = ClassTable.load(class_config) if class_config else ClassTable()
        server_config = ServerConfig(classes=classes,
            host=host, port=port, served_model_names=names, admin_key=admin_key, data_dir=data_dir,
            insecure_no_auth=insecure_no_auth,
            max_request_body_bytes=max_request_body_bytes, max_queued_requests=max_queued_requests,
            max_queued_tokens=max_queued_tokens, drain_timeout_s=drain_timeout_s, max_n=max_n, log_level=log_level,
            engine_stall_timeout_s=engine_stall_timeout_s, replicas=replicas, ray=ray, api_workers=api_workers,
            **(server_options or {}))
        level = log_level.upper()
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("lockgate").setLevel(level)
        store_url = server_config.store_url
        if store_url is not None:  # a bad URL is refused before the engine starts (no password shown)
            check_store_url(store_url)
        elif Path(data_dir).exists():  # refused before the engine starts, not in a traceback after
            check_private_dir(data_dir)
        if not is_loopback_name(host) and not admin_key and store_url is None and not has_tenants(data_dir):
            if not insecure_no_auth:
                raise ValueError(f"refusing to listen on {host} without authentication: set --admin-key (and create "
                                 "tenants and keys), or pass --insecure-no-auth to serve anyone who can reach it")
            log.warning("listening on %s without authentication (--insecure-no-auth): anyone who can reach it "
                        "can use it", host)
        sock = bind_port(host, port, held)  # the port before the models (uvicorn would bind it after them)
    except BaseException:
        if held is not None:
            held.close()
        raise
    if api_workers > 1:
        return _serve_workers(engine_config, server_config, plan, access_log, sock)
    from lockgate.server.app import build_app
    from lockgate.server.draining import DrainingServer
    from lockgate.server.worker import STARTUP_FAILURE

    # Before the models are built: their replicas become Ray actors of this cluster.
    cluster = join_ray(ray) if ray is not None else None
    try:
        app = build_app(engine_config, server_config, plan)
        config = _uvicorn_config(app, server_config, access_log)
        server = DrainingServer(config, app.state.lockgate, drain_timeout_s, on_started=lambda: _log_listening(sock))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
    finally:
        sock.close()
        if cluster is not None:
            cluster.shutdown()  # after the replicas' actors are gone (the app's shutdown)
    return 0 if server.started else STARTUP_FAILURE


def _log_listening(sock: Any) -> None:
    """What uvicorn says when it binds the port itself (it is silent about a socket it is given)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (Ctrl-C to stop)", shown, port)


def _uvicorn_config(app: Any, sc: ServerConfig, access_log: bool) -> uvicorn.Config:
    import uvicorn

    from lockgate.server.http_protocol import protocol_class

    # httptools (llhttp) rejects ambiguous framing; the subclass adds head deadlines and size bounds.
    http = protocol_class(sc.header_timeout_s, sc.max_header_bytes)
    return uvicorn.Config(app, host=sc.host, port=sc.port, log_level=sc.log_level.lower(), access_log=access_log,
                          http=http, timeout_graceful_shutdown=5, limit_concurrency=sc.max_connections,
                          timeout_keep_alive=max(1, round(sc.keep_alive_timeout_s)))


def _serve_workers(engine_config: EngineConfig, server_config: ServerConfig, plan: Any, access_log: bool,
                   sock: Any) -> int:
    """N API workers on one port (server/workers.py); this process has bound it (`sock`) and
    supervises them."""
    from lockgate.server.app import build_app
    from lockgate.server.worker import run_worker
    from lockgate.server.workers import WorkerPool

    sc = server_config

    def main(ctx: WorkerContext) -> int:
        # Worker 0 alone scans budgets and sends alert webhooks (the store dedups alerts anyway).
        config = dataclasses.replace(server_config, alert_scan=ctx.primary)
        return run_worker(ctx, lambda: build_app(engine_config, config, plan),
                          lambda app: _uvicorn_config(app, server_config, access_log), sc.drain_timeout_s)

    return WorkerPool(sc.api_workers, sock, main, sc.drain_timeout_s).run()


def _default(name: str) -> Any:
    return EngineConfig.__dataclass_fields__[name].default


def bare_ray_is_local(args: list[str]) -> list[str]:
    """`--ray` with no value (last, or followed by another option) as `--ray local`."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--":
            return out + args[i + 1:]
        if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("local")
    return out


class ServeCommand(TyperCommand):
    """`lockgate serve`: as Typer builds it, but a bare `--ray` means `--ray local` (a Typer option
    cannot take an optional value)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_ray_is_local(args))


def serve_command(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="PATH (an HF checkpoint directory or GGUF file), or NAME=PATH / NAME@VERSION=PATH, repeatable (each version its own engine); default: the embedded SmolLM2-135M-Instruct")] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option("--config", help="Models file (YAML or JSON): models, versions, per-version engine options, traffic weights, shadow, rollback rules")] = None,  # noqa: E501
    replicas: Annotated[int, typer.Option(help="Engine processes per model version (each with its own KV cache; requests routed by cached prefix and load); the --config file may set it per version")] = 1,  # noqa: E501
    api_workers: Annotated[int, typer.Option(help="API processes on the one port (1-64), sharing the engine cores and the store; worker 0 runs the cores and autoscaling (docs/WORKERS.md)")] = 1,  # noqa: E501
    ray: Annotated[str | None, typer.Option("--ray", metavar="[local|auto|ADDRESS]", help="Replicas as Ray actors, placed by each version's `placement` (docs/RAY.md): local (also a bare --ray) starts a cluster here, auto joins the one `ray start` runs here, HOST:PORT joins that one; needs pip install 'lockgate[ray]'")] = None,  # noqa: E501
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    served_model_name: Annotated[list[str] | None, typer.Option(help="Name(s) clients use as `model` (repeatable)")] = None,  # noqa: E501
    admin_key: Annotated[str | None, typer.Option(envvar="LOCKGATE_ADMIN_KEY", help="Operator key for /admin (turns on keys for every route)")] = None,  # noqa: E501
    data_dir: Annotated[str, typer.Option(envvar="LOCKGATE_DATA_DIR", help="Where tenants, keys, the usage ledger and the audit log are kept")] = "./lockgate-data",  # noqa: E501
    store: Annotated[str | None, typer.Option("--store", envvar="LOCKGATE_STORE_URL", show_envvar=False, help="PostgreSQL store shared by several instances: postgresql://USER@HOST[:PORT]/DB[?sslmode=..&pool_size=N] (instead of --data-dir; put a password in $LOCKGATE_STORE_URL, not here)")] = None,  # noqa: E501
    insecure_no_auth: Annotated[bool, typer.Option(help="Allow serving without keys on a non-loopback address")] = False,  # noqa: E501
    metrics_public: Annotated[bool, typer.Option(help="/metrics without a key even when keys are on (it shows every tenant's usage); by default it needs a metrics-scope or global admin key")] = False,  # noqa: E501
    metrics_auth: Annotated[bool, typer.Option(hidden=True, help="Deprecated, no effect: /metrics needs a key by default now")] = False,  # noqa: E501
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's, capped)")] = None,  # noqa: E501
    max_num_seqs: Annotated[int, typer.Option(help="Max requests in one batch")] = _default("max_num_seqs"),
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget per step")] = _default("max_num_batched_tokens"),  # noqa: E501
    kv_cache_memory_gb: Annotated[float, typer.Option(help="Memory for the KV cache")] = _default("kv_cache_memory_gb"),  # noqa: E501
    kv_cache_dtype: Annotated[str, typer.Option(help="KV cache element type: auto (16-bit, twice the tokens of float32 in the same memory: the model's dtype when 16-bit, else float16; float32 under an explicit --dtype float32) | float32 | bfloat16 | float16")] = _default("kv_cache_dtype"),  # noqa: E501
    num_kv_blocks: Annotated[int | None, typer.Option(help="KV blocks (overrides --kv-cache-memory-gb)")] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block")] = _default("block_size"),
    dtype: Annotated[str, typer.Option(help="Float dtype of what is not quantized: auto (float32 for a model on the native int4 kernels, their fused fast path; else bfloat16 on CPUs with AVX512-BF16/AMX and on GPUs, float32 otherwise) | float32 | bfloat16 | float16")] = _default("dtype"),  # noqa: E501
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = _default("device"),
    load_format: Annotated[str, typer.Option(help="auto | dummy (random weights) | fake (no model: fixed plain tokens at once or after --fake-step-delay; for measuring the server)")] = _default("load_format"),  # noqa: E501
    fake_step_delay: Annotated[float, typer.Option(help="With --load-format fake: seconds per engine step (one sleep per step, shared by the batch)")] = _default("fake_step_delay_s"),  # noqa: E501
    fake_token_delay: Annotated[float, typer.Option(help="With --load-format fake: seconds per token computed in a step, added to --fake-step-delay")] = _default("fake_token_delay_s"),  # noqa: E501
    seed: Annotated[int, typer.Option(help="Engine seed")] = _default("seed"),
    enable_prefix_caching: Annotated[bool, typer.Option(help="Reuse KV blocks of shared prompt prefixes")] = _default("enable_prefix_caching"),  # noqa: E501
    enable_chunked_prefill: Annotated[bool, typer.Option(help="Split long prompts across steps")] = _default("enable_chunked_prefill"),  # noqa: E501
    scheduling_policy: Annotated[str, typer.Option(help="priority (classes first, fair share between tenants, preemption) | fcfs (arrival order)")] = "priority",  # noqa: E501
    max_prefill_tokens: Annotated[int, typer.Option(help="Prefill tokens per engine step (chunked prefill; decodes always run first)")] = _default("max_prefill_tokens"),  # noqa: E501
    priority_aging: Annotated[float, typer.Option(help="Seconds of waiting that raise a request by one priority level (0: no aging)")] = _default("priority_aging_s"),  # noqa: E501
    grammar_compile_timeout: Annotated[float, typer.Option(help="Structured outputs: seconds a grammar may take to compile before its requests fail with a 400")] = _default("grammar_compile_timeout_s"),  # noqa: E501
    max_queued_compiles_per_tenant: Annotated[int, typer.Option(help="Structured outputs: grammar compiles one tenant may have queued; more fail at once")] = _default("max_queued_compiles_per_tenant"),  # noqa: E501
    class_config: Annotated[str | None, typer.Option(help="Priority classes file (YAML or JSON): names, TTFT/TPOT targets, queue caps")] = None,  # noqa: E501
    slo_admission: Annotated[bool, typer.Option(help="Refuse at once (429 slo_unattainable) a request whose class's TTFT target cannot be met")] = True,  # noqa: E501
    max_logprobs: Annotated[int, typer.Option(help="Max logprobs / top_logprobs per token")] = _default("max_logprobs"),  # noqa: E501
    num_threads: Annotated[int | None, typer.Option(help="CPU threads of each engine process (default: the cores this process may use, by affinity and cgroup quota, divided among the engine processes: replicas x versions; more than that is warned about)")] = None,  # noqa: E501
    quantization: Annotated[str, typer.Option(help="Weight precision: auto (as stored: a Q4_0/Q4_1 GGUF such as the default model runs on its own 4-bit blocks, int4, the fast CPU path; a Q8_0 GGUF on its blocks, int8; float checkpoints in float) | none (dequantized to float: the slow reference path) | int4 | int8 (quantize any checkpoint at load; CPU only). The start-up log, /version and /v1/models say what runs")] = _default("quantization"),  # noqa: E501
    quantization_kernels: Annotated[str, typer.Option(help="auto (native C kernels for int4, PyTorch's for int8) | native | torch")] = "auto",  # noqa: E501
    quantization_activations: Annotated[str, typer.Option(help="Native kernels' activation codes: int8 (fastest) | int16 (closer to float32, 20-40% slower; docs/PERFORMANCE.md)")] = "int8",  # noqa: E501
    generation_config: Annotated[str, typer.Option(help="Sampling defaults for requests that leave temperature, top_p, top_k, min_p, repetition_penalty or max_tokens out: auto (the model's generation_config.json or GGUF sampling metadata; the embedded model: temperature 0.2, top_p 0.9) | vllm (none: temperature 1.0, ...) | a directory holding a generation_config.json")] = "auto",  # noqa: E501
    speculative_config: Annotated[str | None, typer.Option(help="Speculative decoding, as vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5}' (prompt lookup: no second model) or '{\"method\": \"draft_model\", \"model\": PATH, \"num_speculative_tokens\": 4}'; greedy output unchanged token for token; off by default (docs/SPECULATIVE.md)")] = None,  # noqa: E501
    max_request_body_bytes: Annotated[int, typer.Option(help="Larger bodies get 413")] = 4 * 1024 * 1024,
    max_queued_requests: Annotated[int, typer.Option(help="Waiting requests before 429")] = 256,
    max_queued_tokens: Annotated[int, typer.Option(help="Waiting prompt tokens before 429")] = 262_144,
    drain_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get after SIGTERM")] = 30.0,
    max_n: Annotated[int, typer.Option(help="Largest `n` accepted")] = 16,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request")] = True,
    allowed_origins: Annotated[list[str] | None, typer.Option(help="Origins browsers may call from (get CORS headers; repeatable; '*' for any)")] = None,  # noqa: E501
    allowed_hosts: Annotated[list[str] | None, typer.Option(help="Host names accepted without an API key besides loopback (repeatable; '*' for any)")] = None,  # noqa: E501
    header_timeout: Annotated[float, typer.Option(help="Seconds a client has to send the request line and headers")] = 10.0,  # noqa: E501
    body_timeout: Annotated[float, typer.Option(help="Seconds a client has to send the request body (408)")] = 60.0,  # noqa: E501
    max_connections: Annotated[int, typer.Option(help="Open connections before new ones get 503")] = 4096,
    enable_fault_injection: Annotated[bool, typer.Option(hidden=True, help="Test only: honour x-lockgate-fault")] = False,  # noqa: E501
    router_policy: Annotated[str, typer.Option(hidden=True, help="kv (default) | round_robin | least_loaded: the peers benchmarks/fleet_routing.py measures the router against")] = "kv",  # noqa: E501
    engine_stall_timeout: Annotated[float, typer.Option(help="Seconds without engine progress, with requests in flight, before they fail and the engine restarts (0: off)")] = 60.0,  # noqa: E501
    debug_hang_at_step: Annotated[int | None, typer.Option(hidden=True, help="Test only: the first engine hangs in this step")] = None,  # noqa: E501
    request_log: Annotated[str, typer.Option(help="json: one JSON line per inference request (stderr, or --request-log-file) | off")] = "json",  # noqa: E501
    request_log_file: Annotated[str | None, typer.Option(help="Append the request log to this file instead of stderr")] = None,  # noqa: E501
    log_prompts: Annotated[bool, typer.Option(help="Put prompts (text or messages) in the request log")] = False,
    otel_endpoint: Annotated[str | None, typer.Option(help="OTLP/HTTP collector for traces, e.g. http://localhost:4318 (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)")] = None,  # noqa: E501
    slo_period_days: Annotated[float, typer.Option(help="SLO period: attainment and error budget are over it")] = 30.0,  # noqa: E501
    metrics_max_tenants: Annotated[int, typer.Option(help="Distinct tenant label values in /metrics; more share 'other'")] = 100,  # noqa: E501
    alert_webhook: Annotated[list[str] | None, typer.Option(help="http(s) URL that receives every budget and anomaly alert as a signed POST (repeatable; a tenant's own alert_webhook gets its alerts too; `lockgate alerts secret` prints the signing secret)")] = None,  # noqa: E501
    alert_allow_private: Annotated[bool, typer.Option(help="Allow alert webhooks on private, loopback and link-local addresses (refused by default)")] = False,  # noqa: E501
    alert_interval: Annotated[float, typer.Option(help="Seconds between budget-threshold checks for alerts")] = 5.0,  # noqa: E501
    tool_call_parser: Annotated[str, typer.Option(help="How `tool_choice: auto` reads the model's tool calls: hermes | llama3_json | json_array | auto (from each model's chat template) | none (never: answers stay content)")] = "auto",  # noqa: E501
    response_cache: Annotated[str | None, typer.Option(metavar="BYTES", help="Response cache: exact-match answers of greedy or seeded requests, per tenant, LRU within BYTES (e.g. 64MiB) in each API process; off by default (docs/POLICIES.md)")] = None,  # noqa: E501
    response_cache_ttl: Annotated[float, typer.Option(help="Seconds a response-cache entry lives")] = DEFAULT_TTL_S,
    embedding_cache: Annotated[str, typer.Option(metavar="BYTES", help="Embedding cache: vectors of /v1/embeddings inputs, per tenant, LRU within BYTES (e.g. 64MiB; 0: off), shared by the API processes through the store when there is one (docs/API.md)")] = "64MiB",  # noqa: E501
    embedding_cache_ttl: Annotated[float, typer.Option(help="Seconds an embedding-cache entry lives")] = EMBEDDING_CACHE_TTL_S,  # noqa: E501
    hedge_budget: Annotated[float, typer.Option(help="Hedged requests (x-lockgate-hedge, or a tenant's hedge): at most this share of requests gets a second copy, 0-1 (docs/POLICIES.md)")] = 0.05,  # noqa: E501
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, ...)."""
    if metrics_auth:
        log.warning(
            "--metrics-auth is deprecated and has no effect: with keys, /metrics needs a key by default "
            "(a metrics-scope or global admin key); --metrics-public opens it")
    try:
        code = serve(
            model, host, port, config=config, replicas=replicas, ray=ray, api_workers=api_workers,
            served_model_name=served_model_name,
            admin_key=admin_key,
            data_dir=data_dir,
            insecure_no_auth=insecure_no_auth,
            max_request_body_bytes=max_request_body_bytes, max_queued_requests=max_queued_requests,
            max_queued_tokens=max_queued_tokens, drain_timeout_s=drain_timeout, max_n=max_n,
            log_level=log_level, access_log=access_log, engine_stall_timeout_s=engine_stall_timeout,
            server_options={"allowed_origins": list(allowed_origins or []), "allowed_hosts": allowed_hosts or None,
                            "header_timeout_s": header_timeout, "body_timeout_s": body_timeout,
                            "max_connections": max_connections, "enable_fault_injection": enable_fault_injection,
                            "router_policy": router_policy,
                            "metrics_public": metrics_public, "slo_admission": slo_admission,
                            "request_log": request_log, "request_log_file": request_log_file,
                            "log_prompts": log_prompts, "otel_endpoint": otel_endpoint,
                            "slo_period_s": slo_period_days * 86400.0, "metrics_max_tenants": metrics_max_tenants,
                            "store_url": store or None, "alert_webhooks": list(alert_webhook or []),
                            "alert_allow_private": alert_allow_private, "alert_interval_s": alert_interval,
                            "tool_call_parser": tool_call_parser,
                            "response_cache_bytes": parse_bytes(response_cache or 0),
                            "response_cache_ttl_s": response_cache_ttl, "hedge_budget": hedge_budget,
                            "embedding_cache_bytes": parse_bytes(embedding_cache, "--embedding-cache"),
                            "embedding_cache_ttl_s": embedding_cache_ttl},
            class_config=class_config,
            debug_hang_at_step=debug_hang_at_step,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory_gb=kv_cache_memory_gb, kv_cache_dtype=kv_cache_dtype, num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            dtype=dtype, device=device, load_format=load_format, fake_step_delay_s=fake_step_delay,
            fake_token_delay_s=fake_token_delay, seed=seed, max_prefill_tokens=max_prefill_tokens,
            priority_aging_s=priority_aging, grammar_compile_timeout_s=grammar_compile_timeout,
            max_queued_compiles_per_tenant=max_queued_compiles_per_tenant,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            scheduling_policy=scheduling_policy, max_logprobs=max_logprobs, num_threads=num_threads,
            quantization=quantization, quantization_kernels=quantization_kernels,
            quantization_activations=quantization_activations,
            generation_config=generation_config, speculative_config=speculative_config,
        )
    except (ValueError, UnsafeDataDir, NotADirectoryError) as exc:  # a bad option value or data directory
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except PortUnavailable as exc:  # before anything loaded
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)
