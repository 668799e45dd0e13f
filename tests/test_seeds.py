"""Seed groups, seed_metrics, the Multi-Bootstrap and training phases, on a real seed group.

The group is trained by scripts/make_seed_suite.py (3 seeds of the demo model, 32 steps) and
ingested through the real pipeline with the weights and memorization analyzers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ckptscope.errors import CkptscopeError
from ckptscope.phases import fit_phases
from ckptscope.pipeline import ingest
from ckptscope.rows import CheckpointRows, ModelRow, RunRows
from ckptscope.seeds import boot_means, groups, seed_draws, seed_intervals
from ckptscope.sources.catalog import resolve
from ckptscope.store.db import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_seed_suite import make_seed_suite  # noqa: E402

SEEDS = (1, 2, 3)
STEPS = (0, 1, 2, 4, 8, 16, 32)


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    runs = make_seed_suite(root / "runs", SEEDS, train_steps=32, steps=STEPS)
    store = root / "seeds.duckdb"
    for seed, run in runs.items():
        ingest(run, store=store, name=f"seed{seed}", group="demo-seeds", seed=seed, tokens_per_step=512,
               analyzers="weights", spectrum="fast")
        ingest(run, store=store, name=f"seed{seed}", analyzers="memorization", corpus=root / "runs" / "canaries.jsonl",
               steps="0,8,32")
    ingest(runs[1], store=store, name="loner", analyzers="weights", spectrum="fast", steps="0,32")  # no group, no tokens
    return store


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ckptscope", *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})


def test_groups_and_membership(seed_store: Path) -> None:
    g = groups(seed_store)
    assert g.row(0, named=True) == {"group_name": "demo-seeds", "seeds": 3, "models": "seed1 (seed 1), seed2 (seed 2), seed3 (seed 3)",
                                    "common_steps": len(STEPS)}
    ls = _cli("ls", "--store", str(seed_store))
    assert ls.returncode == 0 and "demo-seeds" in ls.stdout
    # a seed already taken is refused before anything is written; so is --seed without --group
    before = seed_store.read_bytes()
    taken = _cli("ingest", str(seed_store.parent / "runs" / "seed1"), "--name", "other", "--group", "demo-seeds", "--seed", "2",
                 "--store", str(seed_store))
    assert taken.returncode == 1 and "already has seed 2 (model seed2)" in taken.stderr and "Traceback" not in taken.stderr
    alone = _cli("ingest", str(seed_store.parent / "runs" / "seed1"), "--seed", "2", "--store", str(seed_store))
    assert alone.returncode == 1 and "--seed needs --group GROUP" in alone.stderr
    assert seed_store.read_bytes() == before


def test_catalog_groups_seed_replicates() -> None:
    assert (resolve("pythia-160m-seed3").group, resolve("pythia-160m-seed3").seed) == ("polypythia-160m", 3)
    assert (resolve("pythia-160m").group, resolve("pythia-160m").seed) == ("polypythia-160m", 1234)
    assert resolve("pythia-160m-deduped").group is None
    assert (resolve("pythia-160m-data-seed2").group, resolve("multiberts-seed_4").seed) == ("polypythia-160m-data", 4)
    assert (resolve("durin-gpt2-medium-x343").group, resolve("durin-gpt2-medium-x343").seed) == ("crfm-gpt2-medium", 343)
    out = _cli("suites", "crfm-gpt2")
    assert out.returncode == 0 and "crfm-gpt2-small seed 21" in out.stdout


def test_seed_metrics_equal_numpy(seed_store: Path) -> None:
    with Store(seed_store, read_only=True) as db:
        view = db.sql("SELECT * FROM seed_metrics WHERE metric = 'frobenius_norm' ORDER BY step, tensor, component")
        raw = db.sql("SELECT m.seed, v.step, v.tensor, v.component, v.value FROM metric_values v JOIN models m USING (model) "
                     "WHERE m.group_name = 'demo-seeds' AND v.metric = 'frobenius_norm'")
    assert view.height and set(view["step"]) == set(STEPS) and set(view["n_seeds"]) == {3}
    for row in view.iter_rows(named=True):
        x = raw.filter((pl.col("step") == row["step"]) & (pl.col("tensor") == row["tensor"])
                       & (pl.col("component") == row["component"])).sort("seed")["value"].to_numpy()
        assert len(x) == 3
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12) and row["std"] == pytest.approx(x.std(ddof=1), rel=1e-9)
        assert (row["min"], row["max"]) == (x.min(), x.max())
        assert row["tokens"] == row["step"] * 512
    api = seed_intervals("demo-seeds", "frobenius_norm", store=seed_store, nboot=0)
    joined = api.join(view, on=["step", "tensor", "component"], suffix="_view")
    assert joined.height == view.height
    assert np.allclose(joined["mean"], joined["mean_view"], rtol=1e-12) and np.allclose(joined["std"], joined["std_view"], rtol=1e-9)


def test_intervals_reproduce_with_a_seed(seed_store: Path) -> None:
    # the loss varies across seeds and sequences (the score may be 0 everywhere, the same for any seed)
    args = ("seeds", "demo-seeds", "--metric", "memorization.loss", "--store", str(seed_store), "--format", "csv", "--bootstrap", "200")
    a, b, c = _cli(*args, "--seed", "7"), _cli(*args, "--seed", "7"), _cli(*args, "--seed", "8")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout
    df = pl.read_csv(a.stdout.encode())
    assert df["step"].to_list() == [0, 8, 32] and set(df["n_sequences"]) == {4}
    assert (df["low"] <= df["mean"] + 1e-12).all() and (df["mean"] <= df["high"] + 1e-12).all()


def test_per_sequence_bootstrap_resamples_seeds_and_sequences(seed_store: Path) -> None:
    """The statistic of one resample equals the plain mean over the resampled seeds and sequences."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 7))
    seeds, seqs = seed_draws(rng, 50, 5), seed_draws(rng, 50, 7)
    stats = boot_means(v, seeds, seqs)
    for b in range(50):
        rows = np.repeat(np.arange(5), seeds[b].astype(int))
        cols = np.repeat(np.arange(7), seqs[b].astype(int))
        assert stats[b] == pytest.approx(v[np.ix_(rows, cols)].mean())


