"""Who may talk to a keyless server from a browser: Host and Origin checks, CORS headers.

A server without API keys on loopback is reachable by every web page the user
opens. Two defences, as for any local dev server that executes requests:
- DNS rebinding: a page on `evil.example` re-pointed at 127.0.0.1 sends
  `Host: evil.example`. Only loopback names (and configured hosts) are accepted.
- Cross-site requests: a page sends `Origin: https://evil.example`. Only
  same-origin requests and `--allowed-origins` are accepted. (JSON-only bodies
  already force a CORS preflight, which gets no CORS headers unless allowed.)
With API keys the key is the defence; CORS headers still go only to allowed origins.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

# Request headers a browser client may send cross-origin (preflight answer), and response
# headers it may read.
CORS_ALLOW_HEADERS = "authorization, content-type, idempotency-key, openai-organization, openai-project, " \
                     "x-lockgate-priority, x-request-id, x-stainless-os, x-stainless-lang, " \
                     "x-stainless-package-version, x-stainless-runtime, x-stainless-runtime-version, " \
                     "x-stainless-arch, x-stainless-retry-count, x-stainless-timeout, cache-control"
CORS_EXPOSE_HEADERS = "retry-after, x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, " \
                      "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, " \
                      "x-ratelimit-reset-tokens, x-lockgate-model, x-lockgate-model-version, x-lockgate-replica, " \
                      "x-lockgate-ignored-fields, x-lockgate-cache"
CORS_ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"


def split_host(value: str) -> str:
    """`Host` header value -> lower-case host name without port ('[::1]:80' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    host, _, port = value.rpartition(":")
    return host if host and port.isdigit() else value


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


@dataclass(slots=True)
class OriginPolicy:
    allowed_origins: frozenset[str]  # normalized; "*" allows every origin
    allowed_hosts: frozenset[str] | None  # None: any Host (bound to a wildcard address)

    @classmethod
    def build(cls, bind_host: str, allowed_origins: list[str], allowed_hosts: list[str] | None) -> OriginPolicy:
        origins = frozenset(_normalize_origin(o) for o in allowed_origins)
        if allowed_hosts is not None:
            hosts = frozenset(split_host(h) for h in allowed_hosts)
            return cls(origins, None if "*" in hosts else hosts)
        bind = split_host(bind_host)
        if bind in ("0.0.0.0", "::", ""):
            return cls(origins, None)  # listening everywhere: any name may reach it
        return cls(origins, frozenset({bind}))

    def host_allowed(self, host_header: str | None) -> bool:
        if host_header is None or self.allowed_hosts is None:
            return True  # no Host: not a browser (HTTP/1.1 browsers always send it)
        host = split_host(host_header)
        return is_loopback_name(host) or host in self.allowed_hosts

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        """Configured origins, or same-origin (the page was served by us, e.g. /docs)."""
        norm = _normalize_origin(origin)
        if "*" in self.allowed_origins or norm in self.allowed_origins:
            return True
        parts = urlsplit(norm)
        return (host_header is not None and parts.scheme in ("http", "https")
                and parts.netloc == host_header.strip().lower())

    def cors_allowed(self, origin: str) -> bool:
        """CORS headers are sent only to explicitly allowed origins (same-origin needs none)."""
        norm = _normalize_origin(origin)
        return "*" in self.allowed_origins or norm in self.allowed_origins


def cors_headers(origin: str, preflight: bool) -> list[tuple[bytes, bytes]]:
    out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
    if preflight:
        out += [(b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
                (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
                (b"access-control-max-age", b"600")]
    else:
        out.append((b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()))
    return out
