"""The server behind `ckptscope serve`: Starlette routes over short-lived read-only store connections.

DuckDB lets one process write a file or any number read it, never both, so the server must
leave room for an ingest that writes the store one checkpoint transaction at a time:

* every request opens `Store(path, read_only=True, sandbox=True)` and closes it before answering,
  and retries for a while (LOCK_WAIT_SECONDS) while a writer holds the file;
* under load requests overlap and would keep the file open for good, so opening is gated: reads
  may start during a window of HOLD_SECONDS, after which the server lets every open connection
  finish and keeps the file closed for GAP_SECONDS, long enough for a writer's retry to get in;
* answers are cached under the store's version (size, mtime and inode of the file and its WAL:
  every commit changes one), so a store that did not change is not opened again at all.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ckptscope.errors import CkptscopeError, StoreError
from ckptscope.store.db import Store, default_store_path

QUERY_SECONDS = 10.0  # a query running longer is interrupted
MAX_ROWS = 100_000  # rows one /api/sql answer may hold
MAX_BYTES = 64 * 2**20  # bytes of a result in memory (Arrow) one /api/sql answer may hold
MAX_QUERY_CHARS = 20_000
LOCK_WAIT_SECONDS = 15.0  # how long a request waits for a writer's transaction before answering 503
HOLD_SECONDS = 0.5  # reads may start opening the store for this long ...
GAP_SECONDS = 0.1  # ... then the store stays closed this long, so a writer that retries gets in
POLL_MS = 2000  # how often the dashboard asks whether the store changed
CACHE_BYTES = 256 * 2**20  # answers kept per store version
CACHE_ENTRY_BYTES = 16 * 2**20  # larger answers are not kept
RETRY_SECONDS = 0.02
FORMATS = {"json": "application/json", "csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet",
           "arrow": "application/vnd.apache.arrow.stream"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# The dashboard embeds its scripts, styles and plotly.js, and fetches only this server.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer"}
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

T = TypeVar("T")


class HTTPError(Exception):
    """An answer other than 200, with its one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a store beyond this machine without a token (raises `CkptscopeError`)."""
    if token is not None and not token.strip():
        raise CkptscopeError("the token is empty; pass a secret with --token TOKEN (or $CKPTSCOPE_TOKEN)")
    if token is None and not _is_loopback(host):
        raise CkptscopeError(f"--host {host} would serve the store to other machines without a token; pass --token TOKEN "
                             "(or set $CKPTSCOPE_TOKEN; clients send `Authorization: Bearer TOKEN`), or bind 127.0.0.1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def app(store: Path | str | None = None, *, token: str | None = None, hosts: tuple[str, ...] | None = LOOPBACK_NAMES,
        poll_ms: int = POLL_MS) -> Starlette:
    """The ASGI application serving `store` (default `$CKPTSCOPE_STORE` or ./ckptscope.duckdb).

    With `token`, every request must carry `Authorization: Bearer TOKEN` (else 401). `hosts` are
    the Host header names accepted (default: loopback only, which stops DNS-rebinding pages from
    reading a store served on 127.0.0.1); None accepts any, as `serve` does with a token. The
    store must exist: a missing or foreign file raises `CkptscopeError` here, not at the first request.
    """
    reader = _Reader(Path(store) if store is not None else default_store_path())
    reader.read(lambda db: None)  # fails now, in one line, on a missing or foreign store
    api = _Api(reader, poll_ms)
    routes = [Route("/", api.page), Route("/api/state", api.state), Route("/api/dashboard", api.dashboard),
              Route("/api/models", api.models), Route("/api/sql", api.sql)]
    application = Starlette(routes=routes)
    application.add_middleware(_Guard, token=token, hosts=hosts)
    return application


def serve(store: Path | str | None = None, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          ready: Callable[[str], None] | None = print) -> None:
    """Serve `store` on http://HOST:PORT/ until interrupted (Ctrl-C).

    A host other than loopback needs `token` (or `$CKPTSCOPE_TOKEN`). `port` 0 picks a free port;
    `ready` gets the URL once the socket listens.
    """
    import uvicorn

    token = token if token is not None else os.environ.get("CKPTSCOPE_TOKEN") or None
    check_bind(host, token)
    application = app(store, token=token, hosts=None if token else tuple({*LOOPBACK_NAMES, host.strip("[]")}))
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    if ready is not None:
        ready(f"http://{f'[{host}]' if ':' in host else host}:{bound}/")
    server.run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port or unknown host is a one-line error before uvicorn starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise CkptscopeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port or --host") from None
    sock.set_inheritable(True)
    return sock


class _Guard:
    """ASGI middleware: the Host header (DNS rebinding) and the bearer token, before any route runs."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.app, self.hosts = app, hosts
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.hosts is not None and _host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
                await _error(400, "unexpected Host header; open the dashboard at the address `ckptscope serve` printed")(
                    scope, receive, send)
                return
            # compare_digest: the time taken does not tell how much of a guessed token was right
            if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                if scope["path"] == "/" and b"text/html" in headers.get(b"accept", b""):
                    response: Response = HTMLResponse(LOGIN_PAGE, 401, headers={**COMMON_HEADERS, "WWW-Authenticate": "Bearer"})
                else:
                    response = _error(401, "this server needs `Authorization: Bearer TOKEN` (the --token it was started with)")
                    response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """`[::1]:8765` -> `::1`, `localhost:8765` -> `localhost`."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status, headers=COMMON_HEADERS)


class _Gate:
    """Lets reads start during windows of `hold` seconds; between windows, waits for the reads in
    flight to end and keeps the store closed for `gap` seconds, so a writer polling for the lock
    more often than that gets in. An idle server opens a window at once."""

    def __init__(self, hold: float, gap: float) -> None:
        self.hold, self.gap = hold, gap
        self._cond = threading.Condition()
        self._active = 0
        self._closes_at = 0.0  # end of the current window
        self._opens_at = 0.0  # the last read ended at this time minus gap

    def __enter__(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if now < self._closes_at:
                    break
                if self._active == 0 and now >= self._opens_at:
                    self._closes_at = now + self.hold
                    break
                self._cond.wait(None if self._active else self._opens_at - now)
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._opens_at = time.monotonic() + self.gap
                self._cond.notify_all()


class _Reader:
    """Opens the store read-only per call, through the gate, retrying while a writer holds it; caches answers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._gate = _Gate(HOLD_SECONDS, GAP_SECONDS)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._flights: dict[tuple, threading.Lock] = {}

    def version(self) -> str:
        """Changes with every commit: a commit appends to the WAL; a checkpoint rewrites the file."""
        parts = []
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                st = os.stat(path)
                parts.append(f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}")
            except FileNotFoundError:
                parts.append("-")
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    def read(self, work: Callable[[Store], T]) -> T:
        with self._gate:
            db = self._open()
            try:
                return work(db)
            finally:
                db.close()

    def _open(self) -> Store:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                return Store(self.path, read_only=True, sandbox=True)
            except StoreError as exc:
                if "is locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(RETRY_SECONDS)

    def cached(self, key: tuple, compute: Callable[[], tuple[Any, int]]) -> Any:
        """compute() -> (answer, size), once per key even when many requests ask at the same time."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            try:
                value, size = compute()
            finally:
                with self._lock:
                    self._flights.pop(key, None)
            if size <= CACHE_ENTRY_BYTES:
                with self._lock:
                    self._cache[key], self._sizes[key] = value, size
                    while sum(self._sizes.values()) > CACHE_BYTES:
                        old, _ = self._cache.popitem(last=False)
                        del self._sizes[old]
            return value


class _Api:
    """The routes; each runs its store work in a thread, since DuckDB calls block."""

    def __init__(self, reader: _Reader, poll_ms: int) -> None:
        self.reader, self.poll_ms = reader, poll_ms

    async def _answer(self, work: Callable[[], Response]) -> Response:
        try:
            return await run_in_threadpool(work)
        except HTTPError as exc:
            return _error(exc.status, str(exc))
        except CkptscopeError as exc:  # the store cannot be opened: locked past LOCK_WAIT_SECONDS, deleted, ...
            return _error(503, str(exc))

    # -- dashboard -----------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        def work() -> Response:
            version = self.reader.version()
            body = self.reader.cached(("page", version), lambda: _sized(self._render_page(version)))
            return Response(body, headers={**COMMON_HEADERS, **PAGE_HEADERS}, media_type="text/html; charset=utf-8")
        return await self._answer(work)

    def _contents(self, version: str) -> tuple[Any, str]:
        """(report contents or None, message) of the store at `version` (read once, shared by page and parts)."""
        from ckptscope.reports.html import read_contents

        def read() -> tuple[Any, int]:
            def build(db: Store) -> tuple[Any, str]:
                try:
                    return read_contents(db), ""
                except CkptscopeError as exc:  # e.g. no models yet: said on the page, which keeps polling
                    return None, f"{exc}. This page updates when checkpoints land."
            contents, message = self.reader.read(build)
            return (contents, message), len(json.dumps(contents.charts())) if contents else 0  # the bulk of it
        return self.reader.cached(("contents", version), read)

    def _render_page(self, version: str) -> bytes:
        from ckptscope.reports.html import render_page

        contents, message = self._contents(version)
        live = {"poll_ms": self.poll_ms, "version": version, "store": str(self.reader.path)}
        return render_page(contents, live=live, message=message).encode()

    async def dashboard(self, request: Request) -> Response:
        """What the page swaps in when the store changed (see report.js `follow`)."""
        from ckptscope.reports.html import render_parts

        def work() -> Response:
            version = self.reader.version()

            def render() -> tuple[bytes, int]:
                contents, message = self._contents(version)
                return _sized(json.dumps({"version": version, **render_parts(contents, message)}, allow_nan=False).encode())
            return Response(self.reader.cached(("parts", version), render), headers=COMMON_HEADERS, media_type="application/json")
        return await self._answer(work)

    async def state(self, request: Request) -> Response:
        """Cheap to poll: the store's version, and its checkpoint count and last ingest time."""
        def work() -> Response:
            version = self.reader.version()

            def read() -> tuple[bytes, int]:
                row = self.reader.read(lambda db: db.sql(
                    "SELECT count(*) FILTER (WHERE status = 'ok') AS checkpoints, count(DISTINCT model) AS models, "
                    "max(ingested_at)::VARCHAR AS last_ingested_at FROM checkpoints").row(0, named=True))
                return _sized(json.dumps({"version": version, **row}).encode())
            return Response(self.reader.cached(("state", version), read), headers=COMMON_HEADERS, media_type="application/json")
        return await self._answer(work)

    # -- API -------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """Store.summary(), what `ckptscope ls` shows, as a list of row objects."""
        def work() -> Response:
            version = self.reader.version()
            body = self.reader.cached(("models", version),
                                      lambda: _sized(self.reader.read(lambda db: db.summary()).write_json().encode()))
            return Response(body, headers=COMMON_HEADERS, media_type="application/json")
        return await self._answer(work)

    async def sql(self, request: Request) -> Response:
        """One read-only query (the refusals of `ckptscope sql`), bounded in time and size."""
        query, fmt = request.query_params.get("q", ""), request.query_params.get("format", "json")

        def work() -> Response:
            if not query.strip():
                raise HTTPError(400, "give the query as ?q=SELECT ... (URL-encoded)")
            if len(query) > MAX_QUERY_CHARS:
                raise HTTPError(400, f"the query is longer than {MAX_QUERY_CHARS:,} characters, the limit here")
            if fmt not in FORMATS:
                raise HTTPError(400, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
            version = self.reader.version()
            body = self.reader.cached(("sql", query, fmt, version),
                                      lambda: _sized(_encode(self.reader.read(_bounded(query)), fmt)))
            headers = dict(COMMON_HEADERS)
            if fmt in ("parquet", "arrow"):
                headers["Content-Disposition"] = f'attachment; filename="result.{fmt}"'
            return Response(body, headers=headers, media_type=FORMATS[fmt])
        return await self._answer(work)


def _bounded(query: str) -> Callable[[Store], pa.Table]:
    """The query as store work: interrupted after QUERY_SECONDS, refused past MAX_ROWS or MAX_BYTES."""
    def run(db: Store) -> pa.Table:
        expired = threading.Event()

        def interrupt() -> None:
            expired.set()
            db.interrupt()
        timer = threading.Timer(QUERY_SECONDS, interrupt)
        timer.start()
        try:
            return db.sql_arrow(query, max_rows=MAX_ROWS, max_bytes=MAX_BYTES)
        except StoreError as exc:
            if expired.is_set():
                raise HTTPError(400, f"the query ran longer than {QUERY_SECONDS:g} s, the limit here; narrow it "
                                     "(WHERE, LIMIT) or run it with `ckptscope sql`") from None
            raise HTTPError(400, str(exc)) from None
        finally:
            timer.cancel()
    return run


def _encode(table: pa.Table, fmt: str) -> bytes:
    """json and csv as `ckptscope sql` writes them (polars); parquet and arrow straight from Arrow."""
    try:
        if fmt == "parquet":
            buf = io.BytesIO()
            pq.write_table(table, buf)
            return buf.getvalue()
        if fmt == "arrow":
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return sink.getvalue().to_pybytes()
        df = pl.from_arrow(table)
        return (df.write_json() if fmt == "json" else df.write_csv()).encode()
    except (Exception, pl.exceptions.PanicException) as exc:  # a type the format cannot hold (lists in CSV, blobs in JSON)
        raise HTTPError(400, f"cannot write the result as {fmt}: {exc}; pick another format or cast the column") from None


def _sized(body: bytes) -> tuple[bytes, int]:
    return body, len(body)


LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ckptscope: token needed</title></head>
<body style="font: 15px system-ui, sans-serif; margin: 40px">
<form id="login"><p>This ckptscope server needs the token it was started with (<code>--token</code>).</p>
<input type="password" id="token" autocomplete="current-password" autofocus>
<button type="submit">Open the dashboard</button> <span id="problem"></span></form>
<script>
// The token is kept for this tab only (sessionStorage) and sent as `Authorization: Bearer`, never in a URL.
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value;
  const response = await fetch("/", {headers: {Authorization: `Bearer ${token}`, Accept: "text/html"}, cache: "no-store"});
  if (!response.ok) { document.getElementById("problem").textContent = "wrong token"; return; }
  sessionStorage.setItem("ckptscope-token", token);
  const page = await response.text();
  document.open();
  document.write(page);
  document.close();
});
</script></body></html>
"""
