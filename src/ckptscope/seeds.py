"""Seed groups and the Multi-Bootstrap: is a trend a property of the training recipe, or of one seed?

A model may be seed K of a group of replicates (`ckptscope ingest SOURCE --group G --seed K`;
catalog seed suites are grouped on their own). `seed_intervals` answers, per step and matrix,
how the group's mean behaves, with Multi-Bootstrap intervals (Sellam et al., "The MultiBERTs",
ICLR 2022), and how two groups differ, with a p-value.

The Multi-Bootstrap, as `language/multiberts/multibootstrap.py` computes it: each of B
iterations resamples the seeds with replacement and, for per-sequence outcomes (tables keyed by
`sequence_id`, e.g. `memorization`, `sequence_stats`), the sequences with replacement, one
sequence sample shared by every seed and both groups; the statistic is the mean over the sampled
seeds of each seed's mean over the sampled sequences. The interval is the percentile interval of
the B statistics. Comparing groups, δ = compare − group: the seeds are resampled independently
per group (unpaired) or, with `paired_seeds`, one sample of the seed numbers both groups have;
sequences are paired whenever the groups share sequence ids. Per-checkpoint metrics (weights) have
no sequence axis: only seeds are resampled.
"""

from __future__ import annotations

import json

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import polars as pl

from ckptscope.errors import CkptscopeError
from ckptscope.store.db import Store, default_store_path

AXES = ("step", "tokens", "progress")
CELL = ("layer", "component", "tensor", "head")  # what identifies one series of a per-checkpoint metric within a step
CHUNK = 4096  # cells bootstrapped at once: bounds memory at CHUNK x nboot floats


# -- membership -------------------------------------------------------------------------------

def group_of(spec: Any, source: Any) -> tuple[str | None, int | None]:
    """(group, seed) an ingest records: the options given, else the catalog's for a seed suite."""
    if spec.group is not None:
        return spec.group, spec.seed
    suite = getattr(source, "suite", None) if getattr(source, "kind", None) == "hub" else None
    return (suite.group, suite.seed) if suite is not None and suite.group is not None else (None, None)


def check_membership(db: Store, model: str, group: str | None, seed: int | None) -> tuple[str, int] | None:
    """Refuse a seed another model of the group already holds; return (group, seed) when the store
    must change, None when there is nothing to record."""
    if group is None:
        return None
    if not has_groups(db):  # a store from before seed groups: it is upgraded when written, and holds no member
        return group, seed
    taken = db.sql("SELECT model FROM models WHERE group_name = ? AND seed = ? AND model <> ?", [group, seed, model])
    if taken.height:
        raise CkptscopeError(f"group {group!r} already has seed {seed} (model {taken['model'][0]}); "
                             "give this model another --seed, or another --group")
    stored = db.model(model)
    if stored is not None and stored.get("group_name") == group and stored.get("seed") == seed:
        return None
    return group, seed


def groups(store: Store | str | Path | None = None) -> pl.DataFrame:
    """The store's seed groups: group_name, seeds, models (in seed order), common_steps (steps every seed has)."""
    with _open(store) as db:
        if not has_groups(db):
            return pl.DataFrame(schema={"group_name": pl.String, "seeds": pl.Int64, "models": pl.String, "common_steps": pl.Int64})
        return db.sql("""
            WITH g AS (SELECT group_name, count(*) AS seeds, string_agg(model || ' (seed ' || seed || ')', ', ' ORDER BY seed) AS models
                       FROM models WHERE group_name IS NOT NULL GROUP BY group_name),
            s AS (SELECT m.group_name, c.step FROM checkpoints c JOIN models m USING (model) JOIN g USING (group_name)
                  WHERE c.status = 'ok' GROUP BY m.group_name, c.step HAVING count(DISTINCT c.model) = any_value(g.seeds))
            SELECT g.*, (SELECT count(*) FROM s WHERE s.group_name = g.group_name) AS common_steps FROM g ORDER BY group_name""")


def has_groups(db: Store) -> bool:
    """Whether the store records any seed group (a store not yet migrated to 0008 has no such columns)."""
    if not db.sql("SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'models' AND column_name = 'group_name'").item():
        return False
    return bool(db.sql("SELECT count(*) AS n FROM models WHERE group_name IS NOT NULL").item())


