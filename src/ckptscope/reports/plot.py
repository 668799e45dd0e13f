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
from matplotlib.lines import Line2D

from ckptscope.errors import CkptscopeError
from ckptscope.reports import queries as q
from ckptscope.store.db import Store

FORMATS = (".png", ".svg", ".pdf")
PANEL_COLUMNS = 3
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
NO_LAYER_COLORS = ("black", "tab:red", "tab:brown", "tab:gray", "tab:pink", "tab:olive")  # not viridis, so not read as a layer


def plot_metric(store: Path | str, metric: str, output: Path | str, *, model: str | None = None,
                component: str | None = None) -> Path:
    """Save `metric_figure` to `output`; the format follows its extension (.png, .svg, .pdf)."""
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise CkptscopeError(f"cannot tell the figure format of {output}; end the name with {', '.join(FORMATS)}")
    fig = metric_figure(store, metric, model=model, component=component)
    output.parent.mkdir(parents=True, exist_ok=True)
    # No date in the metadata: the same store gives byte-identical SVG/PDF files.
    metadata = {"Date": None} if output.suffix.lower() in (".svg", ".pdf") else None
    fig.savefig(output, dpi=200, metadata=metadata)
    return output


def metric_figure(store: Path | str, metric: str, *, model: str | None = None, component: str | None = None) -> Figure:
    """`metric` against step (symmetric-log x, so step 0 shows), one line per tensor, never a mean of several.

    One panel per component unless `component` is given. Lines are coloured by layer; where a
    component holds several tensors per layer (ln_1 and ln_2, weight and bias) each tensor
    pattern gets its own line style, named in the legend. Tensors without a layer (wte, wpe,
    lm_head, the final norm) are dashed lines labelled with their names.
    """
    with Store(store, read_only=True) as db:
        models = q.store_models(db)
        if model is None:
            if len(models) > 1:
                raise CkptscopeError(f"the store holds {len(models)} models ({', '.join(models)}); pick one with --model")
            model = models[0]
        sel = q.select(db, [model], [metric], [component] if component else None)
        df = db.sql(q.metric_series_sql(model, metric, component, sel.heads))
    if not df.height:
        raise CkptscopeError(f"model {model} has no {metric} values for component {component} (per-head rows, such as "
                             "attn.ov and attn.qk, are left out: `ckptscope report` draws them per head); "
                             "`ckptscope sql` on the metrics view shows which components have it")
    return _figure(df, model, metric)


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
        rows_ = df.filter(pl.col("component") == comp)
        layered = rows_.filter(pl.col("layer").is_not_null())
        patterns = sorted(layered["pattern"].unique().to_list())
        handles = []
        for i, pattern in enumerate(patterns):
            style = LINE_STYLES[i % len(LINE_STYLES)]
            for (tensor,), line in layered.filter(pl.col("pattern") == pattern).partition_by(
                    "tensor", as_dict=True, maintain_order=True).items():
                ax.plot(line["step"], line["value"], color=mappable.to_rgba(line["layer"][0]), ls=style, lw=1.2, label=tensor)
            if len(patterns) > 1:  # the legend names the line styles; the colour bar the layers
                handles.append(Line2D([], [], color="0.35", ls=style, lw=1.2, label=pattern))
        layerless = rows_.filter(pl.col("layer").is_null()).partition_by("tensor", as_dict=True, maintain_order=True)
        for i, ((tensor,), line) in enumerate(layerless.items()):
            handles.append(ax.plot(line["step"], line["value"], color=NO_LAYER_COLORS[i % len(NO_LAYER_COLORS)],
                                   ls="--", lw=1.2, label=tensor)[0])
        if handles:
            ax.legend(handles=handles, fontsize=7, frameon=False)
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
