"""Schema migrations, applied in order and recorded by name in the store's `migrations` table.

Each migration is a named function of a DuckDB connection, run once, in the manner of
sqlite-utils' `Migrations`: a store of any earlier version catches up in one transaction when
it is first opened for writing. Stores made before migrations were recorded (schema versions 1
and 2, told by `meta.schema_version`) are credited with the migrations they already contain.
Views over the core tables are re-created after any migration, so they always show the current
columns. Tables that analyzers declare are not migrations: the store creates them on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

import duckdb

SCHEMA_VERSION = "3"  # meta.schema_version of a store with every migration below
Migration = tuple[str, Callable[[duckdb.DuckDBPyConnection], None]]


def _sql(name: str) -> str:
    return files("ckptscope.store").joinpath(name).read_text()


def _core_tables(con: duckdb.DuckDBPyConnection) -> None:
    """models, checkpoints, runs, tensors, metric_values, spectra, anomalies (schema version 1)."""
    con.execute(_sql("core.sql"))


def _spectrum_tier(con: duckdb.DuckDBPyConnection) -> None:
    """How a matrix's spectrum was obtained: exact | fast | none (schema version 2)."""
    for table in ("metric_values", "spectra"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tier VARCHAR")


def _head(con: duckdb.DuckDBPyConnection) -> None:
    """The attention head of per-head rows (NULL for whole-matrix rows)."""
    for table in ("metric_values", "spectra"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS head INTEGER")


def _analyzer_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The registry of analyzer-declared tables; `memorization` of older stores joins it."""
    con.execute("""
        CREATE TABLE IF NOT EXISTS analyzer_tables (
            table_name VARCHAR PRIMARY KEY,
            analyzer   VARCHAR NOT NULL,
            columns    JSON NOT NULL,          -- {column: DuckDB type}
            key        JSON NOT NULL,          -- columns identifying a row within a step
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'memorization'").fetchall()[0][0]:
        con.execute("""INSERT OR IGNORE INTO analyzer_tables (table_name, analyzer, columns, key) VALUES
            ('memorization', 'memorization',
             '{"sequence_id": "VARCHAR", "score": "DOUBLE", "memorized": "BOOLEAN", "loss": "DOUBLE", "first_seen_step": "BIGINT"}',
             '["sequence_id"]')""")


def _tensor_ties(con: duckdb.DuckDBPyConnection) -> None:
    """`tensors.tied_to`: the tensor a tied copy (GPT-2's lm_head.weight) shares its weights with."""
    con.execute("ALTER TABLE tensors ADD COLUMN IF NOT EXISTS tied_to VARCHAR")


def _training_log(con: duckdb.DuckDBPyConnection) -> None:
    """The scalars a Hugging Face Trainer logged (trainer_state.json's log_history), per step."""
    con.execute("""
        CREATE TABLE IF NOT EXISTS training_log (
            model      VARCHAR NOT NULL,
            step       BIGINT NOT NULL,    -- the optimizer step the value was logged at
            metric     VARCHAR NOT NULL,   -- log_history key: loss, learning_rate, grad_norm, eval_loss, ...
            value      DOUBLE,
            checkpoint BIGINT NOT NULL,    -- the checkpoint whose trainer_state.json gave the value (the latest wins)
            PRIMARY KEY (model, step, metric)
        )""")


def _step_paths(con: duckdb.DuckDBPyConnection) -> None:
    """Checkpoints named with --steps STEP=PATH, remembered so later ingests of the model find them."""
    con.execute("""
        CREATE TABLE IF NOT EXISTS step_paths (
            model VARCHAR NOT NULL,
            step  BIGINT NOT NULL,
            path  VARCHAR NOT NULL,            -- as given: relative to the model's source directory, or absolute
            PRIMARY KEY (model, step)
        )""")


def _seed_groups(con: duckdb.DuckDBPyConnection) -> None:
    """A model may be seed K of a group of replicates (`ingest --group G --seed K`; catalog seeds)."""
    con.execute("ALTER TABLE models ADD COLUMN IF NOT EXISTS group_name VARCHAR")
    con.execute("ALTER TABLE models ADD COLUMN IF NOT EXISTS seed BIGINT")


def _training_phases(con: duckdb.DuckDBPyConnection) -> None:
    """The HMM state of each model's steps (`ckptscope phases`); the fit's parameters are in `runs`."""
    con.execute("""
        CREATE TABLE IF NOT EXISTS training_phases (
            run_id      BIGINT NOT NULL,     -- the model's 'phases' run (at its last step): the fitted HMM
            model       VARCHAR NOT NULL,
            step        BIGINT NOT NULL,
            state       INTEGER NOT NULL,    -- most probable HMM state (Viterbi path), 0-based
            probability DOUBLE NOT NULL,     -- posterior probability of that state at this step
            PRIMARY KEY (model, step)
        )""")


def _views_only(con: duckdb.DuckDBPyConnection) -> None:
    """No table changes: the views of views.sql (e.g. `seed_similarity`) are re-created after it, as after any migration."""


MIGRATIONS: list[Migration] = [
    ("0001_core_tables", _core_tables),
    ("0002_spectrum_tier", _spectrum_tier),
    ("0003_head", _head),
    ("0004_analyzer_tables", _analyzer_tables),
    ("0005_tensor_ties", _tensor_ties),
    ("0006_training_log", _training_log),
    ("0007_step_paths", _step_paths),
    ("0008_seed_groups", _seed_groups),
    ("0009_training_phases", _training_phases),
    ("0010_seed_similarity_view", _views_only),
]
LEGACY = {"1": 1, "2": 2}  # meta.schema_version of stores without a migrations table -> migrations they hold


def applied(con: duckdb.DuckDBPyConnection) -> list[str] | None:
    """Names of the migrations this store records; None when it is not a ckptscope store."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "meta" not in tables:
        return None
    if "migrations" in tables:
        return [r[0] for r in con.execute("SELECT name FROM migrations ORDER BY name").fetchall()]
    version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()  # DuckDB 2: read results whole
    return [name for name, _ in MIGRATIONS[: LEGACY.get(version[0][0] if version else "", 0)]]


def pending(done: list[str]) -> list[Migration]:
    return [m for m in MIGRATIONS if m[0] not in done]


def unknown(done: list[str]) -> list[str]:
    """Migrations recorded by a newer ckptscope."""
    known = {name for name, _ in MIGRATIONS}
    return [name for name in done if name not in known]


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every pending migration in one transaction; returns their names (none: nothing written)."""
    done = applied(con)
    todo = pending(done or [])
    if not todo and done is not None:
        return []
    con.begin()
    try:
        con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS migrations (name VARCHAR PRIMARY KEY, "
                    "applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)")
        for name in done or []:  # a legacy store: credit what it holds
            con.execute("INSERT OR IGNORE INTO migrations (name) VALUES (?)", [name])
        for name, step in todo:
            step(con)
            con.execute("INSERT INTO migrations (name) VALUES (?)", [name])
        con.execute(_sql("views.sql"))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        con.commit()
    except BaseException:
        try:
            con.rollback()
        except duckdb.Error:  # a failed commit has already ended (and undone) the transaction
            pass
        raise
    return [name for name, _ in todo]
