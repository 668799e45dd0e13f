"""`ckptscope serve`: real uvicorn on 127.0.0.1, real HTTP, real ingests into a real store, real Chromium.

The server runs as `ckptscope serve` in a subprocess (a DuckDB file is opened with one
configuration per process, and the server's is sandboxed), except where a limit is lowered for
a test: there uvicorn runs in a thread of this process, on its own copy of the store.

The background "training run" copies checkpoint directories into a run directory one at a time
and ingests after each, as `ingest --watch` would; it retries while the server holds the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ckptscope
from ckptscope.errors import CkptscopeError
from ckptscope.serve import check_bind, server
from runs import neox_state, trajectory, write_run

STEPS = [0, 1, 2, 4, 8, 16, 32]
FIRST = 3  # steps in the store before the server starts

WRITER = r"""
import shutil, sys, time
from pathlib import Path
import ckptscope
from ckptscope.errors import StoreError

source, run, store = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for name in sys.argv[4:]:
    time.sleep(0.3)
    shutil.copytree(source / name, run / name)
    for attempt in range(600):  # the server may hold the file for a moment; a writer waits (as ingest will)
        try:
            ckptscope.ingest(run, store=store, name="tiny", tokens_per_step=2048)
            break
        except StoreError as exc:
            if "is locked" not in str(exc):
                raise
            time.sleep(0.05)
    print("ingested", name, flush=True)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Every checkpoint of a small real run, written once; tests copy them into run directories."""
    state, config = neox_state(0)
    return write_run(tmp_path_factory.mktemp("source") / "run", trajectory(state, STEPS, seed=1), config)


def start_run(checkpoints: Path, base: Path, steps: list[int]) -> tuple[Path, Path]:
    """A run directory holding `steps` and a store with them ingested."""
    run, store = base / "run", base / "store.duckdb"
    run.mkdir()
    for step in steps:
        shutil.copytree(checkpoints / f"step{step}", run / f"step{step}")
    ckptscope.ingest(run, store=store, name="tiny", tokens_per_step=2048)
    return run, store


def writer(checkpoints: Path, run: Path, store: Path, steps: list[int]) -> subprocess.Popen:
    args = [str(checkpoints), str(run), str(store), *(f"step{s}" for s in steps)]
    return subprocess.Popen([sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def served(store: Path, *args: str, env: dict | None = None):
    """`ckptscope serve` in a subprocess on a free loopback port; yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "ckptscope.cli", "serve", "--store", str(store), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def served_here(store: Path, **kw):
    """uvicorn in a thread of this process (so a test can lower the module's limits); yields its URL."""
    import uvicorn

    sock = server._listen("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(server.app(store, **kw), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        srv.should_exit = True
        thread.join(10)


def get(url: str, path: str, headers: dict | None = None, **params: str) -> tuple[int, dict, bytes]:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(url.rstrip("/") + path + query, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def sql(url: str, query: str, **kw) -> list[dict]:
    status, _, body = get(url, "/api/sql", q=query, **kw)
    assert status == 200, body
    return json.loads(body)


def one_line_error(status_body: tuple[int, dict, bytes], status: int) -> str:
    got, headers, body = status_body
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error and "\n" not in error and set(json.loads(body)) == {"error"}
    return error


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- during an ingest ---------------------------------------------------------------------------------

def test_new_checkpoints_appear_during_an_ingest(checkpoints, tmp_path):
    run, store = start_run(checkpoints, tmp_path, STEPS[:FIRST])
    with served(store) as url:
        assert [m["steps"] for m in json.loads(get(url, "/api/models")[2])] == [FIRST]
        proc = writer(checkpoints, run, store, STEPS[FIRST:])
        seen, failures = [], []
        while proc.poll() is None:
            status, _, body = get(url, "/api/models")
            if status != 200:
                failures.append(body)
                continue
            steps = json.loads(body)[0]["steps"]
            if not seen or seen[-1] != steps:
                seen.append(steps)
            time.sleep(0.05)
        assert proc.returncode == 0, proc.stderr.read()
        assert failures == []
        # each new checkpoint was seen on its own, in order, while the ingest went on
        assert seen == list(range(FIRST, len(STEPS) + 1)), seen
        served_rows = sql(url, "SELECT step, tokens, status FROM checkpoints ORDER BY step")
        served_metrics = sql(url, "SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL")
        state = json.loads(get(url, "/api/state")[2])
    with ckptscope.Store(store, read_only=True) as db:  # an independent read, after the server stopped
        assert served_rows == db.sql("SELECT step, tokens, status FROM checkpoints ORDER BY step").to_dicts()
        assert served_rows == [{"step": s, "tokens": 2048 * s, "status": "ok"} for s in STEPS]
        expected = db.sql("SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL").to_dicts()
        assert served_metrics == pytest.approx(expected) and len(expected) > 100
        assert state["checkpoints"] == len(STEPS) and state["models"] == 1


def test_api_formats_match_the_store(checkpoints, tmp_path):
    _, store = start_run(checkpoints, tmp_path, STEPS[:FIRST])
    query = "SELECT step, tensor, metric, value FROM metrics WHERE metric = 'stable_rank' ORDER BY ALL"
    with ckptscope.Store(store, read_only=True) as db:
        expected = db.sql(query)
        summary = db.summary()
    with served(store) as url:
        assert json.loads(get(url, "/api/models")[2]) == json.loads(summary.write_json())
        assert sql(url, query) == expected.to_dicts()
        status, headers, body = get(url, "/api/sql", q=query, format="csv")
        assert status == 200 and headers["content-type"].startswith("text/csv")
        assert pl.read_csv(io.BytesIO(body)).equals(expected)
        status, _, body = get(url, "/api/sql", q=query, format="parquet")
        assert status == 200 and pl.from_arrow(pq.read_table(pa.BufferReader(body))).equals(expected)
        status, _, body = get(url, "/api/sql", q=query, format="arrow")
        assert status == 200 and pl.from_arrow(pa.ipc.open_stream(body).read_all()).equals(expected)
        assert sql(url, "SELECT step FROM checkpoints WHERE step < 0") == []
        assert "unknown format" in one_line_error(get(url, "/api/sql", q=query, format="xlsx"), 400)
        assert "?q=" in one_line_error(get(url, "/api/sql"), 400)
        # lists cannot go in CSV: the user's to fix, in one line
        assert "cannot write the result as csv" in one_line_error(get(url, "/api/sql", q="SELECT [1, 2] AS l", format="csv"), 400)
        assert "cannot write the result as json" in one_line_error(get(url, "/api/sql", q="SELECT 'a'::BLOB AS b"), 400)


# -- refusals, limits, security -----------------------------------------------------------------------

def test_writes_and_files_are_refused_and_the_store_is_untouched(checkpoints, tmp_path):
    _, store = start_run(checkpoints, tmp_path, STEPS[:2])
    before = sha(store)
    (tmp_path / "secret.csv").write_text("secret\nhunter2\n")
    refused = {
        "DELETE FROM checkpoints": "DELETE statements are refused",
        "DROP TABLE models": "DROP statements are refused",
        "SELECT 1; DELETE FROM models": "DELETE statements are refused",
        "SELECT 1; SELECT 2": "one statement at a time",
        "COPY checkpoints TO 'x.csv'": "COPY statements are refused",
        f"ATTACH '{tmp_path / 'other.duckdb'}'": "ATTACH statements are refused",
        "EXPLAIN ANALYZE DELETE FROM models": "DELETE statements are refused",
        f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')": "file system operations are disabled",
        f"SELECT * FROM '{tmp_path / 'secret.csv'}'": "file system operations are disabled",
        "SELECT content FROM read_blob('/etc/hostname')": "file system operations are disabled",
        "SELECT * FROM glob('/etc/*')": "file system operations are disabled",
        "SELECT * FROM read_text('/etc/hostname')": "file system operations are disabled",
        "SELEC 1": "syntax error",
        "SELECT nope FROM checkpoints": "nope",
    }
    with served(store) as url:
        for query, message in refused.items():
            assert message in one_line_error(get(url, "/api/sql", q=query), 400), query
    assert sha(store) == before
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "other.duckdb").exists()
    with ckptscope.Store(store, read_only=True) as db:  # the refusals are exactly those of `ckptscope sql`
        for query in list(refused)[:7]:
            with pytest.raises(CkptscopeError) as raised:
                db.sql(query)
            assert refused[query] in str(raised.value)


def test_limits(checkpoints, tmp_path, monkeypatch):
    _, store = start_run(checkpoints, tmp_path, STEPS[:2])
    monkeypatch.setattr(server, "QUERY_SECONDS", 1.0)
    monkeypatch.setattr(server, "MAX_ROWS", 1000)
    monkeypatch.setattr(server, "MAX_BYTES", 2**20)
    monkeypatch.setattr(server, "MAX_QUERY_CHARS", 200)
    with served_here(store) as url:
        assert len(sql(url, "SELECT * FROM range(1000)")) == 1000
        assert "more than 1,000 rows" in one_line_error(get(url, "/api/sql", q="SELECT * FROM range(1001)"), 400)
        big = "SELECT repeat('x', 2000) AS s FROM range(900)"  # 900 rows, 1.8 MB: under the row limit, over the bytes
        assert "larger than 1 MiB" in one_line_error(get(url, "/api/sql", q=big), 400)
        start = time.monotonic()
        error = one_line_error(get(url, "/api/sql", q="SELECT count(*) FROM range(1000000000000) a"), 400)
        assert "longer than 1 s" in error and time.monotonic() - start < 5
        assert "longer than 200 characters" in one_line_error(get(url, "/api/sql", q="SELECT 1" + " " * 200), 400)
        assert sql(url, "SELECT 42 AS answer") == [{"answer": 42}]  # the server still answers after all that


def test_token(checkpoints, tmp_path):
    _, store = start_run(checkpoints, tmp_path, STEPS[:2])
    with ckptscope.Store(store, read_only=True) as db:
        models = json.loads(db.summary().write_json())
    with served(store, "--token", "s3cret-token") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer s3cret-tokeN"}, {"Authorization": "Bearer s3cret-token2"}):
            for path in ("/api/models", "/api/sql?q=SELECT%201", "/api/state", "/api/dashboard", "/nowhere"):
                assert "Authorization: Bearer TOKEN" in one_line_error(get(url, path, headers), 401), (path, headers)
        status, headers, body = get(url, "/", {"Accept": "text/html"})  # a browser gets a login form, and no data
        assert status == 401 and b'type="password"' in body and b"tiny" not in body
        good = {"Authorization": "Bearer s3cret-token"}
        assert get(url, "/api/models", good)[0] == 200 and json.loads(get(url, "/api/models", good)[2]) == models
        assert get(url, "/", good)[0] == 200
    with served(store, env={"CKPTSCOPE_TOKEN": "from-env"}) as url:
        assert get(url, "/api/models")[0] == 401
        assert get(url, "/api/models", {"Authorization": "Bearer from-env"})[0] == 200


def test_public_host_needs_a_token(checkpoints, tmp_path):
    _, store = start_run(checkpoints, tmp_path, STEPS[:1])
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(CkptscopeError, match="pass --token TOKEN"):
            check_bind(host, None)
    with pytest.raises(CkptscopeError, match="token is empty"):
        check_bind("0.0.0.0", " ")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check_bind(host, None)
    env = {k: v for k, v in os.environ.items() if k != "CKPTSCOPE_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "ckptscope.cli", "serve", "--store", str(store), "--host", "0.0.0.0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --host 0.0.0.0 would serve the store")


def test_host_header_is_checked_on_loopback(checkpoints, tmp_path):
    """A page on another site that rebinds its name to 127.0.0.1 sends its own Host: refused."""
    _, store = start_run(checkpoints, tmp_path, STEPS[:1])
    with served(store) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        assert "unexpected Host" in one_line_error(get(url, "/api/models", {"Host": f"evil.example:{port}"}), 400)
        assert get(url, "/api/models", {"Host": f"localhost:{port}"})[0] == 200


def test_missing_store_and_taken_port_are_one_line_errors(checkpoints, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ckptscope.cli", "serve", "--store", str(tmp_path / "none.duckdb")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    _, store = start_run(checkpoints, tmp_path, STEPS[:1])
    with served(store) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        done = subprocess.run([sys.executable, "-m", "ckptscope.cli", "serve", "--store", str(store), "--port", port],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_reads_wait_for_a_writer_and_leave_it_room(checkpoints, tmp_path):
    """While a writer holds the file, requests wait (then answer); under constant load the gate
    still leaves gaps in which a writer that retries every 50 ms gets the file."""
    _, store = start_run(checkpoints, tmp_path, STEPS[:2])
    with served(store) as url:
        hold = subprocess.Popen([sys.executable, "-c", "import sys, time, ckptscope; db = ckptscope.Store(sys.argv[1]); db.con; "
                                 "print('held', flush=True); time.sleep(1.5)", str(store)], stdout=subprocess.PIPE, text=True)
        assert hold.stdout.readline() == "held\n"
        start = time.monotonic()
        assert sql(url, "SELECT count(*) AS n FROM checkpoints") == [{"n": 2}]
        assert time.monotonic() - start > 0.5  # it waited for the writer to let go
        hold.wait(10)
        stop = threading.Event()

        def load(i: int) -> None:
            n = 0
            while not stop.is_set():  # a different query each time: no answer comes from the cache
                n += 1
                assert sql(url, f"SELECT count(*) + {i * 100000 + n} AS n FROM metrics")
        threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        waits = []
        for _ in range(5):
            start = time.monotonic()
            while True:
                try:
                    ckptscope.Store(store).close()
                    break
                except CkptscopeError as exc:
                    assert "is locked" in str(exc)
                    time.sleep(0.05)
            waits.append(time.monotonic() - start)
        stop.set()
        for t in threads:
            t.join()
    assert max(waits) < 2 * (server.HOLD_SECONDS + server.GAP_SECONDS) + 1, waits


# -- the live dashboard in a browser ------------------------------------------------------------------

CHECKPOINT_POINTS = "return document.getElementById('chart1-0').data.reduce((n, t) => n + t.x.length, 0)"


def test_dashboard_draws_new_checkpoints_without_a_reload(checkpoints, tmp_path, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    run, store = start_run(checkpoints, tmp_path, STEPS[:FIRST])
    with served(store) as url:
        browser.get_log("browser")
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.documentElement.dataset.state") != "loading")
        assert browser.execute_script("return document.documentElement.dataset.state") == "ready"
        assert browser.execute_script("return document.querySelector('h1').textContent") == "ckptscope live dashboard"
        assert browser.execute_script(CHECKPOINT_POINTS) == FIRST
        titles = browser.execute_script("return Array.from(document.querySelectorAll('main h2'), (h) => h.textContent)")
        assert titles == ["Overview", "Layers over training: tiny", "Spectra", "Attention heads: OV and QK circuits"]
        browser.execute_script("window.sameDocument = true")
        proc = writer(checkpoints, run, store, [STEPS[FIRST]])
        assert proc.wait(120) == 0, proc.stderr.read()
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(CHECKPOINT_POINTS) == FIRST + 1)
        assert browser.execute_script("return window.sameDocument") is True  # drawn without a reload
        assert int(browser.execute_script("return document.documentElement.dataset.updates")) >= 1
        cells = browser.execute_script("return Array.from(document.querySelectorAll('table.models td'), (td) => td.textContent)")
        assert str(FIRST + 1) in cells  # the models table counts the new step too
        resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert resources and all(r.startswith(url + "api/") for r in resources)  # nothing fetched from elsewhere
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_dashboard_of_an_empty_store_waits_for_the_first_checkpoint(tmp_path, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    ckptscope.Store(tmp_path / "empty.duckdb").close()
    with served(tmp_path / "empty.duckdb") as url:
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.documentElement.dataset.state") == "ready")
        message = browser.execute_script("return document.getElementById('message').textContent")
        assert "holds no models yet" in message and "updates when checkpoints land" in message


def test_dashboard_behind_a_token(checkpoints, tmp_path, browser):
    """The browser gets the login form (401), the token typed there opens the dashboard, and its polls carry it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run, store = start_run(checkpoints, tmp_path, STEPS[:2])
    with served(store, "--token", "tab-token") as url:
        browser.get(url)
        assert browser.find_element(By.TAG_NAME, "button").text == "Open the dashboard"
        browser.find_element(By.ID, "token").send_keys("wrong")
        browser.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "problem").text == "wrong token")
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys("tab-token")
        browser.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.documentElement.dataset.state") == "ready")
        assert browser.execute_script(CHECKPOINT_POINTS) == 2
        assert writer(checkpoints, run, store, [STEPS[2]]).wait(120) == 0
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(CHECKPOINT_POINTS) == 3)
        assert "tab-token" not in browser.current_url
