"""A separate package adds an analyzer with no edit to ckptscope: examples/plugin, really installed.

pip installs the example into a private directory; every ckptscope command then runs in a
subprocess that has it on its path, so the analyzer is found through its entry point alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ckptscope

PLUGIN = Path(__file__).parents[1] / "examples" / "plugin"
DEMO = Path(ckptscope.__file__).parent / "demo_suite"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
                    str(PLUGIN)], check=True, cwd=build, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return target


def run(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_installed_plugin_runs_through_ingest_store_sql_and_report(site, tmp_path):
    listed = run(site, "analyzers")
    assert listed.returncode == 0, listed.stderr
    assert "frobenius_per_entry 0.1.0 (from ckptscope-frobenius)" in listed.stdout
    assert "--min-entries (default 2)" in listed.stdout and "tables: frobenius_entries" in listed.stdout

    store = tmp_path / "s.duckdb"
    done = run(site, "ingest", str(DEMO), "--store", str(store), "--name", "demo", "--steps", "0,1000,2000",
               "--analyzers", "weights,frobenius_per_entry", "--min-entries", "64")
    assert done.returncode == 0, done.stderr

    rows = run(site, "sql", "--store", str(store), "--format", "json",
               "SELECT m.step, m.tensor, m.value, m.analyzer_version, r.parameters, f.entries, f.sum_squares "
               "FROM metrics m JOIN runs r USING (run_id) JOIN frobenius_entries f USING (run_id, tensor) "
               "WHERE m.metric = 'frobenius_per_entry'")
    assert rows.returncode == 0, rows.stderr
    got = {(r["step"], r["tensor"]): r for r in json.loads(rows.stdout)}
    expected = {}
    for step in (0, 1000, 2000):
        for name, w in load_file(DEMO / f"step{step}" / "model.safetensors").items():
            if w.ndim == 2 and w.size >= 64:
                w64 = w.astype(np.float64)
                expected[(step, name)] = (math.sqrt((w64 ** 2).sum() / w64.size), w64.size)
    assert set(got) == set(expected) and len(got) > 20
    for key, (value, size) in expected.items():
        assert got[key]["value"] == pytest.approx(value, rel=1e-12)
        assert got[key]["entries"] == size and got[key]["analyzer_version"] == "0.1.0"
        assert json.loads(got[key]["parameters"])["min_entries"] == 64

    report = tmp_path / "r.html"
    drawn = run(site, "report", "--store", str(store), "-o", str(report))
    assert drawn.returncode == 0, drawn.stderr
    html = report.read_text()
    assert "Frobenius norm per entry" in html and "FROM frobenius_entries" in html
    payload = json.loads(html.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0])
    lines = next(c for c in payload if c["type"] == "lines")
    assert len(lines["series"]) == len(expected) // 3 and all(s["x"] == [0, 1000, 2000] for s in lines["series"])

    again = run(site, "ingest", str(DEMO), "--store", str(store), "--name", "demo", "--steps", "0,1000,2000",
                "--analyzers", "frobenius_per_entry", "--min-entries", "2")
    assert again.returncode == 1 and "min_entries=64" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_the_plugins_own_test_passes(site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
                         capture_output=True, text=True, env=env, cwd=PLUGIN)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