def test_intervals_cover_the_true_mean_at_the_nominal_rate(tmp_path: Path) -> None:
    """20 seeds, each cell's values drawn from N(mu_layer, 1), written through Store.write_checkpoint: the
    95% Multi-Bootstrap interval of the seed mean must cover mu in 95% of 400 independent cells, within
    4 percentage points (the binomial s.e. is 1.1 points; percentile intervals run about 1 point narrow
    at n = 20)."""
    rng = np.random.default_rng(1)
    store = tmp_path / "synthetic.duckdb"
    n_seeds, steps, layers = 20, 4, 100
    mu = rng.normal(size=layers)
    with Store(store) as db:
        for k in range(n_seeds):
            for step in range(steps):
                run = RunRows("weights", "1", {}, "float64", "numpy")
                values = mu + rng.normal(size=layers)
                for layer in range(layers):
                    run.add_metrics(f"l{layer}.w", layer, "mlp.in", {"synthetic": values[layer]})
                db.write_checkpoint(CheckpointRows(f"m{k}", step, None, f"step{step}", "synthetic", None,
                                                   {"tensor": [], "layer": [], "component": [], "shape": [], "dtype": []}, [run]),
                                    model=ModelRow("synthetic", "unknown", layers, None, None, None, group_name="g", seed=k))
    df = seed_intervals("g", "synthetic", store=store, nboot=1000, seed=0)
    assert df.height == steps * layers
    truth = mu[df["layer"].to_numpy()]
    covered = ((df["low"].to_numpy() <= truth) & (truth <= df["high"].to_numpy())).mean()
    assert abs(covered - 0.95) < 0.04, covered
    with pytest.raises(CkptscopeError, match="tokens seen are unknown for m0"):
        seed_intervals("g", "synthetic", store=store, axis="tokens")


def test_compare_groups_difference_and_p(tmp_path: Path) -> None:
    """Two groups whose means differ by 1 at every cell: the interval of the difference holds 1 and p is tiny;
    a group against itself shifted by 0 gives a p far from 0."""
    rng = np.random.default_rng(2)
    store = tmp_path / "two.duckdb"
    with Store(store) as db:
        for name, shift in (("a", 0.0), ("b", 1.0), ("c", 0.0)):
            for k in range(10):
                for step in (0, 10, 20):
                    run = RunRows("weights", "1", {}, "float64", "numpy")
                    run.add_metrics("w", 0, "mlp.in", {"x": shift + 0.3 * rng.normal()})
                    db.write_checkpoint(CheckpointRows(f"{name}{k}", step, step * 100, f"step{step}", "s", None,
                                                       {"tensor": [], "layer": [], "component": [], "shape": [], "dtype": []}, [run]),
                                        model=ModelRow("s", "unknown", 1, None, 100, None, group_name=name, seed=k))
    ab = seed_intervals("a", "x", store=store, compare="b", nboot=2000, seed=0, axis="tokens")
    assert ab.height == 3 and (ab["low"] < 1).all() and (ab["high"] > 1).all() and (ab["low"] > 0.5).all()
    assert (ab["p"] == 1 / 2000).all() and set(ab["paired"]) == {"none"}
    direct = ab["mean_compare"] - ab["mean"]
    assert np.allclose(ab["difference"], direct)
    ac = seed_intervals("a", "x", store=store, compare="c", nboot=2000, seed=0, paired_seeds=True)
    assert set(ac["paired"]) == {"seeds"} and (ac["p"] > 0.01).all()


