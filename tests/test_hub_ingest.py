"""A hub sweep through the real pipeline, against olah on loopback: same rows as a local ingest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import ckptscope
from ckptscope.errors import SourceError
from hubserver import checkpoint_files, glob_live, serve
from runs import neox_state, trajectory, write_run

STEPS = [0, 1, 2, 4, 8, 16, 32]
TOKENS = 2_097_152
Q = "SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The same checkpoints as a local run and as a Pythia-style hub repo (fp16 .bin on step branches)."""
    root = tmp_path_factory.mktemp("sweep")
    state, config = neox_state(seed=5)
    weights = trajectory(state, STEPS)
    local = write_run(root / "local", weights, config, fmt="bin")
    with serve(root / "hub") as hub:
        branches = {f"step{s}": checkpoint_files(weights[s], config, fmt="bin") for s in STEPS}
        branches["step64"] = {"README.md": b"weights were never uploaded"}
        branches["main"] = {**branches["step32"], **checkpoint_files(weights[32], config)}
        hub.add_repo("EleutherAI/pythia-14m", branches)
        yield hub, local, root


def snapshots(cache: Path) -> int:
    return len(glob_live(cache, "models--*/snapshots/*/*.bin"))


def test_hub_sweep_matches_local_and_keeps_cache_bounded(suite, tmp_path):
    hub, local, _ = suite
    cache = tmp_path / "cache"
    most, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], snapshots(cache))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = ckptscope.ingest("pythia-14m", store=tmp_path / "hub.duckdb", steps="all", cache_dir=cache)
    finally:
        done.set()
        watcher.join()
    assert report.filter(report["status"] == "missing")["step"].to_list() == [64]
    assert 2 <= most[0] <= 5  # first, previous, current, final and the one being prefetched
    assert snapshots(cache) == 0  # evicted after the sweep
    ckptscope.ingest(local, store=tmp_path / "local.duckdb", name="pythia-14m", tokens_per_step=TOKENS)
    with ckptscope.Store(tmp_path / "hub.duckdb", read_only=True) as h, ckptscope.Store(tmp_path / "local.duckdb", read_only=True) as loc:
        assert h.sql(Q).equals(loc.sql(Q))
        ck = h.sql("SELECT step, tokens, status, revision FROM checkpoints ORDER BY step")
        assert ck["step"].to_list() == [*STEPS, 64]
        assert ck["tokens"].to_list() == [s * TOKENS for s in [*STEPS, 64]]
        assert ck["status"].to_list() == ["ok"] * len(STEPS) + ["missing"]
        assert ck["revision"][1] == "EleutherAI/pythia-14m@step1"
        assert h.sql("SELECT kind FROM anomalies").rows() == [("missing_revision",)]
        assert h.sql("SELECT source FROM models").item() == "hub:EleutherAI/pythia-14m"


def test_server_going_away_mid_sweep_then_resume(suite, tmp_path):
    hub, local, _ = suite
    cache, store = tmp_path / "cache", tmp_path / "s.duckdb"

    def stop_when_step4_arrives() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(cache.glob("models--*/snapshots/*")) or snapshots(cache) < 3:
            time.sleep(0.005)
        hub.stop()

    killer = threading.Thread(target=stop_when_step4_arrives)
    killer.start()
    try:
        with pytest.raises(SourceError, match="unreachable.*rerun to resume"):
            ckptscope.ingest("pythia-14m", store=store, cache_dir=cache)
    finally:
        killer.join()
        hub.start()
    with ckptscope.Store(store, read_only=True) as db:
        partial = db.sql("SELECT count(*) FROM checkpoints WHERE status = 'ok'").item()
    assert partial < len(STEPS)
    report = ckptscope.ingest("pythia-14m", store=store, cache_dir=cache)
    assert report.filter(report["status"] == "ok").height == len(STEPS) - partial
    ckptscope.ingest(local, store=tmp_path / "local.duckdb", name="pythia-14m")
    with ckptscope.Store(store, read_only=True) as h, ckptscope.Store(tmp_path / "local.duckdb", read_only=True) as loc:
        assert h.sql(Q).equals(loc.sql(Q))
