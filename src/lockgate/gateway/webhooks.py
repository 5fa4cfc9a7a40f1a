"""Alert webhooks: signed HTTP POSTs from the store's alert outbox, at least once.

A `WebhookSender` claims due deliveries (store/alert_ops.py: a claim holds a delivery
for `hold_s`, so two instances never post it at once and a dead sender's claims
expire), POSTs each alert's payload as JSON and records the outcome: 2xx is done;
anything else (another status, a timeout, a refused connection) is retried with
exponential backoff and jitter (1 s doubling to a 10 min cap) until `max_attempts`
or `max_age_s` (24 h), then given up with its last error. Redirects are not followed.

Receivers verify the exact body bytes:
    X-Lockgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    X-Lockgate-Alert-Id: <the alert's id>   (the same on every retry: receivers dedup by it)
The secret is $LOCKGATE_ALERT_SECRET, or one made once per store (`lockgate alerts secret`).

Receivers on private, loopback, link-local, unspecified or otherwise non-global
addresses are refused unless the operator allows them (`--alert-allow-private`); the
check is on the addresses the name resolves to at send time, and the POST goes to the
checked address (the URL's host still in Host and TLS SNI), so DNS cannot swap one in
between check and connect. A refused receiver is given up at once, its reason recorded.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from lockgate.store.alert_ops import Delivery

log = logging.getLogger("lockgate.webhooks")

SECRET_ENV = "LOCKGATE_ALERT_SECRET"
SECRET_NAME = "alert-webhook"  # store.meta_secret(SECRET_NAME): one per store, shared by its instances
SIGNATURE_HEADER = "X-Lockgate-Signature"
ALERT_ID_HEADER = "X-Lockgate-Alert-Id"
MAX_URL_CHARS = 2048


class RefusedAddress(Exception):
    """The receiver resolves to an address the operator did not allow: given up at once."""


class Unresolved(Exception):
    """The receiver's name does not resolve now (DNS may be down): retried like any failure."""


def check_url(url: str) -> str:
    """An alert receiver URL: http(s), a host, no more than 2048 characters; ValueError otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise ValueError(f"an alert webhook must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a bad port raises here
    except ValueError as e:
        raise ValueError(f"alert webhook {url[:100]!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"alert webhook {url[:100]!r} must be an http:// or https:// URL with a host")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"alert webhook {url[:100]!r} contains whitespace or control characters")
    return url


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The X-Lockgate-Signature value for `body` sent at Unix time `t`."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does (here for the tests and as the reference): the HMAC over the exact body,
    compared in constant time, and a timestamp within `tolerance_s` (replays of old bodies fail)."""
    try:
        fields = dict(p.split("=", 1) for p in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, t), f"t={t},v1={fields.get('v1', '')}")


def body_of(payload: dict[str, Any]) -> bytes:
    """The bytes posted (and signed): the same for every attempt of an alert."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_public(host: str, port: int) -> str:
    """The address to connect to: every address `host` resolves to must be global (RefusedAddress)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise Unresolved(f"cannot resolve {host}: {e}") from None
    addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
    bad = [a for a in addrs if not _public(a)]
    if bad or not addrs:
        raise RefusedAddress(f"{host} resolves to a private, loopback, link-local or unspecified address "
                             f"({', '.join(bad) or 'none'}); start the server with --alert-allow-private to allow it")
    return addrs[0]


@dataclass(slots=True)
class SenderSettings:
    allow_private: bool = False  # --alert-allow-private
    timeout_s: float = 10.0  # per attempt: connect, send, the response's head
    poll_s: float = 1.0  # how often due deliveries are looked for
    hold_s: float = 60.0  # a claim's life: no other sender takes the delivery before
    base_backoff_s: float = 1.0
    max_backoff_s: float = 600.0
    max_attempts: int = 200
    max_age_s: float = 86400.0  # an alert not delivered within this is given up
    concurrency: int = 8  # deliveries posted at once


