"""`ckptscope`: a thin command line over the Python API.

Each command parses options, calls one documented function, and prints the result. A
`CkptscopeError` (a user mistake) becomes one line on stderr and exit status 1, never a
traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from importlib.resources import files
from pathlib import Path

import click
import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckptscope.errors import CkptscopeError, StoreError
from ckptscope.store.db import Store, default_store_path

out = Console()
err = Console(stderr=True)
DEMO_STORE = "ckptscope-demo.duckdb"
DEMO_QUERIES = [
    ("Steps ingested, with tokens seen",
     "SELECT step, tokens, duplicate_of FROM checkpoints WHERE model = 'demo-neox' ORDER BY step"),
    ("Stable rank of each layer's fused QKV matrix, first vs last step",
     "SELECT layer, step, round(value, 3) AS stable_rank FROM metrics WHERE model = 'demo-neox' AND metric = 'stable_rank' "
     "AND component = 'attn.qkv' AND step IN (SELECT min(step) FROM checkpoints UNION SELECT max(step) FROM checkpoints) ORDER BY layer, step"),
    ("Gradual rank increase: numerical rank of W_t - W_0 for layer 0's MLP input matrix",
     "SELECT step, value AS delta_init_numerical_rank FROM metrics WHERE model = 'demo-neox' AND layer = 0 AND component = 'mlp.in' "
     "AND metric = 'delta_init_numerical_rank' ORDER BY step"),
    ("Heavy-tail exponent alpha per layer and component at the final step",
     "SELECT layer, " + ", ".join(f"round(max(value) FILTER (component = '{c}'), 2) AS \"{c}\"" for c in ("attn.qkv", "attn.o", "mlp.in", "mlp.out"))
     + " FROM metrics WHERE model = 'demo-neox' AND metric = 'alpha' AND layer IS NOT NULL "
     "AND step = (SELECT max(step) FROM checkpoints) GROUP BY layer ORDER BY layer"),
]


def run_ingest(*args, **kwargs) -> pl.DataFrame:
    from ckptscope.pipeline import ingest  # torch is loaded only by the commands that analyze

    return ingest(*args, **kwargs)


def run_analyze(*args, **kwargs) -> pl.DataFrame:
    from ckptscope.pipeline import analyze

    return analyze(*args, **kwargs)


def _store_option(f):
    return click.option("--store", type=click.Path(path_type=Path), default=None,
                        help="DuckDB store file [default: $CKPTSCOPE_STORE or ./ckptscope.duckdb].")(f)


def _executor_options(f):
    """Where steps are analyzed: the same options for every command that analyzes checkpoints."""
    for option in reversed([
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: processes on this machine; ray: a Ray cluster (pip install 'ckptscope[ray]')."),
        click.option("--workers", type=int, help="Steps analyzed at once: processes (local) or Ray actors "
                                                 "[default: 1 for local, the cluster's CPUs / --threads for ray]."),
        click.option("--threads", type=int, help="Torch threads per worker [default: CPUs / --workers for local "
                                                 "processes, 1 for ray, unchanged for one local worker]."),
        click.option("--ray-address", help="Ray cluster to join, e.g. 10.0.0.5:6379 or ray://head:10001 "
                                           "[default: $RAY_ADDRESS, else a local Ray instance]."),
    ]):
        f = option(f)
    return f


def _friendly(f):
    """Turn user mistakes into one line on stderr and a non-zero exit."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except CkptscopeError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err.print("interrupted: completed checkpoints are saved; run the same command again to resume", highlight=False)
            sys.exit(130)
    return wrapper


def _show(df: pl.DataFrame, title: str | None = None) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in df.columns:
        table.add_column(col, overflow="fold")
    for row in df.iter_rows():
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptscope")
def main() -> None:
    """Analyze how every layer of a network changes across training checkpoints."""


