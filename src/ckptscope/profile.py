"""Memorisation profiles: group-time ATT(g, t) on per-sequence statistics (Lesci et al., ACL 2024).

Why: the change in a model's behaviour on a sequence between two checkpoints mixes what training
on that sequence did with what all other training did. Difference-in-differences separates them:
sequences trained on in the interval ending at checkpoint g (cohort g) are compared with control
sequences not (yet) trained on, from the checkpoint before g to every checkpoint t.

Definitions (methods-2 §2; Callaway & Sant'Anna without covariates, as the `differences`
package computes them, verified against it in tests/test_profile.py):

* cohort g of a train sequence = the first checkpoint step >= its `first_seen_step` among the
  steps present; sequences first seen after the last checkpoint form no cohort.
* base period ("varying"): b = the checkpoint before g for t >= g; for t < g (pre-trend placebo
  cells) b = the checkpoint before t. The first checkpoint has no cell.
* controls: `heldout` = the never-trained sequences; `not-yet-treated` = heldout, sequences first
  seen after the last checkpoint, and cohorts g' > t with g' != g.
* ATT(g,t) = mean_{G=g}(Y_t - Y_b) - mean_C(Y_t - Y_b); analytic SE = sqrt(var_T/n_T + var_C/n_C)
  with ddof=0 variances of Y_t - Y_b; interval ATT +- z_0.975 SE (pointwise).
* influence function of a cell, per sequence i (n = all sequences):
  IF_i = n [D_i (dY_i - mean_T)/n_T - C_i (dY_i - mean_C)/n_C], so SE = sqrt(sum IF^2)/n.
* bootstrap (bootstrap > 0): Rademacher multipliers per sequence, draw = mean(IF * u); SE =
  IQR(draws)/(z_.75 - z_.25); interval ATT +- c SE with c the 0.95 quantile of max |draw/SE| over
  all rows of the same table (cells; or rows of one summary kind): simultaneous bands.

Everything is computed from per-group moments (size, mean vector over checkpoints, centred
cross-product matrix), so the cost is one pass over the panel plus O(groups x checkpoints^2).
For surprisal-like outcomes memorisation is -ATT; this module reports ATT as estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl

from ckptscope.errors import CkptscopeError

OUTCOMES = ("sup_seq", "acc_seq", "avg_rank", "entr_seq")
CONTROLS = ("heldout", "not-yet-treated")
Z_975 = 1.959963984540054  # Phi^-1(0.975): pointwise 95% intervals
IQR_NORMAL = 1.3489795003921634  # Phi^-1(0.75) - Phi^-1(0.25): IQR of a standard normal
MIN_BOOTSTRAP = 10  # fewer draws give no usable interquartile range
_ROW_BLOCK = 8192  # sequences per block of bootstrap multipliers (bounds memory)
_CELL_BLOCK = 4096  # cells per block when evaluating bootstrap draws

CELL_COLUMNS = ("cohort_step", "step", "event_time", "att", "se", "ci_low", "ci_high", "n_treated", "n_control")
SUMMARY_COLUMNS = ("kind", "event_time", "step", "att", "se", "ci_low", "ci_high", "n_cohorts", "n_treated")


class ProfileError(CkptscopeError):
    """sequence_stats cannot give a memorisation profile (missing data, no controls, bad option)."""


class MemorizationProfile(NamedTuple):
    """Both tables of one computation: the ATT(g, t) cells and their aggregates."""

    cells: pl.DataFrame
    summary: pl.DataFrame


@dataclass
class _Panel:
    """The balanced panel, sequences grouped: G cohorts (ascending), then 'late', then 'heldout'."""

    steps: np.ndarray  # (T,) checkpoint steps, ascending
    cohorts: np.ndarray  # (G,) index into steps of each cohort's checkpoint, ascending
    y: np.ndarray  # (n, T) outcome; rows of group k are offsets[k]:offsets[k+1]
    offsets: np.ndarray  # (K+1,)
    sizes: np.ndarray  # (K,) sequences per group (float, for arithmetic)
    mean: np.ndarray  # (K, T) group means (0 for an empty group)
    scatter: np.ndarray  # (K, T, T) centred cross-products sum (Y - mean)(Y - mean)^T

    @property
    def n(self) -> int:
        return self.y.shape[0]


@dataclass
class _Cells:
    """All estimable (g, t) cells, with what their influence functions need."""

    j: np.ndarray  # group index of the cohort
    t: np.ndarray  # checkpoint index
    b: np.ndarray  # base checkpoint index
    start: np.ndarray  # controls are groups >= start, except j itself
    n_t: np.ndarray
    n_c: np.ndarray
    mean_t: np.ndarray  # mean of Y_t - Y_b over the cohort
    mean_c: np.ndarray  # ... over the controls
    att: np.ndarray
    se: np.ndarray


def compute_profile(stats: pl.DataFrame, *, outcome: str = "sup_seq", control: str = "heldout",
                    bootstrap: int = 0, seed: int = 0) -> MemorizationProfile:
    """ATT(g, t) for every cohort and checkpoint, and the summary aggregates, in one pass.

    `stats` has the columns of the `sequence_stats` table for one model (`sequence_id`, `step`,
    `split`, `first_seen_step`, the outcome). `bootstrap` > 0 replaces the analytic standard
    errors and pointwise intervals by multiplier-bootstrap ones with simultaneous bands,
    reproducible for a given `seed`.
    """
    if control not in CONTROLS:
        raise ProfileError(f"unknown control group {control!r}: choose one of {', '.join(CONTROLS)}")
    if bootstrap < 0 or 0 < bootstrap < MIN_BOOTSTRAP:
        raise ProfileError(f"--bootstrap must be 0 (analytic standard errors) or at least {MIN_BOOTSTRAP}, not {bootstrap}")
    panel = _build_panel(stats, outcome, control)
    cells = _estimate_cells(panel, control)
    aggregates = _aggregate_specs(panel, cells)
    sums = _multiplier_sums(panel, bootstrap, seed) if bootstrap else None
    agg_att, agg_se, agg_draws = _aggregate(panel, cells, aggregates, sums)
    if sums is not None:
        agg_se, agg_crit = _summary_bands(aggregates, agg_draws)
        cell_se, cell_crit = _cell_bands(panel, cells, *sums)
    else:
        cell_se, cell_crit, agg_crit = cells.se, Z_975, np.full(len(aggregates), Z_975)
    return MemorizationProfile(_cells_frame(panel, cells, cell_se, cell_crit),
                               _summary_frame(cells, aggregates, agg_att, agg_se, agg_crit))


def memorization_profile(stats: pl.DataFrame, *, outcome: str = "sup_seq", control: str = "heldout",
                         bootstrap: int = 0, seed: int = 0) -> pl.DataFrame:
    """The ATT(g, t) table (`CELL_COLUMNS`), one row per cohort and checkpoint with a base period."""
    return compute_profile(stats, outcome=outcome, control=control, bootstrap=bootstrap, seed=seed).cells


def profile_summary(stats: pl.DataFrame, *, outcome: str = "sup_seq", control: str = "heldout",
                    bootstrap: int = 0, seed: int = 0) -> pl.DataFrame:
    """The aggregates (`SUMMARY_COLUMNS`): instantaneous, persistent by event time, residual.

    Takes the per-sequence statistics, not the cell table, because the cells share controls:
    an aggregate's standard error needs the per-sequence influence functions, not only cell SEs.
    """
    return compute_profile(stats, outcome=outcome, control=control, bootstrap=bootstrap, seed=seed).summary


# ---------------------------------------------------------------- panel

def _build_panel(stats: pl.DataFrame, outcome: str, control: str) -> _Panel:
    if outcome not in OUTCOMES:
        raise ProfileError(f"unknown outcome {outcome!r}: choose one of {', '.join(OUTCOMES)}")
    missing = [c for c in ("sequence_id", "step", "split", "first_seen_step", outcome) if c not in stats.columns]
    if missing:
        raise ProfileError(f"sequence_stats lacks column(s) {', '.join(missing)}: run analyze sequence_stats with a current ckptscope")
    if stats.height == 0:
        raise ProfileError("sequence_stats has no rows for this model: run analyze sequence_stats on it first")
    if "model" in stats.columns and stats["model"].n_unique() > 1:
        raise ProfileError(f"sequence_stats holds {stats['model'].n_unique()} models: pass the rows of one model")
    y = stats[outcome].cast(pl.Float64)
    if y.null_count() or y.is_nan().any() or y.is_infinite().any():
        raise ProfileError(f"{outcome} has missing or non-finite values: rerun sequence_stats for those sequences")

    steps = stats["step"].unique().sort().to_numpy().astype(np.int64)
    if len(steps) < 2:
        raise ProfileError(f"sequence_stats has a single checkpoint (step {steps[0]}): a profile needs the checkpoints before and after training on a cohort")
    n_steps = len(steps)

    seqs = (stats.group_by("sequence_id")
            .agg(pl.len().alias("rows"), pl.col("split").first(), pl.col("split").n_unique().alias("n_split"),
                 pl.col("first_seen_step").first(), pl.col("first_seen_step").n_unique().alias("n_first"))
            .sort("sequence_id"))
    incomplete = seqs.filter(pl.col("rows") != n_steps)
    if incomplete.height:
        row = incomplete.row(0, named=True)
        raise ProfileError(f"sequence_stats is unbalanced: sequence {row['sequence_id']} has {row['rows']} rows for {n_steps} checkpoints "
                           f"({incomplete.height} such sequences); run sequence_stats for every sequence at every step")
    varying = seqs.filter((pl.col("n_split") > 1) | (pl.col("n_first") > 1))
    if varying.height:
        raise ProfileError(f"sequence {varying['sequence_id'][0]} has different split or first_seen_step across steps: the corpus changed between runs; rerun sequence_stats")
    bad_split = seqs.filter(~pl.col("split").is_in(["train", "heldout"]) | pl.col("split").is_null())
    if bad_split.height:
        raise ProfileError(f"sequence {bad_split['sequence_id'][0]} has split {bad_split['split'][0]!r}: expected 'train' or 'heldout'")
    train = seqs.filter(pl.col("split") == "train")
    if train["first_seen_step"].null_count():
        sid = train.filter(pl.col("first_seen_step").is_null())["sequence_id"][0]
        raise ProfileError(f"train sequence {sid} has no first_seen_step: build the corpus with corpus from-data")
    seen_heldout = seqs.filter((pl.col("split") == "heldout") & pl.col("first_seen_step").is_not_null())
    if seen_heldout.height:
        raise ProfileError(f"heldout sequence {seen_heldout['sequence_id'][0]} has a first_seen_step: held-out sequences must be never trained on")

    # Cohort = first checkpoint at or after first_seen_step; index len(steps) means after the last one.
    is_train = (seqs["split"] == "train").to_numpy()
    first = seqs["first_seen_step"].fill_null(0).to_numpy().astype(np.int64)
    at = np.searchsorted(steps, first, side="left")
    early = is_train & (at == 0)
    if early.any():
        raise ProfileError(f"{int(early.sum())} train sequences were first seen at or before the first checkpoint (step {steps[0]}), "
                           f"so their cohort has no pre-treatment checkpoint; add the checkpoint before them or drop them from the corpus")
    cohorts = np.unique(at[is_train & (at < n_steps)])
    if len(cohorts) == 0:
        raise ProfileError(f"no train sequence is first seen within the checkpoints {steps[0]}..{steps[-1]}: there is no cohort to profile")
    n_groups = len(cohorts) + 2
    late, heldout = len(cohorts), len(cohorts) + 1
    group = np.where(is_train, np.where(at < n_steps, np.searchsorted(cohorts, np.minimum(at, n_steps - 1)), late), heldout)
    if control == "heldout" and not (group == heldout).any():
        raise ProfileError("no heldout sequences: build the corpus with --heldout, or use --control not-yet-treated")

    order = np.argsort(group, kind="stable")
    unit = np.empty(len(order), dtype=np.int64)
    unit[order] = np.arange(len(order))
    offsets = np.searchsorted(group[order], np.arange(n_groups + 1), side="left")

    # Scatter the long rows into an (n, T) matrix; each (sequence, step) must be filled exactly once.
    keyed = stats.select("sequence_id", "step", pl.col(outcome).cast(pl.Float64).alias("_y")).join(
        seqs.select("sequence_id").with_columns(pl.Series("_unit", unit)), on="sequence_id", how="inner")
    flat = keyed["_unit"].to_numpy() * n_steps + np.searchsorted(steps, keyed["step"].to_numpy())
    counts = np.bincount(flat, minlength=len(unit) * n_steps)
    if (counts != 1).any():
        cell = int(np.flatnonzero(counts != 1)[0])
        sid = seqs["sequence_id"][int(order[cell // n_steps])]
        raise ProfileError(f"sequence {sid} has {counts[cell]} rows at step {steps[cell % n_steps]}: remove duplicate sequence_stats rows")
    y_mat = np.empty(len(unit) * n_steps)
    y_mat[flat] = keyed["_y"].to_numpy()
    y_mat = y_mat.reshape(len(unit), n_steps)

    sizes = np.diff(offsets).astype(np.float64)
    mean = np.zeros((n_groups, n_steps))
    scatter = np.zeros((n_groups, n_steps, n_steps))
    for k in range(n_groups):  # one pass over the panel, group by group
        block = y_mat[offsets[k]:offsets[k + 1]]
        if len(block):
            mean[k] = block.mean(axis=0)
            centred = block - mean[k]
            scatter[k] = centred.T @ centred
    return _Panel(steps, cohorts, y_mat, offsets, sizes, mean, scatter)


# ---------------------------------------------------------------- cells

def _estimate_cells(panel: _Panel, control: str) -> _Cells:
    n_groups, n_steps = panel.mean.shape
    g_count = len(panel.cohorts)
    j, t = np.meshgrid(np.arange(g_count), np.arange(1, n_steps), indexing="ij")
    j, t = j.ravel(), t.ravel()
    gi = panel.cohorts[j]
    b = np.where(t >= gi, gi - 1, t - 1)  # varying base period
    if control == "heldout":
        start = np.full(len(j), n_groups - 1)
    else:  # groups after every cohort <= t: later cohorts, late, heldout (b < t always)
        start = np.searchsorted(panel.cohorts, t, side="right")

    # Per (cell, group): mean and centred sum of squares of Y_t - Y_b.
    diff_mean = (panel.mean[:, t] - panel.mean[:, b]).T
    diff_ss = (panel.scatter[:, t, t] + panel.scatter[:, b, b] - 2 * panel.scatter[:, t, b]).T
    rows = np.arange(len(j))
    n_t, mean_t, ss_t = panel.sizes[j], diff_mean[rows, j], diff_ss[rows, j]
    k = np.arange(n_groups)
    mask = (k[None, :] >= start[:, None]) & (k[None, :] != j[:, None])
    weight = mask * panel.sizes[None, :]
    n_c = weight.sum(axis=1)
    keep = n_c > 0  # a cell without any control is not estimable (not-yet-treated, late t)
    if not keep.any():
        raise ProfileError("no cohort has a not-yet-treated control at any checkpoint: add heldout sequences or later cohorts")
    mean_c = np.where(keep, (weight * diff_mean).sum(axis=1) / np.where(keep, n_c, 1), 0.0)
    ss_c = (mask * diff_ss).sum(axis=1) + (weight * (diff_mean - mean_c[:, None]) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(ss_t / n_t**2 + ss_c / n_c**2)
    return _Cells(j[keep], t[keep], b[keep], start[keep], n_t[keep], n_c[keep], mean_t[keep], mean_c[keep],
                  (mean_t - mean_c)[keep], se[keep])


# ---------------------------------------------------------------- aggregates

class _AggregateSpec(NamedTuple):
    kind: str
    event_time: int | None
    step: int | None
    cells: np.ndarray  # indices into _Cells


def _aggregate_specs(panel: _Panel, cells: _Cells) -> list[_AggregateSpec]:
    """Instantaneous (e = 0), persistent (each e >= 0), residual (t = last checkpoint); post cells only."""
    steps = panel.steps
    post = cells.t >= panel.cohorts[cells.j]
    event = steps[cells.t] - steps[panel.cohorts[cells.j]]
    specs: list[_AggregateSpec] = []
    zero = np.flatnonzero(post & (event == 0))
    if len(zero):
        specs.append(_AggregateSpec("instantaneous", 0, None, zero))
    for e in np.unique(event[post]):
        specs.append(_AggregateSpec("persistent", int(e), None, np.flatnonzero(post & (event == e))))
    final = np.flatnonzero(post & (cells.t == len(steps) - 1))
    if len(final):
        specs.append(_AggregateSpec("residual", None, int(steps[-1]), final))
    return specs


def _aggregate(panel: _Panel, cells: _Cells, specs: list[_AggregateSpec],
               sums: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cohort-size-weighted means of cells, their analytic SEs and bootstrap draws (as `differences`).

    Each aggregate's influence function is, for a sequence i of group k, Y_i . V_k + c_k: the
    weighted cell influence functions plus the term for estimating the cohort-share weights.
    Then sum_i IF_i^2 = sum_k n_k (mean_k . V_k + c_k)^2 + V_k^T scatter_k V_k, and a bootstrap
    draw of mean(IF * u) = sum_k (V_k . A_k + c_k U_k) / n. Aggregates are built in blocks.
    """
    n_groups, n_steps = panel.mean.shape
    n = panel.n
    att = np.empty(len(specs))
    se = np.empty(len(specs))
    draws = None if sums is None else np.empty((sums[1].shape[1], len(specs)))
    block = 64
    for lo in range(0, len(specs), block):
        chunk = specs[lo:lo + block]
        a = np.concatenate([np.full(len(s.cells), i) for i, s in enumerate(chunk)])
        idx = np.concatenate([s.cells for s in chunk])
        share = cells.n_t[idx] / n
        total = np.bincount(a, weights=share, minlength=len(chunk))
        w = share / total[a]
        cell_att = cells.att[idx]
        att[lo:lo + len(chunk)] = np.bincount(a, weights=w * cell_att, minlength=len(chunk))
        j, t, b, start = cells.j[idx], cells.t[idx], cells.b[idx], cells.start[idx]

        v = np.zeros((len(chunk), n_groups, n_steps))
        c = np.zeros((len(chunk), n_groups))
        coef_t = w * n / cells.n_t[idx]  # treated: the cohort's own group
        np.add.at(v, (a, j, t), coef_t)
        np.add.at(v, (a, j, b), -coef_t)
        np.add.at(c, (a, j), -coef_t * cells.mean_t[idx])
        # controls: every group >= start (a difference array over groups, then a cumulative sum);
        # aggregates hold post cells only, whose own cohort is <= t < start, never among them
        coef_c = w * n / cells.n_c[idx]
        ctrl_v = np.zeros_like(v)
        ctrl_c = np.zeros_like(c)
        np.add.at(ctrl_v, (a, start, t), -coef_c)
        np.add.at(ctrl_v, (a, start, b), coef_c)
        np.add.at(ctrl_c, (a, start), coef_c * cells.mean_c[idx])
        ctrl_v = np.cumsum(ctrl_v, axis=1)
        ctrl_c = np.cumsum(ctrl_c, axis=1)
        v += ctrl_v
        c += ctrl_c
        # weight estimation: w_j = share_j / sum(share), shares estimated by cohort dummies
        weighted = np.bincount(a, weights=share * cell_att, minlength=len(chunk))  # sum share * att
        in_agg = np.zeros((len(chunk), n_groups))
        in_agg[a, j] = 1.0
        np.add.at(c, (a, j), cell_att / total[a])
        c -= (weighted / total)[:, None] + (in_agg - total[:, None]) * (weighted / total**2)[:, None]

        level = np.einsum("akt,kt->ak", v, panel.mean) + c
        quad = np.einsum("kat,kat->a", np.matmul(v.transpose(1, 0, 2), panel.scatter), v.transpose(1, 0, 2))
        se[lo:lo + len(chunk)] = np.sqrt(np.maximum(level**2 @ panel.sizes + quad, 0.0)) / n
        if sums is not None:
            a_sum, u_sum = sums
            flat = v.reshape(len(chunk), n_groups * n_steps) @ a_sum.reshape(n_groups * n_steps, -1) + c @ u_sum
            draws[:, lo:lo + len(chunk)] = flat.T / n
    return att, se, draws


