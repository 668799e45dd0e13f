"""`ckptscope`: a thin command line over the Python API.

Each command parses options, calls one documented function, and prints the result. A
`CkptscopeError` (a user mistake) becomes one line on stderr and exit status 1, never a
traceback.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from importlib.resources import files
from pathlib import Path

import click
import polars as pl
from rich.text import Text

from ckptscope import display
from ckptscope.errors import CkptscopeError, StoreError
from ckptscope.store.db import DEMO_STORE, Store, default_store_path

out = display.console()
err = display.console(stderr=True)
_DEMO_STEP = "(SELECT {}(step) FROM checkpoints WHERE model = 'demo-neox')"  # first/last step of the demo model
DEMO_QUERIES = [
    ("Steps ingested, with tokens seen",
     "SELECT step, tokens, duplicate_of FROM checkpoints WHERE model = 'demo-neox' ORDER BY step"),
    ("Stable rank of each layer's fused QKV matrix, first vs last step",
     "SELECT layer, step, round(value, 3) AS stable_rank FROM metrics WHERE model = 'demo-neox' AND metric = 'stable_rank' "
     f"AND component = 'attn.qkv' AND step IN ({_DEMO_STEP.format('min')}, {_DEMO_STEP.format('max')}) ORDER BY layer, step"),
    ("How far layer 0's MLP input matrix moved, relative to its size: since step 0 (grows, then levels off as the "
     "learning rate decays) and since the previous saved step (peaks, then shrinks)",
     "SELECT step, round(max(value) FILTER (metric = 'delta_init_relative'), 4) AS from_init, "
     "round(max(value) FILTER (metric = 'delta_prev_relative'), 4) AS from_previous FROM metrics "
     "WHERE model = 'demo-neox' AND layer = 0 AND component = 'mlp.in' GROUP BY step ORDER BY step"),
    ("Heavy-tail exponent alpha per layer and component at the final step",
     "SELECT layer, " + ", ".join(f"round(max(value) FILTER (component = '{c}'), 2) AS {c.replace('.', '_')}"
                                  for c in ("attn.qkv", "attn.o", "mlp.in", "mlp.out"))
     + f" FROM metrics WHERE model = 'demo-neox' AND metric = 'alpha' AND layer IS NOT NULL AND step = {_DEMO_STEP.format('max')} "
     "GROUP BY layer ORDER BY layer"),
]


def _store_option(f):
    return click.option("--store", type=click.Path(path_type=Path), default=None,
                        help="DuckDB store file [default: $CKPTSCOPE_STORE or ./ckptscope.duckdb].")(f)


def _friendly(f):
    """Turn user mistakes into one line on stderr and a non-zero exit."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except CkptscopeError as exc:
            err.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err.print("interrupted: completed checkpoints are saved; run the same command again to resume")
            sys.exit(130)
    return wrapper


