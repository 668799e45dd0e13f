"""Live use: readers during an ingest, `ingest --watch` following a run that deletes old
checkpoints, and the reference cache. Real processes, real DuckDB files, real safetensors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import ckptscope
from ckptscope.pipeline.watch import Follower
from ckptscope.sources.checkpoint import is_complete
from ckptscope.sources.refcache import cache_dir
from runs import neox_state, trajectory, write_checkpoint, write_run

DELTAS = ("SELECT step, tensor, component, metric, value FROM metrics "
          "WHERE metric LIKE 'delta_init_%' OR metric LIKE 'delta_prev_%' ORDER BY ALL")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ckptscope.cli", *map(str, args)]


def rows(store: Path, query: str = DELTAS) -> list[tuple]:
    with ckptscope.Store(store, read_only=True) as db:
        return db.sql(query).rows()


@pytest.fixture(scope="module")
def states():
    state, config = neox_state()
    return trajectory(state, [0, 10, 20, 30, 40, 50]), config


# A trainer in its own process: saves each step, writing the weights slowly (so the watcher sees
# half-written files), then deletes old checkpoints as save_total_limit=2 does. It saves the next
# step once the store holds the previous one, read through a read-only Store as any notebook would.
TRAINER = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    import ckptscope
    src, run, store = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    steps = sorted(int(p.name[4:]) for p in src.iterdir())
    db = ckptscope.Store  # opened per look: the store appears with the first commit
    for i, step in enumerate(steps):
        out = run / f"checkpoint-{step}"
        out.mkdir(parents=True)
        shutil.copy(src / f"step{step}" / "config.json", out)
        data = (src / f"step{step}" / "model.safetensors").read_bytes()
        with open(out / "model.safetensors", "wb") as fh:
            for k in range(4):
                fh.write(data[k * len(data) // 4:(k + 1) * len(data) // 4]); fh.flush(); time.sleep(0.4)
        for old in sorted(run.iterdir(), key=lambda p: int(p.name.split("-")[1]))[:-2]:
            shutil.rmtree(old)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if db(store, read_only=True).sql(f"SELECT count(*) FROM checkpoints WHERE step = {step}").item():
                    break
            except ckptscope.CkptscopeError:
                pass
            time.sleep(0.2)
        else:
            sys.exit(f"step {step} never reached the store")
""")


def test_watch_follows_a_run_that_deletes_old_checkpoints(states, tmp_path):
    """--watch with save_total_limit=2 deletions gives the delta_* rows of a one-shot ingest of the whole run,
    never analyzes a half-written file, and refuses a second writer with its PID meanwhile."""
    trajectory_states, config = states
    full = write_run(tmp_path / "full", trajectory_states, config)
    one_shot = tmp_path / "one-shot.duckdb"
    ckptscope.ingest(full, store=one_shot, name="run")
    run, store = tmp_path / "run", tmp_path / "live.duckdb"
    run.mkdir()
    watcher = subprocess.Popen(cli("ingest", run, "--store", store, "--watch", "--idle-exit", 15, "--watch-interval", 0.3),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, full, run, store], env=ENV)
    try:
        lock = Path(f"{store.resolve()}.lock")
        deadline = time.monotonic() + 120  # the watcher holds the writer lock once started (its imports take seconds)
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cli("ingest", full, "--store", store), env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"being written by another process (PID {watcher.pid})" in second.stderr
        trained = trainer.wait(timeout=300)
        if trained != 0:
            watcher.kill()
        out, _ = watcher.communicate(timeout=120)
    finally:
        trainer.kill()
        watcher.kill()
    assert trained == 0, out
    assert watcher.returncode == 0, out
    assert "Traceback" not in out and "no new checkpoint for 15 s" in out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-40", "checkpoint-50"]  # 0..30 were deleted
    assert rows(store) == rows(one_shot)
    # each step was analyzed whole: the stored hash is that of the complete file
    hashes = {s: hashlib.sha256((full / f"step{s}" / "model.safetensors").read_bytes()).hexdigest() for s in trajectory_states}
    assert dict(rows(store, "SELECT step, content_hash FROM checkpoints")) == hashes
    # final_* of steps still on disk were re-based onto the latest step; those deleted keep theirs
    finals = dict(rows(store, "SELECT step, parameters->>'final_step' FROM runs WHERE analyzer = 'weights'"))
    assert finals[40] == finals[50] == "50"
    assert all(finals[s] in (str(s + 10), str(s + 20)) for s in (0, 10, 20, 30)), finals  # the latest while it existed
    assert sorted(p.name for p in cache_dir(store, "run").iterdir()) == ["step0", "step50"]
    assert not Path(f"{store}.lock").exists()


