"""CPU priority of a loading engine: idle while it loads, normal once it serves.

Loading a model (reading, dequantizing, quantizing weights) is seconds of CPU; on a
small machine it competes with the engines that serve, and their time to first token
shows it (measured on 2 cores: p99 3.3x during a load at normal priority, 1.03x with
the loading core at SCHED_IDLE; docs/LIFECYCLE.md). Linux only, and only where the
priority can be given back: an unprivileged process may lower a priority but not raise
it again (SCHED_IDLE -> SCHED_OTHER needs CAP_SYS_NICE or RLIMIT_NICE >= 20), so the
ability is probed once on a throwaway thread; without it, loads run at normal priority.
"""
from __future__ import annotations

import functools
import logging
import os
import threading

log = logging.getLogger("lockgate.lifecycle")


@functools.cache
def supported() -> bool:
    """Whether a process can be set to SCHED_IDLE and back (probed on a thread that then exits)."""
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_IDLE"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, name="sched-probe")
    t.start()
    t.join()
    return bool(result and result[0])


def set_idle(pid: int, idle: bool) -> bool:
    """SCHED_IDLE (`idle`) or back to SCHED_OTHER for every thread of process `pid` (a policy is
    per thread; new threads inherit their creator's); False when not done."""
    if not supported():
        return False
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    done = False
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done = True
        except OSError as exc:  # a thread that just ended, or a process gone already
            log.debug("could not set the scheduling policy of %d/%d: %s", pid, tid, exc)
    return done
