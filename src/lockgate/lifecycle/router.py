"""The replica router: which of a version's engine-core replicas serves a request.

Pure policy, no I/O: the fleet feeds it each replica's state (routable, KV usage, the
KV-cache events of its prefix cache) and asks `route` for every request. The answer
is the replica with the lowest predicted cost in prompt-token units, a stand-in for
the time to its first token:

    cost = prompt tokens not cached there (the prefill it would do)
         + queued prefill tokens routed there and not started (under fair share: the
           part that would run before this request, see below)
         + running requests x `decode_tokens`
         + KV pressure (0 up to `kv_pressure_start` usage, growing linearly to
           `kv_pressure_tokens` at 100%)

Costs within `tie_tokens` of the best are a tie, broken at random, so cold misses and
equal loads spread instead of always landing on the first replica.

What counts as cached on a replica:
- Prefix match only: the leading consecutive block hashes of the prompt found in the
  replica's index (its stored blocks from KV events, plus the hashes the router itself
  sent there in the last `sent_ttl_s`, because events lag the requests that cause them;
  a real event replaces that record).
- Common blocks (in >= `common_fraction` of the last `common_window` routed requests, or of
  all routed so far while fewer, and in at least `common_min_requests`: a shared system
  prompt) count as cached everywhere: they never decide, so shared
  boilerplate cannot pin all traffic to one replica. Hashes are chained, so the common
  blocks of a prompt are a leading run; the match that decides is what lies beyond it.
- A deciding match shorter than `min_match_tokens` counts as no match.
Hashes are salted per tenant (`engine/prefix_hash.py`): one tenant's prompt never
matches another tenant's blocks, and the router never sees tokens.

Fair share (`fair_share`, for replicas scheduling with VTC, `scheduling_policy="priority"`):
a replica's scheduler serves backlogged tenants at equal rates, so of another
tenant's queued work only about as much as this tenant's own queued work plus this
request runs before this request's first token. The queued work that counts for a
request of tenant T on a replica is q_T + sum over the other tenants U of
min(q_U, q_T + prefill). A flooding tenant then sees its own backlog on every
replica and spreads over them, while a light tenant still routes by its cached
prefixes instead of fleeing the flood's queues.

Several API workers on shared cores (`--api-workers N`): each worker's router counts its own
tickets, and the fleet feeds it the other workers' load on each replica as the core reports it
(`set_peer_load`): their queued prefill counts like one more tenant's, their running requests
like its own.

`route` counts the request in flight on its replica before it returns (its `Ticket`),
so a burst of simultaneous requests spreads. Not thread-safe: one event loop owns it.
The cost of a route is O(prompt blocks x replicas + tenants queued), never O(index).
"""
from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