def test_reference_cache_serves_deleted_checkpoints_on_rerun(states, tmp_path):
    """Checkpoints deleted by hand before a rerun: delta_init/delta_prev of a new step come from the cache."""
    trajectory_states, config = states
    run = write_run(tmp_path / "run", {s: trajectory_states[s] for s in (0, 10, 20)}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(run, store=store)
    assert sorted(p.name for p in cache_dir(store, "run").iterdir()) == ["step0", "step20"]
    for step in (0, 10, 20):
        shutil.rmtree(run / f"step{step}")
    write_run(run, {30: trajectory_states[30]}, config)
    assert ckptscope.ingest(run, store=store)["step"].to_list() == [30]
    whole = write_run(tmp_path / "whole", {s: trajectory_states[s] for s in (0, 10, 20, 30)}, config)
    ckptscope.ingest(whole, store=tmp_path / "whole.duckdb", name="run")
    assert rows(store) == rows(tmp_path / "whole.duckdb")
    assert sorted(p.name for p in cache_dir(store, "run").iterdir()) == ["step0", "step30"]


def test_read_only_store_kept_open_during_an_ingest(states, tmp_path):
    """A notebook's read-only Store, queried every 20 ms from another thread for the whole ingest."""
    trajectory_states, config = states
    run = write_run(tmp_path / "run", {0: trajectory_states[0]}, config)
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(run, store=store)
    db = ckptscope.Store(store, read_only=True)
    write_run(run, {s: trajectory_states[s] for s in (10, 20, 30, 40)}, config)
    seen, errors, stop = [], [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(db.sql("SELECT count(*) FROM checkpoints").item())
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(exc)
            time.sleep(0.02)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        report = ckptscope.ingest(run, store=store)
    finally:
        stop.set()
        reader.join()
    assert report["step"].to_list() == [10, 20, 30, 40] and not errors
    assert seen == sorted(seen) and seen[0] >= 1 and db.sql("SELECT count(*) FROM checkpoints").item() == 5
    db.close()


def test_cli_readers_see_commits_mid_ingest(tmp_path):
    """`ckptscope sql` and `ls` in other processes answer while an ingest runs, and see its checkpoints land."""
    steps = list(range(0, 120, 10))
    state, config = neox_state()
    big = {k: torch.randn(768, 768) if k.endswith("attention.dense.weight") else v for k, v in state.items()}
    run = write_run(tmp_path / "run", trajectory(big, steps), config)
    store = tmp_path / "s.duckdb"
    ingest = subprocess.Popen(cli("ingest", run, "--store", store), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    counts = []
    try:
        while ingest.poll() is None:
            if not store.exists():
                time.sleep(0.1)
                continue
            got = subprocess.run(cli("sql", "SELECT count(*) AS n FROM checkpoints", "--store", store, "--format", "csv"),
                                 env=ENV, capture_output=True, text=True, timeout=120)
            assert got.returncode == 0, got.stderr
            counts.append(int(got.stdout.split()[-1]))
            listed = subprocess.run(cli("ls", "--store", store), env=ENV, capture_output=True, text=True, timeout=120)
            assert listed.returncode == 0, listed.stderr
    finally:
        _, stderr = ingest.communicate(timeout=600)
    assert ingest.returncode == 0, stderr
    assert counts == sorted(counts) and any(0 < n < len(steps) for n in counts), counts


def test_half_written_checkpoint_is_not_ready(states, tmp_path):
    """A checkpoint is ready only when whole and unchanged between two looks."""
    trajectory_states, config = states
    done = write_checkpoint(tmp_path / "src", trajectory_states[0], config)
    data = (done / "model.safetensors").read_bytes()
    ckpt = tmp_path / "run" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    shutil.copy(done / "config.json", ckpt)
    follower = Follower(tmp_path / "run")
    assert follower.ready() == []  # nothing yet
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])  # header whole, data cut short
    assert follower.ready() == [] and follower.ready() == [] and not is_complete(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    assert is_complete(ckpt) and follower.ready() == []  # whole, but not yet seen unchanged
    assert [r.step for r in follower.ready()] == [5]
    sharded = write_checkpoint(tmp_path / "sharded", trajectory_states[0], config, shards=2)
    assert is_complete(sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert not is_complete(sharded)
