"""Soak benchmark: mixed traffic at ~70% of capacity; memory and descriptors must stay flat.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--load-fraction 0.7]
                                        [--url URL [--api-pid PID] [--engine-pid PID]]

By default it starts its own `python -m lockgate.server` on a free loopback
port (the embedded SmolLM2-135M), finds the engine-core child process, and
stops both at the end. With --url it drives a running server instead (pass
--api-pid, and --engine-pid if it cannot be found as the API process's child,
to get RSS and descriptor figures).

1. Every bad-request case is sent once (a sweep that prints each one's
   outcome). Calibration: a closed loop of --calibrate-concurrency clients
   sends the soak's request mix for --calibrate-seconds (longer, up to 4x,
   while fewer than 2 x concurrency requests completed); capacity = completed
   requests/s. --rate R skips it.
2. Soak: open-loop Poisson arrivals at --load-fraction x capacity for
   --minutes, never more than --max-outstanding requests at once (arrivals
   beyond that are skipped and counted). The mix: streaming and non-streaming
   chat/completions, n = 2..4, streams closed by the client after a few tokens
   and non-streaming requests abandoned mid-way, and bad requests of many kinds
   (broken JSON, wrong types, 2**70 in integer fields, over-context prompts,
   wrong content type, unknown model, oversized body) that must get their 4xx.
3. Every --report-seconds (60) one row: counts, RSS (MiB, VmRSS) and open
   descriptors of the API and engine processes, the server's in-flight,
   queued and free-KV-block gauges, generated tokens/s and the engine's CPU
   use since the previous row.
4. Flatness: at the end of warm-up (the first --warmup-fraction of the run,
   at least one minute) and at the end, arrivals pause, every client
   connection is closed and the server is waited on until idle; RSS and
   descriptors are sampled there, so both samples see the same idle server.
   PASS when each grew by at most --max-growth-pct (5%), nothing unexpected
   was answered (a 5xx, a timeout, a broken stream, a bad request answered
   with anything but its 4xx, an error body not in the OpenAI shape), and the
   server ended idle: nothing queued or in flight, every KV block free (and
   the engine was not restarted).

Capacity is whatever the machine gives: on a busy shared machine the engine
can be many times slower than alone (try --server-args "--num-threads 1"),
and the soak then runs at 70% of that.

Exit status 0 on PASS, 1 on FAIL. Results also go to --out (JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lockgate.bench.procs import ServerProcess, children, pid_alive

KINDS = ("stream", "nonstream", "n", "cancel", "bad")
DEFAULT_MIX = "stream=0.40,nonstream=0.20,n=0.10,cancel=0.15,bad=0.15"
WORDS = ("river", "mountain", "engine", "garden", "silver", "window", "planet", "music", "forest", "harbor",
         "candle", "market", "winter", "signal", "paper", "orange", "bridge", "cloud", "library", "comet")
TOPICS = ("Write a short poem about", "Explain in two sentences what links", "List three facts about",
          "Tell a very short story with", "Describe the colour of")
SYSTEM = "You are a concise assistant. Answer in one or two sentences."
HUGE = 2**70


# ---------------------------------------------------------------- outcomes and counts

@dataclass(slots=True)
class Outcome:
    kind: str            # stream | nonstream | n | cancel | bad:<case>
    result: str          # ok | cancelled | rejected (the expected 4xx) | unexpected
    label: str = ""      # unexpected: the status ("500", "200") or what went wrong ("timeout", ...)
    detail: str = ""
    null_code: bool = False  # an expected 4xx whose error object has "code": null


@dataclass
class Tally:
    sent: int = 0
    skipped: int = 0     # arrivals not sent because --max-outstanding requests were outstanding
    results: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)      # label -> count
    unexpected_by: Counter[str] = field(default_factory=Counter)   # "kind label" -> count
    examples: dict[str, str] = field(default_factory=dict)         # "kind label" -> first detail
    null_codes: Counter[str] = field(default_factory=Counter)      # kind -> count

    def add(self, o: Outcome) -> None:
        self.results[o.result] += 1
        self.by_kind[o.kind] += 1
        if o.result == "unexpected":
            self.unexpected[o.label] += 1
            key = f"{o.kind} {o.label}"
            self.unexpected_by[key] += 1
            self.examples.setdefault(key, o.detail[:300])
        if o.null_code:
            self.null_codes[o.kind] += 1

    def done(self) -> int:
        return sum(self.results.values())

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "skipped": self.skipped, "results": dict(self.results),
                "by_kind": dict(self.by_kind), "unexpected": dict(self.unexpected),
                "unexpected_by_kind": dict(self.unexpected_by), "examples": self.examples,
                "null_error_codes": dict(self.null_codes)}


# ---------------------------------------------------------------- the request mix

@dataclass(slots=True)
class BadCase:
    name: str
    path: str
    content: bytes
    content_type: str | None
    expect: frozenset[int]


def parse_mix(text: str) -> dict[str, float]:
    mix = {k: 0.0 for k in KINDS}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in mix:
            raise SystemExit(f"--mix: unknown kind {k!r} (kinds: {', '.join(KINDS)})")
        mix[k.strip()] = float(v)
    if sum(mix.values()) <= 0:
        raise SystemExit("--mix: all fractions are zero")
    return mix


def bad_cases(max_model_len: int, body_limit: int) -> list[BadCase]:
    """Bad requests and the status each must get."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]

    def js(name: str, path: str, body: Any, expect: int = 400) -> BadCase:
        return BadCase(name, path, json.dumps(body).encode(), "application/json", frozenset({expect}))

    cases = [
        BadCase("broken_json", chat, b'{"messages": [{"role": "user", "content": "hi"}', "application/json",
                frozenset({400})),
        BadCase("json_array", comp, b"[1, 2, 3]", "application/json", frozenset({400})),
        js("string_max_tokens", comp, {"prompt": "hi", "max_tokens": "16"}),
        js("string_messages", chat, {"messages": "hi"}),
        js("bool_n", comp, {"prompt": "hi", "n": True}),
        js("temperature_range", chat, {"messages": msgs, "temperature": 7}),
        js("bad_role", chat, {"messages": [{"role": "bot", "content": "hi"}]}),
        js("huge_max_tokens", chat, {"messages": msgs, "max_tokens": HUGE}),
        js("huge_top_k", comp, {"prompt": "hi", "max_tokens": 1, "top_k": HUGE}),
        js("huge_seed", comp, {"prompt": "hi", "max_tokens": 1, "seed": HUGE}),
        js("negative_huge_seed", chat, {"messages": msgs, "max_tokens": 1, "seed": -HUGE}),
        js("huge_priority", chat, {"messages": msgs, "max_tokens": 1, "priority": HUGE}),
        js("huge_n", comp, {"prompt": "hi", "max_tokens": 1, "n": HUGE}),
        js("over_context_ids", comp, {"prompt": [100] * (max_model_len + 8), "max_tokens": 16}),
        js("over_context_chat", chat, {"messages": [{"role": "user", "content": "hello " * max_model_len}]}),
        js("unknown_model", chat, {"model": "gpt-9-does-not-exist", "messages": msgs}, 404),
        BadCase("text_plain", comp, json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), "text/plain",
                frozenset({415})),
        BadCase("form_encoded", chat, b"messages=hi&max_tokens=2", "application/x-www-form-urlencoded",
                frozenset({415})),
        BadCase("body_too_large", comp, json.dumps({"prompt": "a" * (body_limit + 1024)}).encode(),
                "application/json", frozenset({413})),
    ]
    return cases