@main.command()
@click.argument("source")
@_store_option
@click.option("--name", help="Model name in the store [default: SOURCE's directory name].")
@click.option("--steps", help="Steps: all, first, last, log, 0,1000,5000, 0:143000:1000, or STEP=PATH pairs.")
@click.option("--max", "max_steps", type=int, help="At most N steps, spread evenly in log-step.")
@click.option("--analyzers", default="weights", show_default=True, help="Comma-separated analyzer names.")
@click.option("--force", is_flag=True, help="Recompute steps that are already in the store.")
@click.option("--tokens-per-step", type=int, help="Tokens seen per optimizer step, to fill `tokens`.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of numerical_rank.")
@click.option("--spectrum", type=click.Choice(["exact", "fast", "none"]), default="exact", show_default=True,
              help="How singular values are obtained: exact (default; matrices whose smaller side exceeds --exact-max-side "
                   "fall back to fast), fast (Lanczos/randomized: spectral norm, top-k spectrum, estimated effective rank), "
                   "none (norms only).")
@click.option("--exact-max-side", type=int, default=4096, show_default=True,
              help="Largest smaller side of a matrix whose spectrum --spectrum exact computes exactly.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the spectral work.")
@click.option("--revision-pattern", help="Hub: regex with a (?P<step>...) group mapping revision names to steps.")
@click.option("--keep", is_flag=True, help="Hub: keep downloaded checkpoints in the HF cache instead of evicting them.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Hub: download cache [default: the HF cache].")
@click.option("--probe", type=click.Path(path_type=Path), help="convergence: sequences (JSONL, Parquet or .npy) to compare activations on.")
@click.option("--corpus", type=click.Path(path_type=Path), help="memorization: sequences (JSONL, Parquet or .npy) to test.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass (activation analyzers).")
@_executor_options
@_friendly
def ingest(source, store, name, steps, max_steps, analyzers, force, tokens_per_step, rtol, spectrum, exact_max_side, device,
           revision_pattern, keep, cache_dir, probe, corpus, batch_size, executor, workers, threads, ray_address):
    """Analyze the checkpoints in SOURCE into the store.

    SOURCE is a local run directory, a catalog suite (pythia-160m) or a hub repo (EleutherAI/pythia-160m).
    """
    report = run_ingest(source, store=store or default_store_path(), name=name, steps=steps, max_steps=max_steps,
                        analyzers=analyzers, force=force, tokens_per_step=tokens_per_step, rtol=rtol, spectrum=spectrum,
                        exact_max_side=exact_max_side, device=device, revision_pattern=revision_pattern, keep=keep,
                        cache_dir=cache_dir, probe=probe, corpus=corpus, batch_size=batch_size, executor=executor,
                        workers=workers, threads=threads, ray_address=ray_address, progress=True)
    _summarize(report)


def _summarize(report: pl.DataFrame) -> None:
    if report.height:
        dup = report.filter(pl.col("duplicate_of").is_not_null())
        missing = report.filter(pl.col("status") == "missing")
        extra = f"; {dup.height} duplicate checkpoint(s) flagged" if dup.height else ""
        extra += f"; {missing.height} revision(s) without weights recorded as missing" if missing.height else ""
        out.print(f"ingested {report.height} checkpoint(s) in {report['seconds'].sum():.1f}s{extra}")
    else:
        out.print("nothing to do: every selected step is already in the store (use --force to recompute)")


@main.command()
@click.argument("query")
@_store_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write the result to FILE instead of stdout.")
@_friendly
def sql(query, store, fmt, output):
    """Run a read-only SQL QUERY against the store."""
    if fmt == "parquet" and output is None:
        raise CkptscopeError("--format parquet needs --output FILE")
    if output is not None and not output.parent.is_dir():
        raise CkptscopeError(f"--output {output}: directory {output.parent} does not exist")
    with Store(store or default_store_path(), read_only=True) as db:
        df = db.sql(query)
    if fmt == "table":
        if output:
            output.write_text(str(df))
        else:
            _show(df)
    elif fmt == "parquet":
        df.write_parquet(output)
    else:
        text = df.write_csv() if fmt == "csv" else df.write_json()
        if output:
            output.write_text(text)
        else:
            click.echo(text, nl=fmt == "json")


