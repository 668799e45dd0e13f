"""Cross-seed similarity: do replicates of one recipe learn the same representations and weights?

`analyze_seeds(GROUP, probe=...)` runs the convergence analyzer against another model
(`reference_model`) over every pair of seeds of a group, at the steps every seed has: for each
pair (a, b) with a's seed below b's, model a is analyzed against b's checkpoint at the same step,
storing `cka_model`, `cka_model_debiased` (per layer and site) and `model_relative_distance`
(‖W_a − W_b‖_F / ‖W_b‖_F per tensor) under the run `convergence:b`. The store's
`seed_similarity` view averages them over the pairs, as `cka_seed`, `cka_seed_debiased` and
`seed_relative_distance` with std (ddof 1), min, max and `n_pairs`; `seed_similarity()` reads it.

Each pair is one `analyze` call, so an interrupted sweep resumes pair by pair and step by step,
and a rerun with other options is refused unless forced, as for any analyzer.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import polars as pl

from ckptscope.errors import CkptscopeError
from ckptscope.seeds import _members, _open
from ckptscope.store.db import Store, default_store_path

SIMILARITY = ("cka_seed", "cka_seed_debiased", "seed_relative_distance")  # the view's metrics


def seed_pairs(group: str, store: Store | str | Path | None = None) -> tuple[list[tuple[str, str]], list[int]]:
    """The (model, other model) pairs of a group, lower seed first, and the steps every seed has."""
    with _open(store) as db:
        members = _members(db, group)
        steps = db.sql("""SELECT c.step FROM checkpoints c JOIN models m USING (model)
                          WHERE m.group_name = ? AND c.status = 'ok' GROUP BY c.step HAVING count(DISTINCT c.model) = ?
                          ORDER BY c.step""", [group, members.height])["step"].to_list()
    if members.height < 2:
        raise CkptscopeError(f"group {group!r} has one seed ({members['model'][0]}); pairs need at least two: "
                             "ingest another with --group and --seed")
    if not steps:
        raise CkptscopeError(f"the {members.height} seeds of group {group!r} have no step in common; ingest the same steps for each")
    return list(combinations(members["model"].to_list(), 2)), steps


def analyze_seeds(group: str, *, probe: str | Path, store: str | Path | None = None, force: bool = False,
                  progress: bool = False, **options: Any) -> pl.DataFrame:
    """Convergence against every other seed of `group`, at the steps all seeds share; returns the
    group's `seed_similarity` rows. `options` are the convergence analyzer's and the executor's
    (`batch_size`, `device`, ...), except `reference_model` and `reference_step`, which this sets."""
    from ckptscope.pipeline import analyze  # loads torch: only when something is analyzed

    fixed = sorted({"reference_model", "reference_step"} & set(options))
    if fixed:
        raise CkptscopeError(f"--{fixed[0].replace('_', '-')}: `analyze seeds` compares each seed with every other seed "
                             "of the group at the same step; leave it out")
    path = Path(store) if store is not None else default_store_path()
    pairs, steps = seed_pairs(group, path)
    for model, other in pairs:
        analyze(model, "convergence", store=path, steps=",".join(map(str, steps)), probe=probe, reference_model=other,
                force=force, progress=progress, **options)
    return seed_similarity(group, store=path).filter(pl.col("step").is_in(steps))


def seed_similarity(group: str | None = None, *, store: Store | str | Path | None = None,
                    metric: str | None = None) -> pl.DataFrame:
    """The `seed_similarity` view (of one group, one of `SIMILARITY`), ordered by group, metric, component, layer, tensor, step."""
    if metric is not None and metric not in SIMILARITY:
        raise CkptscopeError(f"metric {metric!r}: seed_similarity has {', '.join(SIMILARITY)}")
    where, params = [], []
    for column, value in (("group_name", group), ("metric", metric)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    with _open(store) as db:
        return db.sql(f"SELECT * FROM seed_similarity{clause} ORDER BY group_name, metric, component, layer NULLS FIRST, "
                      "tensor, step", params)
