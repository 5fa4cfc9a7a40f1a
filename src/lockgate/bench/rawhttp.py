"""`RawClient`: a minimal asyncio HTTP/1.1 client for load generators (one fixed POST).

httpx's AsyncClient spends ~5 ms of CPU per request on a 2-core box, more than
the servers it measures, and a load generator shares those cores with them;
this one costs a fraction of that. A bounded pool of keep-alive connections;
it reads the status line, the headers and a Content-Length or chunked body; a
connection the server closes (or that fails) is dropped and a new one opened.
"""
from __future__ import annotations

import asyncio


class RawClient:
    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], body: bytes,
                 connections: int) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body
        self.slots = asyncio.Semaphore(connections)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self) -> int:
        """The response's status code (the caller bounds the whole call, the wait for a slot included)."""
        async with self.slots:
            conn = None
            while self.idle:  # most recently used first; drop those the server closed while idle
                conn = self.idle.pop()
                if not conn[0].at_eof():
                    break
                conn[1].close()
                conn = None
            if conn is not None:
                try:
                    return await self._send(conn)
                except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise
                    # Closed by the server before it read this request (its keep-alive timeout racing
                    # our reuse): send it again on a fresh connection, as HTTP clients do.
            return await self._send(await asyncio.open_connection(self.host, self.port))

    async def _send(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
        try:
            status, keep = await self._exchange(*conn)
        except BaseException:
            conn[1].close()
            raise
        if keep:
            self.idle.append(conn)
        else:
            conn[1].close()
        return status

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bool]:
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers.get("connection", "").lower() != "close"

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()
