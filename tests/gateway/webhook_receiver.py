"""A real HTTP receiver for alert webhooks on 127.0.0.1 (threaded http.server), scripted per request:
'ok' (204), a status code ('500'), or 'hang' (answers nothing for `hang_s`)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    script: list[str] = field(default_factory=list)  # one behaviour per request; then 'ok'
    hang_s: float = 2.0
    got: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    release: threading.Event = field(default_factory=threading.Event)  # ends every hang at once

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                outer.got.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                          time.time()))
                what = outer.script.pop(0) if outer.script else "ok"
                if what == "hang":
                    outer.release.wait(outer.hang_s)
                    return  # closes without an answer
                self.send_response(204 if what == "ok" else int(what))
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
