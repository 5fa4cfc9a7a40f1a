"""Fixtures shared by the store tests."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate.store.sqlite import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple]:
    """Two store objects on one database (as two API processes or instances), on each backend."""
    if request.param == "sqlite":
        a, b = open_store(tmp_path), open_store(tmp_path)
    else:
        from lockgate.store.postgres import PostgresStore

        url = request.getfixturevalue("pg_url")
        a, b = PostgresStore(url), PostgresStore(url)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    """Each behaviour on both backends: the SQLite file and a real PostgreSQL database."""
    if request.param == "sqlite":
        s = open_store(tmp_path)
    else:
        from lockgate.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()