class Traffic:
    """Draws the next request of the mix; every draw is one coroutine that returns an Outcome."""

    def __init__(self, rng: random.Random, model: str, mix: dict[str, float], bad: list[BadCase],
                 max_tokens: tuple[int, int], headers: dict[str, str]) -> None:
        self.rng = rng
        self.model = model
        self.kinds = list(mix)
        self.weights = [mix[k] for k in self.kinds]
        self.bad = bad
        self.max_tokens = max_tokens
        self.headers = headers

    def _body(self, chat: bool, stream: bool, n: int = 1) -> dict[str, Any]:
        r = self.rng
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 40)))
        text = f"{r.choice(TOPICS)} {words}."
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.randint(*self.max_tokens), "stream": stream}
        if chat:
            msgs = [{"role": "user", "content": text}]
            if r.random() < 0.5:
                msgs.insert(0, {"role": "system", "content": SYSTEM})
            body["messages"] = msgs
        else:
            body["prompt"] = text
        body["temperature"] = 0.8 if n > 1 else r.choice((0.0, 0.7, 1.0))
        if n > 1:
            body["n"] = n
        if r.random() < 0.3:
            body["seed"] = r.randint(0, 2**31)
        if r.random() < 0.2:
            body["top_p"] = 0.9
        if r.random() < 0.1:
            body["stop"] = ["\n\n"]
        if stream and r.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return body

    def draw(self, client: httpx.AsyncClient) -> tuple[str, Awaitable[Outcome]]:
        r = self.rng
        kind = r.choices(self.kinds, self.weights)[0]
        chat = r.random() < 0.6
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if kind == "stream":
            return kind, streamed(client, kind, path, self._body(chat, True), self.headers)
        if kind == "nonstream":
            return kind, non_streamed(client, kind, path, self._body(chat, False), self.headers)
        if kind == "n":
            n = r.randint(2, 4)
            stream = r.random() < 0.5
            body = self._body(chat, stream, n)
            if stream:
                return kind, streamed(client, kind, path, body, self.headers)
            return kind, non_streamed(client, kind, path, body, self.headers)
        if kind == "cancel":
            body = self._body(chat, True)
            body["max_tokens"] = self.max_tokens[1]  # long enough to still be running when dropped
            if r.random() < 0.75:
                return kind, streamed(client, kind, path, body, self.headers, cancel_after=r.randint(1, 6))
            body["stream"] = False
            body.pop("stream_options", None)
            return kind, non_streamed(client, kind, path, body, self.headers, abandon_after=r.uniform(0.1, 1.5))
        case = r.choice(self.bad)
        return f"bad:{case.name}", bad_request(client, case, self.headers)