def _open(store: Store | str | Path | None) -> Any:
    if isinstance(store, Store):
        return nullcontext(store)
    return Store(store if store is not None else default_store_path(), read_only=True)


# -- the Multi-Bootstrap on arrays -------------------------------------------------------------

def seed_draws(rng: np.random.Generator, nboot: int, n: int) -> np.ndarray:
    """Counts [nboot, n]: how often each of n items is drawn in each n-of-n resample with replacement."""
    picks = rng.integers(0, n, size=(nboot, n))
    return np.apply_along_axis(np.bincount, 1, picks, minlength=n).astype(np.float64)


def boot_means(values: np.ndarray, seeds: np.ndarray, sequences: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap statistics of the seed-mean.

    `values` is [cells, n_seeds] (per-checkpoint metrics) or, with `sequences`, [n_seeds, n_sequences]
    (one cell of a per-sequence outcome). `seeds` and `sequences` are draw counts from `seed_draws`.
    Returns [cells, nboot] (or [nboot]): mean over sampled seeds of each seed's mean over sampled
    sequences — counts turn both resamples into weighted means.
    """
    if sequences is None:
        return values @ seeds.T / seeds.shape[1]
    per_seed = values @ sequences.T / sequences.shape[1]  # [n_seeds, nboot]: each seed's mean over its sampled sequences
    return np.einsum("sb,bs->b", per_seed, seeds) / seeds.shape[1]


def percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the last axis, at [(1 - level)/2, 1 - (1 - level)/2] (linear interpolation)."""
    low, high = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2], axis=-1)
    return low, high


