"""The convergence analyzer: how close each layer's representation is to the reference step's.

For every block ℓ and component (`resid`, `attn_out`, `mlp_out`) the probe is run through the
checkpoint and through the reference checkpoint (the final step by default), every token
position is a sample, and linear CKA between the two representations is stored as
`cka_final` (biased) and `cka_final_debiased` (metric names say `ref` instead of `final` when
the reference is another step). The `stabilization` view turns the `cka_final` series into the
step from which each layer stays above a threshold.

Memory is bounded whatever the probe's size: statistics are accumulated in feature space
(`ckptscope.analyzers.cka`); sites are processed in groups whose float64 matrices fit
`stats_mb`; the reference step's activations are cached across steps only when they fit
`cache_mb`, otherwise the reference model stays loaded and is re-run batch by batch.

With `reference_model` OTHER (a model of the store, e.g. another seed of a group) the reference
is OTHER's checkpoint at the same step (a `SameStep` reference, which the executor opens from
OTHER's stored source): metrics `cka_model` and `cka_model_debiased`, and beside them the
weight-space distance `model_relative_distance` = ‖W − W_OTHER‖_F / ‖W_OTHER‖_F of every tensor
both hold (float64 sums, one tensor at a time). These runs are recorded as `convergence:OTHER`
(`run_name`), one series per other model, so they never replace the `cka_final` series or each
other; `runs.parameters.reference_model` names OTHER. A step OTHER lacks is skipped with an
anomaly `reference_step_missing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptscope.analyzers.activations import LoadedModel, Site, backend, build_model, capture, load_model, padded_batches, tokenizer_dirs
from ckptscope.analyzers.cka import Cross, Side, Summary
from ckptscope.analyzers.contract import AnalysisContext, Analyzer, SameStep
from ckptscope.analyzers.corpus import Sequences, check_vocab, load_corpus
from ckptscope.errors import CkptscopeError
from ckptscope.options import Options, at_least, option
from ckptscope.rows import RunRows
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, is_buffer

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


@dataclass
class _Reference:
    """The reference step's side of every CKA, computed once per run."""

    key: tuple[str, int]
    summaries: dict[str, Summary]
    activations: list[dict[str, torch.Tensor]] | None  # per batch and site, when cached
    model: LoadedModel | None  # kept to recompute activations when they are not cached


def _activations(model: LoadedModel, sites: list[Site], batch: Batch) -> dict[str, torch.Tensor]:
    """Each site's output at the batch's real (unpadded) token positions, as positions × features."""
    ids, mask = (t.to(model.device) for t in batch)
    with torch.no_grad(), capture(model.module, sites) as out:
        model.module.base_model(input_ids=ids, attention_mask=mask)  # the LM head is not needed
    valid = mask.bool()
    return {name: t[valid] for name, t in out.items()}


@dataclass(frozen=True)
class ConvergenceOptions(Options):
    probe: Path = option(help="Sequences (JSONL, Parquet or .npy) to compare activations on.", digest=True)
    reference_step: str = option("final", check=lambda v: _reference_problem(v), normalize=lambda v: str(_parse_reference(v)),
                                 help="Step to compare with: final, first or a step number.")
    batch_size: int = option(16, check=at_least(1), affects_results=False, help="Sequences per forward pass.")
    cache_mb: float = option(2048, check=at_least(0), affects_results=False,
                             help="Cache the reference step's activations when they fit this many MB.")
    stats_mb: float = option(4096, check=at_least(0), affects_results=False,
                             help="Memory for float64 CKA statistics, in MB: sites are processed in groups that fit.")
    reference_model: str | None = option(None, help="Compare with this other model of the store at the same step (e.g. "
                                                    "another seed): cka_model, cka_model_debiased, model_relative_distance.")

    def validate(self) -> None:
        """One reference per run: another model's same step, or a step of this model."""
        if self.reference_model is not None and _parse_reference(self.reference_step) != "final":
            raise CkptscopeError("--reference-step and --reference-model exclude each other: with --reference-model each step "
                                 "is compared with the same step of that model; leave one out")
        if self.reference_model is not None and not self.reference_model.strip():
            raise CkptscopeError("--reference-model is empty; give the name of a model in the store")