REASONS = ("prefix", "load", "miss")
# "kv": this module's policy. The others are the usual peers, kept to be measured against it
# (benchmarks/fleet_routing.py): "round_robin" (the next routable replica in turn) and
# "least_loaded" (power of two choices on requests queued and running). Both still count
# requests in flight and keep the index; only the choice differs.
POLICIES = ("kv", "round_robin", "least_loaded")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    block_size: int = 16
    min_match_tokens: int = 64  # a deciding match shorter than this does not decide
    common_fraction: float = 0.5  # a block seen in >= this share of recent routed requests is "common"
    common_window: int = 256  # how many recent requests that share is measured over (0: no common blocks)
    common_max_blocks: int = 256  # leading blocks of a prompt counted for commonality (bounds memory)
    common_min_requests: int = 8  # a block is common only once it was in at least this many of them
    kv_pressure_start: float = 0.8  # KV usage above which a replica's predicted cost grows
    kv_pressure_tokens: float = 4096.0  # cost added at 100% usage (growing from kv_pressure_start)
    decode_tokens: float = 16.0  # cost in prompt-token units of one running (decoding) request
    tie_tokens: float = 16.0  # costs within this many tokens of the best are a tie: random pick among them
    sent_ttl_s: float = 10.0  # how long the router's own record of "sent prefix P to replica R" counts
    fair_share: bool = True  # replicas schedule tenants by VTC fair share (scheduling_policy="priority")
    policy: str = "kv"  # one of POLICIES

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.min_match_tokens < 0:
            raise ValueError(f"min_match_tokens must be >= 0, got {self.min_match_tokens}")
        if not 0.0 < self.common_fraction <= 1.0:
            raise ValueError(f"common_fraction must be in (0, 1], got {self.common_fraction}")
        if self.common_window < 0 or self.common_max_blocks < 0:
            raise ValueError("common_window and common_max_blocks must be >= 0")
        if not 0.0 <= self.kv_pressure_start < 1.0:
            raise ValueError(f"kv_pressure_start must be in [0, 1), got {self.kv_pressure_start}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("kv_pressure_tokens", "decode_tokens", "tie_tokens", "sent_ttl_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")


@dataclass(slots=True)
class Decision:
    replica: int  # replica index
    reason: str  # "prefix": a deciding cached match won; "load": some replica had one but another won
    # on load; "miss": no replica had a deciding match
    matched_tokens: int  # prompt tokens predicted cached on the chosen replica (common blocks included)
    cost: float  # its predicted cost, in tokens


class NoReplicaError(Exception):
    """No routable replica (after exclusions)."""


class _Replica:
    __slots__ = ("index", "routable", "kv_usage", "blocks", "sent", "queued", "queued_by_tenant",
                 "queued_requests", "running", "routed", "peer_queued", "peer_queued_requests", "peer_running")

    def __init__(self, index: int, routable: bool) -> None:
        self.index = index
        self.routable = routable
        self.kv_usage = 0.0
        self.blocks: set[bytes] = set()  # stored blocks, from the replica's KV events
        self.sent: dict[bytes, float] = {}  # hash -> expiry: sent here, no event about it yet
        self.queued = 0  # prefill tokens routed here and not started
        self.queued_by_tenant: dict[str, int] = {}
        self.queued_requests = 0
        self.running = 0
        self.routed = dict.fromkeys(REASONS, 0)
        # Other API workers' requests on this replica's core (shared cores; their tenants unknown).
        self.peer_queued = self.peer_queued_requests = self.peer_running = 0

    def unqueue(self, tenant: str, tokens: int) -> None:
        self.queued -= tokens
        self.queued_requests -= 1
        left = self.queued_by_tenant.get(tenant, 0) - tokens
        if left > 0:
            self.queued_by_tenant[tenant] = left
        else:
            self.queued_by_tenant.pop(tenant, None)


class Ticket:
    """One routed request's share of its replica's load: queued prefill until `started`, then a
    running request until `end`. Outlives its replica harmlessly (a removed replica's load is gone)."""

    __slots__ = ("replica", "_rep", "_tenant", "_tokens", "_state")

    def __init__(self, rep: _Replica, tenant: str, tokens: int) -> None:
        self.replica = rep.index
        self._rep = rep
        self._tenant = tenant
        self._tokens = tokens
        self._state = 0  # 0 queued, 1 running, 2 ended

    def started(self) -> None:
        """First output came: its prefill leaves the replica's queued work, it now counts as running."""
        if self._state != 0:
            return
        self._state = 1
        self._rep.unqueue(self._tenant, self._tokens)
        self._rep.running += 1

    def end(self) -> None:
        """Finished, failed or aborted. Idempotent; safe after `started()` or without it."""
        if self._state == 0:
            self._rep.unqueue(self._tenant, self._tokens)
        elif self._state == 1:
            self._rep.running -= 1
        else:
            return
        self._state = 2


class Router:
    def __init__(self, config: RouterConfig, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._reps: dict[int, _Replica] = {}
        # (expiry, replica, hashes) per route, in expiry order (constant ttl, monotonic clock)
        self._sent_log: deque[tuple[float, _Replica, list[bytes]]] = deque()
        # Common blocks: how many of the last `common_window` routed requests hold each hash.
        self._window: deque[list[bytes]] = deque()
        self._counts: dict[bytes, int] = {}
        self._common_min = config.common_fraction * config.common_window
        self._min_blocks = -(-config.min_match_tokens // config.block_size)
        self._pressure_slope = config.kv_pressure_tokens / (1.0 - config.kv_pressure_start)
        self._turn = 0  # round robin's position

    # ---- the fleet's feed --------------------------------------------------------------------
    @property
    def replicas(self) -> list[int]:
        return sorted(self._reps)

    def add_replica(self, index: int, *, routable: bool = False) -> None:
        """A new replica, not routable until `set_routable(index, True)` (it is starting) unless said."""
        if index in self._reps:
            raise ValueError(f"replica {index} already added")
        self._reps[index] = _Replica(index, routable)

    def remove_replica(self, index: int) -> None:
        """Forget the replica, its index and its load (its tickets still outstanding end harmlessly)."""
        self._reps.pop(index, None)

    def set_routable(self, index: int, routable: bool) -> None:
        """Ready, healthy, not draining, not stalled."""
        self._reps[index].routable = routable

    # Events may lag a replica's removal: the feed methods below ignore unknown replicas.
    def set_kv_usage(self, index: int, usage: float) -> None:
        """Fraction of the replica's KV blocks in use (its engine stats)."""
        rep = self._reps.get(index)
        if rep is not None:
            rep.kv_usage = min(1.0, max(0.0, float(usage))) if math.isfinite(usage) else 1.0

    def set_peer_load(self, index: int, queued_tokens: int, queued_requests: int, running: int) -> None:
        """Other API workers' requests on the replica's core (shared cores): prefill tokens queued, and
        requests queued and running."""
        rep = self._reps.get(index)
        if rep is not None:
            rep.peer_queued, rep.peer_queued_requests, rep.peer_running = queued_tokens, queued_requests, running

    def blocks_stored(self, index: int, hashes: Iterable[bytes]) -> None:
        rep = self._reps.get(index)
        if rep is None:
            return
        sent = rep.sent
        for h in hashes:
            rep.blocks.add(h)
            sent.pop(h, None)  # the real event replaces the router's own record

    def blocks_removed(self, index: int, hashes: Iterable[bytes]) -> None:
        rep = self._reps.get(index)
        if rep is None:
            return
        sent = rep.sent
        for h in hashes:
            rep.blocks.discard(h)
            sent.pop(h, None)

    def cleared(self, index: int) -> None:
        """All blocks cleared, the core restarted, or a resync follows."""
        rep = self._reps.get(index)
        if rep is not None:
            rep.blocks.clear()
            rep.sent.clear()

    # ---- the decision -----------------------------------------------------------------------
    def route(self, hashes: list[bytes], num_prompt_tokens: int, *, tenant: str = "",
              exclude: Collection[int] = ()) -> tuple[Decision, Ticket]:
        """Choose a replica for a prompt of `num_prompt_tokens` tokens whose full blocks hash to
        `hashes` (`prompt_block_hashes`), and count the request in flight there at once."""
        cfg = self.config
        now = self._clock()
        self._expire(now)
        bs = cfg.block_size
        n = len(hashes)
        # The leading run of common blocks (chained hashes: a block is in at most as many
        # requests as its parent, so common blocks cannot follow a non-common one).
        common = 0
        if self._common_min > 0:
            counts = self._counts
            thr = max(cfg.common_min_requests, cfg.common_fraction * len(self._window))
            lim = min(n, cfg.common_max_blocks)
            while common < lim and counts.get(hashes[common], 0) >= thr:
                common += 1
        max_cached = max(0, num_prompt_tokens - 1)  # one token is always computed
        best_cost = math.inf
        costs: list[tuple[float, _Replica, int, bool]] = []  # cost, replica, cached tokens, deciding match
        any_match = False
        fair = cfg.fair_share
        for rep in self._reps.values():
            if not rep.routable or rep.index in exclude:
                continue
            blocks, sent = rep.blocks, rep.sent
            m = common
            while m < n:
                h = hashes[m]
                if h in blocks or h in sent:
                    m += 1
                else:
                    break
            deciding = m > common and m - common >= self._min_blocks
            any_match = any_match or deciding
            cached = min((m if deciding else common) * bs, max_cached)
            prefill = num_prompt_tokens - cached
            if fair and (rep.queued_by_tenant or rep.peer_queued):
                qt = rep.queued_by_tenant
                bound = qt.get(tenant, 0) + prefill
                queued = 0
                for q in qt.values():
                    queued += q if q < bound else bound
                q = rep.peer_queued  # the other workers' queue: tenants unknown, as one more tenant
                queued += q if q < bound else bound
            else:
                queued = rep.queued + rep.peer_queued
            cost = prefill + queued + (rep.running + rep.peer_running) * cfg.decode_tokens
            if rep.kv_usage > cfg.kv_pressure_start:
                cost += (rep.kv_usage - cfg.kv_pressure_start) * self._pressure_slope
            costs.append((cost, rep, cached, deciding))
            if cost < best_cost:
                best_cost = cost
        if not costs:
            raise NoReplicaError("no routable replica" + (f" (excluded: {sorted(exclude)})" if exclude else ""))
        if cfg.policy == "kv":
            limit = best_cost + cfg.tie_tokens
            ties = [c for c in costs if c[0] <= limit]
            cost, rep, cached, deciding = ties[0] if len(ties) == 1 else self._rng.choice(ties)
        else:
            cost, rep, cached, deciding = self._peer_choice(costs)
        reason = "prefix" if deciding else ("load" if any_match else "miss")
        prefill = num_prompt_tokens - cached
        self._count_in(rep, tenant, prefill, reason)
        self._remember(now, rep, hashes)
        return Decision(rep.index, reason, cached, cost), Ticket(rep, tenant, prefill)

    def _peer_choice(self, costs: list[tuple[float, _Replica, int, bool]]) -> tuple[float, _Replica, int, bool]:
        """The comparison policies' pick among the routable replicas (in index order)."""
        costs = sorted(costs, key=lambda c: c[1].index)
        if self.config.policy == "round_robin":
            self._turn += 1
            return costs[self._turn % len(costs)]
        a, b = (self._rng.sample(costs, 2) if len(costs) > 1 else (costs[0], costs[0]))
        load_a, load_b = (c[1].queued_requests + c[1].running + c[1].peer_queued_requests + c[1].peer_running
                          for c in (a, b))
        return a if load_a <= load_b else b

    def _count_in(self, rep: _Replica, tenant: str, prefill: int, reason: str) -> None:
        rep.queued += prefill
        rep.queued_requests += 1
        rep.queued_by_tenant[tenant] = rep.queued_by_tenant.get(tenant, 0) + prefill
        rep.routed[reason] += 1

    def _remember(self, now: float, rep: _Replica, hashes: list[bytes]) -> None:
        """The fallback index (sent prefixes, until their events or the ttl) and the common-block window."""
        cfg = self.config
        if hashes and cfg.sent_ttl_s > 0:
            expiry = now + cfg.sent_ttl_s
            blocks, sent = rep.blocks, rep.sent
            fresh = [h for h in hashes if h not in blocks]
            for h in fresh:
                sent[h] = expiry
            if fresh:
                self._sent_log.append((expiry, rep, fresh))
        if cfg.common_window > 0:
            counts = self._counts
            mine = hashes[: cfg.common_max_blocks]
            for h in mine:
                counts[h] = counts.get(h, 0) + 1
            self._window.append(mine)
            if len(self._window) > cfg.common_window:
                for h in self._window.popleft():
                    c = counts[h] - 1
                    if c:
                        counts[h] = c
                    else:
                        del counts[h]

    def _expire(self, now: float) -> None:
        log = self._sent_log
        while log and log[0][0] <= now:
            expiry, rep, hashes = log.popleft()
            sent = rep.sent
            for h in hashes:
                if sent.get(h) == expiry:  # not re-sent since, nor confirmed by an event
                    del sent[h]

    # ---- views ---------------------------------------------------------------------------------
    def is_common(self, block_hash: bytes) -> bool:
        """Whether a block counts as cached everywhere (in enough of the recent requests)."""
        cfg = self.config
        thr = max(cfg.common_min_requests, cfg.common_fraction * len(self._window))
        return self._common_min > 0 and self._counts.get(block_hash, 0) >= thr

    def replica_view(self, index: int) -> dict:
        """One replica's routing state, for GET /admin/models."""
        rep = self._reps[index]
        self._expire(self._clock())
        total = sum(rep.routed.values())
        everyone = sum(sum(r.routed.values()) for r in self._reps.values())  # the replicas there now
        return {
            "routable": rep.routable,
            "kv_usage": round(rep.kv_usage, 4),
            "queued_requests": rep.queued_requests,
            "queued_tokens": rep.queued,
            "running": rep.running,
            "cached_blocks": len(rep.blocks),
            "sent_blocks": len(rep.sent),
            "routed": dict(rep.routed),
            "routed_share": round(total / everyone, 6) if everyone else 0.0,
        }
