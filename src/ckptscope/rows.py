"""What analyzers produce and the store consumes: rows before they have a run_id.

Kept apart from the store so a worker process builds and ships rows (as Arrow) without
importing DuckDB. `Table` is how an analyzer declares a table of its own; the store creates
it on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

# DuckDB column types an analyzer table may declare, and their Arrow types.
ARROW_TYPES = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int64(), "DOUBLE": pa.float64(),
               "BOOLEAN": pa.bool_(), "DOUBLE[]": pa.list_(pa.float64()), "BIGINT[]": pa.list_(pa.int64()), "JSON": pa.string()}


@dataclass(frozen=True)
class Table:
    """A table an analyzer writes besides `metric_values` and `spectra`.

    Every row also gets `run_id`, `model` and `step` (the store adds them: `step` is the run's
    unless the rows give their own, as a model-level analysis over many steps does), so the rows
    of a run are replaced with it. `columns` maps each column to a DuckDB type (`ARROW_TYPES`) and,
    after a `--`, its documentation; `key` names the columns that identify a row within a step.
    `views` are `CREATE OR REPLACE VIEW` statements over the table, created with it.
    """

    name: str
    columns: dict[str, str]
    key: tuple[str, ...]
    doc: str = ""
    views: tuple[str, ...] = ()

    def types(self) -> dict[str, str]:
        return {col: spec.split("--")[0].strip() for col, spec in self.columns.items()}

    def ddl(self) -> str:
        cols = ["run_id BIGINT NOT NULL", "model VARCHAR NOT NULL", "step BIGINT NOT NULL"]
        cols += [f"{col} {kind}" for col, kind in self.types().items()]
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    " + ",\n    ".join(cols) + "\n)"

    def check(self) -> None:
        bad = {c: k for c, k in self.types().items() if k.removesuffix(" NOT NULL") not in ARROW_TYPES or not c.isidentifier()}
        if bad or not set(self.key) <= {*self.columns, "step"} or not self.name.isidentifier():
            raise ValueError(f"table {self.name!r}: columns must be identifiers typed among {sorted(ARROW_TYPES)}, "
                             "and the key among its columns (or step)")

    def arrow_type(self, column: str) -> pa.DataType:
        return ARROW_TYPES[self.types()[column].removesuffix(" NOT NULL")]


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
    metrics: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("tensor", "layer", "component", "metric", "value", "tier", "head")})
    spectra: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("tensor", "layer", "component", "kind", "rows", "cols", "sv", "tier", "head")})
    anomalies: list[tuple[str | None, str, str]] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # rows of the analyzer's declared tables, by name

    def add_metrics(self, tensor: str, layer: int | None, component: str, values: dict[str, float],
                    tier: str | None = None, head: int | None = None) -> None:
        """`tier` says how a matrix's spectrum was obtained (exact | fast | none; None for other rows);
        `head` is the attention head of a per-head row (None for whole-matrix rows)."""
        for metric, value in values.items():
            for key, item in zip(self.metrics, (tensor, layer, component, metric, float(value), tier, head)):
                self.metrics[key].append(item)

    def add_spectrum(self, tensor: str, layer: int | None, component: str, kind: str, shape: tuple[int, int], sv,
                     tier: str = "exact", head: int | None = None) -> None:
        for key, value in zip(self.spectra, (tensor, layer, component, kind, shape[0], shape[1], [float(x) for x in sv], tier, head)):
            self.spectra[key].append(value)

    def to_arrow(self) -> RunRows:
        """The same rows with Arrow arrays for columns: a few buffers to pickle instead of a Python
        object per value. `Store` inserts either form as it is."""
        def arrays(columns: dict[str, list]) -> dict[str, pa.Array]:
            return {key: column(key, values) for key, values in columns.items()}

        return replace(self, metrics=arrays(self.metrics), spectra=arrays(self.spectra),
                       tables={name: {k: pa.array(v) if not isinstance(v, pa.Array) else v for k, v in columns.items()}
                               for name, columns in self.tables.items()})


@dataclass
class ModelRow:
    """The description of a model, refreshed by every ingest (the latest view wins)."""

    source: str
    architecture: str
    num_layers: int | None
    num_parameters: int | None
    tokens_per_step: int | None
    config: dict | None
    group_name: str | None = None  # seed replicates: the group and this model's seed in it (None: keep what is stored)
    seed: int | None = None


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
    training_log: dict[str, list] | None = None  # step, metric, value from the checkpoint's trainer_state.json
    step_path: str | None = None  # the PATH of a checkpoint named with --steps STEP=PATH, remembered for later ingests


def column(key: str, values: list | pa.Array) -> pa.Array:
    """A row column as the Arrow type of its store column (named alike in every table)."""
    if isinstance(values, pa.Array):
        return values
    if key == "sv":
        kind = pa.list_(pa.float64())
    elif key == "shape":
        kind = pa.list_(pa.int64())
    elif key in ("layer", "rows", "cols", "head"):
        kind = pa.int64()
    elif key == "value":
        kind = pa.float64()
    else:
        kind = pa.string()
    return pa.array(values, kind)
