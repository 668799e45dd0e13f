"""The subspace analyzer: do a matrix's top singular *directions* rotate, or only its spectrum?

For every matrix W_t (oriented out × in as the weight analyzer sees it, and each part of a fused
QKV matrix) it compares the span of the top-k left singular vectors (output space) and of the
top-k right ones (input space) with the same spans of W_previous and of W_final. The summary is
the mean squared cosine of the k principal angles between the two spans,

    mean cos² = ‖U₁ᵀU₂‖_F² / k = Σᵢ cos² θᵢ / k      (U₁, U₂ orthonormal bases, Björck–Golub),

1 for the same directions, about k/n for unrelated random k-dimensional spans of ℝⁿ, 0 for
orthogonal ones. The Frobenius form needs no SVD of U₁ᵀU₂ and is invariant to the choice of basis,
so ties *inside* the top-k block are harmless; scipy's `subspace_angles` is not used (its
angle selection is unreliable, see the README).

Why the Gram route: the bases come from the top-(k+1) eigenpairs of the float64 Gram matrix of the
shorter side (one chunked pass, as the weight analyzer's spectra, and a LAPACK MRRR solve of only
the top eigenpairs via `scipy.linalg.eigh(subset_by_index=...)`); the long side's basis is the
orthonormalised product W·V_k (thin QR, no division by σ). The span of W·V_k is exactly the long
side's top-k subspace, and an error ε in V_k enters it damped by σ_{k+1}/σ_k. On pythia shapes this is
several times cheaper than a float64 SVD (benchmarks/bench_subspace.py). The price is accuracy when
σ_k is small against σ₁: an eigenvalue of the Gram is only known to about ε_mach·σ₁², so when
σ_k < GRAM_TRUST·σ₁ the matrix falls back to a full float64 SVD.

A subspace is only defined by the matrix when there is a gap after σ_k: with σ_k = σ_{k+1} any
rotation inside the tied pair is equally valid, and near ties noise rotates it by O(ε/(σ_k−σ_{k+1}))
(Wedin). Every comparison therefore stores the relative gap δ_k = (σ_k − σ_{k+1})/σ_k (σ_{k+1} = 0
when k is the whole shorter side) and a value is omitted, with an anomaly row, only where a
subspace is numerically undefined: δ_k < MIN_GAP or σ_k at rounding level (rank below k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from ckptscope.analyzers.contract import AnalysisContext, Analyzer, HeatmapChart, ReportSection
from ckptscope.analyzers.spectral import CHUNK_ELEMENTS, gram
from ckptscope.options import Options, at_least, option
from ckptscope.rows import RunRows
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, is_buffer, orient, split_qkv

MIN_GAP = 1e-6  # δ_k below this: the top-k subspace is numerically undefined and not compared
GRAM_TRUST = 1e-3  # σ_k/σ₁ below this: Gram eigenpairs too coarse (λ_k < 1e-6·λ₁), use a full SVD
SIDES = ("left", "right")


@dataclass(frozen=True)
class Subspaces:
    """Orthonormal bases of the top-k left (out) and right (in) singular subspaces of one matrix."""

    left: np.ndarray | None  # (rows, k) float64; None when undefined
    right: np.ndarray | None  # (cols, k)
    k: int
    gap: float  # δ_k = (σ_k − σ_{k+1})/σ_k; 0 when σ_k is 0 up to rounding
    sigma_k: float
    sigma_next: float  # σ_{k+1}, 0 when k is the shorter side
    route: str  # "gram" or "svd"
    why: str | None = None  # why the subspace is undefined, None when defined

    @property
    def defined(self) -> bool:
        return self.why is None


def top_subspaces(w: torch.Tensor, k: int, g: torch.Tensor | None = None) -> Subspaces:
    """Top-k singular subspaces of a 2-D tensor in float64 (k is capped at the shorter side).

    `g` is its Gram matrix of the shorter side as `spectral.gram(w, mirror=False)` returns it
    (lower triangle valid), when already at hand: the Gram of a fused QKV matrix is the sum of its
    parts' Grams.
    """
    rows, cols = w.shape
    short = min(rows, cols)
    k = min(k, short)
    if g is None:
        g = gram(w, mirror=False)
    g_np = g.cpu().numpy()
    # Top k+1 eigenpairs (top k when k is the whole side); ascending order from LAPACK.
    lo = max(short - k - 1, 0)
    evals, evecs = scipy.linalg.eigh(g_np, lower=True, subset_by_index=[lo, short - 1], driver="evr", check_finite=False)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma = np.sqrt(np.clip(evals, 0.0, None))
    sigma1 = float(sigma[0])
    if sigma1 > 0 and sigma[k - 1] >= GRAM_TRUST * sigma1:
        short_basis = np.ascontiguousarray(evecs[:, :k])
        long_basis = _orth(_long_times(w, short_basis))
        left, right = (long_basis, short_basis) if rows >= cols else (short_basis, long_basis)
        route = "gram"
    else:  # σ_k near rounding level of the Gram: the exact, dearer route
        u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        sigma = s.cpu().numpy()
        sigma1 = float(sigma[0]) if sigma.size else 0.0
        left, right = u[:, :k].cpu().numpy(), vh[:k].T.cpu().numpy()
        route = "svd"
    sigma_k = float(sigma[k - 1])
    sigma_next = float(sigma[k]) if k < short else 0.0
    gap = (sigma_k - sigma_next) / sigma_k if sigma_k > 0 else 0.0
    why = None
    if sigma_k <= max(rows, cols) * np.finfo(np.float64).eps * sigma1:  # σ_k is 0 up to rounding
        why = f"rank below k: σ_{k} = {sigma_k:.3g} is at rounding level of σ₁ = {sigma1:.3g}"
        gap = 0.0
    elif gap < MIN_GAP:
        why = f"σ_{k} = {sigma_k:.9g} and σ_{k + 1} = {sigma_next:.9g} tie (relative gap {gap:.2g} < {MIN_GAP:g})"
    if why is not None:
        left = right = None
    return Subspaces(left, right, k, gap, sigma_k, sigma_next, route, why)


def _long_times(w: torch.Tensor, basis: np.ndarray) -> np.ndarray:
    """W·V (tall W) or Wᵀ·U (wide W) in float64, one chunk of the long side converted at a time."""
    tall = w.shape[0] >= w.shape[1]
    side, length = (w.shape[1], w.shape[0]) if tall else (w.shape[0], w.shape[1])
    b = torch.from_numpy(basis).to(w.device)
    chunk = max(1, CHUNK_ELEMENTS // max(side, 1))
    parts = []
    for s in range(0, length, chunk):
        part = w[s : s + chunk] if tall else w[:, s : s + chunk].T
        parts.append(part.to(torch.float64) @ b)
    return torch.cat(parts).cpu().numpy()


def _orth(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of a (full column rank here: σ_k > 0) by thin QR."""
    q, _ = np.linalg.qr(a, mode="reduced")
    return q


