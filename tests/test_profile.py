"""Memorisation profiles (ckptscope.profile): ATT(g, t) against a direct loop, against the
`differences` package, against planted effects, and the errors a user can cause."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from ckptscope.errors import CkptscopeError
from ckptscope.profile import CELL_COLUMNS, SUMMARY_COLUMNS, ProfileError, compute_profile, memorization_profile

GRID = np.arange(0, 90, 10)  # 9 checkpoints, regular, so event time e <-> e/10 checkpoints


def planted(k: int) -> float:
    """True effect of training on surprisal k checkpoints after the cohort's: -0.5, decaying to -0.1."""
    return -(0.1 + 0.4 * 0.5**k)


def synth(rng: np.random.Generator, steps: np.ndarray, cohorts: list[tuple[int, int]], n_heldout: int,
          effect=planted, noise: float = 0.3) -> pl.DataFrame:
    """A balanced sequence_stats panel: sequence level + common trend + planted effect + noise.

    `cohorts` lists (first_seen_step, count). The effect applies from the first checkpoint at or
    after first_seen_step, k checkpoints later being effect(k).
    """
    ids, split, first, ys = [], [], [], []
    trend = 0.3 * np.exp(-steps / 40.0)
    for fss, count in cohorts + [(None, n_heldout)]:
        for _ in range(count):
            y = rng.normal(3.0, 0.5) + trend + rng.normal(0.0, noise, len(steps))
            if fss is not None:
                g = int(np.searchsorted(steps, fss))
                for t in range(g, len(steps)):
                    y[t] += effect(t - g)
            ids.append(f"{'heldout' if fss is None else 'train'}:{len(ids)}")
            split.append("heldout" if fss is None else "train")
            first.append(fss)
            ys.append(y)
    n = len(ids)
    return pl.DataFrame({
        "model": ["m"] * (n * len(steps)),
        "step": np.tile(steps, n).astype(np.int64),
        "sequence_id": np.repeat(ids, len(steps)),
        "split": np.repeat(split, len(steps)),
        "first_seen_step": pl.Series(np.repeat(np.array(first, dtype=object), len(steps)).tolist(), dtype=pl.Int64),
        "sup_seq": np.concatenate(ys),
        "acc_seq": rng.uniform(0, 1, n * len(steps)),
    }).sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1 << 31)))  # row order must not matter


def direct_att(stats: pl.DataFrame, outcome: str, control: str) -> dict[tuple[int, int], tuple[float, float, int, int]]:
    """ATT(g,t), SE, n_T, n_C by the methods-2 §2 formulas, looping over cohorts and checkpoints."""
    steps = sorted(set(stats["step"].to_list()))
    series: dict[str, dict[int, float]] = {}
    meta: dict[str, tuple[str, int | None]] = {}
    for row in stats.iter_rows(named=True):
        series.setdefault(row["sequence_id"], {})[row["step"]] = row[outcome]
        meta[row["sequence_id"]] = (row["split"], row["first_seen_step"])
    cohort_of: dict[str, float] = {}
    for sid, (split, fss) in meta.items():
        if split == "heldout":
            cohort_of[sid] = math.inf
        else:
            later = [s for s in steps if s >= fss]
            cohort_of[sid] = later[0] if later else fss  # beyond the last checkpoint: never within the panel
    cohorts = sorted({c for sid, c in cohort_of.items() if meta[sid][0] == "train" and c <= steps[-1]})
    out = {}
    for g in cohorts:
        for pos, t in enumerate(steps):
            if pos == 0:
                continue
            base = steps[steps.index(g) - 1] if t >= g else steps[pos - 1]
            treated = [sid for sid, c in cohort_of.items() if c == g]
            if control == "heldout":
                controls = [sid for sid in cohort_of if meta[sid][0] == "heldout"]
            else:
                controls = [sid for sid, c in cohort_of.items() if c > max(t, base) and c != g]
            if not controls:
                continue
            d_t = np.array([series[s][t] - series[s][base] for s in treated])
            d_c = np.array([series[s][t] - series[s][base] for s in controls])
            att = d_t.mean() - d_c.mean()
            se = math.sqrt(d_t.var() / len(d_t) + d_c.var() / len(d_c))
            out[(g, t)] = (att, se, len(d_t), len(d_c))
    return out