def backoff_s(attempts: int, settings: SenderSettings, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after `attempts` failed ones: doubling, capped, jittered in [1/2, 1]."""
    base = min(settings.max_backoff_s, settings.base_backoff_s * 2.0 ** min(max(attempts - 1, 0), 60))
    return base * (0.5 + 0.5 * (rng or random).random())


def store_secret(store: Any) -> str:
    """The store's signing secret as receivers are given it (`lockgate alerts secret`): 64 hex digits."""
    return store.meta_secret(SECRET_NAME).hex()


def load_secret(store: Any) -> bytes:
    """The HMAC key: the secret text's UTF-8 bytes ($LOCKGATE_ALERT_SECRET, else the store's)."""
    env = os.environ.get(SECRET_ENV)
    return (env or store_secret(store)).encode("utf-8", "surrogateescape")


class WebhookSender:
    """Posts the outbox's due deliveries. Store calls go through `run_store` (a thread: never the
    event loop); `on_result(result)` counts outcomes: delivered | failed (to be retried) | gave_up | refused."""

    def __init__(self, settings: SenderSettings, secret: bytes, run_store: Callable[..., Any],
                 on_result: Callable[[str], None] | None = None, user_agent: str = "lockgate") -> None:
        self.settings = settings
        self.secret = secret
        self.run_store = run_store
        self.on_result = on_result
        self.user_agent = user_agent
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         timeout=httpx.Timeout(settings.timeout_s),
                                         limits=httpx.Limits(max_connections=settings.concurrency))
        self._sem = asyncio.Semaphore(settings.concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(self, store: Callable[[], Any]) -> None:
        """Until cancelled: claim what is due, post it, sleep `poll_s` when nothing was."""
        while True:
            st = store()
            sent = 0
            if st is not None:
                try:
                    sent = await self.send_due(st)
                except Exception as e:  # noqa: BLE001 - the store may be down: next round
                    log.warning("alert delivery round failed: %r", e)
            if not sent:
                await asyncio.sleep(self.settings.poll_s)

    async def send_due(self, store: Any, now: float | None = None) -> int:
        now = time.time() if now is None else now
        due = await self.run_store(store.claim_deliveries, now, self.settings.hold_s)
        await asyncio.gather(*(self._deliver(store, d) for d in due))
        return len(due)

    async def _deliver(self, store: Any, d: Delivery) -> None:
        async with self._sem:
            result, error = await self._post(d)
        now = time.time()
        attempts = d.attempts + 1
        if result == "delivered":
            await self.run_store(store.delivery_done, d.alert.id, d.url, now)
        elif result == "refused" or attempts >= self.settings.max_attempts \
                or now - d.alert.created_at >= self.settings.max_age_s:
            if result != "refused":
                result, error = "gave_up", f"gave up after {attempts} attempts: {error}"
            await self.run_store(store.delivery_abandoned, d.alert.id, d.url, error, now)
            log.warning("alert %s to %s given up: %s", d.alert.id, _safe(d.url), error)
        else:
            await self.run_store(store.delivery_failed, d.alert.id, d.url, error,
                                 now + backoff_s(attempts, self.settings))
        if self.on_result is not None:
            self.on_result(result)

    async def _post(self, d: Delivery) -> tuple[str, str]:
        """('delivered', '') or (failed | refused, why)."""
        try:
            url, extensions, host_header = await self._target(d.url)
        except (RefusedAddress, ValueError) as e:
            return "refused", str(e)
        except Unresolved as e:
            return "failed", str(e)
        body = body_of(d.alert.payload)
        headers = {"content-type": "application/json", "user-agent": self.user_agent,
                   ALERT_ID_HEADER: d.alert.id, SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
                   "x-lockgate-delivery-attempt": str(d.attempts + 1)}
        if host_header:
            headers["host"] = host_header
        try:
            # The response's body is never read: a receiver cannot make us buffer anything. httpx's
            # timeouts are per phase; the whole attempt is bounded too (a receiver dripping bytes).
            async with asyncio.timeout(self.settings.timeout_s * 3):
                async with self._client.stream("POST", url, content=body, headers=headers,
                                               extensions=extensions) as resp:
                    status = resp.status_code
        except TimeoutError:
            return "failed", f"no answer within {self.settings.timeout_s * 3:g} s"
        except httpx.HTTPError as e:
            return "failed", f"{type(e).__name__}: {e}"[:300] or type(e).__name__
        if 200 <= status < 300:
            return "delivered", ""
        return "failed", f"HTTP {status}"

    async def _target(self, url: str) -> tuple[str, dict[str, Any], str | None]:
        """Where to connect: the URL itself when private addresses are allowed; otherwise the checked
        address, with the URL's host in Host and SNI (TLS still verifies the certificate for it)."""
        check_url(url)
        if self.settings.allow_private:
            return url, {}, None
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            if not _public(host):
                raise RefusedAddress(f"{host} is a private, loopback, link-local or unspecified address; start the "
                                     "server with --alert-allow-private to allow it")
            return url, {}, None
        addr = await resolve_public(host, port)
        literal = f"[{addr}]" if ":" in addr else addr
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{literal}:{port}" if userinfo else f"{literal}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        return pinned, extensions, parts.netloc.rpartition("@")[2]


def _safe(url: str) -> str:
    """A URL for logs: no credentials, no query (tokens often ride there)."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))
