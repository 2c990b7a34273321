"""Counting round trips and statements on the wire, whatever the driver does.

:class:`WireCounter` is a small proxy between the client and PostgreSQL. It parses the frontend
(client -> server) messages of the PostgreSQL protocol and counts:

* **round trips**: each time the server answers after the client has sent something, i.e. each
  client burst that the client waits on. A pipelined batch (BEGIN + set_tenant_context + Sync
  sent together) is one round trip;
* **statements**: simple-protocol ``Query`` messages plus extended-protocol ``Execute`` messages;
* a **transcript** per round trip: the SQL of each statement sent (prepared statements are
  named back to the SQL of their ``Parse``).

It is used only to count, never while timing: the proxy adds latency of its own.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

__all__ = ["WireCounter", "WireSnapshot", "count_per_op"]


@dataclass
class WireSnapshot:
    round_trips: int = 0
    statements: int = 0
    transcript: list[list[str]] = field(default_factory=list)

    def minus(self, before: "WireSnapshot") -> "WireSnapshot":
        # Statements sent before the server answered the last trip of ``before`` extend that trip:
        # they belong to this delta too.
        n = len(before.transcript)
        grown = []
        if n and len(self.transcript) >= n and len(self.transcript[n - 1]) > len(before.transcript[n - 1]):
            grown = [self.transcript[n - 1][len(before.transcript[n - 1]):]]
        return WireSnapshot(
            self.round_trips - before.round_trips,
            self.statements - before.statements,
            grown + self.transcript[n:],
        )


class _Conn:
    """Parser state of one proxied connection (frontend direction)."""

    def __init__(self, counter: "WireCounter") -> None:
        self.counter = counter
        self.buf = b""
        self.started = False  # after the StartupMessage, messages carry a type byte
        self.prepared: dict[str, str] = {}
        self.last_dir = "s"

    def from_client(self, data: bytes) -> None:
        self.buf += data
        labels: list[str] = []
        statements = 0
        while True:
            if not self.started:
                if len(self.buf) < 8:
                    break
                (length,) = struct.unpack("!i", self.buf[:4])
                if len(self.buf) < length:
                    break
                (code,) = struct.unpack("!i", self.buf[4:8])
                self.buf = self.buf[length:]
                if code >> 16 == 3:  # protocol 3.x StartupMessage; SSL/GSS requests stay untyped
                    self.started = True
                continue
            if len(self.buf) < 5:
                break
            kind = chr(self.buf[0])
            (length,) = struct.unpack("!i", self.buf[1:5])
            if len(self.buf) < 1 + length:
                break
            body, self.buf = self.buf[5 : 1 + length], self.buf[1 + length :]
            if kind == "Q":
                statements += 1
                labels.append(_clip(body.split(b"\0", 1)[0]))
            elif kind == "P":
                name, rest = body.split(b"\0", 1)
                sql = rest.split(b"\0", 1)[0]
                if name:
                    self.prepared[name.decode()] = _clip(sql)
                self._pending_sql = _clip(sql)
            elif kind == "B":
                stmt = body.split(b"\0", 2)[1].decode()
                self._pending_sql = self.prepared.get(stmt, getattr(self, "_pending_sql", "?"))
            elif kind == "E":
                statements += 1
                labels.append(getattr(self, "_pending_sql", "?"))
            elif kind == "X":
                return
        self.counter._client_sent(self, statements, labels)


def _clip(sql: bytes) -> str:
    text = " ".join(sql.decode(errors="replace").split())
    return text if len(text) <= 90 else text[:87] + "..."


class WireCounter:
    """A counting proxy on a Unix socket in a temp dir, forwarding to a Unix socket or TCP address."""

    def __init__(self, upstream_url: str) -> None:
        url = make_url(upstream_url)
        self.url = url
        host = url.query.get("host") or url.host or "localhost"
        if isinstance(host, tuple):
            host = host[0]
        self.port = url.port or int(url.query.get("port", 5432) or 5432)  # type: ignore[arg-type]
        self.upstream: str | tuple[str, int] = (
            os.path.join(host, f".s.PGSQL.{self.port}") if host.startswith("/") else (host, self.port)
        )
        self.dir = Path(tempfile.mkdtemp(prefix="rtv-bench-wire-"))
        self.path = self.dir / f".s.PGSQL.{self.port}"
        self._lock = threading.Lock()
        self._snap = WireSnapshot()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(128)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def proxied_url(self, url: str | URL) -> str:
        """``url`` (any role) pointed at the proxy instead of the server."""
        parsed = make_url(url) if isinstance(url, str) else url
        query = {k: v for k, v in parsed.query.items() if k not in ("host", "port")}
        query["host"] = str(self.dir)
        parsed = parsed.set(host=None, port=self.port, query=query)
        return parsed.render_as_string(hide_password=False)

    def snapshot(self) -> WireSnapshot:
        with self._lock:
            # A copy of every trip: the last one may still grow (a snapshot must not).
            return WireSnapshot(self._snap.round_trips, self._snap.statements, [list(t) for t in self._snap.transcript])

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
            self.path.unlink(missing_ok=True)
            self.dir.rmdir()
        except OSError:
            pass

    # -- internals ----------------------------------------------------------------------------

    def _client_sent(self, conn: _Conn, statements: int, labels: list[str]) -> None:
        with self._lock:
            self._snap.statements += statements
            if conn.last_dir != "c":
                conn.last_dir = "c"
                self._snap.transcript.append([])
            if self._snap.transcript:
                self._snap.transcript[-1].extend(labels)

    def _server_sent(self, conn: _Conn) -> None:
        with self._lock:
            if conn.last_dir == "c":
                self._snap.round_trips += 1
            conn.last_dir = "s"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            family = socket.AF_UNIX if isinstance(self.upstream, str) else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(self.upstream)
            state = _Conn(self)
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: _Conn, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                # Count before forwarding, so the reply can never be seen before the request.
                if from_client:
                    state.from_client(data)
                else:
                    self._server_sent(state)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def count_per_op(counter: WireCounter, fns: dict[str, Callable[[int], Any]], n: int) -> dict[str, Any]:
    """Round trips and statements per operation of each variant (already pointed at ``counter``),
    over ``n`` operations after 10 untimed ones, and the transcript of the last."""
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        prepare = getattr(fn, "prepare", None) or (lambda i: None)
        for i in range(10):  # past psycopg's prepare threshold (5): the steady state
            prepare(i), fn(i)
        # Each op's untimed prepare() is excluded from the counts, as from the timings.
        total_rt = total_st = 0
        delta = WireSnapshot()
        for i in range(10, 10 + n):
            prepare(i)
            before = counter.snapshot()
            fn(i)
            delta = counter.snapshot().minus(before)
            total_rt += delta.round_trips
            total_st += delta.statements
        out[name] = {
            "round_trips_per_op": round(total_rt / n, 2),
            "statements_per_op": round(total_st / n, 2),
            "one_op": delta.transcript,
        }
    return out