def _anomaly_summary(f):
    """After a command that analyzes, one line counting by kind the anomalies its runs recorded
    (NaN/Inf weights, ...), which are otherwise only seen with `ckptscope ls`.

    The command's runs are those with a run_id above the store's largest before it started
    (writers hold the store's lock, so no other process adds runs meanwhile)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        path = kwargs.get("store") or default_store_path()
        before = _last_run_id(path)
        result = f(*args, **kwargs)
        counts = _new_anomalies(path, before)
        if counts is not None:
            total = sum(n for _, n in counts)
            kinds = ", ".join(f"{n} {kind}" for kind, n in counts)
            ls = "ckptscope ls" + (f" --store {shlex.quote(str(kwargs['store']))}" if kwargs.get("store") else "")
            display.line(out, f"{total} anomal{'y' if total == 1 else 'ies'}: {kinds}; see `{ls}`" if total else "no anomalies found")
        return result
    return wrapper


def _last_run_id(path: Path) -> int:
    if not Path(path).is_file():
        return 0
    with Store(path, read_only=True) as db:
        return db.sql("SELECT coalesce(max(run_id), 0) FROM runs").item()


def _new_anomalies(path: Path, before: int) -> list[tuple[str, int]] | None:
    """(kind, count) of the anomalies of runs after `before`, and of their checkpoints; None if
    nothing ran (e.g. every step was already in the store)."""
    if not Path(path).is_file():
        return None
    with Store(path, read_only=True) as db:
        if not db.sql("SELECT count(*) FROM runs WHERE run_id > ?", [before]).item():
            return None
        return db.sql(
            "SELECT kind, count(*) AS n FROM anomalies a WHERE a.run_id > ? OR (a.run_id IS NULL AND EXISTS "
            "(SELECT 1 FROM runs r WHERE r.run_id > ? AND r.model = a.model AND r.step = a.step)) GROUP BY kind ORDER BY n DESC, kind",
            [before, before]).rows()


class _Commands(click.Group):
    """The commands that analyze (`ingest`, `analyze`, `analyzers`) are built on first use from the
    analyzers' declarations, so `sql`, `ls` and `report` start without loading torch."""

    LAZY = {"ingest": "ingest_command", "analyze": "analyze_group", "analyzers": "analyzers_command"}
    # what `ckptscope --help` lists for them without building them (and loading torch); a test
    # checks each against the built command's own help
    SHORT_HELP = {"ingest": "Analyze the checkpoints in SOURCE into the store.",
                  "analyze": "Run an analyzer on a model already in the store.",
                  "analyzers": "List the installed analyzers: version, origin, what they count, references, options, tables."}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = []
        for name in self.list_commands(ctx):
            cmd = (click.Command(name, help=self.SHORT_HELP[name]) if name in self.LAZY and name not in self.commands
                   else self.get_command(ctx, name))  # lazy ones unimported: their help without torch
            if cmd is None or cmd.hidden:
                continue
            rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            self.add_command(globals()[self.LAZY[name]](), name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptscope")
def main() -> None:
    """Analyze how every layer of a network changes across training checkpoints."""


def _declarations(analyzer_names: list[str] | None = None) -> dict[str, list]:
    """Declared options by owner: every installed analyzer (or those named), then source and executor."""
    from ckptscope.analyzers import registry
    from ckptscope.pipeline.executors import ExecutorSpec
    from ckptscope.sources.spec import SourceSpec

    groups = {"": [d for d in SourceSpec.declared() if d.name != "source"] + ExecutorSpec.declared()}
    groups.update((name, f.cls.Options.declared()) for name, f in sorted(registry.discover().items())
                  if f.cls is not None and (analyzer_names is None or name in analyzer_names))
    return groups


def ingest_command() -> click.Command:
    """`ckptscope ingest`: SOURCE, the store, and every declared source, executor and analyzer option."""
    from ckptscope.analyzers.registry import DEFAULT
    from ckptscope.cli_options import apply, collect, flags

    found = flags(_declarations())

    @click.argument("source")
    @_store_option
    @click.option("--analyzers", default=",".join(DEFAULT), show_default=True,
                  help="Comma-separated analyzer names (`ckptscope analyzers` lists them).")
    @click.option("--force", is_flag=True, help="Recompute steps that are already in the store.")
    @_friendly
    @_anomaly_summary
    def command(source, store, analyzers, force, **values):
        """Analyze the checkpoints in SOURCE into the store.

        SOURCE is a local run directory, a catalog suite (pythia-160m) or a hub repo (EleutherAI/pythia-160m).
        """
        from ckptscope.pipeline import ingest

        flat, scoped = collect(found, values)
        chosen = _scoped(analyzers, scoped)
        _summarize(ingest(source, store=store or default_store_path(), analyzers=chosen, force=force, progress=True, **flat))

    return click.command(name="ingest")(apply(command, found))


def _scoped(analyzers: str, scoped: dict[str, dict]) -> str | dict[str, dict]:
    """Analyzer names, or names with the options given to one analyzer alone (`--NAME-OPTION`)."""
    if not scoped:
        return analyzers
    names = [n.strip() for n in analyzers.split(",") if n.strip()]
    stray = sorted(set(scoped) - set(names))
    if stray:
        raise CkptscopeError(f"options of analyzer {stray[0]} were given, but it is not in --analyzers")
    return {n: scoped.get(n, {}) for n in names}


def analyze_group() -> click.Group:
    """`ckptscope analyze NAME MODEL`: one subcommand per installed analyzer, its options derived."""
    from ckptscope.analyzers import registry

    group = click.Group(name="analyze", help="Run an analyzer on a model already in the store.")
    for name, f in sorted(registry.discover().items()):
        if f.cls is not None:
            group.add_command(_analyze_command(name, f.cls))
    group.add_command(_profile_command())  # reads the store, not checkpoints: not an analyzer
    group.add_command(_seeds_command())  # convergence over every pair of a seed group
    return group


def _seeds_command() -> click.Command:
    """`ckptscope analyze seeds GROUP --probe FILE`: the convergence options (less the reference) and the executor's."""
    from ckptscope.analyzers.convergence import ConvergenceOptions
    from ckptscope.cli_options import apply, collect, flags
    from ckptscope.pipeline.executors import ExecutorSpec

    own = [d for d in ConvergenceOptions.declared() if d.name not in ("reference_model", "reference_step")]
    found = flags({"": own + ExecutorSpec.declared()})

    @click.argument("group")
    @_store_option
    @click.option("--force", is_flag=True, help="Recompute pairs and steps already analyzed.")
    @_friendly
    @_anomaly_summary
    def command(group, store, force, **values):
        """Cross-seed similarity: CKA (cka_seed) and weight distance (seed_relative_distance) over every pair of GROUP's seeds."""
        from ckptscope.cross_seed import analyze_seeds

        flat, _ = collect(found, values)
        df = analyze_seeds(group, store=store, force=force, progress=True, **flat)
        cka = df.filter(pl.col("metric") == "cka_seed").select("step", "layer", "component", "n_pairs", "mean", "std", "min", "max")
        display.show(out, cka, f"cka_seed across the seed pairs of {group} (view seed_similarity)", max_rows=0)
        dist = (df.filter(pl.col("metric") == "seed_relative_distance").group_by("step")
                .agg(pl.len().alias("tensors"), pl.col("mean").mean().alias("mean_over_tensors"),
                     pl.col("n_pairs").min().alias("n_pairs")).sort("step"))
        display.show(out, dist, "seed_relative_distance, the pairs' mean averaged over tensors (per tensor: view seed_similarity)",
                     max_rows=0)

    return click.command(name="seeds")(apply(command, found, required=True))


def _profile_command() -> click.Command:
    from ckptscope.cli_options import apply, collect, flags
    from ckptscope.profile_run import ProfileOptions

    found = flags({"": ProfileOptions.declared()})

    @click.argument("model")
    @_store_option
    @_friendly
    def command(model, store, **values):
        """Memorisation profile: ATT(g, t) of training on a sequence, from stored sequence_stats."""
        from ckptscope.profile_run import describe, profile

        flat, _ = collect(found, values)
        display.line(out, describe(profile(model, store=store, **flat)))

    return click.command(name="profile")(apply(command, found))


def _analyze_command(name: str, cls: type) -> click.Command:
    from ckptscope.cli_options import apply, collect, flags
    from ckptscope.pipeline.executors import ExecutorSpec

    found = flags({name: cls.Options.declared(), "": ExecutorSpec.declared()})

    @click.argument("model")
    @_store_option
    @click.option("--steps", help="Steps to analyze [default: the steps already ingested for MODEL].")
    @click.option("--force", is_flag=True, help="Recompute steps already analyzed.")
    @_friendly
    @_anomaly_summary
    def command(model, store, steps, force, **values):
        from ckptscope.pipeline import analyze

        flat, _ = collect(found, values)
        mine = {k: flat.pop(k) for k in list(flat) if k in cls.Options.names()}  # never routed to the source
        _summarize(analyze(model, {name: mine}, store=store, steps=steps, force=force, progress=True, **flat), verb="analyzed")

    command.__doc__ = cls.summary()
    return click.command(name=name)(apply(command, found, required=True))


def analyzers_command() -> click.Command:
    """`ckptscope analyzers`: every installed analyzer with its version, options, references and tables."""

    @_friendly
    def command():
        """List the installed analyzers: version, origin, what they count, references, options, tables."""
        from ckptscope.analyzers import registry

        found = registry.discover()
        for name, f in sorted(found.items()):
            if f.cls is None:
                display.line(out, f"{name} (from {f.origin}): cannot be loaded: {f.error}", "bold red")
                continue
            cls = f.cls
            display.line(out, f"{name} {cls.version} (from {f.origin}): {cls.summary()}", "bold")
            refs = ", ".join(map(str, cls.references(_unchecked_defaults(cls.Options)))) or "none"
            tables = ", ".join(t.name for t in cls.tables) or "metric_values, spectra only"
            display.line(out, f"  progress in {cls.unit}; references: {refs}; tables: {tables}")
            for d in cls.Options.declared():
                default = "required" if d.required else f"default {d.default}"
                display.line(out, f"  {d.flag} ({default}): {d.help}")
        display.line(out, f"{len(found)} analyzer(s); add one with an entry point in the group ckptscope.analyzers")

    return click.command(name="analyzers")(command)


def _unchecked_defaults(options: type) -> object:
    """The defaults of an options declaration, required ones as placeholders: what `analyzers` shows."""
    placeholder = {Path: Path("FILE"), int: 0, float: 0.0, bool: False}
    return options(**{d.name: placeholder.get(d.type, "") if d.required else d.default for d in options.declared()})


def _summarize(report: pl.DataFrame, verb: str = "ingested") -> None:
    """One line: what the run wrote (`verb`: ingested or analyzed), duplicates and missing revisions."""
    if report.height:
        dup = report.filter(pl.col("duplicate_of").is_not_null())
        missing = report.filter(pl.col("status") == "missing")
        extra = f"; {dup.height} duplicate checkpoint(s) flagged" if dup.height else ""
        extra += f"; {missing.height} revision(s) without weights recorded as missing" if missing.height else ""
        display.line(out, f"{verb} {report.height} checkpoint(s) in {report['seconds'].sum():.1f}s{extra}")
    else:
        display.line(out, "nothing to do: every selected step is already in the store (use --force to recompute)")


@main.command()
@click.argument("query")
@_store_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write the result to FILE instead of stdout.")
@click.option("--max-rows", type=click.IntRange(min=0),
              help=f"table: rows shown, 0 for all [default: {display.DEFAULT_MAX_ROWS} on stdout, all with --output].")
@_friendly
def sql(query, store, fmt, output, max_rows):
    """Run a read-only SQL QUERY against the store.

    The table format is for reading: floats to 6 significant digits, fitted to the terminal, at
    most 40 rows unless --max-rows says otherwise. csv, json and parquet hold every row, exactly.
    """
    if fmt == "parquet" and output is None:
        raise CkptscopeError("--format parquet needs --output FILE")
    if max_rows is not None and fmt != "table":
        raise CkptscopeError(f"--max-rows applies to --format table; --format {fmt} writes every row (use LIMIT in the query)")
    if output is not None and not output.parent.is_dir():
        raise CkptscopeError(f"--output {output}: directory {output.parent} does not exist")
    with Store(store or default_store_path(), read_only=True) as db:
        df = db.sql(query)
    if fmt == "table":
        if output:  # no terminal to fit: every row (unless --max-rows), each on one line
            with output.open("w") as fh:
                display.show(display.console(file=fh, width=display.UNBOUNDED_WIDTH), df, max_rows=max_rows)
        else:
            display.show(out, df, max_rows=display.DEFAULT_MAX_ROWS if max_rows is None else max_rows)
    elif fmt == "parquet":
        df.write_parquet(output)
    else:
        text = df.write_csv() if fmt == "csv" else df.write_json()
        if output:
            output.write_text(text)
        else:
            click.echo(text, nl=fmt == "json")


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
        "seed group": [f"{s.group} seed {s.seed}" if s.group else "" for s in entries],
        **({"steps": [s.grid_text() for s in entries]} if name else {}),
    })
    display.show(out, table, f"{len(entries)} catalog entr{'y' if len(entries) == 1 else 'ies'}; any other org/name is discovered at run time")