@main.group(name="analyze")
def analyze_group() -> None:
    """Run activation analyzers on a model already in the store."""


def _analyze_options(f):
    for option in reversed([
        click.argument("model"),
        _store_option,
        click.option("--steps", help="Steps to analyze [default: the steps already ingested for MODEL]."),
        click.option("--device", default="cpu", show_default=True, help="Torch device for the forward passes."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass."),
        click.option("--force", is_flag=True, help="Recompute steps already analyzed."),
        _executor_options,
    ]):
        f = option(f)
    return f


@analyze_group.command()
@_analyze_options
@click.option("--probe", type=click.Path(path_type=Path), required=True, help="Sequences (JSONL, Parquet or .npy).")
@click.option("--reference-step", default="final", show_default=True, help="Step to compare with: final, first or a number.")
@_friendly
def convergence(model, store, steps, device, batch_size, force, probe, reference_step, **executor):
    """Linear CKA of every layer's activations to the reference step (default: final)."""
    _summarize(run_analyze(model, "convergence", store=store, steps=steps, device=device, batch_size=batch_size, force=force,
                           probe=probe, reference_step=reference_step, progress=True, **executor))


@analyze_group.command()
@_analyze_options
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="Sequences (JSONL, Parquet or .npy).")
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--continuation-len", type=int, default=32, show_default=True)
@_friendly
def memorization(model, store, steps, device, batch_size, force, corpus, prompt_len, continuation_len, **executor):
    """The Pythia memorization score of every corpus sequence at every step."""
    _summarize(run_analyze(model, "memorization", store=store, steps=steps, device=device, batch_size=batch_size, force=force,
                           corpus=corpus, prompt_len=prompt_len, continuation_len=continuation_len, progress=True, **executor))


@main.command()
@click.argument("name", required=False)
@_friendly
def suites(name):
    """List the suite catalog, or show one family's members and step grids (e.g. `suites pythia`)."""
    from ckptscope.sources.catalog import describe, list_suites

    entries = describe(name) if name else list_suites()
    table = pl.DataFrame({
        "suite": [s.name for s in entries], "family": [s.family for s in entries],
        "repo": [s.repo or s.repo_glob for s in entries],
        "tokens/step": [str(s.tokens_per_step or "") for s in entries],
        **({"steps": [s.grid_text() for s in entries]} if name else {}),
    })
    _show(table, f"{len(entries)} catalog entr{'y' if len(entries) == 1 else 'ies'}; any other org/name is discovered at run time")


@main.command(name="ls")
@_store_option
@_friendly
def ls(store):
    """List models, steps ingested, analyzers run and anomalies."""
    with Store(store or default_store_path(), read_only=True) as db:
        summary, anomalies = db.summary(), db.anomalies()
    if not summary.height:
        out.print("the store holds no models yet; run `ckptscope ingest SOURCE` or `ckptscope demo`")
        return
    _show(summary.select(
        "model", pl.col("architecture").alias("arch"), pl.col("num_layers").alias("layers"),
        pl.col("num_parameters").map_elements(_human, return_dtype=pl.String).alias("params"),
        "steps", pl.format("{}..{}", "first_step", "last_step").alias("range"), "analyzers", "anomalies",
    ), "models")
    if anomalies.height:
        _show(anomalies.select("model", "step", "tensor", "kind", "detail").head(50),
              f"anomalies ({anomalies.height}{', first 50 shown' if anomalies.height > 50 else ''})")
    else:
        out.print("no anomalies")


