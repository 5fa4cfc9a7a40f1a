"""Server-side knobs (the engine's are in `lockgate.engine.config.EngineConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lockgate.engine.sampling_params import MAX_STOP_STRINGS
from lockgate.gateway.alerts import DEFAULT_ANOMALY_INTERVAL_S, DEFAULT_INTERVAL_S
from lockgate.gateway.classes import ClassTable
from lockgate.gateway.embedding_cache import DEFAULT_BYTES as EMBEDDING_CACHE_BYTES
from lockgate.gateway.embedding_cache import DEFAULT_TTL_S as EMBEDDING_CACHE_TTL_S
from lockgate.gateway.embedding_cache import check_settings as check_embedding_cache
from lockgate.gateway.response_cache import DEFAULT_TTL_S, check_ttl, parse_bytes
from lockgate.gateway.webhooks import check_url
from lockgate.lifecycle.ray_cluster import check_address

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # served name of the embedded default model


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may put in `model`; the first is the one /v1/models reports.
    served_model_names: list[str] = field(default_factory=list)
    # The gateway (lockgate.gateway): with an admin key set, or tenants in the store, every route
    # but /health, /ping, /version needs a key; /metrics a metrics-scope or global admin key.
    admin_key: str | None = None
    # The SQLite store: tenants, keys, usage ledger, audit log, stored completions (kept 0700/0600).
    data_dir: str = "./lockgate-data"
    # A PostgreSQL store (postgresql://USER@HOST/DB; or $LOCKGATE_STORE_URL) instead of the SQLite file in
    # data_dir: several instances share tenants, keys, limits, budgets and the ledger (docs/HORIZONTAL.md).
    store_url: str | None = None
    api_workers: int = 1  # API processes on one port sharing the engine cores and the store
    metrics_public: bool = False  # /metrics without a key even when keys are on (it names every tenant)
    insecure_no_auth: bool = False  # allow open (keyless) mode on a non-loopback address
    # Browser protection without a key (origins.py): extra Host names, and origins allowed
    # cross-origin (they also get CORS headers; "*" allows any). None: loopback + the bind address.
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] = field(default_factory=list)
    # Connection limits (http_protocol.py, middleware.py).
    header_timeout_s: float = 10.0  # request line + headers must arrive within this
    body_timeout_s: float = 60.0  # the whole body must arrive within this (408)
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections are closed after this
    max_header_bytes: int = 64 * 1024  # request line + headers (431 beyond)
    max_connections: int = 4096  # open connections + tasks; more get 503
    # Test only: a request header `x-lockgate-fault: <step>` fails that admission step.
    enable_fault_injection: bool = False
    max_request_body_bytes: int = 4 * 1024 * 1024
    # Bounded waiting queue: accepted engine requests that have no output yet, and their prompt tokens.
    max_queued_requests: int = 256
    max_queued_tokens: int = 262_144
    replicas: int = 1  # engine processes per model version (--replicas; a --config file sets it per version)
    router_policy: str = "kv"  # how replicas are chosen (lifecycle/router.py POLICIES; others only to compare)
    # Replicas as Ray actors (--ray): "local" starts a cluster here, "auto" or HOST:PORT joins one; None: processes.
    ray: str | None = None
    # Priority classes (SLO targets, per-class queue caps) and SLO admission (gateway/admission.py).
    classes: ClassTable = field(default_factory=ClassTable)
    slo_admission: bool = True
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    max_n: int = 16
    max_stop: int = MAX_STOP_STRINGS
    max_messages: int = 1024
    max_prompts: int = 64  # prompts in one /v1/completions batch
    engine_startup_timeout_s: float = 600.0
    # No engine progress for this long while requests are in flight: fail them, restart the core (0: off).
    engine_stall_timeout_s: float = 60.0
    log_level: str = "info"
    # Observability (lockgate/observability/): one JSON line per inference request ("json" | "off"),
    # to stderr or this file; prompt text only with log_prompts.
    request_log: str = "json"
    request_log_file: str | None = None
    log_prompts: bool = False
    otel_endpoint: str | None = None  # OTLP/HTTP collector; None: the OTEL_EXPORTER_OTLP_* variables, else off
    slo_period_s: float = 30 * 86400.0  # the SLO period: attainment and error budget are over it
    metrics_max_tenants: int = 100  # distinct tenant label values; more share "other"
    # Budget and anomaly alerts (gateway/alerts.py, webhooks.py): receivers of every alert (a tenant's own
    # alert_webhook gets its tenant's too), private/loopback receivers allowed, how often budgets and
    # anomalies are checked; `alert_scan` False: this process does not scan or send (API workers but 0).
    alert_webhooks: list[str] = field(default_factory=list)
    alert_allow_private: bool = False
    alert_interval_s: float = DEFAULT_INTERVAL_S
    anomaly_interval_s: float = DEFAULT_ANOMALY_INTERVAL_S
    alert_scan: bool = True
    # `tool_choice: auto`: the parser of the model's tool-call format (server/tool_parsers/): a name,
    # "auto" (None: chosen from each model's chat template) or "none" (never parse: answers stay content).
    tool_call_parser: str | None = None
    # The response cache (gateway/response_cache.py): bytes per API process (0: off, the default, so that
    # benchmarks and evaluations never hit it unknowingly) and each entry's time to live.
    response_cache_bytes: int = 0
    hedge_budget: float = 0.05  # hedged requests (lifecycle/hedge.py): at most this share of requests
    response_cache_ttl_s: float = DEFAULT_TTL_S
    # The embedding cache (gateway/embedding_cache.py): bytes of vectors (0: off), shared by the API
    # processes through the store when there is one, and each entry's time to live.
    embedding_cache_bytes: int = EMBEDDING_CACHE_BYTES
    embedding_cache_ttl_s: float = EMBEDDING_CACHE_TTL_S

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_queued_requests", "max_queued_tokens", "max_n",
                     "max_stop", "max_messages", "max_prompts", "max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ray is not None:
            check_address(self.ray)
        if self.router_policy not in ("kv", "round_robin", "least_loaded"):
            raise ValueError(f"router_policy must be kv, round_robin or least_loaded, got {self.router_policy!r}")
        if self.max_stop > MAX_STOP_STRINGS:
            raise ValueError(f"max_stop must be <= {MAX_STOP_STRINGS}, got {self.max_stop}")
        if self.engine_stall_timeout_s < 0:
            raise ValueError(f"engine_stall_timeout_s must be >= 0, got {self.engine_stall_timeout_s}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.request_log not in ("json", "off"):
            raise ValueError(f"request_log must be 'json' or 'off', got {self.request_log!r}")
        if not self.slo_period_s >= 60:
            raise ValueError(f"slo_period_s must be >= 60, got {self.slo_period_s}")
        if self.metrics_max_tenants < 0:
            raise ValueError(f"metrics_max_tenants must be >= 0, got {self.metrics_max_tenants}")
        for url in self.alert_webhooks:
            try:
                check_url(url)
            except ValueError as e:
                raise ValueError(f"--alert-webhook: {e}") from None
        for name in ("alert_interval_s", "anomaly_interval_s"):
            if not 0 < getattr(self, name) <= 86400:
                raise ValueError(f"{name} must be in (0, 86400] seconds, got {getattr(self, name)}")
        if not 0 <= self.hedge_budget <= 1:
            raise ValueError(f"hedge_budget must be in [0, 1], got {self.hedge_budget}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.tool_call_parser is not None and self.tool_call_parser != "none":
            from lockgate.server.tool_parsers import AUTO, get_tool_parser  # the parsers' own names
            if self.tool_call_parser != AUTO:
                get_tool_parser(self.tool_call_parser)  # UnknownToolParser (a ValueError) names the choices
        parse_bytes(self.response_cache_bytes)
        check_ttl(self.response_cache_ttl_s)
        check_embedding_cache(self.embedding_cache_bytes, self.embedding_cache_ttl_s)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