@main.command(name="ls")
@_store_option
@_friendly
def ls(store):
    """List models, steps ingested, tokens seen, analyzers run, anomalies and where each model came from."""
    with Store(store or default_store_path(), read_only=True) as db:
        summary, anomalies = db.summary(), db.anomalies()
    if not summary.height:
        display.line(out, "the store holds no models yet; run `ckptscope ingest SOURCE` or `ckptscope demo`")
        return
    human = functools.partial(pl.Expr.map_elements, function=_human, return_dtype=pl.String)
    display.show(out, summary.select(  # narrow enough for 80 columns; the long cells follow, one line per model
        "model", pl.col("architecture").alias("arch"), pl.col("num_layers").alias("layers"),
        human(pl.col("num_parameters")).alias("params"), pl.format("{}..{} ({})", "first_step", "last_step", "steps").alias("steps"),
        human(pl.col("last_tokens")).alias("tokens"), "anomalies",
    ), "models", whole={"model", "arch", "tokens"})
    for model, analyzers, source in summary.select("model", "analyzers", "source").iter_rows():
        display.line(out, f"{model}: analyzers {(analyzers or 'none').replace(',', ', ')}; source {source}")
    from ckptscope.seeds import groups

    seed_groups = groups(store or default_store_path())
    if seed_groups.height:
        display.show(out, seed_groups, "seed groups (see `ckptscope seeds GROUP --metric M`)", whole={"group_name"})
    if anomalies.height:
        display.show(out, anomalies.select("model", "step", "tensor", "kind", "detail").head(50),
                     f"anomalies ({anomalies.height}{', first 50 shown' if anomalies.height > 50 else ''})")
    else:
        display.line(out, "no anomalies")


