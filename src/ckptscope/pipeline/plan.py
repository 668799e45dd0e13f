"""What an ingest will do, decided before anything is written.

`plan()` resolves the steps and validates every selected local checkpoint; `reconcile()` checks
the plan against what the store holds: shapes, steps already done, and the parameters earlier
runs used. A rerun whose parameters differ from the stored ones is an error that names them
(never a silent "nothing to do"), unless `force` asks to recompute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ckptscope.analyzers.contract import Analyzer, SameStep
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.pipeline.tasks import Architecture, still_to_run
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify
from ckptscope.sources.local import CheckpointRef, Source
from ckptscope.sources.refcache import RefCache
from ckptscope.sources.steps import nearest, select_steps
from ckptscope.sources.trainer_state import read_trainer_state
from ckptscope.store.db import Store

MAX_LISTED = 5  # steps named in an error; the rest are counted


@dataclass
class Plan:
    """The model, its source, the steps to analyze and the references they need."""

    model: str
    source: Source
    available: dict[int, CheckpointRef]  # every step the source holds
    todo: list[int]  # selected steps still to analyze, ascending
    pinned: list[int] = field(default_factory=list)  # numbered reference steps analyzers declared
    arch: Architecture | None = None  # of the first checkpoint; remote sources fill it on first open
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stale_final: bool = False  # stored final_* rows point at an older final step
    retokenize: int | None = None  # --force with a new --tokens-per-step: rewrite the stored tokens
    fill_tokens: bool = False  # retokenize only steps whose tokens were unknown
    cached: dict[int, CheckpointRef] = field(default_factory=dict)  # stored steps kept in the reference cache
    done: dict[int, frozenset[str]] = field(default_factory=dict)  # step to do -> analyzers (run names) stored for it
    hashes: dict[int, str] = field(default_factory=dict)  # stored step -> its content_hash

    def running(self, step: int, analyzers: list[Analyzer]) -> list[Analyzer]:
        """The analyzers that run on `step`: those without stored rows for it."""
        return still_to_run(analyzers, self.done.get(step, frozenset()))

    def ref(self, step: int) -> CheckpointRef:
        """Where a step is opened: a stored step serving as a reference from the reference cache (a trainer
        may delete its checkpoint at any moment), a step to analyze from the source."""
        if step in self.cached and (step not in self.todo or step not in self.available):
            return self.cached[step]
        return self.available[step]

    def adopt(self, ckpt: Checkpoint) -> None:
        """Check a checkpoint against the run's architecture (taking it as the run's, if first)."""
        self.accept(Architecture.of(ckpt))

    def accept(self, arch: Architecture) -> None:
        """`adopt` for an architecture read elsewhere (by a worker)."""
        if self.arch is None:
            _check_against_store(self, arch.shapes)
            self.arch = arch
        else:
            self.arch.check(arch)

    def num_layers(self) -> int | None:
        config, shapes, fam = self.arch.config, self.arch.shapes, self.arch.family
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if config and isinstance(config.get(key), int):
                return config[key]
        layers = [r.layer for r in (classify(n, fam) for n in shapes) if r.layer is not None]
        return max(layers) + 1 if layers else None


def roles(analyzers: list[Analyzer]) -> set[str | int | SameStep]:
    return {r for a in analyzers for r in a.references(a.options)}


def plan(src: Source, *, name: str | None, steps: str | None, max_steps: int | None, analyzers: list[Analyzer]) -> Plan:
    """Resolve the steps; validate every selected local checkpoint up front (reads no store).

    Remote checkpoints are validated as they arrive: checking them first would mean
    downloading the whole sweep before analyzing any of it.
    """
    available = {ref.step: ref for ref in src.refs()}
    select = getattr(src, "select", select_steps)  # a hub source offline selects among what it knows exists
    selected = select(steps, list(available), max_steps=max_steps)
    wanted = roles(analyzers)
    # Steps measured against the first or final checkpoint need those in the store too.
    selected = sorted({*selected, *([min(available)] if "first" in wanted else []), *([max(available)] if "final" in wanted else [])})
    pinned = sorted(r for r in wanted if isinstance(r, int))
    for step in pinned:
        if step not in available:
            raise SourceError(f"--reference-step {step} is not in the source; nearest available: "
                              f"{', '.join(map(str, nearest(step, list(available))))}")
    result = Plan(name or src.default_name, src, available, list(selected), pinned)
    if src.kind == "local":
        for step in sorted({*selected, *pinned}):
            result.adopt(src.open(available[step]))
            read_trainer_state(available[step].path)  # a corrupt trainer_state.json fails here, before any write
        for a in analyzers:
            a.check(result.arch.config)
    return result


def _check_against_store(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if plan.stored_shapes.get(name, shape) != shape:
            raise SourceError(
                f"tensor {name} has shape {list(shape)} but model {plan.model!r} in the store has {list(plan.stored_shapes[name])}; "
                "ingest this run under another --name"
            )


def reconcile(plan: Plan, store: Store, analyzers: list[Analyzer], *, force: bool, tokens_per_step: int | None,
              cache: RefCache | None = None) -> None:
    """Check the plan against what the store already holds and drop steps already done.

    Stored steps gone from the source still serve as references from `cache`; a reference
    found in neither is an error, never a silently different one.
    """
    stored = store.sql("SELECT tensor, shape FROM tensors WHERE model = ? AND step = (SELECT min(step) FROM tensors WHERE model = ?)",
                       [plan.model, plan.model])
    plan.stored_shapes = {row["tensor"]: tuple(row["shape"]) for row in stored.iter_rows(named=True)}
    if plan.arch is not None:
        _check_against_store(plan, plan.arch.shapes)
    _check_tokens(plan, store, tokens_per_step, force=force)
    for a in analyzers:
        _check_parameters(plan, store, a, force=force)
    if not force:  # a step some analyzers already did runs only the others (adding one never redoes the rest)
        stored = {a.run_name: store.steps_done(plan.model, a.run_name) for a in analyzers}
        plan.done = {s: frozenset(n for n, steps in stored.items() if s in steps) for s in plan.todo}
        plan.todo = [s for s in plan.todo if len(plan.done[s]) < len(stored)]
    hashes = plan.hashes = dict(store.sql("SELECT step, content_hash FROM checkpoints WHERE model = ? AND status = 'ok'",
                                          [plan.model]).rows())
    stored_ok = set(hashes)
    plan.cached = cache.refs(hashes) if cache is not None else {}
    every = stored_ok | set(plan.todo)
    wanted = roles(analyzers)
    where = " or the reference cache" if cache is not None else ""
    if every:
        for role, step in (("first", min(every)), ("final", max(every))):
            if role in wanted and step not in plan.available and step not in plan.cached:
                raise SourceError(
                    f"step {step}, the {role} step of model {plan.model!r} in the store, is no longer in the source{where}; "
                    "deltas and distances are taken against it: restore it, or ingest into another --name"
                )
    if "previous" in wanted:
        ordered = sorted(every)
        for i, step in enumerate(ordered[1:], 1):
            before = ordered[i - 1]
            if (step in plan.todo and before not in plan.available and before not in plan.cached
                    and "previous" in roles(plan.running(step, analyzers))):
                raise SourceError(
                    f"step {before}, the step before step {step} of model {plan.model!r} in the store, is no longer in the "
                    f"source{where}; delta_prev_* of step {step} is taken against it: restore it, or ingest into another --name"
                )
    if stored_ok:  # an interrupted re-basing is finished by the next run; steps gone from the source keep theirs
        final = max(every)
        plan.stale_final = any(p.get("final_step") != final
                               for a in analyzers if a.final_metrics
                               for s, (_, p) in store.runs_of(plan.model, a.run_name).items() if s in stored_ok and s in plan.available)


def _check_tokens(plan: Plan, store: Store, tokens_per_step: int | None, *, force: bool) -> None:
    prior = store.model(plan.model)
    if tokens_per_step is None or prior is None or prior["tokens_per_step"] == tokens_per_step:
        return
    if prior["tokens_per_step"] is None:  # filling in what was unknown changes no stored number
        plan.retokenize, plan.fill_tokens = tokens_per_step, True
        return
    if not force:
        raise CkptscopeError(f"model {plan.model!r} was ingested with --tokens-per-step {prior['tokens_per_step']}, "
                             f"this run gives {tokens_per_step}: add --force to rewrite the tokens of every stored step, "
                             "or leave the option out")
    plan.retokenize = tokens_per_step


def _check_parameters(plan: Plan, store: Store, analyzer: Analyzer, *, force: bool) -> None:
    """Steps whose stored run used other options (or another analyzer version) than this run's."""
    ours = analyzer.options.identity()
    differing: dict[int, str] = {}
    for step, (version, params) in store.runs_of(plan.model, analyzer.run_name).items():
        if version != analyzer.version:
            differing[step] = f"version {version} (this is {analyzer.version})"
            continue
        for key, value in ours.items():
            if key in params and _canonical(params[key]) != _canonical(value):
                differing[step] = f"{key}={json.dumps(params[key])} (this run: {json.dumps(value)})"
                break
    if not differing:
        return
    steps = sorted(differing)
    listed = ", ".join(map(str, steps[:MAX_LISTED])) + (f" and {len(steps) - MAX_LISTED} more" if len(steps) > MAX_LISTED else "")
    why = differing[steps[0]]
    if not force:
        raise CkptscopeError(f"analyzer {analyzer.run_name}: step{'s' * (len(steps) > 1)} {listed} of model {plan.model!r} "
                             f"{'were' if len(steps) > 1 else 'was'} computed with {why}; add --force to recompute "
                             "them with this run's options, or ingest into another --name to keep both")
    left = [s for s in steps if s not in plan.todo]
    if left:
        raise CkptscopeError(f"analyzer {analyzer.run_name}: --force recomputes only the selected steps, but steps "
                             f"{', '.join(map(str, left[:MAX_LISTED]))} were computed with {why} too; select them as well "
                             "(e.g. --steps all) so the model's rows share one set of options")


def _canonical(value: object) -> object:
    """Numbers compare by value (1e-3 == 0.001), whatever JSON made of them."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