def p_value(deltas: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """One-sided bootstrap p of the observed direction: P̂(δ ≤ 0) when the estimate is ≥ 0, else P̂(δ ≥ 0),
    floored at 1/nboot (the reference's `report_ci`, its `expect_negative_effect` set by the estimate's sign)."""
    below = (deltas <= 0).mean(axis=-1)
    above = (deltas >= 0).mean(axis=-1)
    p = np.where(estimate >= 0, below, above)
    return np.maximum(p, 1.0 / deltas.shape[-1])


# -- reading a group ---------------------------------------------------------------------------

def _members(db: Store, group: str) -> pl.DataFrame:
    members = db.sql("SELECT model, seed FROM models WHERE group_name = ? ORDER BY seed", [group])
    if not members.height:
        known = db.sql("SELECT DISTINCT group_name FROM models WHERE group_name IS NOT NULL ORDER BY 1")["group_name"].to_list()
        raise CkptscopeError(f"no seed group {group!r} in {db.path} (groups: {', '.join(known) or 'none'}); "
                             "record one with `ckptscope ingest SOURCE --group GROUP --seed K`")
    return members


def _sequence_table(db: Store, metric: str) -> tuple[str, str] | None:
    """(table, column) when `metric` is TABLE.COLUMN of a per-sequence table (keyed by sequence_id)."""
    table, _, column = metric.partition(".")
    if not column:
        return None
    found = db.sql("SELECT columns, key FROM analyzer_tables WHERE table_name = ?", [table])
    if not found.height:
        return None
    columns, key = json.loads(found["columns"][0]), json.loads(found["key"][0])
    if key != ["sequence_id"]:
        raise CkptscopeError(f"table {table} is not per sequence (its key is {', '.join(key)}); per-sequence outcomes are "
                             "columns of tables keyed by sequence_id, e.g. memorization.score")
    numeric = [c for c, t in columns.items() if t.split()[0] in ("DOUBLE", "BIGINT", "INTEGER", "BOOLEAN") and c != "first_seen_step"]
    if column not in numeric:
        raise CkptscopeError(f"{metric}: table {table} has no numeric outcome {column!r}; choose from {', '.join(numeric)}")
    return table, column


def _load(db: Store, group: str, metric: str, component: str | None) -> tuple[pl.DataFrame, bool]:
    """Long rows (seed, step, tokens, cell columns or sequence_id, value) of a group's steps that every
    seed has; and whether the metric is per sequence."""
    members = _members(db, group)
    n = members.height
    common = db.sql("""
        SELECT c.step, CASE WHEN count(c.tokens) = count(*) AND min(c.tokens) = max(c.tokens) THEN min(c.tokens) END AS tokens,
               count(c.tokens) = count(*) AS tokens_known
        FROM checkpoints c JOIN models m USING (model)
        WHERE m.group_name = ? AND c.status = 'ok' GROUP BY c.step HAVING count(DISTINCT c.model) = ? ORDER BY c.step""", [group, n])
    if not common.height:
        raise CkptscopeError(f"the {n} seeds of group {group!r} have no step in common; ingest the same steps for each")
    seq = _sequence_table(db, metric)
    if seq is not None:
        if component is not None:
            raise CkptscopeError(f"--component does not apply to the per-sequence outcome {metric}")
        table, column = seq
        rows = db.sql(f"""SELECT g.seed, t.step, t.sequence_id, t.{column}::DOUBLE AS value
                          FROM {table} t JOIN models g USING (model) WHERE g.group_name = ?""", [group])
    else:
        where = " AND v.component = ?" if component is not None else ""
        rows = db.sql(f"""SELECT g.seed, v.step, v.layer, v.component, v.tensor, v.head, v.value
                          FROM metric_values v JOIN models g USING (model)
                          WHERE g.group_name = ? AND v.metric = ?{where}""", [group, metric, *([component] if component else [])])
    if not rows.height:
        what = f" of component {component}" if component else ""
        raise CkptscopeError(f"group {group!r} has no metric {metric!r}{what}; list them with "
                             f"`ckptscope sql \"SELECT DISTINCT metric, component FROM seed_metrics WHERE group_name = '{group}'\"`")
    last = common["step"].max()
    common = common.with_columns(progress=pl.col("step") / last if last else pl.lit(None, pl.Float64))
    return rows.join(common, on="step"), seq is not None


def _need_axis(df: pl.DataFrame, db: Store, group: str, axis: str) -> None:
    """Tokens seen are only used when every seed knows them: a missing count is said, never guessed."""
    if axis != "tokens" or df["tokens"].null_count() == 0:
        return
    unknown = db.sql("""SELECT DISTINCT m.model FROM checkpoints c JOIN models m USING (model)
                        WHERE m.group_name = ? AND c.status = 'ok' AND c.tokens IS NULL ORDER BY 1""", [group])["model"].to_list()
    if unknown:
        raise CkptscopeError(f"--axis tokens: tokens seen are unknown for {', '.join(unknown)} (group {group!r}): neither the source "
                             "nor the ingest gave them; re-ingest with --tokens-per-step N (and --force), or use --axis step")
    raise CkptscopeError(f"--axis tokens: the seeds of group {group!r} disagree on tokens seen at the same step; use --axis step")


# -- per group ---------------------------------------------------------------------------------

def _cells(df: pl.DataFrame, per_sequence: bool) -> pl.DataFrame:
    """One row per step and cell, with the per-seed values in seed order: `values` [n_seeds] or, per sequence,
    `values` [n_seeds] of the seeds' per-sequence lists over the sequences every seed has."""
    seeds = sorted(df["seed"].unique().to_list())
    keys = ["step", "tokens", "progress", *([] if per_sequence else CELL)]
    if per_sequence:
        per = df.group_by(["step", "sequence_id"]).agg(pl.len().alias("k"), pl.col("seed"), pl.col("value"), pl.col("tokens").first(),
                                                      pl.col("progress").first())
        per = per.filter(pl.col("k") == len(seeds)).sort("step", "sequence_id")
        return per, seeds
    wide = df.pivot(on="seed", index=keys, values="value", aggregate_function="first").sort(keys, nulls_last=False)
    for s in seeds:
        if str(s) not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(str(s)))
    return wide, seeds


def _matrix(wide: pl.DataFrame, seeds: Sequence[int]) -> np.ndarray:
    return wide.select([str(s) for s in seeds]).to_numpy().astype(np.float64)


def _sequence_matrices(per: pl.DataFrame, seeds: Sequence[int]) -> dict[int, tuple[list[str], np.ndarray]]:
    """step -> (sequence ids, values [n_seeds, n_sequences])."""
    out: dict[int, tuple[list[str], np.ndarray]] = {}
    index = {s: i for i, s in enumerate(seeds)}
    for (step,), part in per.group_by(["step"], maintain_order=True):
        ids = part["sequence_id"].to_list()
        v = np.full((len(seeds), len(ids)), np.nan)
        for j, (ss, vv) in enumerate(zip(part["seed"].to_list(), part["value"].to_list())):
            for s, x in zip(ss, vv):
                v[index[s], j] = x
        out[step] = (ids, v)
    return out


