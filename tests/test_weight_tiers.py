"""Spectrum tiers of the weight analyzer, per-matrix parallelism, and the v1 → v2 store upgrade."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest
import torch

import ckptscope
from ckptscope.store.migrations import MIGRATIONS
from ckptscope.analyzers.parallel import ordered_map
from ckptscope.reports.html import build_report
from runs import neox_state, trajectory, write_run
from test_reports import report_payload

STEPS = [0, 1, 2, 4]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    state, config = neox_state(seed=3)
    return write_run(tmp_path_factory.mktemp("tiers") / "neox", trajectory(state, STEPS), config)


def rows(store: Path, where: str = "true") -> dict[tuple, tuple[float, str | None]]:
    with ckptscope.Store(store, read_only=True) as db:
        df = db.sql(f"SELECT step, tensor, component, metric, value, tier FROM metrics WHERE {where}")
    return {r[:4]: (r[4], r[5]) for r in df.iter_rows()}


@pytest.fixture(scope="module")
def exact(run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("exact") / "s.duckdb"
    ckptscope.ingest(run, store=store, analyzers="weights")  # the tiers are the weight analyzer's
    return store


def test_none_tier_gives_the_exact_norms_and_nothing_spectral(run, exact, tmp_path):
    store = tmp_path / "none.duckdb"
    ckptscope.ingest(run, store=store, analyzers="weights", spectrum="none")
    none, full = rows(store), rows(exact)
    matrix_rows = {k: v for k, v in none.items() if v[1] is not None}
    metrics = {k[3] for k in matrix_rows}
    assert metrics == {"frobenius_norm", "log_norm", "delta_init_frobenius_norm", "delta_init_relative",
                       "delta_prev_frobenius_norm", "delta_prev_relative", "final_cosine", "final_relative_distance"}
    assert {v[1] for v in matrix_rows.values()} == {"none"}
    for key, (value, _) in matrix_rows.items():
        assert value == pytest.approx(full[key][0], rel=1e-12, abs=1e-15), key
    vectors = {k: v for k, v in none.items() if v[1] is None}  # 1-D tensors are not matrices: no tier
    assert vectors and all(full[k] == v for k, v in vectors.items())
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT count(*) AS n FROM spectra")["n"].item() == 0
        assert set(db.sql("SELECT DISTINCT parameters->>'spectrum' AS s FROM runs")["s"]) == {"none"}


def test_exact_tier_rows_say_exact(exact):
    tiers = {v[1] for v in rows(exact).values()}
    assert tiers == {"exact", None}
    with ckptscope.Store(exact, read_only=True) as db:
        assert set(db.sql("SELECT DISTINCT tier FROM spectra")["tier"]) == {"exact"}


def test_rows_do_not_depend_on_the_thread_count(run, exact, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = tmp_path / "one-thread.duckdb"
        ckptscope.ingest(run, store=store, analyzers="weights")
    finally:
        torch.set_num_threads(threads)
    assert threads > 1 or pytest.skip("needs a machine with more than one core")
    assert rows(store) == rows(exact)


def test_unknown_tier_is_a_one_line_error(run, tmp_path):
    with pytest.raises(ckptscope.CkptscopeError, match="--spectrum 'slow': choose from exact, fast, none"):
        ckptscope.ingest(run, store=tmp_path / "s.duckdb", spectrum="slow")
    assert not (tmp_path / "s.duckdb").exists()


def test_ordered_map_keeps_order_bounds_memory_and_raises():
    running, peak, lock = {"all": 0, "big": 0}, {"all": 0, "big": 0}, threading.Lock()
    sizes = {0: 10, 1: 10, 5: 10}  # three big jobs (cost 10), the rest cost 1: budget 2 x 10

    def work(i: int) -> int:
        kinds = ("all", "big") if i in sizes else ("all",)
        with lock:
            for kind in kinds:
                running[kind] += 1
                peak[kind] = max(peak[kind], running[kind])
        time.sleep(0.02 * (4 - i % 4))  # later items often finish first
        with lock:
            for kind in kinds:
                running[kind] -= 1
        return i * i

    result = list(ordered_map(list(range(12)), work, lambda i: sizes.get(i, 1), threads=3))
    assert result == [(i, i * i) for i in range(12)]
    assert peak == {"all": 3, "big": 2}  # small jobs run side by side, two big ones may, three never

    def boom(i: int) -> int:
        if i == 4:
            raise ValueError("bad matrix")
        return i

    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="bad matrix"):
        list(ordered_map(list(range(8)), boom, lambda i: 1, threads=2))
    assert torch.get_num_threads() == threads  # the caller's BLAS threads are restored


def test_ordered_map_runs_past_a_long_job():
    """Item 0 runs until item 9 has started: the other thread must work through items 1-9 while
    their results wait, in order, behind item 0's."""
    started = threading.Event()

    def work(i: int) -> bool:
        if i == 9:
            started.set()
        return started.wait(timeout=30) if i == 0 else True

    result = list(ordered_map(list(range(12)), work, lambda i: 1, threads=2))
    assert result == [(i, True) for i in range(12)]


