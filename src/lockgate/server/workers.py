"""`lockgate serve --api-workers N`: N API processes on one port, sharing the engine cores and the store.

One API process tops out near 500 requests/s (its event loop: HTTP, the gateway, detokenizing),
long before the engine cores do. With N workers the parent process binds the listening socket,
forks N workers that inherit it (the kernel hands each new connection to one of the workers
waiting in accept), and then only supervises them (`WorkerPool`):

- worker 0, the primary, starts and supervises the engine cores and runs the autoscalers; the
  others attach to those cores (worker.py, topology.py). Every core serves every worker and
  reports the whole server's load to each, so admission and routing see the server, not one
  worker (engine/core/frontends.py);
- SIGTERM to the parent drains every worker (each finishes its in-flight requests up to the
  drain timeout; the primary stops the cores once the others have left) and the parent exits 0;
  SIGINT stops them the way uvicorn does (a second one forces it);
- a worker that dies is restarted at once (then with backoff while it keeps dying young): an
  attached one comes back in about a second; the primary brings its cores back with it (their
  requests fail, the other workers' included, and the others follow the new cores). A worker
  that fails while the server first starts stops the whole server (exit status 3: a bad model
  or option would fail every one);
- the workers' state lives in a private run directory (the cores' topology, the merged metrics'
  files), removed when the parent exits. The workers die with the parent (SIGTERM, so they
  drain).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from lockgate.server.listening import listen  # noqa: F401  (the parent binds it: launch.py)

# The workers' side (worker.py, topology.py: FastAPI, the engine client) is imported where it is
# used: `serve` checks --api-workers here before anything heavy loads or the port is bound.
if TYPE_CHECKING:
    from lockgate.server.worker import WorkerContext

log = logging.getLogger("lockgate.server")

MAX_WORKERS = 64
POLL_S = 0.2
KILL_GRACE_S = 30.0  # after the drain timeout: then a worker still running is killed
YOUNG_S = 10.0  # a worker that dies younger than this is restarted with growing backoff
MAX_BACKOFF_S = 30.0



def check_api_workers(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"--api-workers must be an integer from 1 to {MAX_WORKERS}, got {n!r}")
    return n


def _die_with_parent() -> None:
    """Linux: SIGTERM (a drain) when the parent dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerPool:
    """The parent: forks, watches, restarts and stops the workers; never serves a request."""

    def __init__(self, count: int, sock: socket.socket, main: Callable[[WorkerContext], int],
                 drain_timeout_s: float) -> None:
        self.count = check_api_workers(count)
        self.sock = sock
        self.main = main
        self.drain_timeout_s = drain_timeout_s
        self.run_dir = Path(tempfile.mkdtemp(prefix="lockgate-workers-"))  # 0700
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started_at: dict[int, float] = {}  # index -> when its latest process started
        self.ready: set[int] = set()  # workers whose latest process serves
        self.ever_ready: set[int] = set()
        self.restart_at: dict[int, float] = {}  # index -> when to start it again
        self.backoff: dict[int, float] = {}
        self.codes: dict[int, int] = {}  # index -> last exit status (once stopping)
        self._stop_sig: int | None = None
        self._forwarded: list[int] = []
        self._kill_at: float | None = None
        self._failed: int | None = None  # the exit status of a failed first start
        self._ready_r = self._ready_w = -1

    # ---- the parent's loop -------------------------------------------------------------------
    def run(self) -> int:
        """Until every worker has exited after a stop (or the first start failed); the exit status."""
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("starting %d API workers on %s (run directory %s)", self.count,
                     self.sock.getsockname(), self.run_dir)
            if threading.active_count() > 1:  # a fork copies only this thread: another's locks stay held
                log.warning("forking API workers with %d threads running: %s", threading.active_count(),
                            ", ".join(t.name for t in threading.enumerate()))
            for index in range(self.count):
                self._start(index)
            while self.pids or (self._stop_sig is None and self.restart_at):
                self._tick()
            if self._failed is not None:
                return self._failed
            return next((c for c in self.codes.values() if c != 0), 0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            os.close(self._ready_r)
            os.close(self._ready_w)
            self.sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _tick(self) -> None:
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select([self._ready_r], [], [], POLL_S)
            if readable:
                self._read_ready()
        self._forward()
        self._reap()
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            log.warning("%d API worker(s) still running %.0f s after the stop; killing them", len(self.pids),
                        now - self._kill_at + KILL_GRACE_S + self.drain_timeout_s)
            self._kill_all()
            self._kill_at = None
        if self._stop_sig is None:
            for index, at in list(self.restart_at.items()):
                if now >= at:
                    del self.restart_at[index]
                    self._start(index)

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._stop_sig is not None:
            return  # already stopping
        self._stop_sig = sig
        self._forwarded.append(sig)  # each SIGINT is passed on: the second forces the workers out

    def _forward(self) -> None:
        if self._forwarded:
            self._read_ready()
        while self._forwarded:
            sig = self._forwarded.pop(0)
            log.info("%s: stopping %d API worker(s)", signal.Signals(sig).name, len(self.pids))
            self.restart_at.clear()
            for pid, index in self.pids.items():
                # One still starting has nothing in flight, and may wait on a primary that is gone.
                stop = sig if index in self.ready else signal.SIGKILL
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, stop)
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self.drain_timeout_s + KILL_GRACE_S

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for index in os.read(self._ready_r, 4096):
                if index not in self.ready:
                    self.ready.add(index)
                    self.ever_ready.add(index)
                    if len(self.ever_ready) == self.count and len(self.ready) == self.count:
                        log.info("all %d API workers are serving", self.count)

    def _reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            self._exited(index, pid, os.waitstatus_to_exitcode(status))

    def _exited(self, index: int, pid: int, code: int) -> None:
        served = index in self.ready
        self.ready.discard(index)
        self._forget(index, pid)
        if self._stop_sig is not None:
            self.codes[index] = code
            log.info("API worker %d (pid %d) exited (%d)", index, pid, code)
            return
        if index not in self.ever_ready and self._failed is None and not self.ever_ready - {index} \
                and index not in self.backoff:
            # The first start failed (a bad model or option fails every worker): stop the server.
            log.error("API worker %d (pid %d) failed to start (exit status %d); stopping the server",
                      index, pid, code)
            from lockgate.server.worker import STARTUP_FAILURE

            self._failed = code or STARTUP_FAILURE
            self._stop_sig = signal.SIGTERM
            self._forwarded.append(signal.SIGTERM)
            return
        age = time.monotonic() - self.started_at.get(index, 0.0)
        backoff = self.backoff.get(index, 0.0)
        backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2)) if age < YOUNG_S or not served else 0.0
        self.backoff[index] = backoff
        log.error("API worker %d (pid %d) died (exit status %d)%s; restarting it%s", index, pid, code,
                  " and with it the engine cores" if index == 0 else "",
                  f" in {backoff:.1f} s" if backoff else "")
        self.restart_at[index] = time.monotonic() + backoff

    def _forget(self, index: int, pid: int) -> None:
        """What a dead worker leaves: its load no longer counts (a dead primary's topology lists dead
        cores: gone until the next primary writes its own); its metrics' live files go."""
        from lockgate.server.topology import LOAD_DIR, TOPOLOGY_FILE

        with contextlib.suppress(OSError):
            (self.run_dir / LOAD_DIR / f"{index}.json").unlink()
        if index == 0:
            with contextlib.suppress(OSError):
                (self.run_dir / TOPOLOGY_FILE).unlink()
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, str(self.run_dir / "metrics"))

    def _kill_all(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.pids and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)

    # ---- a worker ----------------------------------------------------------------------------
    def _start(self, index: int) -> None:
        from lockgate.server.worker import WorkerContext

        ctx = WorkerContext(index, self.count, self.run_dir, self.sock, self._ready_w)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes it on once
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a single server's (uvicorn's own from here)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.close(self._ready_r)
                code = self.main(ctx)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - report, then exit: never unwind into the parent's stack
                traceback.print_exc()
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = index
        self.started_at[index] = time.monotonic()
        log.info("API worker %d started (pid %d)%s", index, pid, " (primary: engine cores, autoscaling)"
                 if index == 0 else "")
