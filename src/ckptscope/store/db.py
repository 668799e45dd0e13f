"""The DuckDB store: one file, documented tables and views (see schema.sql and README).

Writes happen only through `write_checkpoint`, one transaction per checkpoint, so a crash or
a kill loses at most the checkpoint in flight and a rerun resumes where the last one ended.
Reads come back as polars DataFrames.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from ckptscope.errors import StoreError

SCHEMA_VERSION = "2"
READABLE_VERSIONS = {"1", "2"}  # v1 lacks the tier columns; it is upgraded when first written to
DEFAULT_STORE = "ckptscope.duckdb"
DEMO_STORE = "ckptscope-demo.duckdb"  # what `ckptscope demo` writes
READ_STATEMENTS = {"SELECT", "EXPLAIN"}
RUN_TABLES = ("metric_values", "spectra", "memorization", "anomalies", "runs")  # rows owned by a run


def default_store_path() -> Path:
    """`$CKPTSCOPE_STORE`, else `./ckptscope.duckdb`."""
    return Path(os.environ.get("CKPTSCOPE_STORE") or DEFAULT_STORE)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


@dataclass
class RunRows:
    """What one analyzer produced for one checkpoint, before it has a run_id.

    Columnar lists, so a worker process can ship them as Arrow and the driver inserts them
    without touching Python objects row by row.
    """

    analyzer: str
    version: str
    parameters: dict[str, Any]
    dtype: str
    backend: str
    metrics: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("tensor", "layer", "component", "metric", "value", "tier")})
    spectra: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("tensor", "layer", "component", "kind", "rows", "cols", "sv", "tier")})
    anomalies: list[tuple[str | None, str, str]] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # analyzer-specific tables, e.g. memorization

    def add_metrics(self, tensor: str, layer: int | None, component: str, values: dict[str, float],
                    tier: str | None = None) -> None:
        """`tier` says how a matrix's spectrum was obtained (exact | fast | none); None for other rows."""
        for metric, value in values.items():
            for key, item in zip(self.metrics, (tensor, layer, component, metric, float(value), tier)):
                self.metrics[key].append(item)

    def add_spectrum(self, tensor: str, layer: int | None, component: str, kind: str, shape: tuple[int, int], sv,
                     tier: str = "exact") -> None:
        for key, value in zip(self.spectra, (tensor, layer, component, kind, shape[0], shape[1], [float(x) for x in sv], tier)):
            self.spectra[key].append(value)

    def to_arrow(self) -> RunRows:
        """The same rows with Arrow arrays for columns: a few buffers to pickle instead of a Python
        object per value. `Store` inserts either form as it is."""
        def arrays(columns: dict[str, list]) -> dict[str, pa.Array]:
            return {key: _column(key, values) for key, values in columns.items()}

        return replace(self, metrics=arrays(self.metrics), spectra=arrays(self.spectra),
                       tables={name: arrays(columns) for name, columns in self.tables.items()})


@dataclass
class ModelRow:
    """The description of a model, refreshed by every ingest (the latest view wins)."""

    source: str
    architecture: str
    num_layers: int | None
    num_parameters: int | None
    tokens_per_step: int | None
    config: dict | None


@dataclass
class CheckpointRows:
    """Everything one checkpoint adds to the store; written in one transaction."""

    model: str
    step: int
    tokens: int | None
    revision: str
    source: str
    content_hash: str | None
    tensors: dict[str, list]  # tensor, layer, component, shape, dtype
    runs: list[RunRows]
    status: str = "ok"
    anomaly: tuple[str, str] | None = None  # checkpoint-level (kind, detail), e.g. a missing revision


