"""Executors: the same rows whether steps run in this process, in a process pool or on Ray; a step
that fails on a worker costs only that step; the driver works out duplicates whatever the order."""

from __future__ import annotations

import hashlib
import shutil
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.cli import main
from ckptscope.rows import CheckpointRows
from ckptscope.store.db import Store
from hubserver import checkpoint_files, serve
from runs import neox_state, trajectory, write_run

STEPS = [0, 1, 2, 4, 8, 16]  # step 8 holds step 2's weights: a duplicate
TABLES = {  # every stored row, less run ids and timestamps (which differ by design)
    "checkpoints": "SELECT * EXCLUDE (ingested_at) FROM checkpoints",
    "tensors": "SELECT * FROM tensors",
    "metric_values": "SELECT * EXCLUDE (run_id) FROM metric_values",
    "spectra": "SELECT * EXCLUDE (run_id) FROM spectra",
    "anomalies": "SELECT * EXCLUDE (run_id, found_at) FROM anomalies",
    "runs": "SELECT * EXCLUDE (run_id, created_at) FROM runs",
}


@pytest.fixture(scope="module")
def weights():
    state, config = neox_state(seed=7)
    states = trajectory(state, [s for s in STEPS if s != 8])
    states[8] = states[2]
    return states, config


@pytest.fixture(scope="module")
def suite(weights, tmp_path_factory):
    """The run, and a store it was ingested into in this process (one torch thread, as every worker below)."""
    states, config = weights
    root = write_run(tmp_path_factory.mktemp("executors") / "run", states, config)
    store = root.parent / "in-process.duckdb"
    ckptscope.ingest(root, store=store, threads=1)
    return root, store


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def snapshot(store: Path) -> dict[str, list[tuple]]:
    with Store(store, read_only=True) as db:
        return {table: db.sql(f"{query} ORDER BY ALL").rows() for table, query in TABLES.items()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pool_and_ray_give_the_rows_of_one_process(suite, local_ray, tmp_path):
    root, reference = suite
    want = snapshot(reference)
    assert [(r[1], r[6]) for r in want["checkpoints"]] == [(0, None), (1, None), (2, None), (4, None), (8, 2), (16, None)]
    assert [(r[1], r[3]) for r in want["anomalies"]] == [(8, "duplicate_checkpoint")]
    assert len(want["runs"]) == len(STEPS) * len(registry.DEFAULT) and len(want["metric_values"]) > 1000 and want["spectra"]

    pool = tmp_path / "pool.duckdb"
    res = invoke("ingest", root, "--store", pool, "--name", "run", "--executor", "local", "--workers", 2, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "ingested 6 checkpoint(s)" in res.output and "1 duplicate checkpoint(s) flagged" in res.output
    assert snapshot(pool) == want

    cluster = tmp_path / "ray.duckdb"
    report = ckptscope.ingest(root, store=cluster, executor="ray", workers=2, threads=1)
    assert report.select("step", "status", "duplicate_of").rows() == [
        (0, "ok", None), (1, "ok", None), (2, "ok", None), (4, "ok", None), (8, "duplicate", 2), (16, "ok", None)]
    assert snapshot(cluster) == want


def test_a_failed_step_costs_only_itself_and_a_rerun_completes(weights, tmp_path):
    """Step 2 is stored, then its file is truncated. Ingesting steps 4:16 does not validate it up
    front (it is not selected); it is read again as step 4's previous checkpoint, on a worker.
    Steps 8 and 16 are written all the same; after repair, a rerun adds step 4."""
    states, config = weights
    root = write_run(tmp_path / "run", {s: states[s] for s in (0, 1, 2)}, config)
    store, clean = tmp_path / "s.duckdb", tmp_path / "clean.duckdb"
    ckptscope.ingest(root, store=store, threads=1)
    shutil.copy(store, clean)
    write_run(root, {s: states[s] for s in (4, 8, 16)}, config)
    ckptscope.ingest(root, store=clean, steps="4:16", threads=1)  # the same history, without the fault

    weights_file = root / "step2" / "model.safetensors"
    intact = weights_file.read_bytes()
    weights_file.write_bytes(intact[:-100])
    shutil.rmtree(f"{store.resolve()}.refs")  # step 2 is read from the source, not from its intact copy in the reference cache
    with pytest.raises(ckptscope.CkptscopeError) as err:
        ckptscope.ingest(root, store=store, steps="4:16", workers=2, threads=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("1 step failed and was not written (step 4: ")
    assert "step2/model.safetensors: truncated safetensors file" in message
    assert message.endswith("run the same command again to resume")
    with Store(store, read_only=True) as db:
        assert db.sql("SELECT step FROM checkpoints ORDER BY step")["step"].to_list() == [0, 1, 2, 8, 16]
        assert db.sql("SELECT duplicate_of FROM checkpoints WHERE step = 8").item() == 2

    weights_file.write_bytes(intact)
    report = ckptscope.ingest(root, store=store, steps="4:16", workers=2, threads=1)
    assert report["step"].to_list() == [4]
    assert snapshot(store) == snapshot(clean)


def test_hub_steps_in_a_pool_match_and_leave_no_downloads(weights, suite, tmp_path):
    """Each worker process downloads into a cache of its own (sharing one, they would evict each
    other's files mid-read) and deletes it when the pool shuts down. Step 64 has no weights: every
    worker finds that out (it is every step's first final candidate); it is recorded once."""
    states, config = weights
    _, reference = suite
    cache = tmp_path / "cache"
    with serve(tmp_path / "hub") as hub:
        branches = {f"step{s}": checkpoint_files(states[s], config) for s in STEPS}
        hub.add_repo("someorg/run", {**branches, "step64": {"README.md": b"weights were never uploaded"}})
        report = ckptscope.ingest("someorg/run", store=tmp_path / "hub.duckdb", name="run", cache_dir=cache, workers=2, threads=1)
    assert report.filter(report["status"] == "missing")["step"].to_list() == [64]
    got, want = snapshot(tmp_path / "hub.duckdb"), snapshot(reference)
    assert [r[1:] for r in got["checkpoints"] if r[1] == 64] == [(64, None, "someorg/run@step64", "hub:someorg/run", None, None, "missing")]
    assert [(r[1], r[3]) for r in got["anomalies"]] == [(8, "duplicate_checkpoint"), (64, "missing_revision")]
    for table in TABLES:
        got[table] = [r for r in got[table] if r[1] != 64]  # (model, step, ...): the rest is as from a local run
        if table == "checkpoints":  # revision and source say where the weights came from
            got[table], want[table] = ([(r[1], *r[5:]) for r in rows[table]] for rows in (got, want))
        assert got[table] == want[table], table
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_duplicate_of_is_the_earliest_identical_step_in_any_write_order(tmp_path):
    no_tensors = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}

    def write(db: Store, step: int, sha: str) -> None:
        db.write_checkpoint(CheckpointRows("m", step, None, f"step{step}", "test", sha, no_tensors, []), replace=True)

    def state(db: Store) -> tuple[list[tuple], list[tuple]]:
        return (db.sql("SELECT step, duplicate_of FROM checkpoints ORDER BY step").rows(),
                db.sql("SELECT step, detail FROM anomalies WHERE kind = 'duplicate_checkpoint' ORDER BY step").rows())

    with Store(tmp_path / "s.duckdb") as db:
        for step, sha in ((10, "a" * 64), (5, "a" * 64), (7, "b" * 64), (0, "c" * 64)):
            write(db, step, sha)
        byte_identical = "weights are byte-identical to step {} (sha256 " + "a" * 16 + "…)"
        assert state(db) == ([(0, None), (5, None), (7, None), (10, 5)], [(10, byte_identical.format(5))])
        write(db, 3, "a" * 64)  # an earlier copy written last
        assert state(db) == ([(0, None), (3, None), (5, 3), (7, None), (10, 3)],
                             [(5, byte_identical.format(3)), (10, byte_identical.format(3))])
        write(db, 3, "d" * 64)  # recomputed from other weights
        assert state(db) == ([(0, None), (3, None), (5, None), (7, None), (10, 5)], [(10, byte_identical.format(5))])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("args,fragments", [
    (["--workers", "0"], ["--workers 0: give at least 1"]),
    (["--threads", "0"], ["--threads 0: give at least 1"]),
    (["--ray-address", "10.0.0.5:6379"], ["--ray-address is for --executor ray"]),
    (["--executor", "ray", "--ray-address", "127.0.0.1:{port}", "--force"], ["nothing answers at 127.0.0.1:{port}", "ray start --head"]),
    (["--executor", "ray", "--force"], ["--executor ray needs Ray, which is not installed: pip install 'ckptscope[ray]'"]),
], ids=["no-workers", "no-threads", "address-without-ray", "unreachable-cluster", "ray-not-installed"])
def test_bad_executor_options_leave_the_store_untouched(suite, monkeypatch, args, fragments):
    root, store = suite
    if "--ray-address" in args and "--executor" in args:
        pytest.importorskip("ray")
    if fragments[0].endswith("not installed: pip install 'ckptscope[ray]'"):
        monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    port = closed_port()
    before = digest(store)
    res = invoke("ingest", root, "--store", store, "--name", "run", *(a.format(port=port) for a in args))
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and len(res.output.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment.format(port=port) in text
    assert digest(store) == before
