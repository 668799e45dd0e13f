"""`plot_metric`: one static figure of a metric over training, to put in a paper.

matplotlib, not plotly: a paper needs a vector or high-resolution file, not a page. The
`Figure` object is used directly (no pyplot), so plotting leaves no global state behind and
needs no display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from ckptscope.errors import CkptscopeError
from ckptscope.reports import queries as q
from ckptscope.store.db import Store

FORMATS = (".png", ".svg", ".pdf")
PANEL_COLUMNS = 3


def plot_metric(store: Path | str, metric: str, output: Path | str, *, model: str | None = None,
                component: str | None = None) -> Path:
    """Plot `metric` against step (symmetric-log x, so step 0 shows) with one line per layer.

    One panel per component unless `component` is given; tensors without a layer (embeddings,
    final norm) are dashed black lines. The format follows the extension of `output`.
    """
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise CkptscopeError(f"cannot tell the figure format of {output}; end the name with {', '.join(FORMATS)}")
    with Store(store, read_only=True) as db:
        models = q.store_models(db)
        if model is None:
            if len(models) > 1:
                raise CkptscopeError(f"the store holds {len(models)} models ({', '.join(models)}); pick one with --model")
            model = models[0]
        q.select(db, [model], [metric], [component] if component else None)
        df = db.sql(q.metric_series_sql(model, metric, component))
    if not df.height:
        raise CkptscopeError(f"model {model} has no {metric} values for component {component}; "
                             "`ckptscope sql` on the metrics view shows which components have it")
    fig = _figure(df, model, metric)
    output.parent.mkdir(parents=True, exist_ok=True)
    # No date in the metadata: the same store gives byte-identical SVG/PDF files.
    metadata = {"Date": None} if output.suffix.lower() in (".svg", ".pdf") else None
    fig.savefig(output, dpi=200, metadata=metadata)
    return output


def _figure(df: pl.DataFrame, model: str, metric: str) -> Figure:
    components = q.ordered_components(df["component"].unique().to_list())
    cols = min(PANEL_COLUMNS, len(components))
    rows = math.ceil(len(components) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.2, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    max_layer = df["layer"].max()
    # One colour per layer, with integer ticks on the colour bar.
    top = max_layer if max_layer is not None else 0
    mappable = ScalarMappable(BoundaryNorm(np.arange(-0.5, top + 1.5), 256), "viridis")
    for ax, comp in zip(axes, components):
        for (layer,), line in df.filter(pl.col("component") == comp).partition_by("layer", as_dict=True, maintain_order=True).items():
            if layer is None:
                ax.plot(line["step"], line["value"], color="black", ls="--", lw=1.2, label=f"{comp} (no layer)")
                ax.legend(fontsize=8, frameon=False)
            else:
                ax.plot(line["step"], line["value"], color=mappable.to_rgba(layer), lw=1.2)
        ax.set_xscale("symlog", linthresh=1, linscale=0.4)
        ax.set_xlim(left=0)
        ax.set_title(comp, fontsize=10)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3, lw=0.5)
    for ax in axes[len(components):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(components) - cols):len(components)]:
        ax.set_xlabel("step")
    if max_layer is not None:
        ticks = range(0, top + 1, max(1, math.ceil((top + 1) / 12)))
        fig.colorbar(mappable, ax=list(axes[:len(components)]), label="layer", shrink=0.9, ticks=list(ticks))
    fig.suptitle(f"{metric} · {model}")
    return fig
