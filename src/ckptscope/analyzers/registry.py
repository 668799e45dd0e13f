"""Analyzers selectable by name (`--analyzers weights,...`)."""

from __future__ import annotations

from typing import Any

from ckptscope.analyzers.base import Analyzer
from ckptscope.analyzers.convergence import ConvergenceAnalyzer
from ckptscope.analyzers.memorization import MemorizationAnalyzer
from ckptscope.analyzers.weights import WeightAnalyzer
from ckptscope.errors import CkptscopeError

ANALYZERS: dict[str, type] = {a.name: a for a in (WeightAnalyzer, ConvergenceAnalyzer, MemorizationAnalyzer)}


def build_analyzers(names: str | list[str] | None, **options: Any) -> list[Analyzer]:
    """Instantiate analyzers by name; options each analyzer does not take are ignored by it."""
    if names is None:
        names = ["weights"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in ANALYZERS]
    if unknown or not names:
        raise CkptscopeError(f"unknown analyzer {', '.join(map(repr, unknown)) or '(none)'}; choose from: {', '.join(sorted(ANALYZERS))}")
    return [ANALYZERS[n].from_options(**options) for n in dict.fromkeys(names)]
