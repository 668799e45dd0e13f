"""End-to-end ingestion of local runs: stored values against an independent float64 computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.cli import main
from runs import neox_state, trajectory, write_checkpoint, write_run

STEPS = [0, 1, 2, 4, 8]
QKV = "gpt_neox.layers.1.attention.query_key_value.weight"


@pytest.fixture(scope="module")
def neox():
    state, config = neox_state()
    return trajectory(state, STEPS), config


@pytest.fixture(scope="module")
def ingested(neox, tmp_path_factory):
    states, config = neox
    root = write_run(tmp_path_factory.mktemp("run") / "neox", states, config)
    store = root.parent / "store.duckdb"
    report = ckptscope.ingest(root, store=store, tokens_per_step=2048)
    return root, store, report


def metric_table(store: Path, where: str = "true") -> dict[tuple, float]:
    """Whole-matrix rows (per-head circuit rows share a tensor and component across heads)."""
    with ckptscope.Store(store, read_only=True) as db:
        df = db.sql(f"SELECT step, tensor, component, metric, value FROM metrics WHERE head IS NULL AND ({where})")
    return {(r[0], r[1], r[2], r[3]): r[4] for r in df.iter_rows()}


def ref_rank_norm(w: np.ndarray, rtol: float = 1e-3) -> dict[str, float]:
    """Plain float64 definitions, independent of ckptscope."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    fro = math.sqrt(float((s**2).sum()))
    out = {"frobenius_norm": fro, "spectral_norm": float(s[0]) if s.size else 0.0,
           "numerical_rank": float((s > rtol * s[0]).sum()) if s[0] > 0 else 0.0}
    total, cum, k = float((s**2).sum()), 0.0, 0
    while total > 0 and cum < 0.99 * total:
        cum += s[k] ** 2
        k += 1
    out["energy_rank_99"] = float(k)
    if s[0] > 0:
        out["stable_rank"] = fro**2 / s[0] ** 2
        p = s[s > 0] / s[s > 0].sum()
        out["effective_rank"] = math.exp(-float((p * np.log(p)).sum()))
    return out


def ref_alpha(sv: np.ndarray) -> float:
    """WeightWatcher's alpha: continuous power-law MLE on λ > 1e-5, x_min by minimum KS distance."""
    lam = np.sort(sv.astype(np.float64) ** 2)
    lam = lam[lam > 1e-5]
    best = (math.inf, math.nan)
    for i in range(len(lam) - 1):
        tail = lam[i:]
        n = len(tail)
        a = 1 + n / np.log(tail / lam[i]).sum()
        cdf = 1 - (tail / lam[i]) ** (1 - a)
        d = np.abs(cdf - np.arange(n) / n).max()
        if d < best[0]:
            best = (d, a)
    return best[1]


def load(root: Path, step: int) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(root / f"step{step}" / "model.safetensors")).items()}


def test_every_matrix_metric_matches_float64_reference(ingested):
    root, store, _ = ingested
    got = metric_table(store)
    first, final = load(root, 0), load(root, 8)
    checked = 0
    for idx, step in enumerate(STEPS):
        cur = load(root, step)
        prev = load(root, STEPS[idx - 1]) if idx else None
        for name, w in cur.items():
            if w.ndim != 2:
                continue
            comp = next(c for (s, t, c, m) in got if s == step and t == name and c not in ("attn.q", "attn.k", "attn.v"))
            want = ref_rank_norm(w)
            want["log_norm"] = math.log10(want["frobenius_norm"] ** 2)
            want["log_spectral_norm"] = math.log10(want["spectral_norm"] ** 2)
            want["alpha"] = ref_alpha(np.linalg.svd(w, compute_uv=False))
            want["alpha_weighted"] = want["alpha"] * want["log_spectral_norm"]
            want.update({f"delta_init_{k}": v for k, v in ref_rank_norm(w - first[name]).items()})
            want["delta_init_relative"] = np.linalg.norm(w - first[name]) / np.linalg.norm(first[name])
            if prev is not None:
                want.update({f"delta_prev_{k}": v for k, v in ref_rank_norm(w - prev[name]).items()})
                want["delta_prev_relative"] = np.linalg.norm(w - prev[name]) / np.linalg.norm(prev[name])
            f = final[name]
            want["final_cosine"] = float((w * f).sum() / (np.linalg.norm(w) * np.linalg.norm(f)))
            want["final_relative_distance"] = float(np.linalg.norm(w - f) / np.linalg.norm(f))
            for metric, value in want.items():
                key = (step, name, comp, metric)
                assert key in got, key
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
                checked += 1
    assert checked > 500


