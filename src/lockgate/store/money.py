"""Money as integer nano-USD: what the ledger stores and sums, so totals are exact.

One token at cheap prices costs a fraction of a micro-dollar; floats summed over
millions of rows drift, integers do not. A request's cost is computed once from
its prices (USD per 1M tokens, read as the decimals they were written as) and
rounded once to the nano-dollar (half to even); every sum after that is exact.
APIs still speak USD numbers: `usd(nano)` at the edge.
"""
from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANO_PER_USD = 1_000_000_000
_PER_TOKEN = Decimal(NANO_PER_USD) / Decimal(1_000_000)  # nano-USD per token at a price of 1 USD per 1M


def _dec(x: float | int | None) -> Decimal:
    # repr() is the shortest text that reads back as the float: the decimal the operator wrote.
    if isinstance(x, int):
        return Decimal(x)
    return Decimal(repr(float(x))) if x else Decimal(0)


def nano(usd: float | int | None) -> int:
    """A USD amount as integer nano-USD (rounded half to even)."""
    return int((_dec(usd) * NANO_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def usd(nano_usd: int | None) -> float:
    """Integer nano-USD as a USD number (exact to the nano for any realistic amount)."""
    return int(nano_usd or 0) / NANO_PER_USD


def cost_nano(prompt_price: float, completion_price: float, cached_price: float,
              fresh_prompt: int, cached: int, completion: int) -> int:
    """A request's cost in nano-USD: prices in USD per 1M tokens, rounded once."""
    total = (_dec(prompt_price) * _dec(fresh_prompt) + _dec(cached_price) * _dec(cached)
             + _dec(completion_price) * _dec(completion)) * _PER_TOKEN
    return int(total.to_integral_value(ROUND_HALF_EVEN))