def small_panel(seed: int, heldout: int = 40, late: int = 6) -> pl.DataFrame:
    """Irregular grid, unequal cohorts, sequences first seen after the last checkpoint."""
    rng = np.random.default_rng(seed)
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64])
    cohorts = [(1, 5), (3, 7), (4, 6), (9, 8), (20, 5), (30, 4), (33, 9), (100, late)]
    return synth(rng, steps, cohorts, heldout)


@pytest.mark.parametrize("control", ["heldout", "not-yet-treated"])
@pytest.mark.parametrize("outcome", ["sup_seq", "acc_seq"])
def test_att_equals_direct_loop(control: str, outcome: str) -> None:
    stats = small_panel(3)
    cells = memorization_profile(stats, outcome=outcome, control=control)
    assert tuple(cells.columns) == CELL_COLUMNS
    expected = direct_att(stats, outcome, control)
    assert len(cells) == len(expected)
    for row in cells.iter_rows(named=True):
        att, se, n_t, n_c = expected[(row["cohort_step"], row["step"])]
        assert row["att"] == pytest.approx(att, abs=1e-12)
        assert row["se"] == pytest.approx(se, abs=1e-12)
        assert (row["n_treated"], row["n_control"]) == (n_t, n_c)
        assert row["event_time"] == row["step"] - row["cohort_step"]
        assert row["ci_low"] == pytest.approx(att - 1.959963984540054 * se, abs=1e-12)


def test_not_yet_treated_without_heldout_drops_cells_without_controls() -> None:
    stats = small_panel(4, heldout=0, late=0)
    cells = memorization_profile(stats, control="not-yet-treated")
    expected = direct_att(stats, "sup_seq", "not-yet-treated")
    assert set(zip(cells["cohort_step"], cells["step"])) == set(expected)
    # cohorts are at steps 1, 4, 16, 32, 64: at step 64 no sequence is still untreated
    assert cells["step"].max() == 32 and 64 in cells["cohort_step"].to_list()


@pytest.mark.filterwarnings("ignore")  # pandas deprecations inside `differences`
@pytest.mark.parametrize("control,dcontrol", [("heldout", "never_treated"), ("not-yet-treated", "not_yet_treated")])
def test_agrees_with_differences_package(control: str, dcontrol: str) -> None:
    differences = pytest.importorskip("differences")
    stats = small_panel(5)
    result = compute_profile(stats, control=control)
    steps = np.sort(stats["step"].unique().to_numpy())
    pdf = stats.to_pandas()
    if control == "heldout":
        # `differences` counts sequences first seen after the panel as never treated; --control
        # heldout uses the heldout split only, so they are left out of its input.
        pdf = pdf[~((pdf["split"] == "train") & (pdf["first_seen_step"] > steps[-1]))]
    idx = np.searchsorted(steps, pdf["first_seen_step"].fillna(-1).to_numpy())
    cohort = np.where(idx < len(steps), steps[np.minimum(idx, len(steps) - 1)], pdf["first_seen_step"].to_numpy())
    pdf["cohort"] = np.where(pdf["split"] == "heldout", np.nan, cohort)
    att_gt = differences.ATTgt(data=pdf.set_index(["sequence_id", "step"])[["cohort", "sup_seq"]], cohort_column="cohort",
                               base_period="varying")
    fit = att_gt.fit("sup_seq", est_method="reg", control_group=dcontrol, progress_bar=False)

    def flat(frame):
        frame = frame.copy()
        frame.columns = frame.columns.droplevel([0, 1])
        return frame

    ref = flat(fit.to_pandas()).reset_index()
    ours = {(g, t): (a, s) for g, t, a, s in result.cells.select("cohort_step", "step", "att", "se").iter_rows()}
    assert len(ref) == len(ours)
    for g, t, att, se in zip(ref["cohort"], ref["time"], ref["ATT"], ref["std_error"]):
        assert ours[(int(g), int(t))][0] == pytest.approx(att, abs=1e-8)
        assert ours[(int(g), int(t))][1] == pytest.approx(se, abs=1e-8)

    event = flat(fit.aggregate("event"))
    persistent = result.summary.filter(pl.col("kind") == "persistent")
    for e, att, se in persistent.select("event_time", "att", "se").iter_rows():
        assert att == pytest.approx(event.loc[e, "ATT"], abs=1e-8)
        assert se == pytest.approx(event.loc[e, "std_error"], abs=1e-8)
    time_agg = flat(fit.aggregate("time"))
    residual = result.summary.filter(pl.col("kind") == "residual").row(0, named=True)
    assert residual["step"] == steps[-1]
    assert residual["att"] == pytest.approx(time_agg.loc[steps[-1], "ATT"], abs=1e-8)
    assert residual["se"] == pytest.approx(time_agg.loc[steps[-1], "std_error"], abs=1e-8)