@main.command()
@click.option("--store", type=click.Path(path_type=Path), default=DEMO_STORE, show_default=True, help="Store file to write.")
@_friendly
def demo(store):
    """Ingest the embedded demo suite (offline) and show example queries."""
    suite = Path(str(files("ckptscope") / "demo_suite"))
    if not any(suite.glob("step*")):
        raise StoreError(f"the demo suite is missing from {suite}; reinstall ckptscope")
    from ckptscope.pipeline import ingest

    with Store(store) as db:
        ingest(suite, store=db, name="demo-neox", tokens_per_step=_demo_tokens_per_step(suite), progress=True)
    where = shlex.quote(str(store))
    with Store(store, read_only=True) as db:
        for title, query in DEMO_QUERIES:  # each command on one line, quoted for bash, to be copied as it is
            out.print()
            display.line(out, title, "bold")
            display.line(out, f"$ {demo_command(where, query)}", "dim")
            display.show(out, db.sql(query))
    _demo_profile(suite, store)
    out.print()
    display.line(out, f"store: {store}   try: ckptscope ls --store {where}")


DEMO_PROFILE_QUERY = ("SELECT kind, event_time, at_step, round(att, 4) AS att, round(ci_low, 4) AS ci_low, "
                      "round(ci_high, 4) AS ci_high, n_cohorts, n_treated FROM memorization_profile_summary "
                      "WHERE model = 'demo-neox' ORDER BY kind, event_time")