def test_vector_metrics_and_tokens(ingested):
    root, store, report = ingested
    assert report["step"].to_list() == STEPS
    got = metric_table(store, "step = 4")
    w = load(root, 4)["gpt_neox.final_layer_norm.weight"]
    for metric, value in {"l2_norm": np.linalg.norm(w), "mean": w.mean(), "std": w.std(), "max_abs": np.abs(w).max()}.items():
        assert got[(4, "gpt_neox.final_layer_norm.weight", "norm", metric)] == pytest.approx(value, rel=1e-12)
    with ckptscope.Store(store, read_only=True) as db:
        ck = db.sql("SELECT step, tokens FROM checkpoints ORDER BY step")
        assert ck["tokens"].to_list() == [s * 2048 for s in STEPS]
        spectra = db.sql(f"SELECT sv FROM spectra WHERE step = 2 AND tensor = '{QKV}' AND component = 'attn.qkv' AND kind = 'weight'")
        np.testing.assert_allclose(spectra["sv"][0].to_list(), np.linalg.svd(load(root, 2)[QKV], compute_uv=False), rtol=1e-10)
        prov = db.sql("SELECT DISTINCT analyzer, version, dtype, parameters->>'rtol' AS rtol FROM runs ORDER BY analyzer")
        assert prov.rows() == [(name, registry.discover()[name].cls.version, "float64", "0.001" if name == "weights" else None)
                               for name in sorted(registry.DEFAULT)]  # the default set; only weights has rtol
        dtypes = db.sql("SELECT DISTINCT dtype FROM tensors")["dtype"].to_list()
        assert dtypes == ["float16"]


def test_fused_qkv_parts_follow_neox_head_layout(ingested):
    root, store, _ = ingested
    got = metric_table(store, "step = 8")
    w = load(root, 8)[QKV]
    heads, d = 4, 32
    parts = w.reshape(heads, 3, d // heads, d)
    for i, comp in enumerate(("attn.q", "attn.k", "attn.v")):
        part = parts[:, i].reshape(d, d)
        assert got[(8, QKV, comp, "frobenius_norm")] == pytest.approx(np.linalg.norm(part), rel=1e-12)
        assert got[(8, QKV, comp, "spectral_norm")] == pytest.approx(np.linalg.svd(part, compute_uv=False)[0], rel=1e-10)


@pytest.mark.parametrize("fmt,shards", [("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_layouts_give_identical_rows(neox, ingested, tmp_path, fmt, shards):
    states, config = neox
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 4, 8)}, config, layout="checkpoint-{}", fmt=fmt, shards=shards)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, name="neox")
    got = metric_table(store, "metric NOT LIKE 'delta_prev%'")
    ref = metric_table(ingested[1], "step IN (0, 4, 8) AND metric NOT LIKE 'delta_prev%'")
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_planted_rank_update(tmp_path, rank):
    state, config = neox_state()
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    gen = torch.Generator().manual_seed(rank)
    later = dict(state)
    later[name] = state[name] + torch.randn(64, rank, generator=gen) @ torch.randn(rank, 32, generator=gen)
    root = write_run(tmp_path / "run", {0: state, 100: later}, config, dtype=torch.float32)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store)
    got = metric_table(store, "step = 100")
    assert got[(100, name, "mlp.in", "delta_init_numerical_rank")] == rank
    assert got[(100, name, "mlp.in", "delta_prev_numerical_rank")] == rank
    other = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    assert got[(100, other, "mlp.in", "delta_init_frobenius_norm")] == 0.0
    assert got[(100, other, "mlp.in", "delta_init_numerical_rank")] == 0