def test_a_v1_store_is_read_as_is_and_upgraded_on_first_write(run, tmp_path):
    store = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(store))
    con.execute((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs VALUES (nextval('run_ids'), 'old', 0, 'weights', '1.0.0', '{}', 'float64', 'x', now())")
    con.execute("INSERT INTO models (model, source, architecture) VALUES ('old', 'x', 'gpt_neox')")
    con.execute("INSERT INTO checkpoints (model, step, source, status) VALUES ('old', 0, 'x', 'ok')")
    con.execute("INSERT INTO metric_values VALUES (1, 'old', 0, 't', 0, 'mlp.in', 'frobenius_norm', 2.5)")
    con.execute("INSERT INTO spectra VALUES (1, 'old', 0, 't', 0, 'mlp.in', 'weight', 2, 2, [2.0, 1.0])")
    con.close()
    before = store.read_bytes()
    with ckptscope.Store(store, read_only=True) as db:  # readable without an upgrade
        assert db.sql("SELECT value FROM metrics")["value"].to_list() == [2.5]
    payload = report_payload(build_report(store, tmp_path / "old.html"))  # its spectra too, with no `head` column
    [spectrum] = [c for c in payload if c["type"] == "spectrum"]
    assert [(m["tensor"], [s["total"] for s in m["steps"]]) for m in spectrum["matrices"]] == [("t", [2])]
    assert store.read_bytes() == before
    ckptscope.ingest(run, store=store, steps="0,4")
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT value FROM meta WHERE key = 'schema_version'")["value"].item() == "3"
        assert db.sql("SELECT name FROM migrations ORDER BY name")["name"].to_list() == [m for m, _ in MIGRATIONS]
        old = db.sql("SELECT value, tier FROM metrics WHERE model = 'old'")
        assert old.rows() == [(2.5, None)]
        assert "exact" in set(db.sql("SELECT tier FROM metrics WHERE model = 'neox'")["tier"])


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory) -> Path:
    """A one-layer NeoX with hidden size 128: big enough that the fast tier's k = 32 is a real truncation."""
    state, config = neox_state(seed=5)
    hidden, inter, vocab = 128, 512, 300
    gen = torch.Generator().manual_seed(7)
    shapes = {"gpt_neox.embed_in.weight": (vocab, hidden), "embed_out.weight": (vocab, hidden),
              "gpt_neox.layers.0.attention.query_key_value.weight": (3 * hidden, hidden),
              "gpt_neox.layers.0.attention.dense.weight": (hidden, hidden),
              "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (inter, hidden),
              "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (hidden, inter)}
    base = {name: torch.randn(shape, generator=gen) / shape[1] ** 0.5 for name, shape in shapes.items()}
    base["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][:, :8] *= 10  # a few strong directions
    config.update(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, num_hidden_layers=1)
    return write_run(tmp_path_factory.mktemp("wide") / "wide", trajectory(base, [0, 10, 20], scale=0.01), config)


def test_large_matrices_fall_back_to_the_fast_tier_within_its_bounds(wide_run, tmp_path):
    from ckptscope.analyzers import fast_spectrum as fs

    exact, fast = tmp_path / "exact.duckdb", tmp_path / "fast.duckdb"
    ckptscope.ingest(wide_run, store=exact, analyzers="weights")
    ckptscope.ingest(wide_run, store=fast, analyzers="weights", spectrum="exact", exact_max_side=100)  # every matrix has side 128
    ref, got = rows(exact), rows(fast)
    assert {v[1] for v in got.values()} == {"fast"}
    bounds = {"spectral_norm": fs.SPECTRAL_NORM_RTOL, "stable_rank": fs.STABLE_RANK_RTOL,
              "effective_rank": fs.EFFECTIVE_RANK_RTOL, "frobenius_norm": 1e-12, "log_norm": 1e-12,
              "log_spectral_norm": fs.SPECTRAL_NORM_RTOL, "numerical_rank": 0.0, "energy_rank_99": 0.0,
              "relative": 1e-12, "final_cosine": 1e-12, "final_relative_distance": 1e-12}
    seen = set()
    for key, (value, _) in got.items():
        metric = key[3].removeprefix("delta_init_").removeprefix("delta_prev_")
        assert value == pytest.approx(ref[key][0], rel=bounds[metric], abs=1e-12), key
        seen.add(metric)
    assert {"spectral_norm", "stable_rank", "effective_rank", "frobenius_norm"} <= seen
    assert not any(k[3].startswith("alpha") for k in got)  # alpha needs the whole spectrum
    with ckptscope.Store(fast, read_only=True) as db:
        spectra = db.sql("SELECT tier, len(sv) AS n, rows, cols FROM spectra")
        assert set(spectra["tier"]) == {"fast"} and spectra["n"].max() <= 32
        params = db.sql("SELECT DISTINCT parameters->>'spectrum' AS s, parameters->>'exact_max_side' AS m FROM runs")
        assert params.rows() == [("exact", "100")]
