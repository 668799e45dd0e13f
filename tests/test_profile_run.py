"""`analyze profile`: the memorisation profile read from stored sequence_stats, written back with provenance."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ckptscope.analyzers.sequence_stats import SequenceStatsAnalyzer
from ckptscope.cli import main
from ckptscope.profile import compute_profile
from ckptscope.rows import CheckpointRows, ModelRow, RunRows
from ckptscope.store.db import Store

STEPS = [0, 1, 2, 4, 8]


def planted(seed: int = 0) -> pl.DataFrame:
    """Surprisal that drops by 0.5 for a cohort at the checkpoint after it was trained on, then 0.1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(160):
        split = "heldout" if i >= 120 else "train"
        first = None if split == "heldout" else [1, 2, 3, 5, 7, 8][i % 6]
        cohort = None if first is None else min(s for s in STEPS if s >= first)
        base = 5 + rng.normal(0, 0.3)
        for t in STEPS:
            effect = 0.0 if cohort is None or t < cohort else (0.5 if t == cohort else 0.1)
            rows.append({"sequence_id": f"{split}:{i}", "step": t, "split": split, "first_seen_step": first,
                         "sup_seq": base - 0.2 * np.log1p(t) - effect + rng.normal(0, 0.05)})
    return pl.DataFrame(rows)


@pytest.fixture()
def store(tmp_path):
    """A store with a model whose sequence_stats rows are the planted panel, written as the analyzer would."""
    path = tmp_path / "s.duckdb"
    stats = planted()
    table = SequenceStatsAnalyzer.tables[0]
    with Store(path) as db:
        for i, step in enumerate(STEPS):
            part = stats.filter(pl.col("step") == step)
            run = RunRows("sequence_stats", "1.0.0", {"corpus": "c.parquet"}, "float32", "test")
            run.tables[table.name] = {c: part[c].to_list() for c in ("sequence_id", "split", "first_seen_step", "sup_seq")}
            run.tables[table.name].update({c: [0.0] * part.height for c in ("acc_seq", "avg_rank", "entr_seq")})
            run.tables[table.name]["tokens"] = [64] * part.height
            model = ModelRow("test", "gpt_neox", 1, 10, None, None) if i == 0 else None
            db.write_checkpoint(CheckpointRows("m", step, None, f"step{step}", "test", f"{step:064d}", {"tensor": []}, [run]),
                                model=model, tables=[("sequence_stats", table)])
    return path, stats


def test_profile_is_stored_with_provenance_and_replaced_by_its_own_kind(store):
    path, stats = store
    res = CliRunner().invoke(main, ["analyze", "profile", "m", "--store", str(path)])
    assert res.exit_code == 0, res.output
    assert "instantaneous ATT -0.5" in res.output or "instantaneous ATT -0.4" in res.output
    expected = compute_profile(stats.select("sequence_id", "step", "split", "first_seen_step", "sup_seq"))
    with Store(path, read_only=True) as db:
        cells = db.sql("SELECT cohort_step, step, event_time, att, se, ci_low, ci_high, n_treated, n_control "
                       "FROM memorization_profile ORDER BY cohort_step, step")
        summary = db.sql("SELECT kind, event_time, at_step, att FROM memorization_profile_summary "
                         "WHERE kind = 'instantaneous'")
        runs = db.sql("SELECT step, version, parameters FROM runs WHERE analyzer = 'profile'")
    want = expected.cells.sort("cohort_step", "step")
    assert cells["att"].to_list() == pytest.approx(want["att"].to_list(), rel=1e-12)
    assert cells["n_treated"].to_list() == want["n_treated"].to_list()
    assert summary["att"].item() == pytest.approx(-0.5, abs=0.05)
    params = json.loads(runs["parameters"].item())
    assert runs["step"].item() == 8 and params["outcome"] == "sup_seq" and params["control"] == "heldout"
    assert params["sequences"] == 160 and params["checkpoints"] == 5
    # The same profile again replaces it; another control group is kept beside it.
    for control in ("heldout", "not-yet-treated"):
        res = CliRunner().invoke(main, ["analyze", "profile", "m", "--store", str(path), "--control", control])
        assert res.exit_code == 0, res.output
    with Store(path, read_only=True) as db:
        per = db.sql("SELECT control, count(DISTINCT run_id) AS runs FROM memorization_profile GROUP BY control ORDER BY control")
    assert per.rows() == [("heldout", 1), ("not-yet-treated", 1)]


def test_profile_errors_leave_the_store_untouched(store, tmp_path):
    path, _ = store
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for args, fragment in ((["nosuch"], "model 'nosuch' is not in"), (["m", "--bootstrap", "3"], "--bootstrap 3"),
                           (["m", "--outcome", "loss"], "Invalid value for '--outcome'")):
        res = CliRunner().invoke(main, ["analyze", "profile", *args, "--store", str(path)])
        assert res.exit_code != 0 and fragment in res.output, res.output
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    empty = tmp_path / "e.duckdb"
    Store(empty).close()
    res = CliRunner().invoke(main, ["analyze", "profile", "m", "--store", str(empty)])
    assert res.exit_code == 1 and "not in" in res.output