def test_duplicate_and_nan_are_flagged_not_fatal(neox, tmp_path):
    states, config = neox
    bad = dict(states[4])
    bad["gpt_neox.layers.0.attention.dense.weight"] = bad["gpt_neox.layers.0.attention.dense.weight"].clone()
    bad["gpt_neox.layers.0.attention.dense.weight"][0, :3] = float("nan")
    bad["gpt_neox.layers.0.attention.dense.weight"][1, 0] = float("inf")
    root = write_run(tmp_path / "run", {0: states[0], 2: states[2], 4: bad, 8: states[2]}, config)
    store = tmp_path / "s.duckdb"
    report = ckptscope.ingest(root, store=store)
    assert report.filter(report["step"] == 8)["duplicate_of"].to_list() == [2]
    with ckptscope.Store(store, read_only=True) as db:
        an = db.anomalies()
        assert sorted(an.select("step", "kind").rows()) == [  # weights says what is wrong, the others what they skipped
            (4, "circuits_skipped"), (4, "inf"), (4, "nan"), (4, "non_finite"), (8, "duplicate_checkpoint")]
        assert "3 of" in an.filter(an["kind"] == "nan")["detail"][0]
        assert db.sql("SELECT duplicate_of FROM checkpoints WHERE step = 8").item() == 2
        n = db.sql("SELECT count(*) FROM metrics WHERE step = 4 AND tensor = 'gpt_neox.layers.0.attention.dense.weight'").item()
        assert n == 0
        assert db.sql("SELECT count(DISTINCT tensor) FROM metrics WHERE step = 4").item() > 20
        # step 8's previous step is 4: against the NaN/Inf tensor there is no delta_prev, the rest stands
        prefixes = db.sql("SELECT DISTINCT split_part(metric, '_', 1) || '_' || split_part(metric, '_', 2) AS p FROM metrics "
                          "WHERE step = 8 AND tensor = 'gpt_neox.layers.0.attention.dense.weight'")["p"].to_list()
        assert "delta_init" in prefixes and "delta_prev" not in prefixes
        assert db.sql("SELECT count(*) FROM metrics WHERE step = 8 AND metric = 'delta_prev_spectral_norm'").item() >= 10


def test_rerun_skips_and_later_final_rebases(neox, tmp_path):
    states, config = neox
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 2, 4)}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store)
    assert ckptscope.ingest(root, store=store).height == 0
    write_run(root, {8: states[8]}, config)
    assert ckptscope.ingest(root, store=store)["step"].to_list() == [8]
    got = metric_table(store, "metric LIKE 'final_%'")
    w2, w8 = load(root, 2)[QKV], load(root, 8)[QKV]
    assert got[(2, QKV, "attn.qkv", "final_relative_distance")] == pytest.approx(np.linalg.norm(w2 - w8) / np.linalg.norm(w8), rel=1e-9)
    assert got[(8, QKV, "attn.qkv", "final_cosine")] == 1.0
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT DISTINCT parameters->>'final_step' FROM runs WHERE analyzer = 'weights'").item() == "8"
        dup = db.sql("SELECT count(*) - count(DISTINCT (step, tensor, component, metric, head)) FROM metrics").item()
        assert dup == 0
    forced = ckptscope.ingest(root, store=store, force=True, steps="4")
    assert forced["step"].to_list() == [0, 4, 8]
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM runs").item() == 4 * len(registry.DEFAULT)  # one per step and analyzer
        assert db.sql("SELECT count(*) - count(DISTINCT (step, tensor, component, metric, head)) FROM metrics").item() == 0


def test_an_added_analyzer_runs_alone_on_steps_the_others_did(neox, tmp_path):
    """A store made with `weights` (the old default) and ingested again with more analyzers: only
    the new ones run on the stored steps, the weights rows stay as they were (same run ids)."""
    states, config = neox
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 2, 4)}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, analyzers="weights")
    query = "SELECT analyzer, step, run_id, created_at FROM runs ORDER BY ALL"
    with ckptscope.Store(store, read_only=True) as db:
        before = db.sql(query).rows()
    write_run(root, {8: states[8]}, config)  # a new step runs every analyzer, and rebases final_* of the old ones
    report = ckptscope.ingest(root, store=store, analyzers="weights,sparsity,circuits")
    assert report["step"].to_list() == [0, 2, 4, 8]
    with ckptscope.Store(store, read_only=True) as db:
        after = db.sql(query).rows()
        sparsity = db.sql("SELECT step, count(*) AS n FROM metrics WHERE analyzer = 'sparsity' AND metric = 'gini' "
                          "GROUP BY step ORDER BY step").rows()
    kept = {(a, s): r for a, s, r, _ in after}
    assert all(kept[(a, s)] == r for a, s, r, _ in before)  # the stored weights runs were not redone
    assert sorted({(a, s) for a, s, _, _ in after}) == sorted((a, s) for a in ("circuits", "sparsity", "weights")
                                                               for s in (0, 2, 4, 8))
    assert [s for s, _ in sparsity] == [0, 2, 4, 8] and len({n for _, n in sparsity}) == 1
    assert ckptscope.ingest(root, store=store, analyzers="sparsity,weights").height == 0  # all done: nothing runs