def seed_intervals(group: str, metric: str, *, store: Store | str | Path | None = None, component: str | None = None,
                   compare: str | None = None, nboot: int = 1000, seed: int = 0, axis: str = "step",
                   paired_seeds: bool = False, level: float = 0.95) -> pl.DataFrame:
    """Across-seed statistics of `metric` for seed group `group`, with Multi-Bootstrap intervals.

    `metric` is a metric of `metric_values` (e.g. stable_rank; `component` narrows it) or a
    per-sequence outcome TABLE.COLUMN (memorization.score, sequence_stats.sup_seq). Only steps that
    every seed of the group has are used. One row per step (and layer, component, tensor, head):
    n_seeds, mean, std (ddof 1), min, max and, with `nboot` > 0, the `level` percentile interval
    low, high of the mean. With `compare` (another group), one row per point both groups have on
    `axis` ("step", "tokens" or "progress" = step / the group's last common step), matched on
    layer, component and head: mean, mean_compare, difference = compare − group, its interval and
    a one-sided p (`p_value`); `paired` says which axes were paired ("seeds", "sequences").
    The same arguments (and `seed`) give the same result.
    """
    if axis not in AXES:
        raise CkptscopeError(f"--axis {axis!r}: choose from {', '.join(AXES)}")
    if nboot < 0 or nboot == 1:
        raise CkptscopeError(f"--bootstrap {nboot}: give 0 (no intervals) or at least 2 resamples (1000 is usual)")
    if not 0 < level < 1:
        raise CkptscopeError(f"level {level}: give a confidence level strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    with _open(store) as db:
        a, per_sequence = _load(db, group, metric, component)
        _need_axis(a, db, group, axis)
        b = None
        if compare is not None:
            if compare == group:
                raise CkptscopeError(f"--compare {compare}: compare the group with another group")
            b, b_per_sequence = _load(db, compare, metric, component)
            _need_axis(b, db, compare, axis)
    if nboot and a["seed"].n_unique() < 2:
        raise CkptscopeError(f"group {group!r} has one seed: the Multi-Bootstrap needs at least 2 (give --bootstrap 0 for the summary)")
    if b is None:
        return _one_group(group, metric, a, per_sequence, nboot, rng, level)
    if nboot and b["seed"].n_unique() < 2:
        raise CkptscopeError(f"group {compare!r} has one seed: the Multi-Bootstrap needs at least 2 (give --bootstrap 0)")
    return _two_groups(group, compare, metric, a, b, per_sequence, axis, nboot, rng, level, paired_seeds)


def _summary(v: np.ndarray) -> dict[str, np.ndarray]:
    """n_seeds, mean, std (ddof 1), min, max over the last axis, ignoring missing values."""
    with warnings.catch_warnings():  # an all-missing row is NaN (shown as null), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        n = np.sum(~np.isnan(v), axis=-1)
        return {"n_seeds": n, "mean": np.nanmean(v, axis=-1), "std": np.where(n > 1, np.nanstd(v, axis=-1, ddof=1), np.nan),
                "min": np.nanmin(v, axis=-1), "max": np.nanmax(v, axis=-1)}


def _complete(v: np.ndarray) -> np.ndarray:
    """Rows where every seed has a value: only those get an interval."""
    return ~np.isnan(v).any(axis=-1)


def _one_group(group: str, metric: str, df: pl.DataFrame, per_sequence: bool, nboot: int, rng: np.random.Generator,
               level: float) -> pl.DataFrame:
    cells, seeds = _cells(df, per_sequence)
    draws = seed_draws(rng, nboot, len(seeds)) if nboot else None
    if per_sequence:
        mats = _sequence_matrices(cells, seeds)
        steps = sorted(mats)
        head = df.select("step", "tokens", "progress").unique().sort("step").filter(pl.col("step").is_in(steps))
        per_seed = np.stack([np.nanmean(mats[s][1], axis=1) for s in steps])  # [steps, seeds]
        stats = _summary(per_seed)
        out = head.with_columns(pl.lit(group).alias("group_name"), pl.lit(metric).alias("metric"),
                                n_sequences=pl.Series([len(mats[s][0]) for s in steps]),
                                **{k: pl.Series(v) for k, v in stats.items()})
        if nboot:
            cache: dict[tuple, np.ndarray] = {}
            lows, highs = [], []
            for s in steps:
                ids, v = mats[s]
                seq = cache.setdefault(tuple(ids), seed_draws(rng, nboot, len(ids)))
                low, high = percentile_interval(boot_means(v, draws, seq), level)
                lows.append(low)
                highs.append(high)
            out = out.with_columns(low=pl.Series(lows, dtype=pl.Float64), high=pl.Series(highs, dtype=pl.Float64))
        first = ["group_name", "step", "tokens", "progress", "metric"]
        return out.select(*first, *[c for c in out.columns if c not in first]).sort("step")
    v = _matrix(cells, seeds)
    stats = _summary(v)
    out = cells.select("step", "tokens", "progress", *CELL).with_columns(
        pl.lit(group).alias("group_name"), pl.lit(metric).alias("metric"), **{k: pl.Series(x) for k, x in stats.items()})
    if nboot:
        low, high = np.full(len(v), np.nan), np.full(len(v), np.nan)
        ok = np.flatnonzero(_complete(v))
        for start in range(0, len(ok), CHUNK):
            rows = ok[start:start + CHUNK]
            low[rows], high[rows] = percentile_interval(boot_means(v[rows], draws), level)
        out = out.with_columns(low=pl.Series(low), high=pl.Series(high))
    first = ["group_name", "step", "tokens", "progress", *CELL, "metric"]
    return out.select(*first, *[c for c in out.columns if c not in first]).fill_nan(None)


def _two_groups(group: str, compare: str, metric: str, a: pl.DataFrame, b: pl.DataFrame, per_sequence: bool, axis: str,
                nboot: int, rng: np.random.Generator, level: float, paired_seeds: bool) -> pl.DataFrame:
    cells_a, seeds_a = _cells(a, per_sequence)
    cells_b, seeds_b = _cells(b, per_sequence)
    paired = []
    if paired_seeds:
        common = sorted(set(seeds_a) & set(seeds_b))
        if len(common) < 2:
            raise CkptscopeError(f"--paired-seeds: groups {group!r} and {compare!r} share {len(common)} seed number(s); "
                                 "pairing needs at least 2 (leave --paired-seeds out to resample each group's seeds)")
        seeds_a = seeds_b = common
        paired.append("seeds")
    if nboot:
        draws_a = seed_draws(rng, nboot, len(seeds_a))
        draws_b = draws_a if paired_seeds else seed_draws(rng, nboot, len(seeds_b))
    if per_sequence:
        return _two_sequences(group, compare, metric, cells_a, cells_b, seeds_a, seeds_b, a, b, axis, nboot,
                              draws_a if nboot else None, draws_b if nboot else None, rng, level, paired)
    on = [axis, "layer", "component", "head"]
    for cells, name in ((cells_a, group), (cells_b, compare)):
        if cells.select(on).is_duplicated().any():
            raise CkptscopeError(f"group {name!r} has several tensors per layer and component for {metric}; "
                                 "narrow it with --component")
    right = cells_b.select(*on, pl.col("step").alias("step_compare"), pl.col("tensor").alias("tensor_compare"),
                           *[pl.col(str(s)).alias(f"b{s}") for s in seeds_b])
    joined = cells_a.join(right, on=on, how="inner", nulls_equal=True).sort(on, nulls_last=False)
    if not joined.height:
        raise CkptscopeError(f"groups {group!r} and {compare!r} have no {axis} in common for {metric}; try another --axis")
    va = joined.select([str(s) for s in seeds_a]).to_numpy().astype(np.float64)
    vb = joined.select([f"b{s}" for s in seeds_b]).to_numpy().astype(np.float64)
    sa, sb = _summary(va), _summary(vb)
    diff = sb["mean"] - sa["mean"]
    out = joined.select("step", "step_compare", "tokens", "progress", *CELL).with_columns(
        pl.lit(group).alias("group_name"), pl.lit(compare).alias("compare"), pl.lit(metric).alias("metric"),
        n_seeds=pl.Series(sa["n_seeds"]), n_seeds_compare=pl.Series(sb["n_seeds"]), mean=pl.Series(sa["mean"]),
        mean_compare=pl.Series(sb["mean"]), difference=pl.Series(diff))
    if nboot:
        low, high, p = (np.full(len(va), np.nan) for _ in range(3))
        ok = np.flatnonzero(_complete(va) & _complete(vb))
        for start in range(0, len(ok), CHUNK):
            rows = ok[start:start + CHUNK]
            deltas = boot_means(vb[rows], draws_b) - boot_means(va[rows], draws_a)
            low[rows], high[rows] = percentile_interval(deltas, level)
            p[rows] = p_value(deltas, diff[rows])
        out = out.with_columns(low=pl.Series(low), high=pl.Series(high), p=pl.Series(p))
    out = out.with_columns(paired=pl.lit("+".join(paired) or "none"))
    first = ["group_name", "compare", "step", "step_compare", "tokens", "progress", *CELL, "metric"]
    return out.select(*first, *[c for c in out.columns if c not in first]).fill_nan(None)


def _two_sequences(group: str, compare: str, metric: str, cells_a: pl.DataFrame, cells_b: pl.DataFrame, seeds_a: list[int],
                   seeds_b: list[int], a: pl.DataFrame, b: pl.DataFrame, axis: str, nboot: int, draws_a: np.ndarray | None,
                   draws_b: np.ndarray | None, rng: np.random.Generator, level: float, paired: list[str]) -> pl.DataFrame:
    """Per-sequence outcomes of two groups at the points both have on `axis`; sequences paired when shared."""
    mats_a, mats_b = _sequence_matrices(cells_a, seeds_a), _sequence_matrices(cells_b, seeds_b)
    pos_a = a.select("step", "tokens", "progress").unique()
    pos_b = b.select(pl.col("step").alias("step_compare"), "tokens", "progress").unique()
    points = pos_a.filter(pl.col("step").is_in(list(mats_a))).join(
        pos_b.filter(pl.col("step_compare").is_in(list(mats_b))).select(axis, "step_compare"), on=axis).sort("step")
    if not points.height:
        raise CkptscopeError(f"groups {group!r} and {compare!r} have no {axis} in common for {metric}; try another --axis")
    rows, cache = [], {}
    for step, step_b, tokens, progress in points.select("step", "step_compare", "tokens", "progress").iter_rows():
        ids_a, va = mats_a[step]
        ids_b, vb = mats_b[step_b]
        shared = sorted(set(ids_a) & set(ids_b))
        if shared:  # the same sequences: one sample of them for both groups
            ia, ib = [ids_a.index(i) for i in shared], [ids_b.index(i) for i in shared]
            va, vb = va[:, ia], vb[:, ib]
        ma, mb = np.nanmean(va, axis=1), np.nanmean(vb, axis=1)
        row = dict(group_name=group, compare=compare, step=step, step_compare=step_b, tokens=tokens, progress=progress, metric=metric,
                   n_seeds=len(seeds_a), n_seeds_compare=len(seeds_b), n_sequences=va.shape[1], n_sequences_compare=vb.shape[1],
                   mean=float(ma.mean()), mean_compare=float(mb.mean()), difference=float(mb.mean() - ma.mean()))
        if nboot:
            if shared:
                seq_a = seq_b = cache.setdefault(("shared", tuple(shared)), seed_draws(rng, nboot, len(shared)))
            else:
                seq_a = cache.setdefault(("a", tuple(ids_a)), seed_draws(rng, nboot, va.shape[1]))
                seq_b = cache.setdefault(("b", tuple(ids_b)), seed_draws(rng, nboot, vb.shape[1]))
            deltas = boot_means(vb, draws_b, seq_b) - boot_means(va, draws_a, seq_a)
            low, high = percentile_interval(deltas, level)
            row.update(low=float(low), high=float(high), p=float(p_value(deltas, np.array(row["difference"]))))
        row["paired"] = "+".join([*paired, *(["sequences"] if shared else [])]) or "none"
        rows.append(row)
    return pl.DataFrame(rows).fill_nan(None)
