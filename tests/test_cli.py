"""The command line: bad input gives one line, a non-zero exit, and an untouched store."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.cli import main
from runs import neox_state, trajectory, write_checkpoint, write_run


@pytest.fixture(scope="module")
def run_and_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    state, config = neox_state()
    states = trajectory(state, [0, 10, 20])
    root = write_run(base / "run", states, config)
    store = base / "s.duckdb"
    result = CliRunner().invoke(main, ["ingest", str(root), "--store", str(store), "--tokens-per-step", "100"])
    assert result.exit_code == 0, result.output
    return root, store, states, config


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split())
    assert text.startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_sql_formats(run_and_store, tmp_path):
    _, store, _, _ = run_and_store
    q = "SELECT step, tokens FROM checkpoints ORDER BY step"
    res = invoke("sql", q, "--store", store, "--format", "csv")
    assert res.exit_code == 0 and res.output.splitlines() == ["step,tokens", "0,0", "10,1000", "20,2000"]
    res = invoke("sql", q, "--store", store, "--format", "json")
    assert json.loads(res.output) == [{"step": 0, "tokens": 0}, {"step": 10, "tokens": 1000}, {"step": 20, "tokens": 2000}]
    out = tmp_path / "r.parquet"
    assert invoke("sql", q, "--store", store, "--format", "parquet", "-o", out).exit_code == 0
    assert pl.read_parquet(out)["tokens"].to_list() == [0, 1000, 2000]
    res = invoke("sql", "SELECT count(*) AS n FROM metrics WHERE metric = 'alpha'", "--store", store)
    assert res.exit_code == 0 and " n " in res.output
    assert invoke("sql", "EXPLAIN SELECT * FROM metrics", "--store", store).exit_code == 0


def test_env_store_and_ls(run_and_store, monkeypatch):
    _, store, _, _ = run_and_store
    monkeypatch.setenv("CKPTSCOPE_STORE", str(store))
    res = invoke("ls")
    assert res.exit_code == 0
    assert "gpt_neox" in res.output and "weights" in res.output and "no anomalies" in res.output


@pytest.mark.parametrize("query,fragments", [
    ("SELEC 1", ["invalid SQL"]),
    ("SELECT nope FROM metrics", ["query failed", "nope"]),
    ("DELETE FROM metric_values", ["read-only", "DELETE"]),
    ("DROP TABLE runs", ["read-only", "DROP"]),
    ("CREATE TABLE x AS SELECT 1", ["read-only", "CREATE"]),
    ("COPY metric_values TO 'x.csv'", ["read-only", "COPY"]),
    ("SELECT 1; DELETE FROM runs", ["read-only"]),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'leak.csv'", ["read-only", "COPY"]),
    ("SET threads = 1", ["read-only", "SET"]),
    ("ATTACH 'other.duckdb' AS o", ["read-only", "ATTACH"]),
])
def test_sql_refuses_bad_and_writing_statements(run_and_store, query, fragments, tmp_path, monkeypatch):
    _, store, _, _ = run_and_store
    monkeypatch.chdir(tmp_path)
    before = digest(store)
    assert_clean_error(invoke("sql", query, "--store", store), *fragments)
    assert digest(store) == before
    assert list(tmp_path.iterdir()) == []  # no file written beside it either


def test_sql_missing_store_is_not_created(tmp_path):
    assert_clean_error(invoke("sql", "SELECT 1", "--store", tmp_path / "none.duckdb"), "does not exist")
    assert not (tmp_path / "none.duckdb").exists()


class Evil(argparse.Namespace):
    """An object a weights-only load must refuse to construct."""


def bad_source(kind: str, base: Path, states, config) -> Path:
    run = base / kind
    if kind == "missing":
        return run
    if kind == "empty":
        run.mkdir()
        (run / "notes.txt").write_text("no checkpoints here")
        return run
    write_run(run, {0: states[0]}, config)
    if kind == "truncated":
        write_checkpoint(run / "step10", states[10], config)
        f = run / "step10" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "not-an-object":
        (run / "step10").mkdir()
        (run / "step10" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    elif kind == "garbage":
        (run / "step10").mkdir()
        (run / "step10" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif kind == "unpickling":
        (run / "step10").mkdir()
        torch.save({"w": torch.zeros(2), "args": Evil(lr=1)}, run / "step10" / "pytorch_model.bin")
    elif kind == "shapes":
        bigger = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.endswith("dense.weight") else v) for k, v in states[10].items()}
        write_checkpoint(run / "step10", bigger, config)
    return run


@pytest.mark.parametrize("kind,fragments", [
    ("missing", ["no such file or directory"]),
    ("empty", ["no checkpoints found"]),
    ("truncated", ["truncated safetensors file"]),
    ("garbage", ["corrupt safetensors header"]),
    ("not-an-object", ["corrupt safetensors header", "not a JSON object"]),
    ("unpickling", ["refused", "arbitrary unpickling"]),
    ("shapes", ["step 10", "has shape", "one architecture"]),
])
def test_bad_sources_leave_store_untouched(run_and_store, tmp_path, kind, fragments):
    _, store, states, config = run_and_store
    before = digest(store)
    source = bad_source(kind, tmp_path, states, config)
    assert_clean_error(invoke("ingest", source, "--store", store), *fragments)
    assert digest(store) == before
    fresh = tmp_path / "fresh.duckdb"
    assert_clean_error(invoke("ingest", source, "--store", fresh), *fragments)
    assert not fresh.exists()


def test_shape_mismatch_against_stored_model(run_and_store, tmp_path):
    _, store, _, _ = run_and_store
    other_state, other_cfg = neox_state()
    other_state = {k: (torch.zeros(v.shape[0] + 2, *v.shape[1:]) if k.endswith("dense.weight") else v) for k, v in other_state.items()}
    run = write_run(tmp_path / "run", {30: other_state}, other_cfg)
    before = digest(store)
    assert_clean_error(invoke("ingest", run, "--store", store, "--name", "run"), "in the store has", "another --name")
    assert digest(store) == before


@pytest.mark.parametrize("args,fragments", [
    (["--analyzers", "weights,bogus"], ["unknown analyzer 'bogus'", "weights"]),
    (["--steps", "7"], ["step 7 is not available", "10"]),
    (["--steps", "1:x"], ["bad step range"]),
    (["--tokens-per-step", "0"], ["--tokens-per-step"]),
    (["--device", "gpu0"], ["--device", "not a torch device"]),
    (["--device", "cuda"], ["no CUDA GPU"]),
])
def test_bad_options(run_and_store, args, fragments):
    root, store, _, _ = run_and_store
    before = digest(store)
    assert_clean_error(invoke("ingest", root, "--store", store, *args), *fragments)
    assert digest(store) == before


def test_locked_store(run_and_store, monkeypatch):
    """A process outside ckptscope holding the file: readers and writers wait, then say who holds it."""
    root, store, _, _ = run_and_store
    monkeypatch.setenv("CKPTSCOPE_LOCK_WAIT", "1")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,sys,time; c=duckdb.connect({str(store)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert_clean_error(invoke("ingest", root, "--store", store, "--force"), "locked by another process", f"PID {holder.pid}")
        assert_clean_error(invoke("sql", "SELECT 1", "--store", store), "locked")
    finally:
        holder.kill()
        holder.wait()


def test_kill_during_ingest_then_resume(tmp_path):
    """SIGKILL after the first checkpoint committed: a rerun completes with no duplicate rows."""
    steps = list(range(0, 200, 10))
    cfg_state, config = neox_state()
    big = {k: torch.randn(1024, 1024) if k.endswith("attention.dense.weight") else v for k, v in cfg_state.items()}
    run = write_run(tmp_path / "run", trajectory(big, steps), config)
    store = tmp_path / "s.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ckptscope.cli", "ingest", str(run), "--store", str(store)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None and not committed:  # readers see commits mid-ingest
        try:
            committed = ckptscope.Store(store, read_only=True).sql("SELECT count(*) FROM checkpoints").item()
        except ckptscope.CkptscopeError:  # not created yet
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "ingest finished before it could be killed; make the run bigger"
    with ckptscope.Store(store, read_only=True) as db:
        partial = db.sql("SELECT count(*) FROM checkpoints").item()
    assert 0 < partial < len(steps)
    report = ckptscope.ingest(run, store=store)
    assert report.height == len(steps) - partial
    reference = tmp_path / "clean.duckdb"
    ckptscope.ingest(run, store=reference)
    q = "SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL"
    with ckptscope.Store(store, read_only=True) as a, ckptscope.Store(reference, read_only=True) as b:
        assert a.sql("SELECT count(*) FROM runs").item() == len(steps) * len(registry.DEFAULT)  # one per step and analyzer
        assert a.sql(q).equals(b.sql(q))
        assert a.sql("SELECT count(*) FROM spectra").item() == b.sql("SELECT count(*) FROM spectra").item()


def test_demo_ingests_embedded_suite_and_answers_queries(tmp_path):
    store = tmp_path / "demo.duckdb"
    res = invoke("demo", "--store", store)
    assert res.exit_code == 0, res.output
    assert "How far layer 0's MLP input matrix moved" in res.output and "error" not in res.output
    suite = json.loads((Path(ckptscope.__file__).parent / "demo_suite" / "suite.json").read_text())
    with ckptscope.Store(store, read_only=True) as db:
        ck = db.sql("SELECT step, tokens FROM checkpoints WHERE status = 'ok' ORDER BY step")
        assert ck["step"].to_list() == suite["steps"]
        assert ck["tokens"].to_list() == [s * suite["tokens_per_step"] for s in suite["steps"]]
        assert db.anomalies().height == 0
        assert db.sql("SELECT count(DISTINCT layer) FROM metrics WHERE component = 'attn.q'").item() == 4
        # the memorisation profile of the suite's once-seen sequences against its held-out ones
        inst = db.sql("SELECT att, ci_low, ci_high, n_cohorts FROM memorization_profile_summary "
                      "WHERE model = 'demo-neox' AND kind = 'instantaneous'").row(0, named=True)
        persistent = db.sql("SELECT event_time, att FROM memorization_profile_summary WHERE model = 'demo-neox' "
                            "AND kind = 'persistent' ORDER BY event_time").rows()
        placebo = db.sql("SELECT avg(att) FROM memorization_profile WHERE model = 'demo-neox' AND event_time < 0").item()
        first_seen = db.sql("SELECT min(first_seen_step), max(first_seen_step), count(DISTINCT sequence_id) "
                            "FROM sequence_stats WHERE split = 'train'").row(0)
    order = suite["data_order"]
    lo, hi, every = map(int, order["profile"]["steps"].split(":"))
    assert first_seen[:2] == (lo, hi) and first_seen[2] == order["profile"]["per_step"] * len(range(lo, hi + 1, every))
    # planted: training on a sequence lowers its surprisal at the next checkpoint, the effect decays, and
    # before training the cohorts move like the held-out sequences
    assert inst["ci_high"] < 0 and inst["n_cohorts"] == 4
    assert persistent[0][1] == inst["att"] and persistent[1][1] > inst["att"]
    assert abs(placebo) < abs(inst["att"]) / 4
    printed = next(line for line in res.output.splitlines() if "instantaneous ATT" in line)
    assert f"instantaneous ATT {inst['att']:.4g} (95% interval {inst['ci_low']:.4g} to {inst['ci_high']:.4g}, 4 cohorts)" in printed
    assert invoke("demo", "--store", store).exit_code == 0  # a rerun resumes: nothing recomputed, same answers

    suite_dir = Path(ckptscope.__file__).parent / "demo_suite"
    first, final = suite["steps"][0], suite["steps"][-1]
    res = invoke("analyze", "memorization", "demo-neox", "--store", store, "--corpus", suite_dir / "canaries.jsonl",
                 "--steps", f"{first},{final}")
    assert res.exit_code == 0, res.output
    res = invoke("analyze", "convergence", "demo-neox", "--store", store, "--probe", suite_dir / "probe.jsonl",
                 "--steps", f"{first},512,{final}")
    assert res.exit_code == 0, res.output
    with ckptscope.Store(store, read_only=True) as db:
        mem = dict(db.sql("SELECT step, memorized_rate FROM memorization_summary WHERE model = 'demo-neox'").rows())
        assert mem[first] == 0 and mem[final] == suite["canaries_memorized_at_final"] / suite["num_canaries"] > 0
        cka = db.sql("SELECT step, min(value), max(value) FROM metrics WHERE metric = 'cka_final' GROUP BY step ORDER BY step").rows()
        assert [c[0] for c in cka] == [first, 512, final]
        assert cka[-1][1:] == (pytest.approx(1.0), pytest.approx(1.0)) and cka[0][1] < 0.9
        assert db.sql("SELECT count(*) FROM runs WHERE analyzer = 'weights'").item() == len(suite["steps"])  # untouched
    assert_clean_error(invoke("analyze", "memorization", "nope", "--store", store, "--corpus", suite_dir / "canaries.jsonl"),
                       "model 'nope' is not in", "demo-neox")


def test_top_level_help_lists_every_command_without_loading_torch():
    """`ckptscope --help` shows the lazily built commands' own help line, and starts without torch."""
    import click

    from ckptscope.cli import _Commands

    code = ("import sys; from ckptscope.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("no torch")
    for name, short in _Commands.SHORT_HELP.items():
        built = main.get_command(click.Context(main), name)
        assert built.help.split("\n\n")[0].strip() == short, name
        assert f"  {name} " in out and short[:30] in out
