"""Routing a model name to a version: `NAME@VERSION` pins, `NAME` follows the traffic split.

The split is sticky: a request's key (its `user` field, else its tenant) hashes to
a point in [0, 100) and the versions, in name order, own consecutive slices of
that range as wide as their weights. The same key lands on the same version for
as long as the weights stay put, so one conversation stays on one version; when
weights move (95/5 -> 90/10) only the keys in the moved slice change version.
A request with no key is placed at random.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping

VERSION_SEPARATOR = "@"


def split_ref(ref: str) -> tuple[str, str | None]:
    """"NAME@VERSION" -> (NAME, VERSION); "NAME" -> (NAME, None). The last "@" separates."""
    name, sep, version = ref.rpartition(VERSION_SEPARATOR)
    if not sep or not name or not version:
        return ref, None
    return name, version


def sticky_point(model: str, key: str | None) -> float:
    """Where `key` falls in [0, 100) for `model` (salted by the model name: one key's versions
    of two models are independent draws)."""
    if key is None:
        return random.random() * 100.0
    digest = hashlib.sha256(f"{model}\x00{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def pick(weights: Mapping[str, float], point: float, available: Collection[str] | None = None) -> str | None:
    """The version whose slice of [0, 100) holds `point`, slices in version-name order, as wide
    as the weights (which need not sum to 100: they are rescaled).

    A version not in `available` (down, restarting) keeps its slice; keys that fall in it are
    spread over the available versions by their position within the slice, so every other
    key stays where it was and the spilled keys come back when the version does."""
    live = sorted((v, w) for v, w in weights.items() if w > 0)
    total = sum(w for _, w in live)
    if total <= 0:
        return None
    at = min(max(point, 0.0), 100.0) / 100.0 * total
    edge = 0.0
    chosen, start, width = live[-1][0], total - live[-1][1], live[-1][1]
    for version, w in live:
        if at < edge + w:
            chosen, start, width = version, edge, w
            break
        edge += w
    if available is None or chosen in available:
        return chosen
    rest = {v: w for v, w in live if v in available}
    if not rest:
        return None
    return pick(rest, (at - start) / width * 100.0)
