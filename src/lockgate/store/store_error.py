"""`StoreError`: a store that cannot be opened or used, whichever database is behind it."""
from __future__ import annotations


class StoreError(RuntimeError):
    """The database could not be opened or used (bad path, not a lockgate database, unreachable, ...)."""


class StoreUnavailable(StoreError):
    """The database is there but cannot answer now (PostgreSQL down or unreachable): retry later."""