def _demo_profile(suite: Path, store: Path) -> None:
    """The memorisation-profile path on the demo's own data order, each step printed as the command that does it.

    The demo runs each step in this process (no second start of torch) and prints the equivalent
    command line; run in the store's directory, the commands give the same rows.
    """
    from ckptscope.data_order import corpus_from_data
    from ckptscope.pipeline import analyze
    from ckptscope.profile_run import describe, profile

    order = json.loads((suite / "suite.json").read_text())["data_order"]
    corpus = Path(store).with_name(Path(store).stem + "-corpus.parquet")
    data, held = suite / order["train"], suite / order["heldout"]
    pick = order["profile"]
    where, quoted = shlex.quote(str(store)), shlex.quote(str(corpus))
    out.print()
    display.line(out, "Memorisation profile: sequences the demo run trained on exactly once, read from its data order, "
                 f"and never-trained held-out ones; their surprisal at checkpoints {pick['checkpoints']}; the "
                 "difference-in-differences effect (ATT) of training on them: negative = surprisal fell", "bold")
    display.line(out, f"$ ckptscope corpus from-data {shlex.quote(str(data))} -o {quoted} --batch-size {order['batch_size']} "
                 f"--seq-len {order['seq_len']} --steps {pick['steps']} --per-step {pick['per_step']} --seed 0 "
                 f"--heldout {shlex.quote(str(held))} --heldout-count {pick['heldout_count']}", "dim")
    df = corpus_from_data(data, corpus, batch_size=order["batch_size"], seq_len=order["seq_len"], steps=pick["steps"],
                          per_step=pick["per_step"], seed=0, heldout=held, heldout_count=pick["heldout_count"])
    display.line(out, _corpus_written(df, corpus))
    display.line(out, f"$ ckptscope analyze sequence_stats demo-neox --store {where} --corpus {quoted} "
                 f"--steps {pick['checkpoints']} --batch-size {pick['batch_size']}", "dim")
    _summarize(analyze("demo-neox", "sequence_stats", store=store, steps=pick["checkpoints"], corpus=corpus,
                       batch_size=pick["batch_size"], progress=True), verb="analyzed")
    display.line(out, f"$ ckptscope analyze profile demo-neox --store {where}", "dim")
    display.line(out, describe(profile("demo-neox", store=store)))
    display.line(out, f"$ {demo_command(where, DEMO_PROFILE_QUERY)}", "dim")
    with Store(store, read_only=True) as db:
        display.show(out, db.sql(DEMO_PROFILE_QUERY))


