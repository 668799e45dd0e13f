"""The circuits analyzer: norms, ranks and spectra of every attention head's OV and QK circuits.

In the column-vector convention of Elhage et al., head h of a layer moves information with the OV
circuit W_OV^h = W_O^h·W_V^h (what a source token writes into the residual stream when attended
to) and chooses where to attend with the QK circuit W_QK^h = W_Q^hᵀ·W_K^h (the score is
x_dstᵀ·W_QK^h·x_src). Both are d_model × d_model of rank ≤ d_head, with

    W_Q^h, W_K^h, W_V^h : d_head × d_model   the head's rows of the (out × in) projections,
    W_O^h               : d_model × d_head   the head's columns of the output projection.

Why the QR core: a product A·B with A (d_model × d_head) and B (d_head × d_model) never needs
forming (d_model² memory and d_model²·d_head work per head). With thin QR factorizations A = Q_A·R_A
and Bᵀ = Q_B·R_B, A·B = Q_A·(R_A·R_Bᵀ)·Q_Bᵀ, and as Q_A, Q_B have orthonormal columns the singular
values of A·B are exactly those of the d_head × d_head core R_A·R_Bᵀ (the other d_model − d_head are 0).
Only R is computed (`torch.linalg.qr(mode="r")`), batched over heads, in float64: O(d_model·d_head²)
per head. Norms and ranks then follow from those d_head values with the weight analyzer's
`rank_norm_metrics` (zeros add nothing to any of them).

Layouts, as `sources.layers` orients and splits weights (out × in; GPT-2's Conv1D transposed):
GPT-NeoX's fused `query_key_value` rows are (head, {q,k,v}, d_head); GPT-2's `c_attn` outputs
[q | k | v] in thirds; Llama-family (and BERT) models have separate q/k/v projections. Head h's
rows of a projection are h·d_head … (h+1)·d_head − 1 and its columns of the output projection the same
range. Grouped-query attention: H query heads share H_kv key/value heads (`num_key_value_heads`),
query head h uses kv head ⌊h / (H/H_kv)⌋ (contiguous groups, as transformers' `repeat_kv`).

What is left out, by design: biases (b_V only adds the constant b_V·W_O^h, as attention weights
sum to 1; b_K cancels in the softmax; b_Q adds a term linear in the source token), and rotary
position embeddings, which rotate part of each head's query/key by a position-dependent angle
(Pythia: 25% of d_head); the static W_QK is the circuit at relative position 0.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ckptscope.analyzers.contract import AnalysisContext, Analyzer, HeatmapChart, ReportSection
from ckptscope.analyzers.spectral import rank_norm_metrics
from ckptscope.options import NoOptions
from ckptscope.rows import RunRows
from ckptscope.sources.layers import classify, orient, split_qkv

METRICS = ("frobenius_norm", "spectral_norm", "stable_rank", "effective_rank")
ATTENTION = ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o")


def _config_int(config: dict, *keys: str) -> int | None:
    return next((int(config[k]) for k in keys if config.get(k) is not None), None)


def circuit_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a[h] @ b[h] for batches a (H, n, r), b (H, r, m), r ≤ n, m.

    Only the r possibly non-zero values per head: those of the core R_a·R_bᵀ (see module doc).
    """
    r_a = torch.linalg.qr(a, mode="r").R  # (H, r, r)
    r_b = torch.linalg.qr(b.transpose(1, 2), mode="r").R
    return torch.linalg.svdvals(r_a @ r_b.transpose(1, 2))