@main.command()
@click.option("--store", type=click.Path(path_type=Path), default=DEMO_STORE, show_default=True, help="Store file to write.")
@_friendly
def demo(store):
    """Ingest the embedded demo suite (offline) and show example queries."""
    suite = Path(str(files("ckptscope") / "demo_suite"))
    if not any(suite.glob("step*")):
        raise StoreError(f"the demo suite is missing from {suite}; reinstall ckptscope")
    with Store(store) as db:
        run_ingest(suite, store=db, name="demo-neox", tokens_per_step=_demo_tokens_per_step(suite), progress=True)
    with Store(store, read_only=True) as db:
        for title, query in DEMO_QUERIES:
            out.print(f"\n[bold]{title}[/]\n[dim]$ ckptscope sql --store {store} \"{query}\"[/]", highlight=False)
            _show(db.sql(query))
    out.print(f"\nstore: {store}   try: ckptscope ls --store {store}")


def _human(n: int | None) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n and n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _demo_tokens_per_step(suite: Path) -> int | None:
    meta = suite / "suite.json"
    return json.loads(meta.read_text()).get("tokens_per_step") if meta.is_file() else None


def _names(value: str | None) -> list[str] | None:
    """`a,b` -> ["a", "b"]; unset or empty means no filter."""
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    return names or None


@main.command()
@_store_option
@click.option("--models", help="Comma-separated models [default: all].")
@click.option("--metrics", help="Comma-separated metrics [default: stable_rank, effective_rank, alpha, "
                                "delta_init_relative, final_relative_distance, spectral_norm where present].")
@click.option("--components", help="Comma-separated components, e.g. attn.qkv,mlp.in [default: all].")
@click.option("--output", "-o", type=click.Path(path_type=Path), default="report.html", show_default=True,
              help="HTML file to write.")
@_friendly
def report(store, models, metrics, components, output):
    """Write a self-contained HTML report of the store (opens offline)."""
    from ckptscope.reports import build_report  # plotting stack loaded only by the commands that draw

    path = build_report(store or default_store_path(), output, models=_names(models), metrics=_names(metrics),
                        components=_names(components))
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


@main.command()
@click.argument("metric")
@_store_option
@click.option("--model", help="Model to plot [default: the only one in the store].")
@click.option("--component", help="One component [default: one panel per component].")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Figure file: .png, .svg or .pdf.")
@_friendly
def plot(metric, store, model, component, output):
    """Save a static figure of METRIC against step, one line per layer."""
    from ckptscope.reports import plot_metric

    path = plot_metric(store or default_store_path(), metric, output, model=model, component=component)
    out.print(f"wrote {path}", highlight=False, soft_wrap=True)


@main.group(name="corpus")
def corpus_group() -> None:
    """Build corpus files (token sequences) for the activation analyzers."""


@corpus_group.command(name="from-data")
@click.argument("prefix", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Parquet corpus to write.")
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Sequences per optimizer step (Pythia: 1024).")
@click.option("--seq-len", type=int, default=2049, show_default=True, help="Tokens per sequence (Pythia: 2049).")
@click.option("--steps", help="First-seen steps A:B or A:B:S, B inclusive [default: every complete batch].")
@click.option("--per-step", type=int, help="Sequences sampled per selected step [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-step (and held-out) samples.")
@click.option("--heldout", type=click.Path(path_type=Path), help="Second MMapIndexedDataset of never-trained sequences.")
@click.option("--heldout-count", type=int, default=0, help="Held-out sequences to sample from --heldout.")
@_friendly
def corpus_from_data(prefix, output, batch_size, seq_len, steps, per_step, seed, heldout, heldout_count):
    """Write the training sequences that steps saw, read from the MMapIndexedDataset PREFIX(.bin/.idx), as a corpus."""
    from ckptscope.data_order import corpus_from_data as build

    df = build(prefix, output, batch_size=batch_size, seq_len=seq_len, steps=steps, per_step=per_step, seed=seed,
               heldout=heldout, heldout_count=heldout_count)
    train = df.filter(pl.col("split") == "train")
    out.print(f"wrote {df.height} sequences to {output}: {train.height} train from {train['first_seen_step'].n_unique()} "
              f"step(s), {df.height - train.height} held out", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
