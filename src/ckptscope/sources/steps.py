"""Step selection: which of the available steps to ingest.

A SPEC is a comma-separated list of terms, each one of
  `all`            every available step
  `first`, `last`  the earliest / latest available step
  `log`            log-spaced: for each power of two, the available step closest to it
                   in log-space (plus step 0), the way Pythia's early grid is spaced
  `N`              exactly step N
  `A:B[:S]`        available steps in [A, B] (inclusive), every S-th step number when S is given
  `N=PATH`         step N, read from PATH (the source adds it: see `parse_explicit_steps`)
With STEP=PATH terms alone, exactly the named steps are selected.
`max_steps` then keeps at most N of the selected steps, spread evenly in log(step + 1).
Steps are always returned sorted and unique. A named step that does not exist is an error,
because silently analyzing a different grid than the user asked for wastes hours.
"""

from __future__ import annotations

import math

from ckptscope.errors import CkptscopeError


def _log_spaced(available: list[int]) -> set[int]:
    chosen = {available[0], available[-1]}
    top = max(available[-1], 1)
    for k in range(int(math.log2(top)) + 2):
        target = math.log(2**k + 1)
        chosen.add(min(available, key=lambda s: abs(math.log(s + 1) - target)))
    return chosen


def _thin(steps: list[int], n: int) -> list[int]:
    """At most n steps, evenly spread in log(step+1), always keeping the first and last."""
    if n >= len(steps):
        return steps
    if n == 1:
        return [steps[-1]]
    lo, hi = math.log(steps[0] + 1), math.log(steps[-1] + 1)
    kept: list[int] = []
    for i in range(n):
        target = lo + (hi - lo) * i / (n - 1)
        remaining = [s for s in steps if s not in kept]
        kept.append(min(remaining, key=lambda s: abs(math.log(s + 1) - target)))
    return sorted(kept)


def nearest(step: int, available: list[int], k: int = 3) -> list[int]:
    """The `k` available steps closest to `step`, ascending: what an error suggests instead."""
    return sorted(sorted(available, key=lambda s: abs(s - step))[:k])


def select_steps(spec: str | None, available: list[int], *, max_steps: int | None = None) -> list[int]:
    """Resolve a step SPEC against the sorted available steps."""
    available = sorted(set(available))
    if not available:
        raise CkptscopeError("no checkpoints available to select from")
    have = set(available)
    chosen: set[int] = set()
    for term in (spec or "all").replace(" ", "").split(","):
        if term in ("", "all"):
            chosen |= have
        elif term == "first":
            chosen.add(available[0])
        elif term == "last":
            chosen.add(available[-1])
        elif term == "log":
            chosen |= _log_spaced(available)
        elif "=" in term:  # a named checkpoint: the source made its step available
            chosen.add(int(term.partition("=")[0]))
        elif ":" in term:
            parts = term.split(":")
            try:
                lo, hi = int(parts[0] or available[0]), int(parts[1] or available[-1])
                stride = int(parts[2]) if len(parts) > 2 and parts[2] else None
            except (ValueError, IndexError):
                raise CkptscopeError(f"bad step range {term!r}; use START:STOP or START:STOP:STRIDE, e.g. 0:143000:1000") from None
            if len(parts) > 3 or (stride is not None and stride <= 0):
                raise CkptscopeError(f"bad step range {term!r}; use START:STOP or START:STOP:STRIDE with STRIDE > 0")
            chosen |= {s for s in available if lo <= s <= hi and (stride is None or (s - lo) % stride == 0)}
        else:
            try:
                step = int(term)
            except ValueError:
                raise CkptscopeError(f"bad step {term!r} in --steps; use numbers, ranges A:B:S, all, first, last or log") from None
            if step not in have:
                raise CkptscopeError(f"step {step} is not available; nearest available: {', '.join(map(str, nearest(step, available)))}")
            chosen.add(step)
    if not chosen:
        raise CkptscopeError(f"--steps {spec!r} selects no available step (available: {available[0]}..{available[-1]})")
    steps = sorted(chosen)
    if max_steps is not None:
        if max_steps < 1:
            raise CkptscopeError("--max must be at least 1")
        steps = _thin(steps, max_steps)
    return steps
