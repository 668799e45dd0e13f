"""What the command line shows: text exactly as stored, tables that fit, commands that can be
copied, one-line errors when the store cannot be written, and run summaries that say what
happened. Everything runs the real `ckptscope` console script in a subprocess, with its output
piped, as a user's shell or a script would."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.errors import StoreError
from runs import neox_state, trajectory, write_checkpoint, write_run

DEMO_SUITE = Path(ckptscope.__file__).parent / "demo_suite"
# `[...]` is rich markup and `:x:` an emoji code: both must come out as typed.
ODD_NAME = "gpt[lr=3e-3]:x:y"


def cli(*args: object, columns: int = 80, cwd: Path | None = None, check: bool = True,
        preexec_fn=None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `ckptscope ARGS` with stdout and stderr piped and a terminal width of `columns`."""
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1"}
    env.pop("CKPTSCOPE_STORE", None)
    proc = subprocess.run([*prefix, shutil.which("ckptscope") or "ckptscope", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in `text`, cells stripped."""
    return [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """A 3-step run in `sweeps/gpt[lr=3e-3]:x:y`, ingested by the CLI into a fresh store."""
    base = tmp_path_factory.mktemp("odd")
    state, config = neox_state()
    root = write_run(base / "sweeps" / ODD_NAME, trajectory(state, [0, 10, 20]), config)
    store = base / "s.duckdb"
    proc = cli("ingest", root, "--store", store, "--tokens-per-step", 100)
    return root, store, proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`ckptscope demo` as a user runs it: in a working directory, with the default store name."""
    cwd = tmp_path_factory.mktemp("demo")
    proc = cli("demo", cwd=cwd)
    return cwd, cwd / "ckptscope-demo.duckdb", proc


# -- 1. text from users, files and the store is shown as it is ---------------------------------

def test_bracketed_and_colon_names_verbatim_everywhere(odd_run, tmp_path):
    root, store, ingest = odd_run
    assert f"{ODD_NAME} checkpoints" in ingest.stderr  # the progress bar's description
    ls = cli("ls", "--store", store)
    assert table_rows(ls.stdout)[0][0] == ODD_NAME
    assert f"{ODD_NAME}: analyzers {', '.join(sorted(registry.DEFAULT))}; source {root}" in ls.stdout
    sql = cli("sql", "SELECT model, source FROM models", "--store", store, columns=300)
    assert table_rows(sql.stdout) == [[ODD_NAME, str(root)]]
    report = cli("report", "--store", store, "--models", ODD_NAME, "-o", tmp_path / "r.html")
    assert "wrote" in report.stdout and ODD_NAME in (tmp_path / "r.html").read_text()
    err = one_line_error(cli("report", "--store", store, "--models", "nope[x]:x:", "-o", tmp_path / "n.html", check=False))
    assert "nope[x]:x:" in err and ODD_NAME in err


def test_sql_strings_and_error_messages_are_not_markup_or_emoji(odd_run):
    root, store, _ = odd_run
    res = cli("sql", "SELECT 'x:x:y' AS a, '[bold]hi[/bold]' AS b, ':thumbs_up: [red]' AS c", "--store", store)
    assert table_rows(res.stdout) == [["x:x:y", "[bold]hi[/bold]", ":thumbs_up: [red]"]]
    assert "❌" not in res.stdout and "👍" not in res.stdout
    err = one_line_error(cli("ingest", root, "--store", store, "--steps", "banana", check=False), "A:B:S")
    assert "🅱" not in err


# -- 7. sql tables: row limit, float digits, width ------------------------------------------------

THIRDS = "SELECT range AS i, range / 3 AS third, 123456789.123::DOUBLE * range AS big FROM range(100)"


def test_sql_table_row_limit_and_footer(odd_run):
    _, store, _ = odd_run
    res = cli("sql", THIRDS, "--store", store)
    rows = table_rows(res.stdout)
    assert [r[0] for r in rows] == [str(i) for i in range(40)]
    assert "40 of 100 rows shown; --max-rows N shows more, --max-rows 0 shows all" in res.stdout
    assert len(table_rows(cli("sql", THIRDS, "--store", store, "--max-rows", 7).stdout)) == 7
    every = cli("sql", THIRDS, "--store", store, "--max-rows", 0).stdout
    assert len(table_rows(every)) == 100 and "rows shown" not in every
    small = cli("sql", "SELECT 1 AS one", "--store", store).stdout
    assert table_rows(small) == [["1"]] and "rows shown" not in small
    one_line_error(cli("sql", THIRDS, "--store", store, "--format", "csv", "--max-rows", 3, check=False), "--max-rows")


def test_sql_table_floats_have_six_significant_digits_csv_json_stay_exact(odd_run, tmp_path):
    _, store, _ = odd_run
    rows = table_rows(cli("sql", THIRDS, "--store", store, "--max-rows", 0).stdout)
    assert rows[1] == ["1", "0.333333", "1.23457e+08"]
    assert rows[2] == ["2", "0.666667", "2.46914e+08"]
    assert rows[0] == ["0", "0", "0"]
    exact = [(i, i / 3, 123456789.123 * i) for i in range(100)]
    text = cli("sql", THIRDS, "--store", store, "--format", "csv").stdout
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["i", "third", "big"] and len(parsed) == 101
    assert [(int(a), float(b), float(c)) for a, b, c in parsed[1:]] == exact
    assert pl.read_json(io.StringIO(cli("sql", THIRDS, "--store", store, "--format", "json").stdout)).rows() == exact


WIDE = ("SELECT range AS step, 'gpt_neox.layers.' || range || '.attention.query_key_value.weight.with.a.long.suffix' AS tensor, "
        "range * 1.0e-7 / 7 AS value, 'a sentence long enough that it has to wrap at spaces on a narrow terminal' AS note, "
        "range * 98765.4321::DOUBLE AS big FROM range(3)")


def test_sql_table_fits_the_terminal_without_breaking_numbers(odd_run, tmp_path):
    _, store, _ = odd_run
    numbers = [(f"{i * 1e-7 / 7:.6g}", f"{i * 98765.4321:.6g}") for i in range(3)]
    wide = cli("sql", WIDE, "--store", store, columns=300).stdout
    rows = table_rows(wide)
    assert [(r[0], r[2], r[4]) for r in rows] == [(str(i), *numbers[i]) for i in range(3)]
    assert [r[1] for r in rows] == [f"gpt_neox.layers.{i}.attention.query_key_value.weight.with.a.long.suffix" for i in range(3)]
    assert "a sentence long enough that it has to wrap at spaces on a narrow terminal" in wide
    narrow = cli("sql", WIDE, "--store", store, columns=80).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 80
    for i, (value, big) in enumerate(numbers):  # each number whole, on the line of its step
        line = next(line for line in narrow.splitlines() if re.match(rf"│\s+{i} │", line))
        assert f" {value} │" in line and f" {big} │" in line
        assert "gpt_neox.layers" in line and "…" in line  # the long name is shortened, not wrapped
    # A table written to a file has no terminal: every row, each whole on one line.
    out = tmp_path / "t.txt"
    cli("sql", THIRDS, "--store", store, "-o", out, columns=80)
    assert len(table_rows(out.read_text())) == 100 and "rows shown" not in out.read_text()
    cli("sql", WIDE, "--store", store, "-o", out, columns=80)
    assert table_rows(out.read_text()) == rows


# -- 8. the demo's example commands --------------------------------------------------------------

def printed_commands(text: str) -> list[str]:
    return [line.removeprefix("$ ") for line in text.splitlines() if line.startswith("$ ")]


def test_demo_commands_run_through_bash_as_printed(demo, tmp_path):
    cwd, store, proc = demo
    commands = printed_commands(proc.stdout)
    sql = [c for c in commands if c.startswith("ckptscope sql ")]
    assert len(sql) == 5 and all(c.startswith("ckptscope sql --store ckptscope-demo.duckdb ") for c in sql)
    # the memorisation-profile path, in order, on the suite's data order and into the same store
    pipeline = [c for c in commands if c not in sql]
    assert [c.split()[1:3] for c in pipeline] == [["corpus", "from-data"], ["analyze", "sequence_stats"], ["analyze", "profile"]]
    assert all("--store ckptscope-demo.duckdb" in c for c in pipeline[1:]) and "-o ckptscope-demo-corpus.parquet" in pipeline[0]
    assert "Gradual rank increase" not in proc.stdout
    lines = proc.stdout.splitlines()
    for command in sql:  # one line each even at 80 columns, the table right below it
        assert lines[lines.index(f"$ {command}") + 1].startswith("┏")
    printed_tables = [table_rows(block) for block in proc.stdout.split("\n$ ")[1:] if block.startswith("ckptscope sql ")]
    assert "try: ckptscope ls --store ckptscope-demo.duckdb" in proc.stdout
    env = {**os.environ, "COLUMNS": "80"}

    def bash(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)

    # Rerun as printed: the corpus is rewritten the same, sequence_stats has nothing left to do, and the
    # profile is recomputed to the same line the demo printed below each command.
    corpus = cwd / "ckptscope-demo-corpus.parquet"
    before = digest(corpus)
    for command in pipeline:
        res = bash(command)
        assert res.returncode == 0, (command, res.stdout, res.stderr)
        if "sequence_stats" in command:
            assert res.stdout.startswith("nothing to do"), res.stdout
        else:
            assert res.stdout.splitlines()[0] == lines[lines.index(f"$ {command}") + 1], (command, res.stdout)
    assert digest(corpus) == before

    def run_all() -> list[list[list[str]]]:
        results = []
        for command in sql + ["ckptscope ls --store ckptscope-demo.duckdb"]:
            res = bash(command)
            assert res.returncode == 0 and not res.stderr, (command, res.stdout, res.stderr)
            assert table_rows(res.stdout), (command, res.stdout)
            results.append(table_rows(res.stdout))
        return results

    assert run_all()[:5] == printed_tables
    # A second model with later steps in the same store: "the final step" of each query stays the demo's.
    state, config = neox_state()
    other = write_run(tmp_path / "other", trajectory(state, [0, 5000]), config)
    cli("ingest", other, "--store", store)
    assert run_all()[:5] == printed_tables


def test_demo_trend_query_shows_a_trend(demo):
    cwd, store, proc = demo
    trend = next(c for c in printed_commands(proc.stdout) if "from_init" in c)
    res = subprocess.run(["bash", "-c", trend + " --format csv"], cwd=cwd, capture_output=True, text=True, timeout=120)
    from_init = [float(r["from_init"]) for r in csv.DictReader(io.StringIO(res.stdout))]
    assert len(from_init) == 17 and from_init == sorted(from_init) and from_init[0] == 0 and from_init[-1] > 2


# -- 2. a store that cannot be written -------------------------------------------------------------

def _without_privileges() -> tuple[str, ...]:
    """A command prefix under which a read-only directory is really read-only: nothing for a
    normal user; for root (whom permissions do not stop), `setpriv` dropping every capability."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop the capability that bypasses permissions")
    return (setpriv, "--bounding-set=-all", "--inh-caps=-all")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory holding a store, which the CLI run under `prefix` cannot write to."""
    prefix = _without_privileges()
    ro = tmp_path / "ro"
    ro.mkdir()
    state, config = neox_state()
    run = write_run(tmp_path / "run", trajectory(state, [0, 10]), config)
    ckptscope.ingest(run, store=ro / "s.duckdb")
    ro.chmod(0o555)
    probe = subprocess.run([*prefix, "sh", "-c", f"touch '{ro}/probe'"], capture_output=True)
    if probe.returncode == 0:
        ro.chmod(0o755)
        pytest.skip("this user can write to a mode 555 directory even with capabilities dropped")
    yield ro, run, prefix
    ro.chmod(0o755)


def test_read_only_store_directory_is_one_line(read_only_dir, tmp_path):
    ro, run, prefix = read_only_dir
    before = digest(ro / "s.duckdb")
    for store in (ro / "s.duckdb", ro / "new.duckdb"):
        err = one_line_error(cli("ingest", run, "--store", store, "--name", "other", prefix=prefix, check=False),
                             f"cannot write store {store}", str(ro), "not writable", "--store")
        assert "TransactionException" not in err
    assert digest(ro / "s.duckdb") == before and not (ro / "new.duckdb").exists()
    assert table_rows(cli("sql", "SELECT count(*) FROM checkpoints", "--store", ro / "s.duckdb", prefix=prefix).stdout) == [["2"]]


def test_directory_turning_read_only_mid_run_is_one_store_error(read_only_dir, tmp_path):
    """The directory is writable when the store opens and not when a checkpoint commits."""
    ro, run, prefix = read_only_dir
    ro.chmod(0o755)
    script = textwrap.dedent(f"""
        import os, ckptscope
        from ckptscope.errors import StoreError
        with ckptscope.Store({str(ro / 's.duckdb')!r}) as db:
            os.chmod({str(ro)!r}, 0o555)
            try:
                ckptscope.ingest({str(run)!r}, store=db, name="other")
            except StoreError as exc:
                print("StoreError:", exc)
    """)
    res = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith(f"StoreError: cannot write store {ro / 's.duckdb'}: "), res.stdout
    assert "Permission denied" in res.stdout and "not writable" in res.stdout and len(res.stdout.splitlines()) == 1


def test_disk_full_while_writing_is_one_line_and_resumes(demo, tmp_path):
    """A file size limit (RLIMIT_FSIZE, EFBIG: what a full disk looks like to DuckDB) stops the
    run part-way with one line; committed checkpoints stay, and the rerun completes the store."""
    import resource

    _, reference, _ = demo
    store = tmp_path / "full.duckdb"
    limit = 2_000_000  # the demo store grows to ~7.6 MB: this stops it about a quarter of the way

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli("ingest", DEMO_SUITE, "--store", store, "--name", "demo-neox", "--tokens-per-step", 2048,
               preexec_fn=small_disk, check=False)
    one_line_error(proc, f"cannot write store {store}", "File too large", "free space", "run the same command again")
    with ckptscope.Store(store, read_only=True) as db:
        done = db.sql("SELECT count(*) FROM checkpoints").item()
    assert 0 < done < 17
    cli("ingest", DEMO_SUITE, "--store", store, "--name", "demo-neox", "--tokens-per-step", 2048)
    q = ("SELECT m.step, m.tensor, m.component, m.metric, m.value FROM metric_values m JOIN runs r USING (run_id) "
         "WHERE r.analyzer = 'weights' AND m.model = 'demo-neox' ORDER BY ALL")
    with ckptscope.Store(store, read_only=True) as a, ckptscope.Store(reference, read_only=True) as b:
        assert a.sql(q).equals(b.sql(q))


def test_store_deleted_mid_run_is_one_store_error(tmp_path):
    state, config = neox_state()
    run = write_run(tmp_path / "run", trajectory(state, [0, 10]), config)
    path = tmp_path / "s.duckdb"
    with ckptscope.Store(path) as db:
        path.unlink()
        with pytest.raises(StoreError, match="was deleted or replaced while this command ran"):
            ckptscope.ingest(run, store=db)


# -- 10. run summaries and advice -------------------------------------------------------------------

def test_ingest_summarizes_anomalies_and_leaves_no_stale_bar(tmp_path):
    state, config = neox_state()
    states = trajectory(state, [0, 2, 4])
    bad = dict(states[4])
    name = "gpt_neox.layers.0.attention.dense.weight"
    bad[name] = bad[name].clone()
    bad[name][0, :3] = float("nan")
    bad[name][1, 0] = float("inf")
    run = write_run(tmp_path / "run", {0: states[0], 2: states[2], 4: bad, 8: states[2]}, config)
    store = tmp_path / "s.duckdb"
    proc = cli("ingest", run, "--store", store)
    assert proc.stdout.splitlines()[0].startswith("ingested 4 checkpoint(s) in ")
    kinds = ["circuits_skipped", "duplicate_checkpoint", "inf", "nan", "non_finite"]  # mp_fit and circuits skip the NaN matrix
    assert proc.stdout.splitlines()[1] == f"5 anomalies: {', '.join(f'1 {k}' for k in kinds)}; see `ckptscope ls --store {store}`"
    with ckptscope.Store(store, read_only=True) as db:  # the line counts what the store recorded
        assert sorted(db.anomalies()["kind"].to_list()) == kinds
    assert not re.search(r"^step \d+", proc.stderr, re.MULTILINE), proc.stderr  # the per-step bar is gone
    again = cli("ingest", run, "--store", store)
    assert "anomal" not in again.stdout and "nothing to do" in again.stdout  # nothing ran, nothing to count
    clean = cli("ingest", write_run(tmp_path / "clean", {0: states[0], 2: states[2]}, config), "--store", tmp_path / "c.duckdb")
    assert clean.stdout.splitlines()[1] == "no anomalies found"


def test_analyze_says_analyzed_without_warnings_or_stale_bar(demo):
    _, store, _ = demo
    proc = cli("analyze", "memorization", "demo-neox", "--store", store, "--corpus", DEMO_SUITE / "canaries.jsonl",
               "--steps", "0,2000", "--force")
    assert proc.stdout.splitlines() == [proc.stdout.splitlines()[0], "no anomalies found"]
    assert re.fullmatch(r"analyzed 2 checkpoint\(s\) in [\d.]+s", proc.stdout.splitlines()[0])
    assert "Warning" not in proc.stderr and "past_key_values" not in proc.stderr, proc.stderr
    assert not re.search(r"^step \d+", proc.stderr, re.MULTILINE), proc.stderr


def test_advice_for_missing_store_and_damaged_local_file(tmp_path):
    one_line_error(cli("sql", "SELECT 1", "--store", tmp_path / "none.duckdb", check=False),
                   "`ckptscope demo` creates ckptscope-demo.duckdb", "--store ckptscope-demo.duckdb")
    state, config = neox_state()
    run = write_run(tmp_path / "run", trajectory(state, [0]), config)
    write_checkpoint(run / "step10", state, config)
    f = run / "step10" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = one_line_error(cli("ingest", run, "--store", tmp_path / "s.duckdb", check=False), "truncated safetensors file")
    assert "re-download" not in err and "copy, download or save it again" in err


def test_ls_shows_tokens_and_source(odd_run):
    root, store, _ = odd_run
    ls = cli("ls", "--store", store, columns=200).stdout
    header = next(line for line in ls.splitlines() if line.startswith("┃"))
    cells = dict(zip([c.strip() for c in header.strip("┃").split("┃")], table_rows(ls)[0]))
    assert cells["tokens"] == "2.0K" and cells["steps"] == "0..20 (3)"  # steps 0, 10, 20 at 100 tokens per step
    assert f"source {root}" in ls
