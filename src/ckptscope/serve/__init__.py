"""`ckptscope serve`: a live dashboard and a read-only SQL API over a store, beside a running ingest.

`app(store, token=None)` is the ASGI application (Starlette); `serve(store, host, port, token)`
runs it on uvicorn. The store is only ever opened read-only, per request, so an ingest writing
the same file is never locked out for long; docs/serve.md describes the endpoints and limits.
"""

from ckptscope.serve.server import (GAP_SECONDS, HOLD_SECONDS, LOCK_WAIT_SECONDS, MAX_BYTES, MAX_QUERY_CHARS, MAX_ROWS,
                                    POLL_MS, QUERY_SECONDS, app, check_bind, serve)

__all__ = ["app", "serve", "check_bind", "QUERY_SECONDS", "MAX_ROWS", "MAX_BYTES", "MAX_QUERY_CHARS", "LOCK_WAIT_SECONDS",
           "HOLD_SECONDS", "GAP_SECONDS", "POLL_MS"]
