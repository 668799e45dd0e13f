"""`analyze profile`: a memorisation profile of a model, from its stored `sequence_stats`, into the store.

The math is `ckptscope.profile` (pure polars/numpy); this module reads the model's per-sequence
statistics, runs it once and writes both tables in one transaction with a `runs` row (analyzer
`profile`) carrying the options, so a profile is replaced only by one of the same outcome and
control group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ckptscope.errors import CkptscopeError
from ckptscope.options import Options, at_least, option
from ckptscope.profile import CONTROLS, OUTCOMES, MemorizationProfile, compute_profile
from ckptscope.rows import RunRows, Table
from ckptscope.store.db import Store, default_store_path

NAME, VERSION = "profile", "1.0.0"
_INTERVAL = {"ci_low": "DOUBLE -- lower end of the 95% interval", "ci_high": "DOUBLE -- upper end"}
CELLS = Table("memorization_profile", {
    "outcome": "VARCHAR NOT NULL -- the sequence_stats column the profile is of",
    "control": "VARCHAR NOT NULL -- heldout | not-yet-treated",
    "cohort_step": "BIGINT NOT NULL -- g: the checkpoint ending the interval the cohort was trained in",
    "event_time": "BIGINT NOT NULL -- t − g, in steps (negative: a pre-trend placebo cell)",
    "att": "DOUBLE -- ATT(g, t) of the outcome",
    "se": "DOUBLE -- standard error (analytic, or multiplier bootstrap)",
    **_INTERVAL,
    "n_treated": "BIGINT -- sequences of the cohort",
    "n_control": "BIGINT -- control sequences",
}, key=("outcome", "control", "cohort_step", "step"), doc="ATT(g, t) per cohort g and checkpoint t (`step`).")
SUMMARY = Table("memorization_profile_summary", {
    "outcome": "VARCHAR NOT NULL -- as in memorization_profile",
    "control": "VARCHAR NOT NULL -- as in memorization_profile",
    "kind": "VARCHAR NOT NULL -- instantaneous | persistent | residual",
    "event_time": "BIGINT -- e of a persistent row (0 for instantaneous)",
    "at_step": "BIGINT -- the final checkpoint, for residual rows",
    "att": "DOUBLE -- cohort-size-weighted average of ATT(g, t) over the cells of the row",
    "se": "DOUBLE -- from the per-sequence influence functions (cells share controls)",
    **_INTERVAL,
    "n_cohorts": "BIGINT -- cohorts averaged",
    "n_treated": "BIGINT -- sequences of those cohorts",
}, key=("outcome", "control", "kind", "event_time", "at_step"), doc="Aggregates of a memorisation profile.")


@dataclass(frozen=True)
class ProfileOptions(Options):
    owner = "analyze profile"
    outcome: str = option("sup_seq", choices=OUTCOMES, help="The sequence_stats column to profile.")
    control: str = option("heldout", choices=CONTROLS, help="Control sequences: heldout, or not-yet-treated.")
    bootstrap: int = option(0, check=lambda v: None if v == 0 or v >= 10 else "give 0 (analytic) or at least 10",
                            help="Multiplier-bootstrap draws (0: analytic standard errors).")
    seed: int = option(0, check=at_least(0), help="Seed of the bootstrap draws.")


def profile(model: str, *, store: str | Path | None = None, **options: object) -> MemorizationProfile:
    """Compute the memorisation profile of `model` from its `sequence_stats` rows and store it.

    Options: `outcome`, `control`, `bootstrap`, `seed` (`ProfileOptions`). Returns the cells and
    summary as polars frames. Everything is checked before the store is opened for writing.
    """
    opts = ProfileOptions.build(options)
    path = Path(store) if store is not None else default_store_path()
    with Store(path, read_only=True) as db:
        if db.model(model) is None:
            raise CkptscopeError(f"model {model!r} is not in {path}; ingest it first")
        if not db.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'sequence_stats'")["n"].item():
            raise CkptscopeError(f"{path} has no sequence_stats: run `ckptscope analyze sequence_stats {model} --corpus FILE` first")
        stats = db.sql(f"SELECT sequence_id, step, split, first_seen_step, {opts.outcome} FROM sequence_stats WHERE model = ?",
                       [model])
    if not stats.height:
        raise CkptscopeError(f"model {model!r} has no sequence_stats rows: run `ckptscope analyze sequence_stats {model} "
                             "--corpus FILE` first")
    result = compute_profile(stats, outcome=opts.outcome, control=opts.control, bootstrap=opts.bootstrap, seed=opts.seed)
    run = RunRows(NAME, VERSION, {**opts.provenance(), "sequences": stats["sequence_id"].n_unique(),
                                  "checkpoints": stats["step"].n_unique()}, "float64", f"numpy-{np.__version__}")
    tag = {"outcome": opts.outcome, "control": opts.control}
    run.tables[CELLS.name] = {**{k: [v] * result.cells.height for k, v in tag.items()}, **_columns(result.cells)}
    summary = result.summary.rename({"step": "at_step"})
    run.tables[SUMMARY.name] = {**{k: [v] * summary.height for k, v in tag.items()}, **_columns(summary)}
    with Store(path) as db:
        db.replace_analysis(model, int(stats["step"].max()), run, [(NAME, CELLS), (NAME, SUMMARY)], same=tag)
    return result


def _columns(df: pl.DataFrame) -> dict[str, list]:
    return {c: df[c].to_list() for c in df.columns}


def describe(result: MemorizationProfile) -> str:
    """One line for the console: the instantaneous effect and how many cells were estimated."""
    inst = result.summary.filter(pl.col("kind") == "instantaneous")
    if not inst.height:
        return f"{result.cells.height} ATT(g, t) cells; no instantaneous estimate"
    row = inst.row(0, named=True)
    return (f"{result.cells.height} ATT(g, t) cells; instantaneous ATT {row['att']:.4g} "
            f"(95% interval {row['ci_low']:.4g} to {row['ci_high']:.4g}, {row['n_cohorts']} cohorts)")