class CircuitsAnalyzer(Analyzer):
    """Norms, ranks and spectra of each attention head's OV (W_O·W_V) and QK (W_Qᵀ·W_K) circuits."""

    name = "circuits"
    version = "1.0.0"
    Options = NoOptions
    unit = "layers"

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        out = self.new_rows("float64", f"torch-{torch.__version__}/cpu")
        layers: dict[int, dict[str, str]] = defaultdict(dict)  # layer -> component -> weight tensor name
        for name, info in ctx.checkpoint.tensors.items():
            role = classify(name, ctx.family)
            if role.component in ATTENTION and role.layer is not None and name.endswith("weight") and len(info.shape) == 2:
                layers[role.layer][role.component] = name
        ctx.progress.start(len(layers))
        for layer in sorted(layers):
            self._layer(ctx, layer, layers[layer], out)
            ctx.progress.advance()
        return out

    def _layer(self, ctx: AnalysisContext, layer: int, names: dict[str, str], out: RunRows) -> None:
        """Rows of one layer's heads; an anomaly instead when its weights cannot be read as heads."""
        try:
            q, k, v, o, q_name, o_name = self._projections(ctx, names)
            heads = _config_int(ctx.config or {}, "num_attention_heads", "n_head")
            if heads is None:
                raise ValueError("config.json has no num_attention_heads / n_head")
            kv_heads = _config_int(ctx.config or {}, "num_key_value_heads") or heads
            d_head = q.shape[0] // heads
            if (q.shape[0] != heads * d_head or heads % kv_heads or k.shape != v.shape
                    or k.shape[0] != kv_heads * d_head or o.shape[1] != heads * d_head or k.shape[1] != q.shape[1]):
                raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, o {tuple(o.shape)} do not "
                                 f"fit {heads} query and {kv_heads} key/value heads")
        except ValueError as exc:
            out.anomalies.append((names.get("attn.o") or next(iter(names.values())), "circuits_skipped", f"layer {layer}: {exc}"))
            return
        if not all(bool(torch.isfinite(t).all()) for t in (q, k, v, o)):
            out.anomalies.append((o_name, "circuits_skipped", f"layer {layer}: NaN or ±Inf in the attention weights"))
            return
        kv = torch.arange(heads) // (heads // kv_heads)  # query head -> its key/value head
        per_head = lambda t: t.reshape(-1, d_head, t.shape[1])  # noqa: E731  (H, d_head, d_model) row blocks
        w_q, w_k, w_v = per_head(q), per_head(k)[kv], per_head(v)[kv]
        w_o = o.reshape(o.shape[0], heads, d_head).permute(1, 0, 2)  # (H, d_model, d_head) column blocks
        shape = (q.shape[1], q.shape[1])
        for component, tensor, sv in (("attn.ov", o_name, circuit_singular_values(w_o, w_v)),
                                      ("attn.qk", q_name, circuit_singular_values(w_q.transpose(1, 2), w_k))):
            for h in range(heads):
                s = sv[h].numpy()
                metrics = rank_norm_metrics(s)
                out.add_metrics(tensor, layer, component, {m: metrics[m] for m in METRICS if math.isfinite(metrics[m])},
                                tier="exact", head=h)
                out.add_spectrum(tensor, layer, component, "weight", shape, s, tier="exact", head=h)

    @classmethod
    def report_sections(cls, models: list[str]) -> list[ReportSection]:
        """Per model, a head × step heatmap of one layer, circuit and metric, chosen in the selector."""
        from ckptscope.reports.queries import literal

        def sql(model: str) -> str:
            return ("SELECT 'layer ' || layer || ' · ' || component || ' · ' || metric AS facet, step AS x, head AS y, value AS z\n"
                    f"FROM metrics\nWHERE model = {literal(model)} AND analyzer = 'circuits' AND head IS NOT NULL\n"
                    "ORDER BY layer, component, metric, step, head")

        charts = [HeatmapChart(f"{model}: per-head circuits", f"One attention layer's heads of {model} over training, for the "
                               "layer, circuit (attn.ov = W_O·W_V, attn.qk = W_Qᵀ·W_K) and metric chosen above the chart.",
                               sql(model), y_title="head", z_title="value", facet_title="layer · circuit · metric")
                  for model in models]
        intro = (f"From the `circuits` analyzer: {', '.join(METRICS)} of each head's OV and QK circuit (rows with a `head`), "
                 "as a head × step heatmap per layer.")
        return [ReportSection("heads", "Attention heads: OV and QK circuits", intro, charts)]

    @staticmethod
    def _projections(ctx: AnalysisContext, names: dict[str, str]) -> tuple[torch.Tensor, ...]:
        """(W_Q, W_K, W_V, W_O) oriented out × in in float64, and the tensors the QK and OV rows name."""
        def read(name: str) -> torch.Tensor:
            return orient(name, ctx.family, ctx.checkpoint.read(name)).to(torch.float64)

        if "attn.o" not in names:
            raise ValueError("no attention output projection found")
        if "attn.qkv" in names:
            fused = names["attn.qkv"]
            parts = dict(split_qkv(classify(fused, ctx.family), ctx.family, read(fused), ctx.config or {}))
            q, k, v, q_name = parts["attn.q"], parts["attn.k"], parts["attn.v"], fused
        elif all(c in names for c in ("attn.q", "attn.k", "attn.v")):
            q, k, v, q_name = read(names["attn.q"]), read(names["attn.k"]), read(names["attn.v"]), names["attn.q"]
        else:
            raise ValueError(f"no query/key/value projections found among {', '.join(sorted(names.values()))}")
        return q, k, v, read(names["attn.o"]), q_name, names["attn.o"]