def test_tokens_axis_says_when_tokens_are_missing(seed_store: Path) -> None:
    with Store(seed_store) as db:
        db.set_group("loner", "lonely", 0)
    out = _cli("seeds", "lonely", "--metric", "frobenius_norm", "--axis", "tokens", "--bootstrap", "0", "--store", str(seed_store))
    assert out.returncode == 1 and "tokens seen are unknown for loner" in out.stderr and "--tokens-per-step" in out.stderr
    ok = _cli("seeds", "demo-seeds", "--metric", "frobenius_norm", "--axis", "progress", "--bootstrap", "0", "--format", "json",
              "--store", str(seed_store))
    rows = json.loads(ok.stdout)
    assert {r["progress"] for r in rows} == {s / 32 for s in STEPS}


def test_phases_recover_a_planted_two_regime_sequence(tmp_path: Path) -> None:
    """Three seeds whose metrics switch regime at step 36 of 60: the HMM finds two states, split there."""
    rng = np.random.default_rng(3)
    store = tmp_path / "phases.duckdb"
    with Store(store) as db:
        for k in range(3):
            for step in range(60):
                run = RunRows("weights", "1", {}, "float64", "numpy")
                level = 0.0 if step < 36 else 3.0
                for layer in range(2):
                    run.add_metrics(f"l{layer}", layer, "mlp.in", {"a": level + 0.3 * rng.normal(), "b": -level + 0.3 * rng.normal()})
                db.write_checkpoint(CheckpointRows(f"s{k}", step, None, f"step{step}", "s", None,
                                                   {"tensor": [], "layer": [], "component": [], "shape": [], "dtype": []}, [run]),
                                    model=ModelRow("s", "unknown", 2, None, None, None, group_name="planted", seed=k))
    first = fit_phases("planted", store=store, metrics=["a", "b"], max_states=4, seed=0)
    assert first["state"].n_unique() == 2
    for (_,), part in first.group_by(["model"]):
        part = part.sort("step")
        early, late = part.filter(pl.col("step") < 36)["state"], part.filter(pl.col("step") >= 36)["state"]
        assert early.n_unique() == 1 and late.n_unique() == 1 and early[0] != late[0]
    with Store(store, read_only=True) as db:
        stored = db.sql("SELECT model, step, state, probability FROM training_phases ORDER BY model, step")
        runs = db.sql("SELECT model, step, parameters FROM runs WHERE analyzer = 'phases' ORDER BY model")
    assert stored.equals(first.sort("model", "step"))
    assert runs["step"].to_list() == [59, 59, 59] and json.loads(runs["parameters"][0])["n_states"] == 2
    again = fit_phases("planted", store=store, metrics=["a", "b"], max_states=4, seed=0)
    assert again.equals(first)


def test_phase_features_are_means_over_whole_matrices(seed_store: Path, tmp_path: Path) -> None:
    """circuits' per-head rows share metric names with weights' (stable_rank, ...): the features
    average whole matrices only, never the heads pooled in."""
    from ckptscope.phases import features

    store = tmp_path / "heads.duckdb"
    ingest(seed_store.parent / "runs" / "seed1", store=store, name="m", analyzers="weights,circuits", steps="0,32")
    with Store(store, read_only=True) as db:
        got = features(db, ["m"], ("stable_rank", "frobenius_norm"))
        want = db.sql("SELECT step, avg(value) FILTER (WHERE metric = 'stable_rank') AS stable_rank, "
                      "avg(value) FILTER (WHERE metric = 'frobenius_norm') AS frobenius_norm FROM metric_values "
                      "WHERE run_id IN (SELECT run_id FROM runs WHERE analyzer = 'weights') AND layer IS NOT NULL "
                      "GROUP BY step ORDER BY step")
        heads = db.sql("SELECT count(*) FROM metric_values WHERE head IS NOT NULL AND metric = 'stable_rank'").item()
    assert heads > 0
    assert got.select("step", "stable_rank", "frobenius_norm").rows() == pytest.approx(want.rows(), rel=1e-12)


def test_phases_on_the_real_group(seed_store: Path) -> None:
    out = _cli("phases", "demo-seeds", "--store", str(seed_store))
    assert out.returncode == 0, out.stderr
    with Store(seed_store, read_only=True) as db:
        assert db.sql("SELECT count(*) AS n FROM training_phases").item() == 3 * len(STEPS)
    bad = _cli("phases", "nothing", "--store", str(seed_store))
    assert bad.returncode == 1 and "neither a seed group nor a model" in bad.stderr