class Store:
    """A ckptscope DuckDB file.

    `Store(path)` opens (creating if needed) for writing; `Store(path, read_only=True)` opens an
    existing store for queries and refuses any statement that is not a read.
    """

    def __init__(self, path: Path | str | None = None, *, read_only: bool = False) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; create it with `ckptscope ingest SOURCE`, or pass --store STORE "
                             f"(`ckptscope demo` creates {DEMO_STORE}: pass --store {DEMO_STORE})")
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"store {self.path} is a directory; pass a file path with --store")
        if not read_only and not os.access(self.path.resolve().parent, os.W_OK):  # found before any work, not at the first commit
            raise StoreError(f"cannot write store {self.path}: {self._not_writable()}")
        try:
            # Read-only means no side effects at all: no extension downloads triggered by a SELECT.
            config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False} if read_only else {}
            self.con = duckdb.connect(str(self.path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            msg = _one_line(exc)
            if "lock" in msg.lower():
                pid = re.search(r"PID (\d+)", msg)
                who = f" (PID {pid.group(1)})" if pid else ""
                raise StoreError(f"store {self.path} is locked by another process{who}; wait for it to finish or use another --store") from None
            if "permission denied" in msg.lower():
                raise StoreError(f"cannot open store {self.path}: {msg}; {self._not_writable()}") from None
            raise StoreError(f"cannot open store {self.path}: {msg}") from None
        except duckdb.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {_one_line(exc)}; is it a ckptscope DuckDB file?") from None
        self._opened = os.stat(self.path)
        if read_only:
            self._check_version()
        else:
            try:
                self._migrate()
            except duckdb.Error as exc:  # a new store's schema is its first write
                raise self._write_error(exc) from None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scalar(self, query: str, params: list | None = None):
        """First value of the first row; fetches everything (DuckDB 2 rejects half-read results)."""
        rows = self.con.execute(query, params or []).fetchall()
        return rows[0][0] if rows else None

    def _migrate(self) -> None:
        existing = self._scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'")
        if existing:  # an existing store is left byte-identical until something is written
            if self._check_version() == "1":
                self._upgrade_from_v1()
            return
        self.con.execute(files("ckptscope.store").joinpath("schema.sql").read_text())
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])

    def _upgrade_from_v1(self) -> None:
        """v1 → v2: add the `tier` columns (NULL for old rows) and re-create the views that show them."""
        con = self.con
        con.begin()
        try:
            for table in ("metric_values", "spectra"):
                con.execute(f"ALTER TABLE {table} ADD COLUMN tier VARCHAR")
            views = files("ckptscope.store").joinpath("schema.sql").read_text().split("CREATE OR REPLACE VIEW metrics AS", 1)[1]
            con.execute("CREATE OR REPLACE VIEW metrics AS" + views)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [SCHEMA_VERSION])
            con.commit()
        except BaseException:
            con.rollback()
            raise

    def _check_version(self) -> str | None:
        try:
            version = self._scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            raise StoreError(f"{self.path} is not a ckptscope store (no meta table); pass the right --store") from None
        if version is not None and version not in READABLE_VERSIONS:
            raise StoreError(f"store {self.path} has schema version {version}, this ckptscope writes {SCHEMA_VERSION}; upgrade ckptscope")
        return version

    # -- reading ---------------------------------------------------------------------------
    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run one query and return its result; on a read-only store only reads are allowed."""
        if self.read_only:
            self._refuse_writes(query)
        try:
            rel = self.con.sql(query, params=params or None)
            return pl.DataFrame() if rel is None else pl.from_arrow(rel.to_arrow_table())
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {_one_line(exc)}") from None

    def _refuse_writes(self, query: str) -> None:
        try:
            statements = self.con.extract_statements(query)
        except duckdb.Error as exc:
            raise StoreError(f"invalid SQL: {_one_line(exc)}") from None
        if not statements:
            raise StoreError("empty query; give one SELECT statement")
        for st in statements:
            kind = st.type.name
            if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: that one must be a read too
                inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", st.query, flags=re.IGNORECASE)
                kind = self.con.extract_statements(inner)[0].type.name if inner.strip() else kind
            if kind not in READ_STATEMENTS - {"EXPLAIN"}:
                raise StoreError(f"`sql` is read-only: {kind} statements are refused; use SELECT (or the Python API for changes)")
        if len(statements) > 1:
            raise StoreError("give one statement at a time")

    def steps_done(self, model: str, analyzer: str) -> set[int]:
        """Steps of `model` whose `analyzer` rows are already stored."""
        rows = self.con.execute(
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
    def write_checkpoint(self, rows: CheckpointRows, *, replace: bool = False, model: ModelRow | None = None) -> None:
        """Write all of one checkpoint's rows in a single transaction (replacing them with `replace`).

        `model` registers or refreshes the model's description in the same transaction, so a
        model never appears in the store without a checkpoint. `duplicate_of` is worked out
        here, from the hashes stored, so it names the earliest identical step whatever order
        steps are written in (parallel executors finish them out of order).
        """
        con = self.con
        with self._transaction():
            if model is not None:
                con.execute(
                    "INSERT OR REPLACE INTO models (model, source, architecture, num_layers, num_parameters, tokens_per_step, config) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [rows.model, model.source, model.architecture, model.num_layers, model.num_parameters,
                     model.tokens_per_step, json.dumps(model.config) if model.config else None],
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
                    if columns and next(iter(columns.values())):
                        self._insert(table, rows.model, rows.step, run_id, columns)
                for tensor, kind, detail in run.anomalies:
                    self._add_anomaly(rows.model, rows.step, tensor, kind, detail, run_id)

    def _mark_duplicates(self, model: str) -> None:
        """Point every checkpoint of `model` at the earliest step with the same weights, with a
        `duplicate_checkpoint` anomaly; only rows whose answer changed are touched."""
        changed = self.con.execute(
            """
            WITH firsts AS (SELECT content_hash, min(step) AS first FROM checkpoints
                            WHERE model = $model AND status = 'ok' AND content_hash IS NOT NULL GROUP BY content_hash)
            SELECT c.step, CASE WHEN f.first < c.step THEN f.first END AS dup, c.content_hash
            FROM checkpoints c LEFT JOIN firsts f ON c.status = 'ok' AND f.content_hash = c.content_hash
            WHERE c.model = $model AND dup IS DISTINCT FROM c.duplicate_of
            """, {"model": model}).fetchall()
        for step, dup, digest in changed:
            self.con.execute("UPDATE checkpoints SET duplicate_of = ? WHERE model = ? AND step = ?", [dup, model, step])
            self.con.execute("DELETE FROM anomalies WHERE model = ? AND step = ? AND run_id IS NULL AND kind = 'duplicate_checkpoint'",
                             [model, step])
            if dup is not None:
                self._add_anomaly(model, step, None, "duplicate_checkpoint",
                                  f"weights are byte-identical to step {dup} (sha256 {digest[:16]}…)")

    def replace_metrics(self, model: str, step: int, analyzer: str, metrics: list[str], rows: RunRows, parameters: dict) -> None:
        """Swap some metrics of an existing run for recomputed ones, in one transaction.

        Used when a reference moves, e.g. `final_*` rows after a later step is ingested.
        """
        con = self.con
        with self._transaction():
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
        self.con.begin()
        try:
            yield
            self.con.commit()
        except BaseException as exc:
            try:
                self.con.rollback()
            except duckdb.Error:  # a failed commit has already ended (and undone) the transaction
                pass
            if isinstance(exc, duckdb.Error):
                raise self._write_error(exc) from None
            raise

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

    def run_parameters(self, model: str, analyzer: str) -> dict[int, dict]:
        rows = self.con.execute("SELECT step, parameters FROM runs WHERE model = ? AND analyzer = ?", [model, analyzer]).fetchall()
        return {step: json.loads(params) for step, params in rows}

    def _delete_step(self, model: str, step: int, analyzers: list[str]) -> None:
        ids = [r[0] for r in self.con.execute(
            f"SELECT run_id FROM runs WHERE model = ? AND step = ? AND analyzer IN ({', '.join('?' * len(analyzers))})",
            [model, step, *analyzers]).fetchall()]
        if ids:
            marks = ", ".join("?" * len(ids))
            for table in RUN_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
        self.con.execute("DELETE FROM anomalies WHERE model = ? AND step = ? AND run_id IS NULL", [model, step])
        self.con.execute("DELETE FROM tensors WHERE model = ? AND step = ?", [model, step])  # rewritten with the checkpoint

    def _add_anomaly(self, model: str, step: int, tensor: str | None, kind: str, detail: str, run_id: int | None = None) -> None:
        self.con.execute("INSERT INTO anomalies (run_id, model, step, tensor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
                         [run_id, model, step, tensor, kind, detail])

    def _insert(self, table: str, model: str, step: int, run_id: int | None, columns: dict[str, list], replace_keys: bool = False) -> None:
        n = len(next(iter(columns.values())))
        data: dict[str, Any] = {}
        if run_id is not None:
            data["run_id"] = pa.array([run_id] * n, pa.int64())
        data["model"] = pa.array([model] * n, pa.string())
        data["step"] = pa.array([step] * n, pa.int64())
        for key, values in columns.items():
            data[key] = _column(key, values)
        batch = pa.table(data)
        cols = ", ".join(batch.column_names)
        verb = "INSERT OR REPLACE" if replace_keys else "INSERT"
        self.con.register("_ckptscope_batch", batch)
        try:
            self.con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _ckptscope_batch")
        finally:
            self.con.unregister("_ckptscope_batch")


def _column(key: str, values: list | pa.Array) -> pa.Array:
    """A row column as the Arrow type of its store column (named alike in every table)."""
    if isinstance(values, pa.Array):
        return values
    if key == "sv":
        kind = pa.list_(pa.float64())
    elif key == "shape":
        kind = pa.list_(pa.int64())
    elif key in ("layer", "rows", "cols", "first_seen_step"):
        kind = pa.int64()
    elif key in ("value", "score", "loss"):
        kind = pa.float64()
    elif key == "memorized":
        kind = pa.bool_()
    else:
        kind = pa.string()
    return pa.array(values, kind)