def demo_command(store: str, query: str) -> str:
    """The `ckptscope sql` command line the demo prints for `query` (`store` already quoted)."""
    return f"ckptscope sql --store {store} {display.shell_word(query)}"


def _human(n: int | None) -> str:
    if n is None:
        return ""
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
@click.option("--groups", help="Comma-separated seed groups; the first is compared with each other one "
                               "[default: the groups of the selected models].")
@click.option("--seed-bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Multi-Bootstrap resamples of the seed groups' bands; 0: none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resampling: the same seed draws the same bands.")
@_friendly
def report(store, models, metrics, components, output, groups, seed_bootstrap, seed):
    """Write a self-contained HTML report of the store (opens offline)."""
    from ckptscope.reports import build_report  # plotting stack loaded only by the commands that draw

    path = build_report(store or default_store_path(), output, models=_names(models), metrics=_names(metrics),
                        components=_names(components), groups=_names(groups), seed_bootstrap=seed_bootstrap, seed=seed)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


@main.command()
@click.argument("metric")
@_store_option
@click.option("--model", help="Model to plot [default: the only one in the store].")
@click.option("--component", help="One component [default: one panel per component].")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Figure file: .png, .svg or .pdf.")
@_friendly
def plot(metric, store, model, component, output):
    """Save a static figure of METRIC against step, one line per tensor."""
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
    display.line(out, _corpus_written(df, output))


