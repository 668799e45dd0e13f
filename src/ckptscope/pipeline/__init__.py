"""The straight pipeline: `plan` (what to do) → `tasks` (one step's work) → `executors` (where it
runs) → `driver` (`ingest()`, `analyze()`: the driver that writes each result to the store).

`ingest` and `analyze` are imported on first use: worker processes import `tasks` alone, which
must not load the store (DuckDB).
"""

from typing import Any

__all__ = ["analyze", "ingest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ckptscope.pipeline import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'ckptscope.pipeline' has no attribute {name!r}")
