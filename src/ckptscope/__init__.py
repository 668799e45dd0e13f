"""ckptscope: how every layer of a network changes across training checkpoints.

Data flows one way: a source yields checkpoints (`ckptscope.sources`), a checkpoint yields
tensors, analyzers turn tensors into rows (`ckptscope.analyzers`), the store writes rows
(`ckptscope.store`), and reports and SQL read the store.
"""

from pathlib import Path
from typing import Any

from ckptscope.errors import CkptscopeError

__all__ = ["CkptscopeError", "Store", "analyze", "default_store_path", "demo_suite", "ingest"]
__version__ = "0.1.0"


def ingest(source: Any, **options: Any) -> Any:
    """Analyze checkpoints into the store: `ckptscope.pipeline.driver.ingest`, imported on first use.

    Importing the pipeline loads torch (about a second); `ckptscope sql` and `ls` never need it.
    """
    from ckptscope.pipeline import ingest as run

    return run(source, **options)


def demo_suite() -> Path:
    """The embedded demo run (a tiny GPT-NeoX trained on public-domain text), as a local source."""
    return Path(__file__).parent / "demo_suite"


def analyze(model: str, analyzers: str, **options: Any) -> Any:
    """Run analyzers on a model already in the store: `ckptscope.pipeline.driver.analyze`."""
    from ckptscope.pipeline import analyze as run

    return run(model, analyzers, **options)


def __getattr__(name: str) -> Any:
    """`ckptscope.Store` and `default_store_path`, imported on first use: worker processes import
    `ckptscope.rows` and the pipeline's tasks, which must not load DuckDB."""
    if name in ("Store", "default_store_path"):
        from ckptscope.store import db

        return getattr(db, name)
    raise AttributeError(f"module 'ckptscope' has no attribute {name!r}")
