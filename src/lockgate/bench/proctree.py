"""CPU seconds of a server's whole process tree, split into API processes and engine cores (Linux /proc).

A server is one process (its engine cores are its children) or, with `--api-workers N`, a
supervising parent whose forked workers run the API (the primary's children are the cores).
Engine cores are told apart by their command line (`-m lockgate.engine.core`).
"""
from __future__ import annotations

import os
from pathlib import Path

from lockgate.bench.procs import children

ENGINE_MODULE = b"lockgate.engine.core"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """`pid`'s children, theirs, and so on (breadth first)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop(0))
        out += kids
        todo += kids
    return out


def is_engine(pid: int) -> bool:
    try:
        return ENGINE_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def tree_cpu(pid: int) -> tuple[float, float]:
    """(API, engine) CPU seconds of `pid` and every process below it, as they stand now."""
    api = engine = 0.0
    for p in [pid, *descendants(pid)]:
        if is_engine(p):
            engine += cpu_seconds(p)
        else:
            api += cpu_seconds(p)
    return api, engine


def tree_total(pid: int) -> float:
    """CPU seconds of `pid` and every process below it (a database server and its backends)."""
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])
