"""Settings for the whole test run.

httpx builds a new SSL context for every client, loading the whole CA bundle (20-90 ms on a
2-core box), and every `httpx.get()`/`httpx.post()` is a new client: the suite makes well over
a thousand of them, all plain HTTP to 127.0.0.1 (nothing here speaks TLS). One context per
distinct set of arguments, shared by every client, makes each call cost what the request
costs; it also keeps that load time out of tests that time a request (e.g. /health answering
while long prompts tokenize).
"""
from __future__ import annotations

import functools

import httpx._transports.default as _httpx_transport

_create = _httpx_transport.create_ssl_context
_cached = functools.lru_cache(maxsize=8)(_create)


def _shared_ssl_context(*args, **kwargs):  # httpx's own signature
    try:
        return _cached(*args, **kwargs)
    except TypeError:  # an unhashable argument (a list for `cert`): a context of its own
        return _create(*args, **kwargs)


if not getattr(_create, "_lockgate_shared", False):  # not twice
    _shared_ssl_context._lockgate_shared = True
    _httpx_transport.create_ssl_context = _shared_ssl_context


# ---- a real PostgreSQL server, one per test session (lockgate/bench/pgserver.py) ----------------
import itertools  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

_db_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server():
    """PostgreSQL from this machine's binaries (the project's install step provides them). CI must
    run these tests for real: without binaries the test fails there, and is skipped only elsewhere."""
    from lockgate.bench.pgserver import PgServer, PgUnavailable

    try:
        server = PgServer(durable=False)  # no fsync: a throwaway database
    except PgUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    server.start()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the session's server."""
    if pg_server.proc is None:  # a test stopped it (an outage) and failed before restarting it
        pg_server.start()
    return pg_server.create_database(f"t{os.getpid()}_{next(_db_names)}")


@pytest.fixture(scope="module")
def pg_module_url(pg_server) -> str:
    """A fresh database shared by one module's tests (one server process per module uses it)."""
    if pg_server.proc is None:
        pg_server.start()
    return pg_server.create_database(f"m{os.getpid()}_{next(_db_names)}")