class ConvergenceAnalyzer(Analyzer):
    """Per-layer linear CKA of activations on a probe set against a reference step."""

    name = "convergence"
    version = "1.1.0"  # 1.1.0: runs.parameters hold the option as given (reference_step) and the step used (reference)
    Options = ConvergenceOptions
    unit = "batches"

    def __init__(self, options: ConvergenceOptions) -> None:
        super().__init__(options)
        self.probe = load_corpus(options.probe, "probe")
        self.reference_step = _parse_reference(options.reference_step)
        self.batch_size, self.cache_mb, self.stats_mb = options.batch_size, options.cache_mb, options.stats_mb
        self._seqs: Sequences | None = None
        self._batches: list[Batch] = []
        self._positions = 0
        self._reference_state: _Reference | None = None

    @classmethod
    def references(cls, options: ConvergenceOptions) -> tuple[str | int | SameStep, ...]:
        if options.reference_model is not None:
            return (SameStep(options.reference_model),)
        # final too: whether the reference is the final step decides the metric's name
        ref = _parse_reference(options.reference_step)
        return ("final",) if ref == "final" else (ref, "final")

    @property
    def run_name(self) -> str:
        other = self.options.reference_model
        return self.name if other is None else f"{self.name}:{other}"

    def check(self, config: dict | None) -> None:
        self.probe.check_vocab(config)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "samples": "token positions", "estimators": ["linear", "linear_debiased"]}

    # -- per checkpoint ----------------------------------------------------------------------
    def analyze(self, ctx: AnalysisContext) -> RunRows:
        reference, label = self._resolve_reference(ctx)
        if label == "model" and reference is None:
            out = self.new_rows("", backend(ctx.device))
            out.anomalies.append((None, "reference_step_missing", f"model {self.options.reference_model} has no step "
                                  f"{ctx.checkpoint.step} in its source; cka_model was not computed for this step"))
            return out
        model = load_model(ctx.checkpoint, ctx.device)
        batches = self._prepare(ctx, model)
        sites = model.sites()
        out = self.new_rows(f"{model.dtype_label}; CKA statistics float64", backend(ctx.device),
                            reference=(reference or ctx.checkpoint).step, positions=self._positions)
        if label == "model":
            _distances(ctx, reference, out)
        ctx.progress.start(0 if reference is None else len(batches) * len(self._groups(model, sites, matrices=2)))
        if reference is None:  # this step is the reference: identical representations
            values = {s.module: (1.0, 1.0) for s in sites}
        else:
            values = self._compare(ctx, model, reference, sites, batches)
        for site in sites:
            biased, debiased = values[site.module]
            row = {f"cka_{label}": biased, f"cka_{label}_debiased": debiased}
            out.add_metrics(site.module, site.layer, site.component, {k: v for k, v in row.items() if math.isfinite(v)})
            if not math.isfinite(biased):
                out.anomalies.append((site.module, "cka_undefined", "an activation matrix is constant over the probe, so CKA is undefined"))
        return out

    def _resolve_reference(self, ctx: AnalysisContext) -> tuple[Checkpoint | None, str]:
        """The reference checkpoint (None when it is this one, or another model lacks the step) and the metric label."""
        if self.options.reference_model is not None:
            return ctx.reference(SameStep(self.options.reference_model)), "model"
        if self.reference_step == "final":
            return ctx.final, "final"
        final_step = ctx.final.step if ctx.final is not None else ctx.checkpoint.step
        step = (ctx.first.step if ctx.first is not None else ctx.checkpoint.step) if self.reference_step == "first" else self.reference_step
        label = "final" if step == final_step else "ref"
        return (None if step == ctx.checkpoint.step else ctx.reference(self.reference_step)), label

    def _prepare(self, ctx: AnalysisContext, model: LoadedModel) -> list[Batch]:
        """The probe as batches (built once per run), after checking it fits this model."""
        if self._seqs is None:
            seqs = self.probe.sequences(tokenizer_dirs(ctx))
            self._seqs = seqs.subset([i for i, t in enumerate(seqs.tokens) if len(t)])
            if not len(self._seqs):
                raise CkptscopeError(f"{self.probe.path}: every sequence is empty; nothing to compare")
            self._batches = padded_batches(self._seqs.tokens, self.batch_size)
            self._positions = sum(len(t) for t in self._seqs.tokens)
        longest = max(len(t) for t in self._seqs.tokens)
        if model.max_positions() and longest > model.max_positions():
            raise CkptscopeError(f"{self.probe.path}: a sequence has {longest} tokens, more than the model's "
                                 f"{model.max_positions()} positions; cut the probe into shorter sequences")
        check_vocab(self._seqs, model.vocab_size, self.probe.path)
        return self._batches

    def _groups(self, model: LoadedModel, sites: list[Site], matrices: int) -> list[list[Site]]:
        """Sites in groups whose `matrices` float64 feature×feature accumulators each fit `stats_mb`."""
        hidden = model.module.config.hidden_size
        per_site = matrices * hidden * hidden * 8
        size = max(1, int(self.stats_mb * 2**20 // per_site))
        return [sites[i : i + size] for i in range(0, len(sites), size)]

    def _reference(self, ctx: AnalysisContext, ckpt: Checkpoint, sites: list[Site], batches: list[Batch]) -> _Reference:
        """Summaries (and, when they fit, activations) of the reference step, computed on first use."""
        key = (str(ckpt.path.resolve()), ckpt.step)
        if self._reference_state is not None and self._reference_state.key == key:
            return self._reference_state
        self._reference_state = None
        model = build_model(ckpt, ctx.device)  # not via load_model: it must not evict the current step's model
        lacking = sorted({s.module for s in sites} - {s.module for s in model.sites()})
        if lacking:
            raise CkptscopeError(f"{ckpt.path}: the reference has no module {lacking[0]}; CKA compares the same layers "
                                 "of models of one architecture")
        check_vocab(self._seqs, model.vocab_size, self.probe.path)
        itemsize = torch.empty(0, dtype=model.dtype).element_size()
        cached = self._positions * model.module.config.hidden_size * len(sites) * itemsize <= self.cache_mb * 2**20
        acts: list[dict[str, torch.Tensor]] | None = [{} for _ in batches] if cached else None
        summaries: dict[str, Summary] = {}
        for group in self._groups(model, sites, matrices=1):
            sides = {s.module: Side() for s in group}
            for b, batch in enumerate(batches):
                for name, y in _activations(model, group, batch).items():
                    sides[name].add(y)
                    if acts is not None:
                        acts[b][name] = y.cpu()
            summaries.update({name: side.summary() for name, side in sides.items()})
        self._reference_state = _Reference(key, summaries, acts, None if cached else model)
        return self._reference_state

    def _compare(self, ctx: AnalysisContext, model: LoadedModel, ckpt: Checkpoint, sites: list[Site],
                 batches: list[Batch]) -> dict[str, tuple[float, float]]:
        ref = self._reference(ctx, ckpt, sites, batches)
        values: dict[str, tuple[float, float]] = {}
        for group in self._groups(model, sites, matrices=2):
            sides = {s.module: Side() for s in group}
            crosses = {s.module: Cross() for s in group}
            for b, batch in enumerate(batches):
                ctx.progress.advance()
                xs = _activations(model, group, batch)
                ys = ref.activations[b] if ref.activations is not None else _activations(ref.model, group, batch)
                for name, x in xs.items():
                    xt, a = sides[name].add(x)
                    yt, bb = ref.summaries[name].shifted(ys[name].to(xt.device))
                    crosses[name].add(xt, a, yt, bb)
            values.update({name: crosses[name].cka(sides[name].summary(), ref.summaries[name]) for name in sides})
        return values


def _distances(ctx: AnalysisContext, other: Checkpoint, out: RunRows) -> None:
    """`model_relative_distance` = ‖W − W_other‖_F / ‖W_other‖_F of every tensor both checkpoints hold
    with one shape (like weights' `final_relative_distance`, between models); undefined where W_other is 0."""
    theirs = other.tensors
    for name, info in ctx.checkpoint.tensors.items():
        if is_buffer(name) or name not in theirs or theirs[name].shape != info.shape:
            continue
        w, v = ctx.checkpoint.read(name).double(), other.read(name).double()
        norm = float(torch.linalg.vector_norm(v))
        if norm > 0:
            role = classify(name, ctx.family)
            out.add_metrics(name, role.layer, role.component,
                            {"model_relative_distance": float(torch.linalg.vector_norm(w - v)) / norm})


def _parse_reference(value: str) -> str | int:
    """`final`, `first` or a step number."""
    text = value.strip().lower()
    return int(text) if text.isdigit() else text


def _reference_problem(value: str) -> str | None:
    return None if _parse_reference(value) in ("final", "first") or value.strip().isdigit() else "use final, first or a step number"