def mean_cos2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the spans of orthonormal a and b (same k)."""
    return float(np.sum((a.T @ b) ** 2) / a.shape[1])


@dataclass(frozen=True)
class SubspaceOptions(Options):
    subspace_k: int = option(16, help="Dimension k of the top singular subspaces compared (capped at a matrix's shorter side).",
                             check=at_least(1))


class SubspaceAnalyzer(Analyzer):
    """Rotation of each matrix's top-k singular subspaces against the previous and the final step."""

    name = "subspace"
    version = "1.0.0"
    Options = SubspaceOptions
    unit = "tensors"

    @classmethod
    def references(cls, options: Options) -> tuple[str | int, ...]:
        return ("previous", "final")

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        k = self.options.subspace_k
        out = self.new_rows("float64", f"torch-{torch.__version__}+scipy-{scipy.__version__}/{ctx.device}",
                            min_gap=MIN_GAP, gram_trust=GRAM_TRUST)
        tensors = ctx.checkpoint.tensors
        names = [n for n, info in tensors.items() if not is_buffer(n) and len(info.shape) >= 2
                 and info.dtype.startswith(("float", "bfloat"))]
        live = {(str(c.path), c.step) for c in (ctx.checkpoint, ctx.previous, ctx.final) if c is not None}
        self._cache = {key: v for key, v in self._cache.items() if key[:2] in live}
        ctx.progress.start(len(names))
        for name in names:
            self._tensor(ctx, name, k, out)
            ctx.progress.advance()
        return out

    @classmethod
    def report_sections(cls, models: list[str]) -> list[ReportSection]:
        """Per model, a layer × step heatmap of one rotation metric of one component, chosen in the selector."""
        from ckptscope.reports.queries import literal

        order = "['subspace_prev_left', 'subspace_prev_right', 'subspace_final_left', 'subspace_final_right']"

        def sql(model: str) -> str:
            return ("SELECT component || ' · ' || metric AS facet, step AS x, layer AS y, avg(value) AS z\n"
                    f"FROM metrics\nWHERE model = {literal(model)} AND analyzer = 'subspace' AND layer IS NOT NULL\n"
                    f"  AND list_contains({order}, metric)\n"
                    f"GROUP BY component, metric, step, layer\nORDER BY component, list_position({order}, metric), step, layer")

        charts = [HeatmapChart(f"{model}: subspace rotation per layer", f"Mean cos² of the principal angles between the top-k "
                               f"singular subspaces of each layer's matrix of {model} and the same matrix at the previous "
                               "(prev) or final step, left (output) or right (input) side, for the component and metric "
                               "chosen above the chart: 1 = the same directions, about k/n = unrelated.", sql(model),
                               y_title="layer", z_title="mean cos²", facet_title="component · metric") for model in models]
        intro = ("From the `subspace` analyzer (metrics subspace_prev_* and subspace_final_*; averaged where a layer holds "
                 "several tensors of one component). Omitted values (an undefined subspace, see the anomalies) stay empty.")
        return [ReportSection("rotation", "Subspace rotation", intro, charts)]

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        # (checkpoint path, step, tensor) -> (bases or None when non-finite, anomalies of computing them).
        # A step's W_t is the next step's W_previous and W_final serves every step, so each basis is
        # computed once per run instead of three times; only the open checkpoints' entries are kept.
        self._cache: dict[tuple[str, int, str], tuple[dict[str, Subspaces] | None, list[tuple[str, str, str]]]] = {}

    def _tensor(self, ctx: AnalysisContext, name: str, k: int, out: RunRows) -> None:
        role = classify(name, ctx.family)
        current = self._subspaces(ctx, ctx.checkpoint, name, role, k, out)
        if current is None:
            return
        shape = ctx.checkpoint.tensors[name].shape
        refs = {}
        for key in ("previous", "final"):
            ref = ctx.reference(key)
            usable = ref is not None and name in ref.tensors and ref.tensors[name].shape == shape
            refs[key] = (ref, self._subspaces(ctx, ref, name, role, k, None) if usable else None)
        for component, own in current.items():
            values = {"subspace_k": float(own.k), "subspace_gap": own.gap}
            if not own.defined:
                out.anomalies.append((name, "subspace_undefined", f"{component} at step {ctx.checkpoint.step}: top-{own.k} "
                                      f"subspace undefined, {own.why}; subspace_previous/final values omitted"))
            else:
                for key, short in (("previous", "prev"), ("final", "final")):
                    values.update(self._compare(ctx, name, component, own, key, short, refs[key], out))
            out.add_metrics(name, role.layer, component, values)

    def _subspaces(self, ctx: AnalysisContext, ckpt: Checkpoint, name: str, role, k: int,
                   out: RunRows | None) -> dict[str, Subspaces] | None:
        """The bases of tensor `name` of `ckpt` (None when it holds NaN/Inf), from the cache when
        an earlier step computed them; their anomalies go to `out` (the step's own tensor only)."""
        key = (str(ckpt.path), ckpt.step, name)
        if key not in self._cache:
            w = ckpt.read(name)
            notes: list[tuple[str, str, str]] = []
            if bool(torch.isfinite(w).all()):
                self._cache[key] = (self._bases(ctx, name, role, w, k, notes), notes)
            else:
                self._cache[key] = (None, [(name, "subspace_nonfinite", "NaN or ±Inf values; no subspaces compared")])
        bases, notes = self._cache[key]
        if out is not None:
            out.anomalies.extend(notes)
        return bases

    @staticmethod
    def _compare(ctx: AnalysisContext, name: str, component: str, own: Subspaces, key: str, short: str,
                 ref: tuple[Checkpoint | None, dict[str, Subspaces] | None], out: RunRows) -> dict[str, float]:
        """`subspace_{short}_left/right` and `subspace_gap_{short}` against reference `key`
        (empty when the reference is missing or its subspace undefined)."""
        checkpoint, bases = ref
        prefix = f"subspace_{short}"
        if key == "final" and ctx.final is None:  # this is the final step: W_t = W_final
            return {f"{prefix}_left": 1.0, f"{prefix}_right": 1.0, f"subspace_gap_{short}": own.gap}
        if bases is None or component not in bases:
            return {}
        other = bases[component]
        if not other.defined:
            out.anomalies.append((name, "subspace_undefined", f"{component}: top-{other.k} subspace of the {key} step "
                                  f"{checkpoint.step} undefined, {other.why}; {prefix}_* omitted"))
            return {}
        return {f"{prefix}_left": mean_cos2(own.left, other.left), f"{prefix}_right": mean_cos2(own.right, other.right),
                f"subspace_gap_{short}": min(own.gap, other.gap)}

    @staticmethod
    def _bases(ctx: AnalysisContext, name: str, role, w: torch.Tensor, k: int, notes: list[tuple[str, str, str]]) -> dict[str, Subspaces]:
        """Subspaces of the matrix as the weight analyzer orients it and, for fused QKV, of its q/k/v parts."""
        m = orient(name, ctx.family, w).to(ctx.device)
        m = m.reshape(m.shape[0], -1) if m.dim() > 2 else m
        parts: list[tuple[str, torch.Tensor]] = []
        if role.component == "attn.qkv" and ctx.config:
            try:
                parts = split_qkv(role, ctx.family, m, ctx.config)
            except ValueError as exc:  # config and shapes disagree: the fused matrix is still analyzed
                notes.append((name, "qkv_not_split", str(exc)))
        grams = {c: gram(p, mirror=False) for c, p in parts}
        # The parts partition the fused matrix's rows; when both are tall their Grams WᵀW add up.
        fused_gram = sum(grams.values()) if parts and all(p.shape[0] >= p.shape[1] for _, p in parts) \
            and m.shape[0] >= m.shape[1] else None
        result = {role.component: top_subspaces(m, k, fused_gram)}
        result.update({c: top_subspaces(p, k, grams[c]) for c, p in parts})
        return result