def regular_panel(seed: int, per_cohort: int = 30, heldout: int = 120) -> pl.DataFrame:
    """8 cohorts on a regular grid: cohort step 10c holds sequences first seen in (10(c-1), 10c]."""
    rng = np.random.default_rng(seed)
    return synth(rng, GRID, [(10 * c - int(rng.integers(0, 10)), per_cohort) for c in range(1, 9)], heldout)


def truth(cells: pl.DataFrame) -> np.ndarray:
    k = (cells["event_time"].to_numpy() // 10)
    return np.where(k >= 0, [planted(int(x)) for x in np.maximum(k, 0)], 0.0)


def test_planted_effect_recovered_with_sign_and_magnitude() -> None:
    result = compute_profile(regular_panel(11, per_cohort=400, heldout=1500))
    cells = result.cells
    post = cells.filter(pl.col("event_time") >= 0)
    err = post["att"].to_numpy() - truth(post)
    assert np.all(post["att"].to_numpy() < 0)  # training lowers surprisal at every post cell
    assert np.max(np.abs(err)) < 0.08  # SE per cell ~0.02; 36 cells
    pre = cells.filter(pl.col("event_time") < 0)
    assert np.max(np.abs(pre["att"].to_numpy())) < 0.08  # no anticipation: placebo cells near 0
    summary = result.summary
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    inst = summary.filter(pl.col("kind") == "instantaneous").row(0, named=True)
    assert inst["att"] == pytest.approx(-0.5, abs=0.03) and inst["n_cohorts"] == 8
    persistent = summary.filter(pl.col("kind") == "persistent").sort("event_time")
    assert persistent["event_time"].to_list() == list(range(0, 80, 10))
    expected = [planted(e // 10) for e in persistent["event_time"]]
    assert np.allclose(persistent["att"].to_numpy(), expected, atol=0.05)
    residual = summary.filter(pl.col("kind") == "residual").row(0, named=True)
    # residual at step 80: cohorts 10..80 weighted by size (all equal) -> mean of planted(7..0)
    assert residual["att"] == pytest.approx(np.mean([planted(k) for k in range(8)]), abs=0.03)


def test_intervals_cover_the_planted_truth_at_the_nominal_rate() -> None:
    """Across 200 independent panels, pointwise 95% intervals cover the truth in 95% +- 2.5% of cells."""
    covered, total, summary_cov, summary_total = 0, 0, 0, 0
    for rep in range(200):
        result = compute_profile(regular_panel(1000 + rep))
        cells = result.cells
        truth_v = truth(cells)
        covered += int(np.sum((cells["ci_low"].to_numpy() <= truth_v) & (truth_v <= cells["ci_high"].to_numpy())))
        total += len(cells)
        persistent = result.summary.filter(pl.col("kind") == "persistent")
        true_e = np.array([planted(e // 10) for e in persistent["event_time"]])
        summary_cov += int(np.sum((persistent["ci_low"].to_numpy() <= true_e) & (true_e <= persistent["ci_high"].to_numpy())))
        summary_total += len(persistent)
    assert 0.925 <= covered / total <= 0.975, covered / total
    assert 0.92 <= summary_cov / summary_total <= 0.98, summary_cov / summary_total


def test_bootstrap_simultaneous_bands_cover_all_cells_jointly() -> None:
    """Sup-t bands cover all 64 cells of a panel at once in about 95% of panels (80 panels: >= 86%).

    Cohorts of 150: with 30 per cohort the normal approximation's tails are too thin for a
    64-cell maximum and joint coverage drops to about 84% (pointwise coverage is still nominal).
    """
    joint, ratios = 0, []
    for rep in range(80):
        stats = regular_panel(7000 + rep, per_cohort=150, heldout=600)
        boot = memorization_profile(stats, bootstrap=199, seed=rep)
        truth_v = truth(boot)
        joint += bool(np.all((boot["ci_low"].to_numpy() <= truth_v) & (truth_v <= boot["ci_high"].to_numpy())))
        ratios.append(np.median(boot["se"].to_numpy() / memorization_profile(stats)["se"].to_numpy()))
    assert joint / 80 >= 0.86, joint / 80
    assert 0.9 <= np.median(ratios) <= 1.1  # the bootstrap SE estimates the same quantity


def test_bootstrap_reproducible_with_seed() -> None:
    stats = small_panel(8)
    a = compute_profile(stats, control="not-yet-treated", bootstrap=50, seed=7)
    b = compute_profile(stats, control="not-yet-treated", bootstrap=50, seed=7)
    c = compute_profile(stats, control="not-yet-treated", bootstrap=50, seed=8)
    assert a.cells.equals(b.cells) and a.summary.equals(b.summary)
    assert not np.allclose(a.cells["se"].to_numpy(), c.cells["se"].to_numpy())
    assert np.array_equal(a.cells["att"].to_numpy(), c.cells["att"].to_numpy())  # only intervals are resampled
    analytic = compute_profile(stats, control="not-yet-treated")
    assert np.array_equal(a.cells["att"].to_numpy(), analytic.cells["att"].to_numpy())
    half = (a.cells["ci_high"] - a.cells["ci_low"]).to_numpy() / 2 / a.cells["se"].to_numpy()
    assert np.allclose(half, half[0]) and half[0] > 1.96  # one simultaneous critical value, above pointwise
    # the cells' draws (suffix sums over not-yet-treated groups, pre-period cells too) estimate the analytic SE
    pre = (a.cells["event_time"] < 0).to_numpy()
    ratio = a.cells["se"].to_numpy() / analytic.cells["se"].to_numpy()
    assert 0.8 <= np.median(ratio[pre]) <= 1.2 and 0.8 <= np.median(ratio[~pre]) <= 1.2
    assert 0.7 <= np.median(a.summary["se"].to_numpy() / analytic.summary["se"].to_numpy()) <= 1.3


def _edit(stats: pl.DataFrame, expr) -> pl.DataFrame:
    return stats.with_columns(expr)


ERRORS = [
    ("no heldout", lambda s: s.filter(pl.col("split") != "heldout"), {}, "no heldout sequences"),
    ("single checkpoint", lambda s: s.filter(pl.col("step") == 0), {}, "single checkpoint"),
    ("unknown outcome", lambda s: s, {"outcome": "loss"}, "unknown outcome 'loss'"),
    ("missing column", lambda s: s.drop("sup_seq"), {}, "lacks column"),
    ("unknown control", lambda s: s, {"control": "never"}, "unknown control group"),
    ("few draws", lambda s: s, {"bootstrap": 5}, "at least 10"),
    ("no pre-period", lambda s: s.filter(pl.col("step") > 0), {}, "no pre-treatment checkpoint"),
    ("unbalanced", lambda s: s.filter(~((pl.col("sequence_id") == "train:0") & (pl.col("step") == 8))), {}, "unbalanced"),
    ("duplicate", lambda s: pl.concat([s.filter(~((pl.col("sequence_id") == "train:0") & (pl.col("step") == 8))),
                                       s.filter((pl.col("sequence_id") == "train:0") & (pl.col("step") == 4))]), {}, "2 rows at step 4"),
    ("null outcome", lambda s: _edit(s, pl.when(pl.col("step") == 4).then(None).otherwise(pl.col("sup_seq")).alias("sup_seq")), {}, "missing or non-finite"),
    ("nan outcome", lambda s: _edit(s, pl.when(pl.col("step") == 4).then(float("nan")).otherwise(pl.col("sup_seq")).alias("sup_seq")), {}, "missing or non-finite"),
    ("two models", lambda s: _edit(s, pl.when(pl.col("step") == 4).then(pl.lit("x")).otherwise(pl.col("model")).alias("model")), {}, "2 models"),
    ("seen heldout", lambda s: _edit(s, pl.col("first_seen_step").fill_null(3)), {}, "must be never trained on"),
    ("unseen train", lambda s: _edit(s, pl.when(pl.col("sequence_id") == "train:0").then(None).otherwise(pl.col("first_seen_step")).alias("first_seen_step")), {}, "no first_seen_step"),
    ("bad split", lambda s: _edit(s, pl.col("split").replace("heldout", "validation")), {"control": "not-yet-treated"}, "split 'validation'"),
    ("no cohort", lambda s: _edit(s, pl.col("first_seen_step") + 1000), {}, "no cohort"),
    ("empty", lambda s: s.clear(), {}, "no rows"),
]


@pytest.mark.parametrize("name,edit,kwargs,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_unusable_input_is_a_one_line_error(name, edit, kwargs, message) -> None:
    stats = edit(small_panel(9))
    with pytest.raises(ProfileError, match=message) as info:
        compute_profile(stats, **kwargs)
    assert isinstance(info.value, CkptscopeError)
    assert "\n" not in str(info.value)
