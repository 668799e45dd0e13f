"""A store opens in the DuckDB tools researchers already have, not only in the DuckDB ckptscope links.

ckptscope writes with duckdb 2.x, whose newest storage format DuckDB 1.x cannot read. The oldest
DuckDB CLI on PyPI (`duckdb-cli`, a real 1.x binary) opens a store made by a real ingest, and its
answers must equal the Python API's.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
from pathlib import Path

import duckdb
import pytest

import ckptscope
from runs import neox_state, trajectory, write_run

QUERIES = {
    # every metric row, exactly (doubles round-trip through CSV text)
    "metrics": "SELECT model, step, tokens, tensor, component, metric, value FROM metrics ORDER BY ALL",
    # the JSON, list and macro features of the schema
    "json_lists_macros": """SELECT m.model, (m.config->>'hidden_size')::INTEGER AS hidden, json_extract(r.parameters, '$.rtol')::DOUBLE AS rtol,
                                   s.tensor, s.kind, len(s.sv) AS n, list_sum(s.sv) AS total, t.shape[1] AS rows_stored,
                                   (SELECT count(*) FROM stabilization_at(0.5)) AS stabilized
                            FROM spectra s JOIN runs r ON r.run_id = s.run_id JOIN models m ON m.model = s.model
                            JOIN tensors t ON t.model = s.model AND t.step = s.step AND t.tensor = s.tensor
                            ORDER BY ALL""",
}


def cli_binary() -> Path:
    spec = importlib.util.find_spec("duckdb_cli")
    if spec is None or spec.origin is None:
        pytest.skip("the DuckDB CLI is not installed (pip install -e '.[test]' installs duckdb-cli)")
    binary = Path(spec.origin).parent / "duckdb"
    if not binary.is_file():
        pytest.skip(f"duckdb-cli has no bundled binary at {binary}")
    return binary


def cli(binary: Path, store: Path, query: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), "-no-init", "-readonly", "-bail", "-csv", str(store), "-c", query],
                          capture_output=True, text=True, timeout=120)


def cli_rows(binary: Path, store: Path, query: str) -> list[tuple]:
    """The CLI's rows, with every field as Python reads it back (NULL → None, numbers → float)."""
    result = cli(binary, store, query)
    assert result.returncode == 0, result.stderr
    reader = csv.reader(io.StringIO(result.stdout))
    next(reader)  # header
    return [tuple(parse(field) for field in row) for row in reader]


def parse(field: str):
    if field == "NULL" or field == "":
        return None
    try:
        return float(field)
    except ValueError:
        return field


def api_rows(store: Path, query: str) -> list[tuple]:
    with ckptscope.Store(store, read_only=True) as db:
        rows = db.sql(query).rows()
    return [tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in row) for row in rows]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store written by two ingests of a real run: the second reopens it, adds a step and rebases `final_*`."""
    base = tmp_path_factory.mktemp("compat")
    state, config = neox_state()
    states = trajectory(state, [0, 1, 2])
    store = base / "store.duckdb"
    ckptscope.ingest(write_run(base / "run", {s: states[s] for s in (0, 1)}, config), store=store, name="neox",
                     tokens_per_step=2048)
    ckptscope.ingest(write_run(base / "run", {2: states[2]}, config), store=store, name="neox", tokens_per_step=2048)
    return store


def test_cli_1x_reads_the_store_like_the_python_api(store):
    binary = cli_binary()
    version = subprocess.run([str(binary), "-version"], capture_output=True, text=True).stdout
    assert version.startswith("v1."), version  # the point is an older major version than the linked duckdb
    for name, query in QUERIES.items():
        expected = api_rows(store, query)
        assert len(expected) > (100 if name == "metrics" else 10), name
        assert cli_rows(binary, store, query) == expected, name
    assert {row[1] for row in api_rows(store, QUERIES["metrics"])} == {0.0, 1.0, 2.0}


def test_converting_a_newest_format_store(store, tmp_path):
    """The docs' recipe for a store written before ckptscope chose the format: copy it into one DuckDB 1.x reads."""
    binary = cli_binary()
    if int(duckdb.__version__.split(".")[0]) < 2:
        pytest.skip(f"duckdb {duckdb.__version__}'s default format is one DuckDB 1.x reads; nothing to convert")
    newest = tmp_path / "newest.duckdb"  # DuckDB's default format, as ckptscope wrote before it chose one
    con = duckdb.connect()
    con.execute(f"ATTACH '{store}' AS src (READ_ONLY); ATTACH '{newest}' AS dst; "
                "COPY FROM DATABASE src TO dst")
    con.close()
    refused = cli(binary, newest, "SELECT count(*) FROM metrics")
    assert refused.returncode != 0 and "version number" in refused.stderr, refused.stderr
    with ckptscope.Store(newest) as db:  # an existing file keeps its format when ckptscope writes to it again
        db.sql("SELECT nextval('run_ids')")  # a write, flushed on close
    assert cli(binary, newest, "SELECT 1").returncode != 0

    converted = tmp_path / "converted.duckdb"
    con = duckdb.connect()
    con.execute(f"ATTACH '{newest}' AS old (READ_ONLY); ATTACH '{converted}' AS new (STORAGE_VERSION 'v1.1.0'); "
                "COPY FROM DATABASE old TO new")
    con.close()
    assert cli_rows(binary, converted, QUERIES["metrics"]) == api_rows(store, QUERIES["metrics"])
    with ckptscope.Store(converted) as db:  # the run_id sequence came along: new runs do not reuse ids
        assert db.sql("SELECT nextval('run_ids') AS n")["n"][0] > db.sql("SELECT max(run_id) AS m FROM runs")["m"][0]
