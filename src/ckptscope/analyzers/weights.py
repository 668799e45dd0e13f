"""The weight analyzer: spectra, ranks and norms of every tensor, and how they move.

For each 2-D matrix (and each part of a fused QKV matrix) one chunked pass in float64 feeds
every statistic at once: the Gram matrices of W, of W − W_first and of W − W_previous (whose
eigenvalues give the singular values), and the inner products with W_final. Only one chunk of
each matrix is ever converted to float64, so memory stays near the stored tensors' size.
1-D tensors (norms, biases) get vector statistics. Non-finite tensors are reported as
anomalies and skipped, never fatal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ckptscope.analyzers.base import AnalysisContext
from ckptscope.analyzers.spectral import heavy_tail_metrics, rank_norm_metrics, singular_values_from_gram, vector_metrics
from ckptscope.ingest.checkpoint import Checkpoint
from ckptscope.ingest.layers import Role, classify, is_buffer, orient, split_qkv
from ckptscope.store.db import RunRows

FINAL_METRICS = ("final_cosine", "final_relative_distance")
CHUNK_ELEMENTS = 1 << 22  # float64 elements per chunk: 32 MB


@dataclass
class _Pass:
    """Accumulated statistics of one matrix against its references."""

    gram: torch.Tensor | None
    sq_w: float = 0.0
    gram_init: torch.Tensor | None = None
    gram_prev: torch.Tensor | None = None
    sq_first: float = 0.0
    sq_prev: float = 0.0
    sq_final: float = 0.0
    dot_final: float = 0.0
    sq_diff_final: float = 0.0


def _one_pass(w: torch.Tensor, first: torch.Tensor | None, prev: torch.Tensor | None,
              final: torch.Tensor | None, device: str, *, spectrum: bool = True) -> _Pass:
    """Chunk along the longer side so the Gram matrix is of the shorter side.

    Without `spectrum` (re-basing `final_*` rows) no Gram matrix of W is built: only norms and dots.
    """
    if w.shape[0] < w.shape[1]:
        w, first, prev, final = (t.T if t is not None else None for t in (w, first, prev, final))
    n = w.shape[1]
    f64 = dict(dtype=torch.float64, device=device, memory_format=torch.contiguous_format)
    zeros = lambda: torch.zeros(n, n, dtype=torch.float64, device=device)  # noqa: E731
    acc = _Pass(gram=zeros() if spectrum else None)
    if first is not None:
        acc.gram_init = zeros()
    if prev is not None:
        acc.gram_prev = zeros()
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    for s in range(0, w.shape[0], step):
        a = w[s : s + step].to(**f64)
        if first is not None:
            b = first[s : s + step].to(**f64)
            acc.sq_first += _sq(b)
            acc.gram_init.addmm_((d := a - b).T, d)
        if prev is not None:
            b = prev[s : s + step].to(**f64)
            acc.sq_prev += _sq(b)
            acc.gram_prev.addmm_((d := a - b).T, d)
        if final is not None:
            b = final[s : s + step].to(**f64)
            acc.sq_final += _sq(b)
            acc.dot_final += float(torch.dot(a.reshape(-1), b.reshape(-1)))
            acc.sq_diff_final += _sq(a - b)
        acc.sq_w += _sq(a)
        if acc.gram is not None:
            acc.gram.addmm_(a.T, a)
    return acc


def _sq(t: torch.Tensor) -> float:
    """Σ t² as one BLAS dot, without a squared temporary."""
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def _sv(g: torch.Tensor | None):
    """Singular values from a Gram matrix, or None when it is non-finite (a NaN/Inf reference)."""
    return singular_values_from_gram(g) if g is not None and bool(torch.isfinite(g).all()) else None


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()}


def _finite(values: dict[str, float]) -> dict[str, float]:
    """Undefined metrics (e.g. effective rank of a zero matrix) are omitted, not stored as NaN."""
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def _final_metrics(acc: _Pass) -> dict[str, float]:
    denom = math.sqrt(acc.sq_w * acc.sq_final)
    return {
        "final_cosine": acc.dot_final / denom if denom > 0 else math.nan,
        "final_relative_distance": math.sqrt(acc.sq_diff_final / acc.sq_final) if acc.sq_final > 0 else math.nan,
    }


class WeightAnalyzer:
    """Spectral, rank, norm, update and weight-space convergence statistics per tensor."""

    name = "weights"
    uses_references = True  # deltas need the first and previous steps, convergence the final
    version = "1.0.0"

    def __init__(self, *, rtol: float = 1e-3, spectra: tuple[str, ...] = ("weight", "delta_init")) -> None:
        self.rtol = rtol
        self.spectra = spectra

    @classmethod
    def from_options(cls, rtol: float = 1e-3, **_: Any) -> WeightAnalyzer:
        return cls(rtol=rtol)

    def parameters(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "alpha_thresh": 1e-5, "spectrum": "exact", "spectra_stored": list(self.spectra)}

    @staticmethod
    def _backend(device: str) -> str:
        return f"torch-{torch.__version__}/{device}"

    def _run_rows(self, ctx: AnalysisContext) -> RunRows:
        params = self.parameters()
        for key, ref in (("first_step", ctx.first), ("previous_step", ctx.previous), ("final_step", ctx.final)):
            params[key] = ref.step if ref is not None else (None if key == "previous_step" else ctx.checkpoint.step)
        return RunRows(self.name, self.version, params, "float64", self._backend(ctx.device))

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        out = self._run_rows(ctx)
        for name, info in ctx.checkpoint.tensors.items():
            if is_buffer(name) or not info.dtype.startswith(("float", "bfloat")):
                continue
            ctx.on_tensor(name)
            self._tensor(ctx, name, out, final_only=False)
        return out

    def refresh_final(self, ctx: AnalysisContext) -> RunRows:
        """Only the `final_*` rows, for steps ingested before a later final step arrived."""
        out = self._run_rows(ctx)
        for name, info in ctx.checkpoint.tensors.items():
            if is_buffer(name) or not info.dtype.startswith(("float", "bfloat")) or len(info.shape) < 2:
                continue
            ctx.on_tensor(name)
            self._tensor(ctx, name, out, final_only=True)
        return out

    def _tensor(self, ctx: AnalysisContext, name: str, out: RunRows, *, final_only: bool) -> None:
        role = classify(name, ctx.family)
        w = ctx.checkpoint.read(name)
        if not self._check_finite(name, w, out):
            return
        if w.dim() < 2:
            if not final_only:
                out.add_metrics(name, role.layer, role.component, _finite(vector_metrics(w)))
            return
        refs = {key: self._reference(getattr(ctx, key), name, w.shape) for key in ("first", "previous", "final")}
        if final_only:
            refs["first"] = refs["previous"] = None
        for component, parts in self._units(name, role, ctx, w, refs, out):
            self._matrix(name, role, component, parts, ctx, out, final_only=final_only)

    @staticmethod
    def _check_finite(name: str, w: torch.Tensor, out: RunRows) -> bool:
        flat = w.reshape(-1)  # in chunks: isfinite on the whole tensor allocates ~2x its size
        if all(bool(torch.isfinite(flat[i : i + CHUNK_ELEMENTS]).all()) for i in range(0, flat.numel(), CHUNK_ELEMENTS)):
            return True
        nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        if nan:
            out.anomalies.append((name, "nan", f"{nan} of {w.numel()} values are NaN"))
        if inf:
            out.anomalies.append((name, "inf", f"{inf} of {w.numel()} values are ±Inf"))
        return not (nan or inf)

    @staticmethod
    def _reference(ref: Checkpoint | None, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The same tensor in a reference checkpoint, or None when absent or reshaped.

        A non-finite reference is not scanned for here: it yields a non-finite Gram matrix,
        and that delta is then omitted (its own step already reported the anomaly).
        """
        if ref is None or name not in ref.tensors:
            return None
        t = ref.read(name)
        return t if t.shape == shape else None

    @staticmethod
    def _units(name: str, role: Role, ctx: AnalysisContext, w: torch.Tensor, refs: dict[str, torch.Tensor | None], out: RunRows):
        """The matrix as stored (oriented out × in, >2-D flattened) and, for fused QKV, its parts."""
        def shaped(t: torch.Tensor) -> torch.Tensor:
            t = orient(name, ctx.family, t)
            return t.reshape(t.shape[0], -1) if t.dim() > 2 else t

        mats = {"w": shaped(w), **{k: shaped(v) if v is not None else None for k, v in refs.items()}}
        yield role.component, mats
        if role.component == "attn.qkv" and ctx.config:
            try:
                split = {k: dict(split_qkv(role, ctx.family, v, ctx.config)) if v is not None else None for k, v in mats.items()}
            except ValueError as exc:  # config and shapes disagree: the fused matrix is still analyzed
                out.anomalies.append((name, "qkv_not_split", str(exc)))
                return
            for component in split["w"]:
                yield component, {k: (v[component] if v is not None else None) for k, v in split.items()}

    def _matrix(self, name: str, role: Role, component: str, m: dict[str, torch.Tensor | None],
                ctx: AnalysisContext, out: RunRows, *, final_only: bool) -> None:
        w = m["w"].to(ctx.device)
        move = lambda t: t.to(ctx.device) if t is not None else None  # noqa: E731
        acc = _one_pass(w, move(m["first"]), move(m["previous"]), move(m["final"]), ctx.device, spectrum=not final_only)
        values: dict[str, float] = {}
        if final_only:
            if m["final"] is not None:
                values.update(_final_metrics(acc))
            elif ctx.final is None:  # re-basing the final step itself
                values.update({"final_cosine": 1.0, "final_relative_distance": 0.0})
            out.add_metrics(name, role.layer, component, _finite(values))
            return
        sv = singular_values_from_gram(acc.gram)
        shape = tuple(w.shape)
        values.update(rank_norm_metrics(sv, rtol=self.rtol))
        values.update(heavy_tail_metrics(sv))
        if "weight" in self.spectra:
            out.add_spectrum(name, role.layer, component, "weight", shape, sv)
        if (sv_init := _sv(acc.gram_init)) is not None:
            values.update(self._delta("delta_init_", sv_init, acc.sq_first))
            if "delta_init" in self.spectra:
                out.add_spectrum(name, role.layer, component, "delta_init", shape, sv_init)
        elif ctx.first is None:  # this is the first step: ΔW = 0 exactly
            values.update(self._delta("delta_init_", torch.zeros(1, dtype=torch.float64).numpy(), acc.sq_w))
        if (sv_prev := _sv(acc.gram_prev)) is not None:
            values.update(self._delta("delta_prev_", sv_prev, acc.sq_prev))
            if "delta_prev" in self.spectra:
                out.add_spectrum(name, role.layer, component, "delta_prev", shape, sv_prev)
        if m["final"] is not None:
            values.update(_final_metrics(acc))
        elif ctx.final is None:  # this is the final step
            values.update({"final_cosine": 1.0, "final_relative_distance": 0.0})
        out.add_metrics(name, role.layer, component, _finite(values))

    def _delta(self, prefix: str, sv, sq_ref: float) -> dict[str, float]:
        values = _prefixed(prefix, rank_norm_metrics(sv, rtol=self.rtol))
        values[f"{prefix}relative"] = values[f"{prefix}frobenius_norm"] / math.sqrt(sq_ref) if sq_ref > 0 else math.nan
        return values