def test_partial_steps_need_only_the_references_of_what_runs_and_the_same_weights(neox, tmp_path):
    """Adding circuits (no references) to a weights store whose middle steps left the source (and
    the reference cache) works; a stored step whose files changed since is refused for the
    analyzers that would run on it, never mixed with the rows of the old files."""
    import shutil

    states, config = neox
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 2, 4, 8)}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, analyzers="weights")
    shutil.rmtree(root / "step4")  # the previous step of step 8; the cache holds steps 0 and 8 only
    assert ckptscope.ingest(root, store=store, analyzers="weights,circuits")["step"].to_list() == [0, 2, 8]
    write_checkpoint(root / "step2", states[1], config)  # step 2 rewritten with other weights
    res = CliRunner().invoke(main, ["ingest", str(root), "--store", str(store), "--analyzers", "weights,sparsity"])
    assert res.exit_code == 1, res.output
    assert "step 2 changed since analyzer(s) weights analyzed it" in res.output and "--force" in res.output
    sparsity = "SELECT step FROM runs WHERE analyzer = 'sparsity' ORDER BY step"
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql(sparsity)["step"].to_list() == [0]  # a failed step stops an in-process run: 8 not started
    write_run(root, {4: states[4]}, config)  # --force recomputes the first and final steps too: 8 needs 4 again
    ckptscope.ingest(root, store=store, analyzers="weights,sparsity", force=True, steps="2")
    ckptscope.ingest(root, store=store, analyzers="weights,sparsity")
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql(sparsity)["step"].to_list() == [0, 2, 4, 8]
    got = metric_table(store, "step = 2 AND metric = 'frobenius_norm'")[(2, QKV, "attn.qkv", "frobenius_norm")]
    assert got == pytest.approx(np.linalg.norm(load(root, 2)[QKV].astype(np.float64)), rel=1e-9)  # the new weights


def test_explicit_step_paths_and_single_checkpoint(neox, tmp_path):
    states, config = neox
    write_checkpoint(tmp_path / "run" / "init", states[0], config)
    write_checkpoint(tmp_path / "run" / "later", states[4], config)
    store = tmp_path / "s.duckdb"
    report = ckptscope.ingest(tmp_path / "run", store=store, steps="0=init,400=later")
    assert report["step"].to_list() == [0, 400]
    single = ckptscope.ingest(tmp_path / "run" / "later", store=store, name="single")
    assert single["step"].to_list() == [0]


def test_duplicate_points_to_earliest_step_even_after_force(neox, tmp_path):
    states, config = neox
    root = write_run(tmp_path / "run", {0: states[0], 5: states[2], 10: states[2]}, config)
    store = tmp_path / "s.duckdb"
    for force in (False, True):
        ckptscope.ingest(root, store=store, force=force)
        with ckptscope.Store(store, read_only=True) as db:
            assert db.sql("SELECT step, duplicate_of FROM checkpoints ORDER BY step").rows() == [(0, None), (5, None), (10, 5)]
            assert db.sql("SELECT step, kind FROM anomalies").rows() == [(10, "duplicate_checkpoint")]


def test_float64_wide_matrices(tmp_path):
    """A wide float64 matrix compared with the final step (a transposed, non-contiguous chunk)."""
    wide = {"blocks.0.w": torch.randn(4, 8, dtype=torch.float64)}
    later = {"blocks.0.w": wide["blocks.0.w"] + 0.1}
    root = write_run(tmp_path / "run", {0: wide, 3: later}, None, dtype=None)
    ckptscope.ingest(root, store=tmp_path / "s.duckdb")
    got = metric_table(tmp_path / "s.duckdb", "metric = 'final_relative_distance'")
    w0, w3 = wide["blocks.0.w"].numpy(), later["blocks.0.w"].numpy()
    assert got[(0, "blocks.0.w", "other", "final_relative_distance")] == pytest.approx(np.linalg.norm(w0 - w3) / np.linalg.norm(w3), rel=1e-12)


def test_lost_reference_is_a_clear_error_and_interrupted_rebasing_resumes(neox, tmp_path):
    states, config = neox
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 2, 4)}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store)
    with ckptscope.Store(store) as db:  # as if a re-basing onto step 4 had been killed half-way
        db.con.execute("UPDATE runs SET parameters = json_object('final_step', 2) WHERE step = 0 AND analyzer = 'weights'")
    report = ckptscope.ingest(root, store=store)
    assert report.height == 0
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT DISTINCT parameters->>'final_step' FROM runs WHERE analyzer = 'weights'").item() == "4"
    import shutil
    shutil.rmtree(root / "step0")
    shutil.rmtree(f"{store.resolve()}.refs")  # without the reference cache either (see test_live.py for with it)
    write_run(root, {8: states[8]}, config)
    with pytest.raises(ckptscope.CkptscopeError, match="step 0, the first step .* no longer in the source or the reference cache"):
        ckptscope.ingest(root, store=store)