# ---------------------------------------------------------------- bootstrap

def _iqr_se(draws: np.ndarray) -> np.ndarray:
    """Robust bootstrap SE per column: IQR / IQR of N(0,1), quantiles by the inverted CDF."""
    q75 = np.quantile(draws, 0.75, axis=0, method="inverted_cdf")
    q25 = np.quantile(draws, 0.25, axis=0, method="inverted_cdf")
    return (q75 - q25) / IQR_NORMAL


def _sup_t_max(draws: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Per draw, max over columns of |draw / se| (columns with se = 0 carry no information)."""
    ok = se > 0
    if not ok.any():
        return np.zeros(draws.shape[0])
    return np.max(np.abs(draws[:, ok] / se[ok]), axis=1)


def _multiplier_sums(panel: _Panel, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One Rademacher weight u_i per sequence and draw, shared by every cell and aggregate.

    Returns A_k = sum_{i in k} u_i Y_i (K, T, draws) and U_k = sum_{i in k} u_i (K, draws): each
    draw of mean(IF * u) is linear in them, so the sequences are visited once.
    """
    n_groups, n_steps = panel.mean.shape
    rng = np.random.default_rng(seed)
    a_sum = np.zeros((n_groups, n_steps, draws))
    u_sum = np.zeros((n_groups, draws))
    for k in range(n_groups):
        for lo in range(panel.offsets[k], panel.offsets[k + 1], _ROW_BLOCK):
            hi = min(lo + _ROW_BLOCK, panel.offsets[k + 1])
            u = rng.integers(0, 2, size=(hi - lo, draws), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
            a_sum[k] += panel.y[lo:hi].T @ u
            u_sum[k] += u.sum(axis=0)
    return a_sum, u_sum


def _summary_bands(specs: list[_AggregateSpec], agg_draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap SEs of the aggregates and one simultaneous critical value per summary kind."""
    agg_se = _iqr_se(agg_draws)
    kinds = np.array([s.kind for s in specs])
    agg_crit = np.empty(len(specs))
    for kind in np.unique(kinds):
        sel = kinds == kind
        agg_crit[sel] = np.quantile(_sup_t_max(agg_draws[:, sel], agg_se[sel]), 0.95, method="inverted_cdf")
    return agg_se, agg_crit


def _cell_bands(panel: _Panel, cells: _Cells, a_sum: np.ndarray, u_sum: np.ndarray) -> tuple[np.ndarray, float]:
    """Bootstrap SEs of the cells and the simultaneous critical value over all cells."""
    n_groups, n_steps, draws = a_sum.shape
    # Cells: controls are the groups >= start except the cohort itself, so use suffix sums over groups.
    a_suffix = np.zeros((n_groups + 1, n_steps, draws))
    a_suffix[:-1] = np.cumsum(a_sum[::-1], axis=0)[::-1]
    u_suffix = np.zeros((n_groups + 1, draws))
    u_suffix[:-1] = np.cumsum(u_sum[::-1], axis=0)[::-1]
    cell_se = np.empty(len(cells.att))
    sup_t = np.zeros(draws)
    for lo in range(0, len(cells.att), _CELL_BLOCK):
        r = np.arange(lo, min(lo + _CELL_BLOCK, len(cells.att)))
        j, t, b, s = cells.j[r], cells.t[r], cells.b[r], cells.start[r]
        own_t = a_sum[j, t] - a_sum[j, b] - cells.mean_t[r, None] * u_sum[j]
        own_c = a_sum[j, t] - a_sum[j, b] - cells.mean_c[r, None] * u_sum[j]
        ctrl = a_suffix[s, t] - a_suffix[s, b] - cells.mean_c[r, None] * u_suffix[s] - (j >= s)[:, None] * own_c
        d = (own_t / cells.n_t[r, None] - ctrl / cells.n_c[r, None]).T  # (draws, cells)
        cell_se[r] = _iqr_se(d)
        sup_t = np.maximum(sup_t, _sup_t_max(d, cell_se[r]))
    return cell_se, float(np.quantile(sup_t, 0.95, method="inverted_cdf"))


# ---------------------------------------------------------------- frames

def _cells_frame(panel: _Panel, cells: _Cells, se: np.ndarray, crit: float) -> pl.DataFrame:
    g_step = panel.steps[panel.cohorts[cells.j]]
    t_step = panel.steps[cells.t]
    frame = pl.DataFrame({
        "cohort_step": g_step, "step": t_step, "event_time": t_step - g_step,
        "att": cells.att, "se": se, "ci_low": cells.att - crit * se, "ci_high": cells.att + crit * se,
        "n_treated": cells.n_t.astype(np.int64), "n_control": cells.n_c.astype(np.int64)})
    return frame.sort("cohort_step", "step")


def _summary_frame(cells: _Cells, specs: list[_AggregateSpec], att: np.ndarray, se: np.ndarray, crit: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({
        "kind": [s.kind for s in specs],
        "event_time": pl.Series([s.event_time for s in specs], dtype=pl.Int64),
        "step": pl.Series([s.step for s in specs], dtype=pl.Int64),
        "att": att, "se": se, "ci_low": att - crit * se, "ci_high": att + crit * se,
        "n_cohorts": [len(s.cells) for s in specs],
        "n_treated": [int(cells.n_t[s.cells].sum()) for s in specs],
    }, schema_overrides={"n_cohorts": pl.Int64, "n_treated": pl.Int64})
