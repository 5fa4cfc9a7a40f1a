"""`class_loads`: each SLO class's predicted queue wait, the autoscaler's SLO signal, computed the
same way for the live fleet (`autoscale_loop.py`, on the version's shared `QueueView`) and on the
simulator (`autoscale_sim.py`), as admission predicts a newcomer's wait (`gateway/admission.py`)
but without its safety margin."""
from __future__ import annotations

from lockgate.engine.frontend.queue_view import DrainRate, QueueView
from lockgate.gateway.classes import ClassTable
from lockgate.lifecycle.autoscale_types import ClassLoad

MAX_WAIT_S = 3600.0  # "hopeless" is enough; inf breaks the arithmetic
SCALING_DEMAND_MARGIN = 1.0  # admission's is HIGHER_DEMAND_MARGIN (1.25): see class_loads


def class_loads(view: QueueView, classes: ClassTable, mean_prompt: float, aging_s: float,
                margin: float = SCALING_DEMAND_MARGIN) -> list[ClassLoad]:
    """Each class's predicted wait for a request arriving now, as admission predicts it (what is queued
    ahead of it, its class and better and lower ones aging up within its target, over the queue's
    measured drain rate less what higher classes keep taking), 0 when none of the class is queued.

    `margin`: admission counts higher classes' demand 25% above its mean (`HIGHER_DEMAND_MARGIN`) to
    refuse safely; for scaling the expected wait is wanted. The drain rate is measured under backlog,
    so below saturation it is the throughput, about the arrival rate: with that margin the lowest
    class (20% of the default mix under 80% above it) would read "never served" whenever any of it
    queues, and keep the fleet in panic."""
    rate = view.drain_rate()
    out = []
    for cls in classes.classes:
        queued = view.queued(lambda p, r=cls.rank: p == r)
        wait = 0.0
        if rate is not None and queued > 0:
            ahead_req, ahead_tok = view.ahead(cls.rank, aging_s, cls.ttft_s)
            hi = view.arrival_rate(cls.rank)
            left = DrainRate(max(0.0, rate.requests_per_s - margin * hi.requests_per_s),
                             max(0.0, rate.tokens_per_s - margin * hi.tokens_per_s))
            wait = min(left.wait_s(ahead_req + 1, ahead_tok + int(mean_prompt)), MAX_WAIT_S)
        out.append(ClassLoad(cls.name, cls.ttft_s, wait, queued))
    return out
