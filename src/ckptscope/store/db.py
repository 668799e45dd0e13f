"""The DuckDB store: one file, documented tables and views (core.sql, views.sql, migrations.py).

Writes happen only through `write_checkpoint`, one transaction per checkpoint, so a crash or
a kill loses at most the checkpoint in flight and a rerun resumes where the last one ended.
Reads come back as polars DataFrames.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ckptscope.errors import StoreError
from ckptscope.rows import CheckpointRows, ModelRow, RunRows, Table, column
from ckptscope.store import migrations

DEFAULT_STORE = "ckptscope.duckdb"
STORAGE_COMPATIBILITY = "v1.1.0"  # oldest DuckDB that must open a new store; see docs/store.md
DEMO_STORE = "ckptscope-demo.duckdb"  # what `ckptscope demo` writes
READ_STATEMENTS = {"SELECT", "EXPLAIN"}
SQL_BATCH_ROWS = 8192  # rows per Arrow batch read by `sql_arrow`
CORE_RUN_TABLES = ("metric_values", "spectra", "anomalies", "runs")  # rows owned by a run, besides analyzer tables
# How long one side waits while the other holds the file ($CKPTSCOPE_LOCK_WAIT overrides both): a reader
# for a writer's transaction (one checkpoint's rows), a writer for readers (a report, a long query).
READ_WAIT_S = 15.0
WRITE_WAIT_S = 300.0


def default_store_path() -> Path:
    """`$CKPTSCOPE_STORE`, else `./ckptscope.duckdb`."""
    return Path(os.environ.get("CKPTSCOPE_STORE") or DEFAULT_STORE)


def backend_name() -> str:
    """What a store-level computation (numpy, not torch) ran on, for `runs.backend`."""
    import numpy

    return f"numpy-{numpy.__version__}/cpu"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


class Store:
    """A ckptscope DuckDB file.

    `Store(path)` opens (creating if needed) for writing; `Store(path, read_only=True)` opens an
    existing store for queries and refuses any statement that is not a read; `sandbox=True` (with
    read_only) also denies queries any file but the store (`read_csv`, `glob`, ...), for `ckptscope serve`.

    DuckDB lets one process hold a file for writing and then no other process may open it, so
    neither side keeps it open: a writer connects for each transaction (one checkpoint's rows)
    and a reader for each query, each waiting briefly while the other side holds the file
    (`on_wait` hears about it). `with Store(path, read_only=True) as db:` holds one read
    connection for the block (a consistent snapshot, one open for many queries), so keep such
    blocks short while an ingest runs. Writers exclude each other through `<store>.lock`
    (see `WriterLock`), held for the writable `Store`'s life.
    """

    def __init__(self, path: Path | str | None = None, *, read_only: bool = False, sandbox: bool = False) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        if sandbox and not read_only:
            raise ValueError("sandbox=True needs read_only=True")
        self.read_only, self.sandbox = read_only, sandbox
        self.on_wait: Callable[[str | None], None] | None = None  # told "waiting for …" while locked out, then None
        self.lock_wait_s = 0.0  # total time spent waiting for other processes to let go of the file
        self._con: duckdb.DuckDBPyConnection | None = None
        self._held: Iterator | None = None  # the session a `with` block or `.con` keeps open
        self._lock: WriterLock | None = None
        if read_only and not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; create it with `ckptscope ingest SOURCE`, or pass --store STORE "
                             f"(`ckptscope demo` creates {DEMO_STORE}: pass --store {DEMO_STORE})")
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"store {self.path} is a directory; pass a file path with --store")
        if not read_only and not os.access(self.path.resolve().parent, os.W_OK):  # found before any work, not at the first commit
            raise StoreError(f"cannot write store {self.path}: {self._not_writable()}")
        if not read_only:
            self._lock = WriterLock.acquire(self.path)
        try:
            with self._session():
                self._opened = os.stat(self.path)
                if read_only:
                    self._check_version()
                else:
                    try:
                        self._migrate()
                    except duckdb.Error as exc:  # a new store's schema is its first write
                        raise self._write_error(exc) from None
        except BaseException:
            self.close()
            raise

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting (up to READ_WAIT_S / WRITE_WAIT_S) while another process holds it."""
        # Read-only means no side effects at all: no extension downloads triggered by a SELECT.
        # A new file is written in a storage format DuckDB >= 1.1 reads (CLI, R, DBeaver), not
        # the newest one, which only the newest DuckDB opens. An existing file keeps its format.
        config = ({"autoinstall_known_extensions": False, "autoload_known_extensions": False} if self.read_only
                  else {"storage_compatibility_version": STORAGE_COMPATIBILITY})
        if self.sandbox:  # queries from the network (`ckptscope serve`) must not read or list other files
            config["enable_external_access"] = False
        limit = float(os.environ.get("CKPTSCOPE_LOCK_WAIT") or (READ_WAIT_S if self.read_only else WRITE_WAIT_S))
        started, pause, told, locked_out = time.monotonic(), 0.01, False, False
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=self.read_only, config=config)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                msg = _one_line(exc)
                # another process holds the file, or this one holds it in the other mode (a reader kept open in a notebook)
                if "lock" not in msg.lower() and "different configuration" not in msg:
                    if "permission denied" in msg.lower():
                        raise StoreError(f"cannot open store {self.path}: {msg}; {self._not_writable()}") from None
                    raise StoreError(f"cannot open store {self.path}: {msg}") from None
                locked_out = True
                pid = re.search(r"PID (\d+)", msg)
                who = f" (PID {pid.group(1)})" if pid else " (this process)" if "different configuration" in msg else ""
                waited = time.monotonic() - started
                if waited >= limit:
                    self._tell(None) if told else None
                    raise StoreError(f"store {self.path} is locked by another process{who} for {waited:.0f} s; wait for it "
                                     "to finish or use another --store") from None
                if not told and waited >= 0.5:  # a short wait is the normal case: say nothing
                    self._tell(f"waiting for store lock held by another process{who}")
                    told = True
                time.sleep(pause)
                pause = min(pause * 2, 0.25)
            except duckdb.Error as exc:
                raise StoreError(f"cannot open store {self.path}: {_one_line(exc)}; is it a ckptscope DuckDB file?") from None
        if locked_out:
            self.lock_wait_s += time.monotonic() - started
        if told:
            self._tell(None)
        return con

    def _tell(self, message: str | None) -> None:
        if self.on_wait is not None:
            self.on_wait(message)

    @contextmanager
    def _session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for the block: the one already open (nested calls, `with`), else a new one closed after."""
        if self._con is not None:
            yield self._con
            return
        if hasattr(self, "_opened"):  # reconnecting: DuckDB would silently create a new, empty file where it was deleted
            self._check_still_there()
        self._con = self._connect()
        try:
            yield self._con
        finally:
            con, self._con = self._con, None
            con.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The raw DuckDB connection, for what the methods do not cover; it stays open (holding the file,
        so an ingest's writes wait) until `close()`."""
        if self._con is None:
            self._hold()
        return self._con

    def _hold(self) -> None:
        self._held = self._session()
        self._held.__enter__()

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close any connection held and, for a writer, give up the writer lock."""
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        if self.read_only and self._con is None:  # one snapshot for the block; a writer still connects per transaction
            self._hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scalar(self, query: str, params: list | None = None):
        """First value of the first row; fetches everything (DuckDB 2 rejects half-read results)."""
        with self._session() as con:
            rows = con.execute(query, params or []).fetchall()
        return rows[0][0] if rows else None

    def _migrate(self) -> None:
        """Bring the store up to date (one transaction); an up-to-date store is left byte-identical."""
        self._check_version()
        migrations.migrate(self._con)  # a DuckDB error here is a failed write: see __init__

    def _check_version(self) -> None:
        try:
            done = migrations.applied(self._con)
        except duckdb.Error as exc:
            raise StoreError(f"cannot read store {self.path}: {_one_line(exc)}") from None
        if done is None:
            if self.read_only or self._scalar("SELECT count(*) FROM information_schema.tables"):
                raise StoreError(f"{self.path} is not a ckptscope store (no meta table); pass the right --store")
            return
        newer = migrations.unknown(done)
        if newer:
            raise StoreError(f"store {self.path} was written by a newer ckptscope (migration {newer[0]}); upgrade ckptscope")

    # -- reading ---------------------------------------------------------------------------
    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run one query and return its result; on a read-only store only reads are allowed."""
        with self._session() as con:
            if self.read_only:
                self._refuse_writes(query)
            try:
                rel = con.sql(query, params=params or None)
                return pl.DataFrame() if rel is None else pl.from_arrow(rel.to_arrow_table())
            except duckdb.Error as exc:
                raise StoreError(f"query failed: {_one_line(exc)}") from None

    def has_column(self, table: str, column: str) -> bool:
        """Whether `table` has `column` (a store opened read-only is not migrated, so an old one may lack it)."""
        return bool(self.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                             [table, column]).item())

    def sql_arrow(self, query: str, *, max_rows: int | None = None, max_bytes: int | None = None) -> pa.Table:
        """Like `sql` (same refusals), as an Arrow table fetched in batches, refused as soon as it
        passes `max_rows` rows or `max_bytes` bytes: a server's bound on what one query may take."""
        with self._session() as con:  # interrupt() acts on this connection while the query runs
            if self.read_only:
                self._refuse_writes(query)
            try:
                rel = con.sql(query)
                stream = rel.to_arrow_reader if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch  # newer DuckDB : older (deprecated since)
                reader = stream(SQL_BATCH_ROWS)
                batches, rows, size = [], 0, 0
                for batch in reader:
                    rows, size = rows + batch.num_rows, size + batch.nbytes
                    if max_rows is not None and rows > max_rows:
                        raise StoreError(f"the result has more than {max_rows:,} rows, the limit here; add LIMIT or aggregate")
                    if max_bytes is not None and size > max_bytes:
                        raise StoreError(f"the result is larger than {max_bytes / 2**20:g} MiB, the limit here; "
                                         "select fewer columns or rows")
                    batches.append(batch)
                return pa.Table.from_batches(batches, reader.schema)
            except (duckdb.Error, pa.ArrowIOError) as exc:  # an error while streaming comes through Arrow
                raise StoreError(f"query failed: {_one_line(exc)}") from None

    def interrupt(self) -> None:
        """Cancel the query running on this store (called from another thread: a server's time limit)."""
        con = self._con
        if con is not None:
            con.interrupt()

    def _refuse_writes(self, query: str) -> None:
        try:
            statements = self._con.extract_statements(query)
        except duckdb.Error as exc:
            raise StoreError(f"invalid SQL: {_one_line(exc)}") from None
        if not statements:
            raise StoreError("empty query; give one SELECT statement")
        for st in statements:
            kind = st.type.name
            if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: that one must be a read too
                inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", st.query, flags=re.IGNORECASE)
                kind = self._con.extract_statements(inner)[0].type.name if inner.strip() else kind
            if kind not in READ_STATEMENTS - {"EXPLAIN"}:
                raise StoreError(f"`sql` is read-only: {kind} statements are refused; use SELECT (or the Python API for changes)")
        if len(statements) > 1:
            raise StoreError("give one statement at a time")

    def steps_done(self, model: str, analyzer: str) -> set[int]:
        """Steps of `model` whose `analyzer` rows are already stored."""
        with self._session() as con:
            rows = con.execute(
                "SELECT DISTINCT r.step FROM runs r JOIN checkpoints c ON c.model = r.model AND c.step = r.step "
                "WHERE r.model = ? AND r.analyzer = ? AND c.status = 'ok'",
                [model, analyzer],
            ).fetchall()
        return {r[0] for r in rows}

    def checkpoints(self, model: str) -> pl.DataFrame:
        return self.sql("SELECT * FROM checkpoints WHERE model = ? ORDER BY step", [model])

    def model(self, model: str) -> dict | None:
        row = self.sql("SELECT * FROM models WHERE model = ?", [model])
        return row.row(0, named=True) if row.height else None

    def metrics(self, model: str | None = None, metric: str | None = None, component: str | None = None) -> pl.DataFrame:
        """The long `metrics` view, filtered."""
        where, params = [], []
        for col, val in (("model", model), ("metric", metric), ("component", component)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self.sql(f"SELECT * FROM metrics {clause} ORDER BY model, step, layer NULLS FIRST, tensor, component, metric", params)

    def summary(self) -> pl.DataFrame:
        """Per model: steps ingested, tokens at the last one, analyzers run, anomalies, source — what `ckptscope ls` shows."""
        return self.sql(
            """
            SELECT m.model, m.architecture, m.num_layers, m.num_parameters,
                   count(DISTINCT c.step) FILTER (WHERE c.status = 'ok') AS steps,
                   min(c.step) FILTER (WHERE c.status = 'ok') AS first_step,
                   max(c.step) FILTER (WHERE c.status = 'ok') AS last_step,
                   arg_max(c.tokens, c.step) FILTER (WHERE c.status = 'ok') AS last_tokens, m.source,
                   (SELECT string_agg(DISTINCT analyzer, ',' ORDER BY analyzer) FROM runs r WHERE r.model = m.model) AS analyzers,
                   (SELECT count(*) FROM anomalies a WHERE a.model = m.model) AS anomalies
            FROM models m LEFT JOIN checkpoints c USING (model)
            GROUP BY ALL ORDER BY m.model
            """
        )

    def anomalies(self, model: str | None = None) -> pl.DataFrame:
        if model is None:
            return self.sql("SELECT * FROM anomalies ORDER BY model, step, tensor")
        return self.sql("SELECT * FROM anomalies WHERE model = ? ORDER BY step, tensor", [model])

    # -- writing ---------------------------------------------------------------------------
    def write_checkpoint(self, rows: CheckpointRows, *, replace: bool = False, model: ModelRow | None = None,
                         tables: Sequence[tuple[str, Table]] = ()) -> None:
        """Write all of one checkpoint's rows in a single transaction (replacing them with `replace`).

        `tables` are the (analyzer, table) declarations of the runs' extra tables: a table not in
        the store yet is created in the same transaction, so it appears with its first rows.

        `model` registers or refreshes the model's description in the same transaction, so a
        model never appears in the store without a checkpoint. `duplicate_of` is worked out
        here, from the hashes stored, so it names the earliest identical step whatever order
        steps are written in (parallel executors finish them out of order).
        """
        declared = {t.name: t for _, t in tables}
        with self._transaction():
            con = self._con
            self._ensure_tables(tables)
            if model is not None:
                # A model's group and seed stay as stored unless this ingest names them.
                kept = con.execute("SELECT group_name, seed FROM models WHERE model = ?", [rows.model]).fetchall()
                group, seed = (model.group_name, model.seed) if model.group_name is not None else (kept[0] if kept else (None, None))
                con.execute(
                    "INSERT OR REPLACE INTO models (model, source, architecture, num_layers, num_parameters, tokens_per_step, config, "
                    "group_name, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [rows.model, model.source, model.architecture, model.num_layers, model.num_parameters,
                     model.tokens_per_step, json.dumps(model.config) if model.config else None, group, seed],
                )
            if replace:
                self._delete_step(rows.model, rows.step, [r.analyzer for r in rows.runs])
            con.execute(
                "INSERT OR REPLACE INTO checkpoints (model, step, tokens, revision, source, content_hash, duplicate_of, status) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",  # duplicate_of: set below, with its anomaly
                [rows.model, rows.step, rows.tokens, rows.revision, rows.source, rows.content_hash, rows.status],
            )
            self._mark_duplicates(rows.model)
            if rows.tensors["tensor"]:
                self._insert("tensors", rows.model, rows.step, None, rows.tensors, replace_keys=True)
            if rows.anomaly is not None:
                self._add_anomaly(rows.model, rows.step, None, *rows.anomaly)
            if rows.training_log and rows.training_log["metric"]:
                self._merge_training_log(rows.model, rows.step, rows.training_log)
            if rows.step_path is not None:
                con.execute("INSERT OR REPLACE INTO step_paths (model, step, path) VALUES (?, ?, ?)",
                            [rows.model, rows.step, rows.step_path])
            for run in rows.runs:
                run_id = self._scalar("SELECT nextval('run_ids')")
                con.execute(
                    "INSERT INTO runs (run_id, model, step, analyzer, version, parameters, dtype, backend) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, rows.model, rows.step, run.analyzer, run.version, json.dumps(run.parameters, sort_keys=True), run.dtype, run.backend],
                )
                if run.metrics["metric"]:
                    self._insert("metric_values", rows.model, rows.step, run_id, run.metrics)
                if run.spectra["sv"]:
                    self._insert("spectra", rows.model, rows.step, run_id, run.spectra)
                for table, columns in run.tables.items():
                    if table not in declared:
                        raise StoreError(f"analyzer {run.analyzer} wrote rows for table {table!r}, which it does not declare")
                    if columns and len(next(iter(columns.values()))):
                        self._insert(table, rows.model, rows.step, run_id, columns, declared=declared[table])
                for tensor, kind, detail in run.anomalies:
                    self._add_anomaly(rows.model, rows.step, tensor, kind, detail, run_id)

    def _merge_training_log(self, model: str, checkpoint: int, log: dict[str, list]) -> None:
        """Add a checkpoint's logged scalars to the model's `training_log`: a value already stored
        from a later checkpoint's history stays, whatever order checkpoints are written in."""
        batch = pa.table({"step": pa.array(log["step"], pa.int64()), "metric": pa.array(log["metric"], pa.string()),
                          "value": pa.array(log["value"], pa.float64())})
        self.con.register("_ckptscope_log", batch)
        try:
            self.con.execute(
                "INSERT INTO training_log (model, step, metric, value, checkpoint) SELECT ?, step, metric, value, ? "
                "FROM _ckptscope_log ON CONFLICT (model, step, metric) DO UPDATE SET value = excluded.value, "
                "checkpoint = excluded.checkpoint WHERE excluded.checkpoint >= training_log.checkpoint", [model, checkpoint])
        finally:
            self.con.unregister("_ckptscope_log")

    def step_paths(self, model: str) -> dict[int, str]:
        """The checkpoints of `model` named with --steps STEP=PATH in earlier ingests: step -> PATH."""
        if not self._scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'step_paths'"):
            return {}  # a store not migrated yet (opened read-only) has none
        return dict(self.con.execute("SELECT step, path FROM step_paths WHERE model = ?", [model]).fetchall())

    def _mark_duplicates(self, model: str) -> None:
        """Point every checkpoint of `model` at the earliest step with the same weights, with a
        `duplicate_checkpoint` anomaly; only rows whose answer changed are touched."""
        changed = self._con.execute(
            """
            WITH firsts AS (SELECT content_hash, min(step) AS first FROM checkpoints
                            WHERE model = $model AND status = 'ok' AND content_hash IS NOT NULL GROUP BY content_hash)
            SELECT c.step, CASE WHEN f.first < c.step THEN f.first END AS dup, c.content_hash
            FROM checkpoints c LEFT JOIN firsts f ON c.status = 'ok' AND f.content_hash = c.content_hash
            WHERE c.model = $model AND dup IS DISTINCT FROM c.duplicate_of
            """, {"model": model}).fetchall()
        for step, dup, digest in changed:
            self._con.execute("UPDATE checkpoints SET duplicate_of = ? WHERE model = ? AND step = ?", [dup, model, step])
            self._con.execute("DELETE FROM anomalies WHERE model = ? AND step = ? AND run_id IS NULL AND kind = 'duplicate_checkpoint'",
                             [model, step])
            if dup is not None:
                self._add_anomaly(model, step, None, "duplicate_checkpoint",
                                  f"weights are byte-identical to step {dup} (sha256 {digest[:16]}…)")

    def replace_analysis(self, model: str, step: int, run: RunRows, tables: Sequence[tuple[str, Table]],
                         same: dict[str, Any]) -> int:
        """Write a model-level analysis (one run over the stored rows, e.g. a memorisation profile) in
        one transaction, replacing earlier runs of the same analyzer whose parameters agree on `same`.

        `step` is the last step the analysis covers (runs rows belong to a step). Returns the run_id.
        """
        declared = {t.name: t for _, t in tables}
        with self._transaction():
            self._ensure_tables(tables)
            old = [rid for rid, params in self.con.execute(
                "SELECT run_id, parameters FROM runs WHERE model = ? AND analyzer = ?", [model, run.analyzer]).fetchall()
                if all(json.loads(params).get(k) == v for k, v in same.items())]
            for table in self.run_tables() if old else ():
                self.con.execute(f"DELETE FROM {table} WHERE run_id IN ({', '.join('?' * len(old))})", old)
            run_id = self._scalar("SELECT nextval('run_ids')")
            self.con.execute(
                "INSERT INTO runs (run_id, model, step, analyzer, version, parameters, dtype, backend) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, model, step, run.analyzer, run.version, json.dumps(run.parameters, sort_keys=True), run.dtype, run.backend])
            for table, columns in run.tables.items():
                if columns and len(next(iter(columns.values()))):
                    self._insert(table, model, step, run_id, columns, declared=declared[table])
            for tensor, kind, detail in run.anomalies:
                self._add_anomaly(model, step, tensor, kind, detail, run_id)
        return run_id

    def replace_metrics(self, model: str, step: int, analyzer: str, metrics: list[str], rows: RunRows, parameters: dict) -> None:
        """Swap some metrics of an existing run for recomputed ones, in one transaction.

        Used when a reference moves, e.g. `final_*` rows after a later step is ingested.
        """
        with self._transaction():
            con = self._con
            run_id = self._scalar("SELECT run_id FROM runs WHERE model = ? AND step = ? AND analyzer = ?", [model, step, analyzer])
            con.execute(
                f"DELETE FROM metric_values WHERE run_id = ? AND metric IN ({', '.join('?' * len(metrics))})",
                [run_id, *metrics],
            )
            if rows.metrics["metric"]:
                self._insert("metric_values", model, step, run_id, rows.metrics)
            con.execute("UPDATE runs SET parameters = ? WHERE run_id = ?", [json.dumps(parameters, sort_keys=True), run_id])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction: committed if the block completes, else rolled back. A store that cannot
        be written (read-only directory, full disk, file deleted) raises one-line `StoreError`;
        earlier transactions stay committed."""
        self._check_still_there()
        with self._session() as con:  # the file is held for this transaction only
            con.begin()
            try:
                yield
                con.commit()
            except BaseException as exc:
                try:
                    con.rollback()
                except duckdb.Error:  # a failed commit has already ended (and undone) the transaction
                    pass
                if isinstance(exc, duckdb.Error):
                    raise self._write_error(exc) from None
                raise

    def runs_of(self, model: str, analyzer: str) -> dict[int, tuple[str, dict]]:
        """step -> (analyzer version, parameters) of the stored runs of `analyzer` on `model`."""
        with self._session() as con:
            rows = con.execute("SELECT step, version, parameters FROM runs WHERE model = ? AND analyzer = ?",
                               [model, analyzer]).fetchall()
        return {step: (version, json.loads(params)) for step, version, params in rows}

    def set_tokens_per_step(self, model: str, tokens_per_step: int, *, only_missing: bool = False) -> None:
        """Set the model's tokens per step and its steps' tokens (step × it), in one transaction: every
        step's, or with `only_missing` those not known (a suite's own schedule stays)."""
        with self._transaction():
            self.con.execute("UPDATE models SET tokens_per_step = ? WHERE model = ?", [tokens_per_step, model])
            self.con.execute(f"UPDATE checkpoints SET tokens = step * ? WHERE model = ?{' AND tokens IS NULL' * only_missing}",
                             [tokens_per_step, model])

    def set_group(self, model: str, group: str, seed: int) -> None:
        """Record that a stored model is seed `seed` of `group` (`ingest --group --seed` on a model already ingested)."""
        with self._transaction():
            self.con.execute("UPDATE models SET group_name = ?, seed = ? WHERE model = ?", [group, seed, model])

    def write_training_phases(self, runs: Sequence[tuple[str, int, str, dict]], phases: pl.DataFrame) -> None:
        """Replace the `training_phases` rows and 'phases' runs of the models in `runs` in one transaction.

        `runs` holds (model, step, version, parameters) of each model's fit; `phases` the columns
        model, step, state, probability.
        """
        with self._transaction():
            models = [r[0] for r in runs]
            marks = ", ".join("?" * len(models))
            self.con.execute(f"DELETE FROM training_phases WHERE model IN ({marks})", models)
            self.con.execute(f"DELETE FROM runs WHERE analyzer = 'phases' AND model IN ({marks})", models)
            ids = {}
            for model, step, version, parameters in runs:
                ids[model] = self._scalar("SELECT nextval('run_ids')")
                self.con.execute("INSERT INTO runs (run_id, model, step, analyzer, version, parameters, dtype, backend) "
                                 "VALUES (?, ?, ?, 'phases', ?, ?, 'float64', ?)",
                                 [ids[model], model, step, version, json.dumps(parameters, sort_keys=True), backend_name()])
            batch = phases.with_columns(run_id=pl.col("model").replace_strict(ids, return_dtype=pl.Int64)).to_arrow()
            self.con.register("_ckptscope_batch", batch)
            try:
                self.con.execute("INSERT INTO training_phases (run_id, model, step, state, probability) "
                                 "SELECT run_id, model, step, state, probability FROM _ckptscope_batch")
            finally:
                self.con.unregister("_ckptscope_batch")

    def _check_still_there(self) -> None:
        """A store file deleted or replaced while open would take every later write with it."""
        try:
            same = os.path.samestat(os.stat(self.path), self._opened)
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreError(f"store {self.path} was deleted or replaced while this command ran; nothing more was written to it. "
                             "Run the same command again to write a new store")

    def _not_writable(self) -> str:
        return (f"the store or its directory {self.path.resolve().parent} is not writable (a store is written with a "
                f"{self.path.name}.wal file beside it); pass --store with a path in a writable directory, or copy the store there")

    def _write_error(self, exc: duckdb.Error) -> StoreError:
        """A duckdb error from writing, as one line saying what to do; the cause decides the advice."""
        msg = _one_line(exc)
        where = self.path.resolve().parent
        if "permission denied" in msg.lower() or "read-only" in msg.lower():
            advice = self._not_writable()
        elif os.strerror(errno.ENOSPC) in msg or "File too large" in msg or "disk" in msg.lower():
            advice = f"free space on the disk holding {where}, then run the same command again to resume"
        else:
            advice = "run the same command again to resume"
        return StoreError(f"cannot write store {self.path}: {msg}; the checkpoints completed before are saved; {advice}")


    def _delete_step(self, model: str, step: int, analyzers: list[str]) -> None:
        ids = [r[0] for r in self._con.execute(
            f"SELECT run_id FROM runs WHERE model = ? AND step = ? AND analyzer IN ({', '.join('?' * len(analyzers))})",
            [model, step, *analyzers]).fetchall()]
        if ids:
            marks = ", ".join("?" * len(ids))
            for table in self.run_tables():
                self._con.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
        self._con.execute("DELETE FROM anomalies WHERE model = ? AND step = ? AND run_id IS NULL", [model, step])
        self._con.execute("DELETE FROM tensors WHERE model = ? AND step = ?", [model, step])  # rewritten with the checkpoint

    def _add_anomaly(self, model: str, step: int, tensor: str | None, kind: str, detail: str, run_id: int | None = None) -> None:
        self._con.execute("INSERT INTO anomalies (run_id, model, step, tensor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
                         [run_id, model, step, tensor, kind, detail])

    def run_tables(self) -> list[str]:
        """Every table whose rows belong to an analyzer run: the core ones and the declared ones."""
        with self._session() as con:
            return [*CORE_RUN_TABLES, *(r[0] for r in con.execute("SELECT table_name FROM analyzer_tables").fetchall())]

    def _ensure_tables(self, tables: Sequence[tuple[str, Table]]) -> None:
        """Create declared tables (and their views) not in the store yet; add columns a newer
        declaration has. A column of another type is refused: that would change a public table."""
        for analyzer, table in tables:
            have = dict(self._con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?",
                                         [table.name]).fetchall())
            owner = self._scalar("SELECT analyzer FROM analyzer_tables WHERE table_name = ?", [table.name])
            if owner is not None and owner != analyzer:
                raise StoreError(f"analyzer {analyzer} declares table {table.name!r}, which analyzer {owner} owns; rename the table")
            if have and owner is None:
                raise StoreError(f"analyzer {analyzer} declares table {table.name!r}, which is a core table; rename it")
            if not have:
                self._con.execute(table.ddl())
            for col, kind in table.types().items():
                base = kind.removesuffix(" NOT NULL")
                if col not in have:
                    if have:
                        self._con.execute(f"ALTER TABLE {table.name} ADD COLUMN {col} {base}")
                elif have[col] != base and not (base == "JSON" and have[col] == "VARCHAR"):
                    raise StoreError(f"table {table.name}: column {col} is {have[col]} in the store but analyzer {analyzer} "
                                     f"declares {base}; give the analyzer a new table name")
            for view in table.views:
                self.con.execute(view)
            self.con.execute("INSERT INTO analyzer_tables (table_name, analyzer, columns, key) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (table_name) DO UPDATE SET columns = excluded.columns, key = excluded.key",
                             [table.name, analyzer, json.dumps(table.types()), json.dumps(list(table.key))])

    def _insert(self, table: str, model: str, step: int, run_id: int | None, columns: dict[str, list],
                replace_keys: bool = False, declared: Table | None = None) -> None:
        n = len(next(iter(columns.values())))
        data: dict[str, Any] = {}
        if run_id is not None:
            data["run_id"] = pa.array([run_id] * n, pa.int64())
        data["model"] = pa.array([model] * n, pa.string())
        if "step" not in columns:  # rows of a model-level analysis carry the step each is about
            data["step"] = pa.array([step] * n, pa.int64())
        for key, values in columns.items():
            if declared is None or key not in declared.columns:
                data[key] = column(key, values) if key != "step" else pa.array(values, pa.int64())
            elif isinstance(values, pa.Array):
                data[key] = values.cast(declared.arrow_type(key))
            else:
                data[key] = pa.array(values, declared.arrow_type(key))
        batch = pa.table(data)
        if declared is not None and declared.key:
            _check_key(batch, declared)
        cols = ", ".join(batch.column_names)
        verb = "INSERT OR REPLACE" if replace_keys else "INSERT"
        self._con.register("_ckptscope_batch", batch)
        try:
            self._con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _ckptscope_batch")
        finally:
            self._con.unregister("_ckptscope_batch")


def _check_key(batch: pa.Table, table: Table) -> None:
    """Rows of a declared table must differ in its key (within a step): two rows for one sequence
    would make every join on the key double-count. An analyzer that breaks this fails its step."""
    key = ["step", *(k for k in table.key if k != "step")]
    distinct = batch.select(key).group_by(key).aggregate([([], "count_all")])
    if distinct.num_rows < batch.num_rows:
        twice = distinct.filter(pc.greater(distinct["count_all"], 1)).slice(0, 1).to_pylist()[0]
        raise StoreError(f"table {table.name}: {batch.num_rows - distinct.num_rows} row(s) repeat the key "
                         f"({', '.join(key)}), e.g. {twice}; the analyzer must write one row per key")


class WriterLock:
    """`<store>.lock`: one writer at a time, though a writer opens the store only per transaction.

    An exclusive `flock` on the file, which holds the writer's PID for the error a second writer
    shows. The kernel drops the lock when its process dies (even by kill -9), so a lock file
    left behind is stale by construction and simply taken over. Re-entrant within a process:
    `--watch` holds it across passes whose `Store`s take it again.
    """

    _held: dict[Path, WriterLock] = {}

    def __init__(self, lock_path: Path, fd: int) -> None:
        self.lock_path, self.fd, self.count = lock_path, fd, 1

    @classmethod
    def acquire(cls, store: Path) -> WriterLock:
        lock_path = Path(f"{store.resolve()}.lock")
        held = cls._held.get(lock_path)
        if held is not None:
            held.count += 1
            return held
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f" (PID {pid})" if pid.isdigit() else ""
                raise StoreError(f"store {store} is being written by another process{who}; wait for it to finish "
                                 "or use another --store") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the one in place
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        lock = cls._held[lock_path] = cls(lock_path, fd)
        return lock

    def release(self) -> None:
        self.count -= 1
        if self.count:
            return
        del self._held[self.lock_path]
        try:
            self.lock_path.unlink()  # still ours: removed before the lock is dropped
        except OSError:  # gone, or its directory turned read-only: the flock is dropped below all the same
            pass
        os.close(self.fd)