# ---------------------------------------------------------------- one request

def _error_of(resp_text: str) -> tuple[bool, bool]:
    """(is an OpenAI error object, its code is null)."""
    try:
        err = json.loads(resp_text)["error"]
        ok = isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
        return ok, ok and err.get("code") is None
    except (ValueError, KeyError, TypeError):
        return False, False


async def guarded(kind: str, coro: Awaitable[Outcome]) -> Outcome:
    try:
        return await coro
    except httpx.TimeoutException as exc:
        return Outcome(kind, "unexpected", "timeout", repr(exc))
    except httpx.HTTPError as exc:
        return Outcome(kind, "unexpected", f"conn:{type(exc).__name__}", repr(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in this script must show, not kill the run
        return Outcome(kind, "unexpected", f"client:{type(exc).__name__}", repr(exc))


async def streamed(client: httpx.AsyncClient, kind: str, path: str, body: dict[str, Any],
                   headers: dict[str, str], cancel_after: int | None = None) -> Outcome:
    n = body.get("n", 1)
    async with client.stream("POST", path, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            return Outcome(kind, "unexpected", str(resp.status_code), text)
        finished: set[int] = set()
        pieces = 0
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                return Outcome(kind, "unexpected", "stream-garbled", data)
            if "error" in chunk:
                return Outcome(kind, "unexpected", "stream-error", data)
            for c in chunk.get("choices", []):
                if c.get("finish_reason"):
                    finished.add(c["index"])
                if c.get("text") or (c.get("delta") or {}).get("content"):
                    pieces += 1
            if cancel_after is not None and pieces >= cancel_after:
                return Outcome(kind, "cancelled")  # leaving the block closes the connection mid-stream
        if not done:
            return Outcome(kind, "unexpected", "stream-truncated", f"no [DONE]; finished {sorted(finished)}")
        if finished != set(range(n)):
            return Outcome(kind, "unexpected", "stream-incomplete", f"finished {sorted(finished)} of n={n}")
        return Outcome(kind, "ok")


async def non_streamed(client: httpx.AsyncClient, kind: str, path: str, body: dict[str, Any],
                       headers: dict[str, str], abandon_after: float | None = None) -> Outcome:
    request = client.post(path, json=body, headers=headers)
    if abandon_after is not None:
        try:
            resp = await asyncio.wait_for(request, abandon_after)
        except TimeoutError:
            return Outcome(kind, "cancelled")  # the connection was closed under the running request
    else:
        resp = await request
    if resp.status_code != 200:
        return Outcome(kind, "unexpected", str(resp.status_code), resp.text)
    try:
        out = resp.json()
        choices = out["choices"]
        good = (len(choices) == body.get("n", 1)
                and all(c["finish_reason"] in ("stop", "length") for c in choices)
                and isinstance(out["usage"]["completion_tokens"], int))
    except (ValueError, KeyError, TypeError):
        good = False
    return Outcome(kind, "ok") if good else Outcome(kind, "unexpected", "bad-body", resp.text)


async def bad_request(client: httpx.AsyncClient, case: BadCase, headers: dict[str, str]) -> Outcome:
    kind = f"bad:{case.name}"
    h = dict(headers)
    if case.content_type:
        h["content-type"] = case.content_type
    resp = await client.post(case.path, content=case.content, headers=h)
    if resp.status_code not in case.expect:
        return Outcome(kind, "unexpected", str(resp.status_code), resp.text)
    shaped, null_code = _error_of(resp.text)
    if not shaped:
        return Outcome(kind, "unexpected", f"{resp.status_code}-not-openai-error", resp.text)
    return Outcome(kind, "rejected", null_code=null_code)


# ---------------------------------------------------------------- processes and metrics

def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def num_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (from /proc/PID/stat)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def find_engine(api_pid: int) -> int | None:
    kids = [p for p in children(api_pid) if pid_alive(p)]
    if not kids:
        return None
    return max(kids, key=lambda p: rss_mib(p) or 0.0)  # the engine holds the model: the largest child


class Server:
    """The server under test: one we started, or one at --url."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.started: ServerProcess | None = None  # the server we started (none with --url)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.api_pid: int | None = args.api_pid
        self.engine_pid: int | None = args.engine_pid
        self.engine_pid_fixed = args.engine_pid is not None
        self.engine_pids_seen: list[int] = []
        if args.url:
            self.base_url = args.url.rstrip("/")
            return
        self.log_path = Path(tempfile.mkdtemp(prefix="lockgate-soak-")) / "server.log"
        self.started = ServerProcess(args.server_args.split(), self.log_path, wait=False)
        self.base_url, self.proc, self.api_pid = self.started.base_url, self.started.proc, self.started.pid
        print(f"server: {' '.join(self.started.cmd)}\nserver log: {self.log_path}", flush=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""

    def wait_ready(self, timeout: float, headers: dict[str, str]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.base_url}/v1/models", headers=headers, timeout=5)
                if r.status_code == 200 and httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return r.json()["data"][0]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def current_engine(self) -> int | None:
        if not self.engine_pid_fixed and self.api_pid is not None and (
                self.engine_pid is None or not pid_alive(self.engine_pid)):
            self.engine_pid = find_engine(self.api_pid)
        if self.engine_pid is not None and self.engine_pid not in self.engine_pids_seen:
            self.engine_pids_seen.append(self.engine_pid)
        return self.engine_pid

    def api_pid_alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.api_pid is None or pid_alive(self.api_pid)

    def stop(self) -> None:
        if self.started is not None:
            self.started.stop()


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
MODEL_LABEL = re.compile(r'model_name="[^"]*",?')


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics: each metric summed over its label sets, and per label set (less model_name) as
    `name{labels}`; {} when it cannot be read."""
    try:
        resp = await client.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if resp.status_code != 200:  # keyed mode: /metrics needs a metrics-scope or global admin key
        raise SystemExit(f"/metrics answered {resp.status_code}: give --metrics-key (a metrics-scope or "
                         f"global admin key) for a keyed server: {resp.text[:200]}")
    text = resp.text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m and not line.startswith("#"):
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            out[m.group(1)] = out.get(m.group(1), 0.0) + value
            labels = MODEL_LABEL.sub("", m.group(2) or "").replace("{,", "{").replace(",}", "}")
            if labels not in ("", "{}"):
                out[m.group(1) + labels] = out.get(m.group(1) + labels, 0.0) + value
    return out


@dataclass(slots=True)
class Sample:
    t: float
    phase: str
    sent: int
    ok: int
    cancelled: int
    rejected: int
    unexpected: int
    skipped: int
    api_rss: float | None
    engine_rss: float | None
    api_fds: int | None
    engine_fds: int | None
    in_flight: float | None
    queued: float | None
    kv_free: float | None
    kv_total: float | None
    tok_s: float | None          # generated tokens/s since the previous row (lockgate:generation_tokens)
    engine_cpu: float | None     # engine CPU use since the previous row, % of one core
    unexpected_by: str


HEADER = (f"{'time':>6} {'phase':<7}{'sent':>7}{'ok':>7}{'cancel':>7}{'4xx':>6}{'unexp':>6}{'skip':>5}"
          f"{'API MiB':>9}{'eng MiB':>9}{'API fd':>7}{'eng fd':>7}{'inflt':>6}{'queue':>6}{'KV free':>11}"
          f"{'tok/s':>7}{'eng cpu':>8}  unexpected by status")


def least(xs: list[Any]) -> Any:
    known = [x for x in xs if x is not None]
    return min(known) if known else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def row(s: Sample) -> str:
    kv = "-" if s.kv_free is None else f"{s.kv_free:.0f}/{s.kv_total or 0:.0f}"
    return (f"{int(s.t // 60):>3}:{int(s.t % 60):02d} {s.phase:<7}{s.sent:>7}{s.ok:>7}{s.cancelled:>7}"
            f"{s.rejected:>6}{s.unexpected:>6}{s.skipped:>5}{fmt(s.api_rss, '.1f'):>9}"
            f"{fmt(s.engine_rss, '.1f'):>9}{fmt(s.api_fds, 'd'):>7}{fmt(s.engine_fds, 'd'):>7}"
            f"{fmt(s.in_flight, '.0f'):>6}{fmt(s.queued, '.0f'):>6}{kv:>11}{fmt(s.tok_s, '.1f'):>7}"
            f"{fmt(s.engine_cpu, '.0f'):>7}%  {s.unexpected_by or '-'}")


# ---------------------------------------------------------------- the soak

class Soak:
    def __init__(self, args: argparse.Namespace, server: Server, traffic: Traffic, headers: dict[str, str]) -> None:
        self.args = args
        self.server = server
        self.traffic = traffic
        self.headers = headers
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self.phase = "warmup"
        self.calibration = Tally()  # the bad-request sweep and the calibration
        self.last: tuple[float, float | None, float | None, int | None] = (time.monotonic(), None, None, None)
        # /metrics on its own connection-per-scrape client, so it holds no socket open between samples.
        mkey = self.args.metrics_key or self.args.api_key
        self.metrics_client = httpx.AsyncClient(base_url=server.base_url,
                                                headers={"authorization": f"Bearer {mkey}"} if mkey else {},
                                                limits=httpx.Limits(max_keepalive_connections=0))

    def new_client(self, connections: int) -> httpx.AsyncClient:
        t = self.args.request_timeout
        return httpx.AsyncClient(base_url=self.server.base_url, timeout=httpx.Timeout(t, connect=10.0),
                                 limits=httpx.Limits(max_connections=connections,
                                                     max_keepalive_connections=connections))

    async def sample(self, phase: str, reads: int = 1) -> Sample:
        """One row; with reads > 1 (an idle sample) RSS and descriptors are the least of that many reads,
        0.5 s apart, so a connection that is just closing does not count."""
        api, eng = self.server.api_pid, self.server.current_engine()
        stats: list[tuple[float | None, float | None, int | None, int | None]] = []
        for i in range(reads):  # before the scrape: its own connection must not be counted
            if i:
                await asyncio.sleep(0.5)
            stats.append((rss_mib(api), rss_mib(eng), num_fds(api), num_fds(eng)))
        api_rss, eng_rss, api_fds, eng_fds = (least([x[j] for x in stats]) for j in range(4))
        m = await scrape(self.metrics_client)
        now, tokens, cpu = time.monotonic(), m.get("lockgate:generation_tokens_total"), cpu_seconds(eng)
        (t_prev, tokens_prev, cpu_prev, eng_prev), self.last = self.last, (now, tokens, cpu, eng)
        tok_s = None if tokens is None or tokens_prev is None else (tokens - tokens_prev) / (now - t_prev)
        same_engine = cpu is not None and cpu_prev is not None and eng == eng_prev
        eng_cpu = (cpu - cpu_prev) / (now - t_prev) * 100 if same_engine else None
        t = self.tally
        s = Sample(time.monotonic() - self.t0, phase, t.sent, t.results["ok"], t.results["cancelled"],
                   t.results["rejected"], t.results["unexpected"], t.skipped, api_rss, eng_rss,
                   api_fds, eng_fds, m.get("lockgate:num_requests_in_flight"),
                   m.get("lockgate:num_requests_queued"), m.get("lockgate:kv_cache_free_blocks"),
                   m.get("lockgate:kv_cache_total_blocks"), tok_s, eng_cpu,
                   " ".join(f"{k}:{v}" for k, v in sorted(t.unexpected.items())))
        self.samples.append(s)
        print(row(s), flush=True)
        return s

    async def wait_idle(self, timeout: float) -> dict[str, float]:
        """Until nothing is queued or in flight and every KV block is free (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = await scrape(self.metrics_client)
            idle = (m.get("lockgate:num_requests_in_flight") == 0 and m.get("lockgate:num_requests_queued") == 0
                    and m.get("lockgate:kv_cache_free_blocks") == m.get("lockgate:kv_cache_total_blocks"))
            if idle or time.monotonic() > deadline:
                return m
            await asyncio.sleep(0.5)

    async def sweep(self) -> dict[str, str]:
        """Each bad-request case once, whatever the random mix draws later: case -> status."""
        seen: dict[str, str] = {}
        async with self.new_client(4) as client:
            for case in self.traffic.bad:
                o = await guarded(f"bad:{case.name}", bad_request(client, case, self.headers))
                self.calibration.sent += 1
                self.calibration.add(o)
                seen[case.name] = o.label if o.result == "unexpected" else "ok"
        print("bad-request sweep (ok = the expected 4xx): "
              + ", ".join(f"{k} {v}" for k, v in seen.items()), flush=True)
        return seen

    async def calibrate(self) -> float:
        """Closed loop: completed requests/s of the mix at --calibrate-concurrency.

        The window runs --calibrate-seconds, longer if fewer than 2 x concurrency requests completed in
        it (slow requests would make a short window miscount), but never past 4 x --calibrate-seconds.
        """
        a = self.args
        tally = self.calibration
        conc = a.calibrate_concurrency
        client = self.new_client(conc + 4)
        start = time.monotonic()
        measure_from = start + min(10.0, a.calibrate_seconds * 0.2)  # let the batch fill first
        completed = 0      # completions since measure_from
        stopped = False

        async def worker() -> None:
            nonlocal completed
            while not stopped:
                kind, coro = self.traffic.draw(client)
                tally.sent += 1
                tally.add(await guarded(kind, coro))
                if not stopped and time.monotonic() >= measure_from:
                    completed += 1

        print(f"calibrating: closed loop, {conc} clients, {a.calibrate_seconds:.0f} s ...", flush=True)
        workers = [asyncio.create_task(worker()) for _ in range(conc)]
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            if (now >= start + a.calibrate_seconds and completed >= 2 * conc) or now >= start + 4 * a.calibrate_seconds:
                break
        stopped = True
        window, counted = now - measure_from, completed
        await asyncio.gather(*workers)  # each finishes the request it has (not counted)
        await client.aclose()
        rate = counted / window
        print(f"calibration: {counted} requests completed in {window:.0f} s = {rate:.2f} req/s "
              f"(all so far: {dict(tally.results)}; unexpected {dict(tally.unexpected) or 'none'})", flush=True)
        return rate

    async def drive(self, rate: float, until: float, client: httpx.AsyncClient, then: str) -> None:
        """Open-loop Poisson arrivals at `rate` until `until`; waits for what it started."""
        rng = random.Random(self.traffic.rng.random())
        outstanding: set[asyncio.Task[None]] = set()

        async def one(kind: str, coro: Awaitable[Outcome]) -> None:
            self.tally.add(await guarded(kind, coro))

        next_t = time.monotonic()
        while True:
            next_t += rng.expovariate(rate)
            if next_t >= until:
                break
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if len(outstanding) >= self.args.max_outstanding:
                self.tally.skipped += 1
                continue
            kind, coro = self.traffic.draw(client)
            self.tally.sent += 1
            task = asyncio.create_task(one(kind, coro))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        self.phase = then  # no more arrivals: what is left finishes
        if outstanding:
            await asyncio.gather(*outstanding)

    async def quiesce(self, client: httpx.AsyncClient, phase: str, idle_timeout: float) -> tuple[Sample, dict]:
        """Close every client connection, wait until the server is idle, then sample."""
        await client.aclose()
        m = await self.wait_idle(idle_timeout)
        await asyncio.sleep(1.0)  # the server closes its side of the connections
        return await self.sample(phase, reads=5), m

    async def reporter(self) -> None:
        every = self.args.report_seconds
        k = 1
        while True:
            await asyncio.sleep(max(0.0, self.t0 + k * every - time.monotonic()))
            k += 1
            await self.sample(self.phase)

    async def run(self, rate: float) -> tuple[Sample, Sample, dict[str, float]]:
        a = self.args
        total = a.minutes * 60
        warmup = min(total, max(60.0, a.warmup_fraction * total))
        conns = a.max_outstanding + 4
        print(f"\nsoak: {a.minutes:g} min of Poisson arrivals at {rate:.2f} req/s, at most {a.max_outstanding} "
              f"outstanding; warm-up {warmup:.0f} s; a row every {a.report_seconds:g} s\n{HEADER}", flush=True)
        self.t0 = time.monotonic()
        await self.sample("start")
        rep = asyncio.create_task(self.reporter())
        try:
            client = self.new_client(conns)
            await self.drive(rate, self.t0 + warmup, client, "pause")
            base, _ = await self.quiesce(client, "base", min(a.idle_timeout, 30.0))
            self.phase = "soak"
            client = self.new_client(conns)
            await self.drive(rate, self.t0 + total, client, "drain")
            end, m = await self.quiesce(client, "end", a.idle_timeout)
        finally:
            rep.cancel()
        return base, end, m


# ---------------------------------------------------------------- verdict

def growth(base: float | None, end: float | None) -> float | None:
    if base is None or end is None or base == 0:
        return None
    return (end - base) / base * 100


def verdict(args: argparse.Namespace, soak: Soak, base: Sample, end: Sample, m: dict[str, float],
            before: dict[str, float], rate: float, capacity: float | None, server: Server) -> dict[str, Any]:
    reasons: list[str] = []
    flat: dict[str, dict[str, Any]] = {}
    for name, b, e in (("api_rss_mib", base.api_rss, end.api_rss), ("engine_rss_mib", base.engine_rss, end.engine_rss),
                       ("api_fds", base.api_fds, end.api_fds), ("engine_fds", base.engine_fds, end.engine_fds)):
        g = growth(b, e)
        ok = g is not None and g <= args.max_growth_pct
        flat[name] = {"warmup_end": b, "end": e, "growth_pct": g, "ok": ok}
        if g is None:
            reasons.append(f"{name}: not measured")
        elif not ok:
            reasons.append(f"{name} grew {g:+.1f}% (> {args.max_growth_pct:g}%)")
    in_flight = m.get("lockgate:num_requests_in_flight")
    queued = m.get("lockgate:num_requests_queued")
    kv_free, kv_total = m.get("lockgate:kv_cache_free_blocks"), m.get("lockgate:kv_cache_total_blocks")
    idle = in_flight == 0 and queued == 0 and kv_free == kv_total and kv_total is not None
    if not idle:
        reasons.append(f"not idle at the end: in flight {in_flight}, queued {queued}, KV free {kv_free}/{kv_total}")
    total_unexpected = soak.tally.results["unexpected"] + soak.calibration.results["unexpected"]
    if total_unexpected:
        reasons.append(f"{total_unexpected} unexpected responses")
    if not server.api_pid_alive():
        reasons.append("the API process died")
    if m.get("lockgate:engine_healthy") == 0:
        reasons.append("lockgate:engine_healthy is 0 at the end")
    if len(server.engine_pids_seen) > 1:
        reasons.append(f"the engine process changed: pids {server.engine_pids_seen}")
    # The server's own counters over the whole run (calibration included).
    counted = ("lockgate:request_", "lockgate:requests_", "lockgate:http_errors", "lockgate:num_preemptions")
    counters = {k.removeprefix("lockgate:"): m[k] - before.get(k, 0.0) for k in sorted(m)
                if k.split("{")[0].endswith("_total") and k.startswith(counted)  # per label set where labelled
                and ("{" in k or not any(x.startswith(k + "{") for x in m))}
    restarts = m.get("lockgate:engine_restarts_total", 0.0) - before.get("lockgate:engine_restarts_total", 0.0)
    if restarts:
        reasons.append(f"engine restarts: {restarts:.0f}")
    soak_s = end.t
    return {
        "pass": not reasons, "reasons": reasons,
        "args": {k: ("<set>" if k == "api_key" and v else v) for k, v in vars(args).items()},
        "capacity_req_s": capacity, "target_rate_req_s": rate,
        "achieved_rate_req_s": soak.tally.sent / soak_s if soak_s else None, "duration_s": soak_s,
        "flatness": flat, "idle_at_end": {"in_flight": in_flight, "queued": queued, "kv_free_blocks": kv_free,
                                          "kv_total_blocks": kv_total, "ok": idle},
        "calibration": soak.calibration.to_json(), "soak": soak.tally.to_json(),
        "server_counters": counters, "engine_pids": server.engine_pids_seen,
        "samples": [asdict(s) for s in soak.samples],
    }


def print_summary(res: dict[str, Any], soak: Soak) -> None:
    t = soak.tally
    cap = res["capacity_req_s"]
    cap_s = f" = {res['args']['load_fraction']:g} x {cap:.2f} measured" if cap else ""
    print(f"\n== soak summary ==\n{t.sent} requests sent in {res['duration_s'] / 60:.1f} min "
          f"({res['achieved_rate_req_s']:.2f} req/s; target {res['target_rate_req_s']:.2f}{cap_s}); "
          f"{t.skipped} arrivals skipped at the outstanding bound")
    print(f"outcomes: ok {t.results['ok']}, cancelled by the client {t.results['cancelled']}, "
          f"bad requests answered with their 4xx {t.results['rejected']}, unexpected {t.results['unexpected']}")
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(t.by_kind.items()) if not k.startswith("bad:"))
          + f", bad {sum(v for k, v in t.by_kind.items() if k.startswith('bad:'))}")
    for label, tl in (("calibration", soak.calibration), ("soak", t)):
        for key, n in sorted(tl.unexpected_by.items()):
            print(f"  UNEXPECTED ({label}) {key} x{n}: {tl.examples[key][:160]!r}")
    nulls = t.null_codes + soak.calibration.null_codes
    if nulls:
        print('note: 4xx error objects with "code": null: '
              + ", ".join(f"{k} x{v}" for k, v in sorted(nulls.items())))
    print("server counters over the run: " + ", ".join(f"{k} {v:.0f}" for k, v in res["server_counters"].items()))
    idle = res["idle_at_end"]
    print(f"idle at the end: in flight {idle['in_flight']}, queued {idle['queued']}, "
          f"KV free {idle['kv_free_blocks']}/{idle['kv_total_blocks']}  {'ok' if idle['ok'] else 'NOT IDLE'}")
    print(f"{'':<16}{'warm-up end':>12}{'end':>10}{'growth':>9}")
    for name, f in res["flatness"].items():
        g = "-" if f["growth_pct"] is None else f"{f['growth_pct']:+.1f}%"
        b = "-" if f["warmup_end"] is None else f"{f['warmup_end']:.1f}"
        e = "-" if f["end"] is None else f"{f['end']:.1f}"
        print(f"{name:<16}{b:>12}{e:>10}{g:>9}  {'ok' if f['ok'] else 'FAIL'}")
    verdict_s = "PASS" if res["pass"] else "FAIL: " + "; ".join(res["reasons"])
    print(f"RESULT: {verdict_s}", flush=True)


# ---------------------------------------------------------------- main

async def main_async(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info = await asyncio.to_thread(server.wait_ready, args.startup_timeout, headers)
    model, max_len = info["id"], int(info.get("max_model_len") or 2048)
    print(f"model {model}, max_model_len {max_len}; API pid {server.api_pid}, engine pid {server.current_engine()}",
          flush=True)
    lo, hi = (int(x) for x in args.max_tokens.split(","))
    mix = parse_mix(args.mix)
    cases = [c for c in bad_cases(max_len, args.max_body_bytes) if c.name not in set(args.skip_bad.split(","))]
    traffic = Traffic(random.Random(args.seed), model, mix, cases, (lo, hi), headers)
    soak = Soak(args, server, traffic, headers)
    try:
        before = await scrape(soak.metrics_client)
        sweep = await soak.sweep()
        if args.rate:
            capacity, rate = None, args.rate
        else:
            capacity = await soak.calibrate()
            rate = capacity * args.load_fraction
            idle = await soak.wait_idle(args.idle_timeout)
            if idle.get("lockgate:num_requests_in_flight") or idle.get("lockgate:num_requests_queued"):
                print(f"warning: not idle after calibration: in flight {idle.get('lockgate:num_requests_in_flight')},"
                      f" queued {idle.get('lockgate:num_requests_queued')}", flush=True)
        if rate <= 0:
            raise SystemExit("capacity measured as 0 req/s: nothing completed during calibration")
        base, end, m = await soak.run(rate)
    finally:
        await soak.metrics_client.aclose()
    res = verdict(args, soak, base, end, m, before, rate, capacity, server)
    res["bad_request_sweep"] = sweep
    print_summary(res, soak)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="soak length, after calibration")
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--api-pid", type=int, help="with --url: the API process, for RSS and descriptors")
    ap.add_argument("--engine-pid", type=int, help="with --url: the engine process (default: the API's child)")
    ap.add_argument("--api-key", default=os.environ.get("LOCKGATE_API_KEY"))
    ap.add_argument("--metrics-key", default=os.environ.get("LOCKGATE_METRICS_KEY"),
                    help="a metrics-scope or global admin key for /metrics of a keyed server (default: --api-key)")
    ap.add_argument("--server-args", default="", help="extra `lockgate serve` options, space separated")
    ap.add_argument("--load-fraction", type=float, default=0.7, help="arrival rate as a fraction of capacity")
    ap.add_argument("--rate", type=float, help="arrival rate in req/s (skips calibration)")
    ap.add_argument("--calibrate-seconds", type=float, default=45.0)
    ap.add_argument("--calibrate-concurrency", type=int, default=16)
    ap.add_argument("--max-outstanding", type=int, default=64, help="bound on concurrent requests")
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"fractions of {', '.join(KINDS)} (default {DEFAULT_MIX})")
    ap.add_argument("--skip-bad", default="", help="bad-request cases to leave out, comma separated")
    ap.add_argument("--max-tokens", default="16,64", help="range of max_tokens of normal requests: LO,HI")
    ap.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                    help="the server's --max-request-body-bytes (the oversized-body case exceeds it)")
    ap.add_argument("--warmup-fraction", type=float, default=0.2)
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    ap.add_argument("--report-seconds", type=float, default=60.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--idle-timeout", type=float, default=60.0, help="wait this long for the server to go idle")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak-result.json", help="JSON result file")
    args = ap.parse_args()
    if args.minutes <= 0 or args.max_outstanding < 1:
        ap.error("--minutes and --max-outstanding must be positive")

    server = Server(args)
    try:
        res = asyncio.run(main_async(args, server))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as exc:  # the server did not start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"results: {args.out}")
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