def _corpus_written(df: pl.DataFrame, output: Path) -> str:
    """What `corpus from-data` (and the demo, for the same command) says it wrote."""
    train = df.filter(pl.col("split") == "train")
    return (f"wrote {df.height} sequences to {output}: {train.height} train from {train['first_seen_step'].n_unique()} "
            f"step(s), {df.height - train.height} held out")


@main.command()
@click.argument("group")
@_store_option
@click.option("--metric", required=True, help="A metric (stable_rank) or a per-sequence outcome TABLE.COLUMN (memorization.score).")
@click.option("--component", help="Only this component, e.g. attn.qkv [default: all].")
@click.option("--compare", help="Another seed group: the difference compare − GROUP, its interval and p-value.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True, help="Multi-Bootstrap resamples; 0: no intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resampling: the same seed prints the same output.")
@click.option("--paired-seeds", is_flag=True, help="--compare: the groups share seed numbers; resample them together.")
@click.option("--axis", type=click.Choice(["step", "tokens", "progress"]), default="step", show_default=True,
              help="Align steps by step, tokens seen or training progress (step / last common step).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@_friendly
def seeds(group, store, metric, component, compare, bootstrap, seed, paired_seeds, axis, fmt):
    """Across the seeds of GROUP: mean, spread and Multi-Bootstrap 95% intervals of METRIC per step."""
    from ckptscope.seeds import seed_intervals

    df = seed_intervals(group, metric, store=store, component=component, compare=compare, nboot=bootstrap, seed=seed,
                        axis=axis, paired_seeds=paired_seeds)
    if fmt == "table":  # what every row shares goes to the title; csv and json keep every column
        shared = [c for c in ("group_name", "compare", "metric", "tensor") if c in df.columns]
        empty = [c for c in df.columns if df[c].null_count() == df.height]
        display.show(out, df.drop(*shared, *empty), f"{metric} across the seeds of {group}" + (f" vs {compare}" if compare else ""),
                     max_rows=0)
    else:
        click.echo(df.write_csv() if fmt == "csv" else df.write_json(), nl=fmt == "json")


@main.command()
@click.argument("target")
@_store_option
@click.option("--metrics", help="Comma-separated metrics, each averaged over a step's layer tensors "
                                "[default: frobenius_norm, spectral_norm, stable_rank, delta_init_relative, delta_prev_relative].")
@click.option("--max-states", type=click.IntRange(min=1), default=8, show_default=True, help="Most HMM states tried; BIC chooses.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the HMM restarts: the same seed gives the same phases.")
@_friendly
def phases(target, store, metrics, max_states, seed):
    """Fit training phases (a Gaussian HMM over per-step metrics) to a model or jointly to a seed GROUP; store them."""
    from ckptscope.phases import fit_phases

    df = fit_phases(target, store=store, metrics=_names(metrics), max_states=max_states, seed=seed)
    spans = (df.with_columns(span=pl.col("state").rle_id().over("model"))  # consecutive steps in one state
             .group_by("model", "span", maintain_order=True).agg(pl.col("state").first(), pl.col("step").min().alias("from_step"),
                                                                  pl.col("step").max().alias("to_step")).drop("span"))
    display.show(out, spans, f"states visited: {df['state'].n_unique()}; stored in training_phases, the HMM in runs (analyzer 'phases')")


@main.command()
@_store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; other than loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--token", envvar="CKPTSCOPE_TOKEN", help="Require `Authorization: Bearer TOKEN` [default: $CKPTSCOPE_TOKEN].")
@_friendly
def serve(store, host, port, token):
    """Serve a live dashboard and a read-only SQL API of the store (works beside a running ingest)."""
    from ckptscope.serve import serve as run

    run(store or default_store_path(), host=host, port=port, token=token,
        ready=lambda url: display.line(out, f"serving {store or default_store_path()} at {url} (Ctrl-C stops)"))


if __name__ == "__main__":
    main()
