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
from dataclasses import dataclass, fields
from functools import reduce
from typing import Any

import numpy as np
import torch

from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.analyzers.fast_spectrum import fast_spectrum
from ckptscope.analyzers.parallel import ordered_map
from ckptscope.analyzers.spectral import CHUNK_ELEMENTS, add_gram_, heavy_tail_metrics, rank_norm_metrics, singular_values_from_gram, vector_metrics
from ckptscope.options import Options, at_least, between, option
from ckptscope.rows import RunRows
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import Role, classify, is_buffer, orient, split_qkv

FINAL_METRICS = ("final_cosine", "final_relative_distance")
TIERS = ("exact", "fast", "none")
EXACT_MAX_SIDE = 4096  # tier exact falls back to fast above this smaller side (an eigensolve is O(side³))


@dataclass
class _Pass:
    """Accumulated statistics of one matrix against its references.

    Every field is a sum over rows of the (tall-oriented) matrix, so the passes of a row
    partition add up to the pass of the whole: a fused QKV matrix costs nothing beyond its parts.
    Gram matrices hold their lower triangle only (see `add_gram_`).
    """

    gram: torch.Tensor | None = None
    gram_init: torch.Tensor | None = None
    gram_prev: torch.Tensor | None = None
    sq_w: float = 0.0
    sq_first: float = 0.0
    sq_prev: float = 0.0
    sq_final: float = 0.0
    sq_diff_first: float = 0.0
    sq_diff_prev: float = 0.0
    dot_final: float = 0.0
    sq_diff_final: float = 0.0

    def __add__(self, other: _Pass) -> _Pass:
        def add(a, b):
            return None if a is None or b is None else a + b
        return _Pass(**{f.name: add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


def _one_pass(w: torch.Tensor, first: torch.Tensor | None, prev: torch.Tensor | None,
              final: torch.Tensor | None, device: str, *, grams: bool = True) -> _Pass:
    """Chunk along the longer side so the Gram matrices are of the shorter side.

    Without `grams` (tiers fast and none, re-basing `final_*` rows) only norms and dots are taken.
    """
    if w.shape[0] < w.shape[1]:
        w, first, prev, final = (t.T if t is not None else None for t in (w, first, prev, final))
    n = w.shape[1]
    zeros = lambda: torch.zeros(n, n, dtype=torch.float64, device=device) if grams else None  # noqa: E731
    acc = _Pass(gram=zeros(), gram_init=zeros() if first is not None else None, gram_prev=zeros() if prev is not None else None)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    # Three float64 chunk buffers, reused rather than a temporary per conversion and difference.
    rows = min(step, w.shape[0])
    a_buf, b_buf, d_buf = (torch.empty((rows, n), dtype=torch.float64, device=device) for _ in range(3))
    for s in range(0, w.shape[0], step):
        a = a_buf[: min(step, w.shape[0] - s)]
        a.copy_(w[s : s + step])
        b, d = b_buf[: a.shape[0]], d_buf[: a.shape[0]]
        if first is not None:
            acc.sq_first += _sq(b.copy_(first[s : s + step]))
            acc.sq_diff_first += _sq(torch.sub(a, b, out=d))
            if grams:
                add_gram_(acc.gram_init, d)
        if prev is not None:
            acc.sq_prev += _sq(b.copy_(prev[s : s + step]))
            acc.sq_diff_prev += _sq(torch.sub(a, b, out=d))
            if grams:
                add_gram_(acc.gram_prev, d)
        if final is not None:
            acc.sq_final += _sq(b.copy_(final[s : s + step]))
            acc.dot_final += float(torch.dot(a.reshape(-1), b.reshape(-1)))
            acc.sq_diff_final += _sq(torch.sub(a, b, out=d))
        acc.sq_w += _sq(a)
        if grams:
            add_gram_(acc.gram, a)
    return acc


def _sq(t: torch.Tensor) -> float:
    """Σ t² as one BLAS dot, without a squared temporary."""
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


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


def _merge(out: RunRows, part: RunRows) -> None:
    for table, columns in ((out.metrics, part.metrics), (out.spectra, part.spectra)):
        for key, values in columns.items():
            table[key].extend(values)
    out.anomalies.extend(part.anomalies)


@dataclass(frozen=True)
class WeightOptions(Options):
    rtol: float = option(1e-3, check=between(0, 1), help="Relative tolerance of numerical_rank: σ > rtol·σ₁ counts.")
    spectrum: str = option("exact", choices=TIERS, help=(
        "How singular values are obtained: exact (matrices whose smaller side exceeds --exact-max-side fall back to fast), "
        "fast (Lanczos: spectral norm, top-k spectrum, estimated effective rank), none (norms only). mp_fit, "
        "if it runs, still computes every eigenvalue of the matrices it fits."))
    exact_max_side: int = option(EXACT_MAX_SIDE, check=at_least(1),
                                 help="Largest smaller side of a matrix whose spectrum --spectrum exact computes exactly.")


class WeightAnalyzer(Analyzer):
    """Spectra, ranks, norms, updates and weight-space convergence of every tensor.

    `spectrum` picks how singular values are obtained (recorded per row as `tier`): `exact`
    (float64 Gram eigensolve; matrices whose smaller side exceeds `exact_max_side` fall back to
    `fast`), `fast` (matrix-free Krylov methods: top-`fast_k` spectrum, spectral norm, estimated
    effective rank; no alpha) or `none` (Frobenius norms, distances and cosines only). Exact
    singular values of W are left in `ctx.shared[("sv", tensor, component)]` for later analyzers.
    """

    name = "weights"
    version = "1.2.0"
    Options = WeightOptions
    unit = "tensors"
    final_metrics = FINAL_METRICS
    spectra = ("weight", "delta_init")  # kinds whose singular values are stored
    fast_k = 32

    def __init__(self, options: WeightOptions | None = None) -> None:
        super().__init__(options)
        self.rtol, self.spectrum, self.exact_max_side = self.options.rtol, self.options.spectrum, self.options.exact_max_side

    @classmethod
    def references(cls, options: Options) -> tuple[str, ...]:
        return ("first", "previous", "final")  # deltas need the first and previous steps, convergence the final

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "alpha_thresh": 1e-5, "fast_k": self.fast_k, "spectra_stored": list(self.spectra)}

    def tier(self, shape: tuple[int, ...]) -> str:
        """The tier a matrix of this (2-D) shape is analyzed with."""
        if self.spectrum == "exact" and min(shape) > self.exact_max_side:
            return "fast"
        return self.spectrum

    @staticmethod
    def _backend(device: str) -> str:
        return f"torch-{torch.__version__}/{device}"

    def _run_rows(self, ctx: AnalysisContext) -> RunRows:
        params = {}
        for key, ref in (("first_step", ctx.first), ("previous_step", ctx.previous), ("final_step", ctx.final)):
            params[key] = ref.step if ref is not None else (None if key == "previous_step" else ctx.checkpoint.step)
        return self.new_rows("float64", self._backend(ctx.device), **params)

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        return self._all(ctx, final_only=False)

    def refresh_final(self, ctx: AnalysisContext) -> RunRows:
        """Only the `final_*` rows, for steps ingested before a later final step arrived."""
        return self._all(ctx, final_only=True)

    def _all(self, ctx: AnalysisContext, *, final_only: bool) -> RunRows:
        out = self._run_rows(ctx)
        tensors = ctx.checkpoint.tensors
        names = [n for n, info in tensors.items() if not is_buffer(n) and info.dtype.startswith(("float", "bfloat"))
                 and not (final_only and len(info.shape) < 2)]
        refs = sum(r is not None for r in (ctx.first, ctx.previous, ctx.final))

        def cost(name: str) -> int:  # the tensor and its references as stored, plus float64 work space
            info = tensors[name]
            side = min(info.shape) if len(info.shape) > 1 else 1
            return info.nbytes * (1 + refs) + 8 * (3 * side * side + 3 * min(CHUNK_ELEMENTS, math.prod(info.shape)))

        threads = torch.get_num_threads() if torch.device(ctx.device).type == "cpu" else 1
        ctx.progress.start(len(names))
        for _name, part in ordered_map(names, lambda n: self._tensor(ctx, n, final_only=final_only), cost, threads=threads):
            ctx.progress.advance()
            _merge(out, part)
        return out

    def _tensor(self, ctx: AnalysisContext, name: str, *, final_only: bool) -> RunRows:
        """All rows of one tensor (run in a worker thread, merged in order by the caller)."""
        out = RunRows(self.name, self.version, {}, "float64", "")
        role = classify(name, ctx.family)
        w = ctx.checkpoint.read(name)
        if not self._check_finite(name, w, out):
            return out
        if w.dim() < 2:
            if not final_only:
                out.add_metrics(name, role.layer, role.component, _finite(vector_metrics(w)))
            return out
        refs = {key: self._reference(getattr(ctx, key), name, w.shape) for key in ("first", "previous", "final")}
        if final_only:
            refs["first"] = refs["previous"] = None
        units = [(c, {k: t.to(ctx.device) if t is not None else None for k, t in m.items()})
                 for c, m in self._units(name, role, ctx, w, refs, out)]
        passes = {c: _one_pass(m["w"], m["first"], m["previous"], m["final"], ctx.device,
                               grams=not final_only and self.tier(m["w"].shape) == "exact") for c, m in units[1:]}
        fused, m = units[0]  # the parts of a fused QKV matrix partition its rows: their passes add up
        passes[fused] = (reduce(_Pass.__add__, passes.values()) if passes else
                         _one_pass(m["w"], m["first"], m["previous"], m["final"], ctx.device,
                                   grams=not final_only and self.tier(m["w"].shape) == "exact"))
        for component, m in units:
            self._matrix(name, role, component, m, passes[component], ctx, out, final_only=final_only)
        return out

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

        A non-finite reference is not scanned for here: it yields non-finite sums, and that
        delta is then omitted (its own step already reported the anomaly).
        """
        if ref is None or name not in ref.tensors:
            return None
        t = ref.read(name)
        return t if t.shape == shape else None

    @staticmethod
    def _units(name: str, role: Role, ctx: AnalysisContext, w: torch.Tensor, refs: dict[str, torch.Tensor | None],
               out: RunRows) -> list[tuple[str, dict[str, torch.Tensor | None]]]:
        """The matrix as stored (oriented out × in, >2-D flattened) and, for fused QKV, its parts."""
        def shaped(t: torch.Tensor) -> torch.Tensor:
            t = orient(name, ctx.family, t)
            return t.reshape(t.shape[0], -1) if t.dim() > 2 else t

        mats = {"w": shaped(w), **{k: shaped(v) if v is not None else None for k, v in refs.items()}}
        units = [(role.component, mats)]
        if role.component == "attn.qkv" and ctx.config:
            try:
                split = {k: dict(split_qkv(role, ctx.family, v, ctx.config)) if v is not None else None for k, v in mats.items()}
            except ValueError as exc:  # config and shapes disagree: the fused matrix is still analyzed
                out.anomalies.append((name, "qkv_not_split", str(exc)))
                return units
            units += [(c, {k: (v[c] if v is not None else None) for k, v in split.items()}) for c in split["w"]]
        return units

    def _matrix(self, name: str, role: Role, component: str, m: dict[str, torch.Tensor | None], acc: _Pass,
                ctx: AnalysisContext, out: RunRows, *, final_only: bool) -> None:
        tier = self.tier(m["w"].shape)
        values: dict[str, float] = {}
        if not final_only:
            values.update(self._spectral(name, role, component, tier, m, acc, ctx, out))
        if m["final"] is not None:
            values.update(_final_metrics(acc))
        elif ctx.final is None:  # this is the final step
            values.update({"final_cosine": 1.0, "final_relative_distance": 0.0})
        out.add_metrics(name, role.layer, component, _finite(values), tier=tier)

    def _spectral(self, name: str, role: Role, component: str, tier: str, m: dict, acc: _Pass, ctx: AnalysisContext,
                  out: RunRows) -> dict[str, float]:
        """The metrics (and stored spectra) of W and of both deltas, in the matrix's tier."""
        shape = tuple(m["w"].shape)
        values, sv = self._spectrum(tier, m["w"], None, acc.gram, acc.sq_w)
        # alpha and WeightWatcher's log norms need the whole spectrum; the other tiers get the log norms it has
        values.update(heavy_tail_metrics(sv) if tier == "exact" else self._log_norms(acc.sq_w, values.get("spectral_norm")))
        if sv is not None and "weight" in self.spectra:
            out.add_spectrum(name, role.layer, component, "weight", shape, sv, tier=tier)
        if sv is not None and tier == "exact":
            ctx.shared[("sv", name, component)] = sv
        for kind, ref, g, sq_diff, sq_ref in (("delta_init", m["first"], acc.gram_init, acc.sq_diff_first, acc.sq_first),
                                              ("delta_prev", m["previous"], acc.gram_prev, acc.sq_diff_prev, acc.sq_prev)):
            if ref is not None and math.isfinite(sq_diff):  # a NaN/Inf reference gives no delta
                delta, sv_d = self._spectrum(tier, m["w"], ref, g, sq_diff)
                values.update(self._delta(f"{kind}_", delta, sq_ref))
                if kind == "delta_init" and tier == "exact":  # WeightWatcher's analyze(base_model=first step)
                    values.update(_prefixed("delta_init_", heavy_tail_metrics(sv_d)))
                if sv_d is not None and kind in self.spectra:
                    out.add_spectrum(name, role.layer, component, kind, shape, sv_d, tier=tier)
            elif kind == "delta_init" and ctx.first is None:  # this is the first step: ΔW = 0 exactly
                zero = rank_norm_metrics(np.zeros(1), rtol=self.rtol) if tier != "none" else {"frobenius_norm": 0.0}
                values.update(self._delta("delta_init_", zero, acc.sq_w))
        return values

    def _spectrum(self, tier: str, w: torch.Tensor, ref: torch.Tensor | None, g: torch.Tensor | None,
                  sq: float) -> tuple[dict[str, float], np.ndarray | None]:
        """(rank and norm metrics, singular values to store) of w - ref (w if ref is None), whose
        float64 Gram (lower triangle; tier exact) is g and squared Frobenius norm sq."""
        if tier == "exact":
            sv = singular_values_from_gram(g)
            return rank_norm_metrics(sv, rtol=self.rtol), sv
        if tier == "fast":
            fs = fast_spectrum(w, minus=ref, k=self.fast_k, rtol=self.rtol)
            return dict(fs.metrics), fs.top_sv
        return {"frobenius_norm": math.sqrt(sq)}, None

    @staticmethod
    def _log_norms(sq_w: float, sigma1: float | None) -> dict[str, float]:
        """WeightWatcher's log_norm (log10 ‖W‖_F²) and, given σ₁, log_spectral_norm (log10 σ₁²)."""
        values = {"log_norm": math.log10(sq_w) if sq_w > 0 else -math.inf}
        if sigma1 is not None:
            values["log_spectral_norm"] = 2 * math.log10(sigma1) if sigma1 > 0 else -math.inf
        return values

    @staticmethod
    def _delta(prefix: str, metrics: dict[str, float], sq_ref: float) -> dict[str, float]:
        values = _prefixed(prefix, metrics)
        values[f"{prefix}relative"] = values[f"{prefix}frobenius_norm"] / math.sqrt(sq_ref) if sq_ref > 0 else math.nan
        return values
