"""What an analyzer is, and what it is handed.

An analyzer is a small object with a `name`, a `version` and `analyze(ctx) -> RunRows`: it
turns one checkpoint (and the reference checkpoints it needs) into rows. The pipeline owns
I/O order and the store; analyzers own the math. Adding one means one module here plus an
entry in `ckptscope.analyzers.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.store.db import RunRows


@dataclass
class AnalysisContext:
    """One checkpoint to analyze, with the references its deltas are taken against.

    `first`, `previous` and `final` are None when the checkpoint *is* that reference (or has none,
    like `previous` of the first step); they are read tensor by tensor, never whole.
    """

    checkpoint: Checkpoint
    family: str
    config: dict | None
    first: Checkpoint | None = None
    previous: Checkpoint | None = None
    final: Checkpoint | None = None
    device: str = "cpu"
    on_tensor: Callable[[str], None] = field(default=lambda name: None)


class Analyzer(Protocol):
    name: str
    version: str

    def parameters(self) -> dict[str, Any]:
        """Everything besides the inputs that determines the output: stored as provenance."""

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        """Rows for one checkpoint."""
