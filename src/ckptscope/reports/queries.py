"""The SQL behind every figure, as literal text.

Each builder returns a complete statement with its values inlined as SQL literals (not bound
parameters), because the report prints the exact query next to its chart so that a reader can
paste it into `ckptscope sql` and get the same rows. All aggregation happens here, in DuckDB:
a report over hundreds of checkpoints ships grids of per-layer values, never raw rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptscope.errors import CkptscopeError
from ckptscope.store.db import Store

# Matrix statistics a training-dynamics paper plots first; used when no --metrics are given.
DEFAULT_METRICS = ("stable_rank", "effective_rank", "alpha", "delta_init_relative", "final_relative_distance", "spectral_norm")
CKA_METRIC = "cka_final"
LOGIT_LENS_METRIC = "memorization_logit_lens"
CKA_STABLE = 0.9  # the threshold of the store's `stabilization` view
DEPTH_BINS = 4
BINS_PER_DECADE = 5
# Components in the order a reader scans a transformer block; figures show the first one present first.
COMPONENT_ORDER = ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.in", "mlp.out")


def literal(value: str | int | float) -> str:
    """A SQL literal; strings get their quotes doubled so any store text is safe to inline."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def ordered_components(components: Sequence[str]) -> list[str]:
    rank = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    return sorted(components, key=lambda c: (rank.get(c, len(rank)), c))


def in_list(column: str, values: Sequence[str | int]) -> str:
    return f"{column} IN ({', '.join(literal(v) for v in values)})"


@dataclass(frozen=True)
class Selection:
    """What a report covers, checked against the store so every later query has an answer."""

    models: list[str]
    metrics: list[str]
    components: list[str] | None  # None: every component each metric has
    heads: bool  # whether the store has the `head` column (stores before migration 0003 do not)


def _refuse_unknown(asked: Sequence[str], known: Sequence[str], what: str) -> None:
    missing = [a for a in asked if a not in known]
    if missing:
        shown = ", ".join(known[:40]) + (", …" if len(known) > 40 else "")
        raise CkptscopeError(f"{what} {', '.join(missing)} not in the store; it has: {shown or 'none'}")


def store_models(db: Store) -> list[str]:
    """The models in the store; an empty store is a user mistake with a clear next step."""
    models = db.sql("SELECT model FROM models ORDER BY model")["model"].to_list()
    if not models:
        raise CkptscopeError(f"the store {db.path} holds no models yet; run `ckptscope ingest SOURCE --store {db.path}` "
                             "(or `ckptscope demo`) first")
    return models


def select(db: Store, models: Sequence[str] | None, metrics: Sequence[str] | None,
           components: Sequence[str] | None) -> Selection:
    """Resolve the user's filters, defaulting to every model and the DEFAULT_METRICS present."""
    known_models = store_models(db)
    if models:
        _refuse_unknown(models, known_models, "model(s)")
    chosen_models = list(models) if models else known_models
    known_metrics = db.sql(f"SELECT DISTINCT metric FROM metric_values WHERE {in_list('model', chosen_models)} "
                           "ORDER BY metric")["metric"].to_list()
    if metrics:
        _refuse_unknown(metrics, known_metrics, "metric(s)")
        chosen_metrics = list(metrics)
    else:
        chosen_metrics = [m for m in DEFAULT_METRICS if m in known_metrics]
    if components:
        known_components = db.sql(f"SELECT DISTINCT component FROM metric_values WHERE {in_list('model', chosen_models)} "
                                  "ORDER BY component")["component"].to_list()
        _refuse_unknown(components, known_components, "component(s)")
    return Selection(chosen_models, chosen_metrics, list(components) if components else None,
                     db.has_column("metric_values", "head") and db.has_column("spectra", "head"))


def has_metric(db: Store, sel: Selection, metric: str) -> bool:
    return db.sql(f"SELECT count(*) AS n FROM metric_values WHERE metric = {literal(metric)} "
                  f"AND {in_list('model', sel.models)}")["n"][0] > 0


def has_rows(db: Store, relation: str, sel: Selection) -> bool:
    """Whether `relation` exists (stores made by older versions may lack it) and covers a selected model."""
    exists = db.sql(f"SELECT count(*) AS n FROM information_schema.tables WHERE table_name = {literal(relation)}")["n"][0]
    return bool(exists) and db.sql(f"SELECT count(*) AS n FROM {relation} WHERE {in_list('model', sel.models)}")["n"][0] > 0


def _component_filter(components: Sequence[str] | None) -> str:
    return f"\n  AND {in_list('component', components)}" if components else ""


def _whole_matrices(heads: bool) -> str:
    """Leave out per-head rows (the circuits analyzer's) where the store has a `head` column: one
    value or histogram per matrix, never all of a layer's heads pooled into one (per-head figures
    have their own queries)."""
    return " AND head IS NULL" if heads else ""


# -- overview -------------------------------------------------------------------------------

def models_sql(sel: Selection) -> str:
    return f"""SELECT m.model, m.architecture, m.num_layers, m.num_parameters, m.tokens_per_step,
       count(c.step) FILTER (WHERE c.status = 'ok') AS steps,
       min(c.step) FILTER (WHERE c.status = 'ok') AS first_step,
       max(c.step) FILTER (WHERE c.status = 'ok') AS last_step,
       max(c.tokens) FILTER (WHERE c.status = 'ok') AS last_tokens,
       count(c.step) FILTER (WHERE c.status <> 'ok') AS missing,
       (SELECT string_agg(DISTINCT r.analyzer || ' ' || r.version, ', ' ORDER BY r.analyzer || ' ' || r.version)
        FROM runs r WHERE r.model = m.model) AS analyzers
FROM models m LEFT JOIN checkpoints c USING (model)
WHERE {in_list('m.model', sel.models)}
GROUP BY ALL
ORDER BY m.model"""


def anomaly_summary_sql(sel: Selection) -> str:
    """Anomalies by kind: duplicate checkpoints, NaN/Inf tensors, missing revisions."""
    return f"""SELECT model, kind, count(*) AS count, count(DISTINCT step) AS steps,
       min(step) AS first_step, any_value(detail) AS example
FROM anomalies
WHERE {in_list('model', sel.models)}
GROUP BY model, kind
ORDER BY model, kind"""


def anomalies_sql(sel: Selection, limit: int) -> str:
    return f"""SELECT model, step, tensor, kind, detail
FROM anomalies
WHERE {in_list('model', sel.models)}
ORDER BY model, step, tensor NULLS FIRST, kind
LIMIT {limit}"""


def checkpoints_sql(sel: Selection) -> str:
    return f"""SELECT c.model, c.step, c.tokens, c.status, c.duplicate_of, count(a.kind) AS anomalies
FROM checkpoints c LEFT JOIN anomalies a ON a.model = c.model AND a.step = c.step
WHERE {in_list('c.model', sel.models)}
GROUP BY ALL
ORDER BY c.model, c.step"""


# -- per model and metric -------------------------------------------------------------------

def tensor_pattern(layer_column: str = "layer") -> str:
    """SQL naming a tensor with its layer number starred (`h.3.ln_1.weight` -> `h.*.ln_1.weight`).

    Tensors of one component at one layer (a norm's weight and bias, ln_1 and ln_2) are
    different matrices: the pattern tells them apart, and joins the same tensor across layers.
    """
    # The first `.N.` only, found with strpos: a regex built from each row's layer would be compiled per row.
    at = f"strpos(tensor, '.' || {layer_column} || '.')"
    return (f"CASE WHEN {at} > 0 THEN left(tensor, {at}) || '*' || substr(tensor, {at} + length({layer_column}::VARCHAR) + 1) "
            "ELSE tensor END")


def layer_grid_sql(model: str, metric: str, components: Sequence[str] | None, heads: bool) -> str:
    """One value per (component, tensor pattern, layer, step): one matrix each, never a mean of several.

    Only repeated measurements of the same matrix (several analyzer runs) are averaged.
    """
    return f"""SELECT component, {tensor_pattern()} AS pattern, layer, step, any_value(tokens) AS tokens,
       any_value(tensor) AS tensor, avg(value) AS value
FROM metrics
WHERE model = {literal(model)} AND metric = {literal(metric)} AND layer IS NOT NULL{_whole_matrices(heads)}{_component_filter(components)}
GROUP BY component, pattern, layer, step
ORDER BY component, pattern, layer, step"""


def layerless_sql(model: str, metric: str, components: Sequence[str] | None, heads: bool) -> str:
    """Tensors without a layer (embeddings, unembedding, final norm): one series per tensor."""
    return f"""SELECT component, tensor, step, any_value(tokens) AS tokens, avg(value) AS value
FROM metrics
WHERE model = {literal(model)} AND metric = {literal(metric)} AND layer IS NULL{_whole_matrices(heads)}{_component_filter(components)}
GROUP BY component, tensor, step
ORDER BY component, tensor, step"""


def metric_series_sql(model: str, metric: str, component: str | None, heads: bool) -> str:
    """Every tensor's values, with and without a layer, for static figures: one line per tensor."""
    return f"""SELECT component, layer, tensor, {tensor_pattern()} AS pattern, step, avg(value) AS value
FROM metrics
WHERE model = {literal(model)} AND metric = {literal(metric)}{_whole_matrices(heads)}{_component_filter([component] if component else None)}
GROUP BY component, layer, tensor, step
ORDER BY component, layer NULLS FIRST, tensor, step"""


def compare_sql(models: Sequence[str], metric: str, components: Sequence[str] | None, heads: bool) -> str:
    """Layers pooled into DEPTH_BINS bins of relative depth, so models of any depth share an axis."""
    return f"""SELECT model, component, least(floor(relative_depth * {DEPTH_BINS}), {DEPTH_BINS - 1})::INTEGER AS depth_bin,
       step, any_value(tokens) AS tokens, any_value(progress) AS progress,
       min(layer) AS first_layer, max(layer) AS last_layer, avg(value) AS value
FROM layer_metrics
WHERE metric = {literal(metric)} AND relative_depth IS NOT NULL AND {in_list('model', models)}{_whole_matrices(heads)}{_component_filter(components)}
GROUP BY model, component, depth_bin, step
ORDER BY model, component, depth_bin, step"""


# -- convergence and memorization -----------------------------------------------------------

def stabilization_sql(models: Sequence[str]) -> str:
    """The store's `stabilization` view (first step after which CKA stays >= 0.9), placed at relative depth."""
    return f"""SELECT s.model, s.component, s.layer, s.layer::DOUBLE / NULLIF(m.num_layers, 0) AS relative_depth,
       s.stabilization_step, c.tokens, s.stabilization_fraction
FROM stabilization s
JOIN models m USING (model)
LEFT JOIN checkpoints c ON c.model = s.model AND c.step = s.stabilization_step
WHERE s.layer IS NOT NULL AND {in_list('s.model', models)}
ORDER BY s.model, s.component, s.layer"""


def memorization_sql(models: Sequence[str]) -> str:
    return f"""SELECT s.model, s.step, c.tokens, s.memorized_rate, s.mean_score, s.sequences
FROM memorization_summary s
LEFT JOIN checkpoints c ON c.model = s.model AND c.step = s.step
WHERE {in_list('s.model', models)}
ORDER BY s.model, s.step"""


# -- spectra --------------------------------------------------------------------------------

def spectrum_candidates_sql(model: str, components: Sequence[str] | None, heads: bool) -> str:
    """Every matrix of `model` with a stored spectrum, with and without a layer; the report offers each.
    `heads`: whether the store's spectra have the `head` column (stores before migration 0003 do not)."""
    return f"""SELECT tensor, component, layer, count(DISTINCT step) AS steps
FROM spectra
WHERE model = {literal(model)} AND kind = 'weight'{_whole_matrices(heads)}{_component_filter(components)}
GROUP BY tensor, component, layer
ORDER BY layer NULLS FIRST, component, tensor"""


def spectrum_steps_sql(model: str, components: Sequence[str] | None, heads: bool) -> str:
    return f"""SELECT DISTINCT step FROM spectra
WHERE model = {literal(model)} AND kind = 'weight'{_whole_matrices(heads)}{_component_filter(components)}
ORDER BY step"""


def spectrum_sql(model: str, components: Sequence[str] | None, steps: Sequence[int], heads: bool) -> str:
    """Density of the eigenvalues λ = σ² of each matrix in log-spaced bins (BINS_PER_DECADE per decade)."""
    b = BINS_PER_DECADE
    return f"""WITH eigen AS (
  SELECT tensor, component, step, unnest(sv) ^ 2 AS ev
  FROM spectra
  WHERE model = {literal(model)} AND kind = 'weight' AND {in_list('step', steps)}{_whole_matrices(heads)}{_component_filter(components)}
), bins AS (
  SELECT tensor, component, step, floor(log10(ev) * {b}) AS bin, count(*) AS n
  FROM eigen WHERE ev > 0 GROUP BY tensor, component, step, bin
), totals AS (
  SELECT tensor, component, step, count(*) AS total, max(ev) AS ev_max
  FROM eigen WHERE ev > 0 GROUP BY tensor, component, step
)
SELECT tensor, component, step, 10 ^ ((bin + 0.5) / {b}) AS eigenvalue, n, total, ev_max,
       n / (total * (10 ^ ((bin + 1) / {b}) - 10 ^ (bin / {b}))) AS density
FROM bins JOIN totals USING (tensor, component, step)
ORDER BY tensor, component, step, eigenvalue"""


def spectrum_fit_sql(model: str, components: Sequence[str] | None, steps: Sequence[int]) -> str:
    return f"""SELECT tensor, component, step, any_value(tokens) AS tokens,
       max(value) FILTER (WHERE metric = 'alpha') AS alpha,
       max(value) FILTER (WHERE metric = 'alpha_xmin') AS alpha_xmin,
       max(value) FILTER (WHERE metric = 'num_pl_spikes') AS num_pl_spikes
FROM metrics
WHERE model = {literal(model)} AND metric IN ('alpha', 'alpha_xmin', 'num_pl_spikes')
  AND {in_list('step', steps)}{_component_filter(components)}
GROUP BY tensor, component, step
ORDER BY tensor, component, step"""


# -- seed groups ----------------------------------------------------------------------------

def seed_groups_sql(models: Sequence[str]) -> str:
    """Seed groups with a member among `models`: their members in seed order."""
    return f"""SELECT group_name, count(*) AS seeds, list(model ORDER BY seed) AS models, list(seed ORDER BY seed) AS seed_numbers
FROM models
WHERE group_name IS NOT NULL AND group_name IN (SELECT group_name FROM models WHERE {in_list('model', models)})
GROUP BY group_name
ORDER BY group_name"""


def seed_values_sql(group: str, metric: str) -> str:
    """Each seed's own values of `metric` at the steps every seed of the group has (those of `seed_metrics`)."""
    return f"""SELECT m.seed, v.model, v.step, v.layer, v.component, v.tensor, v.head, v.value
FROM metric_values v
JOIN models m USING (model)
WHERE m.group_name = {literal(group)} AND v.metric = {literal(metric)}
  AND v.step IN (SELECT DISTINCT step FROM seed_metrics WHERE group_name = {literal(group)} AND metric = {literal(metric)})
ORDER BY v.tensor, v.component, v.head NULLS FIRST, m.seed, v.step"""


def seed_cka_sql(group: str) -> str:
    """Cross-seed CKA (the `seed_similarity` view's `cka_seed`) per component and layer over steps."""
    return f"""SELECT component, layer, step, tokens, n_pairs, mean, std, min, max
FROM seed_similarity
WHERE group_name = {literal(group)} AND metric = 'cka_seed'
ORDER BY component, layer, step"""


def training_phases_sql(group: str) -> str:
    """The HMM state of each seed's steps (`ckptscope phases GROUP`), in seed order."""
    return f"""SELECT m.seed, p.model, p.step, c.tokens, p.state, p.probability
FROM training_phases p
JOIN models m USING (model)
LEFT JOIN checkpoints c ON c.model = p.model AND c.step = p.step
WHERE m.group_name = {literal(group)}
ORDER BY m.seed, p.step"""


# -- memorisation profiles ------------------------------------------------------------------

def profiles_sql(models: Sequence[str]) -> str:
    """The stored profiles: one per model, outcome and control group, each drawn on its own."""
    return f"""SELECT DISTINCT model, outcome, control
FROM memorization_profile
WHERE {in_list('model', models)}
ORDER BY model, outcome, control"""


def _profile_where(model: str, outcome: str, control: str, alias: str = "") -> str:
    return " AND ".join(f"{alias}{c} = {literal(v)}" for c, v in (("model", model), ("outcome", outcome), ("control", control)))


def profile_cells_sql(model: str, outcome: str, control: str) -> str:
    """ATT(g, t) of one profile, per cohort g (`cohort_step`) and checkpoint t (`step`): the heatmap."""
    return f"""SELECT p.cohort_step, p.step, c.tokens, p.event_time, p.att, p.se, p.ci_low, p.ci_high, p.n_treated, p.n_control
FROM memorization_profile p
LEFT JOIN checkpoints c ON c.model = p.model AND c.step = p.step
WHERE {_profile_where(model, outcome, control, "p.")}
ORDER BY p.cohort_step, p.step"""


def profile_summary_sql(model: str, outcome: str, control: str, kind: str | None = None) -> str:
    """The aggregates of one profile (instantaneous, persistent by event time, residual), or those of one kind."""
    only = f" AND kind = {literal(kind)}" if kind else ""
    return f"""SELECT kind, event_time, at_step, att, se, ci_low, ci_high, n_cohorts, n_treated
FROM memorization_profile_summary
WHERE {_profile_where(model, outcome, control)}{only}
ORDER BY CASE kind WHEN 'instantaneous' THEN 0 WHEN 'persistent' THEN 1 ELSE 2 END, event_time"""


SPIKES_SHOWN = 64  # the largest eigenvalues above bulk_max marked per matrix and step


def spectrum_mp_sql(model: str, components: Sequence[str] | None, steps: Sequence[int]) -> str:
    """The Marchenko–Pastur fit of `mp_fit` per matrix and step, with what drawing it needs from the
    stored spectrum: Q = long/short side, W² = number of eigenvalues / Σλ (mp_fit's rescaling), and
    the eigenvalues above bulk_max (their number, and the largest SPIKES_SHOWN)."""
    return f"""WITH fit AS (
  SELECT tensor, component, step,
         max(value) FILTER (WHERE metric = 'sigma_mp') AS sigma_mp,
         max(value) FILTER (WHERE metric = 'bulk_min') AS bulk_min,
         max(value) FILTER (WHERE metric = 'bulk_max') AS bulk_max,
         max(value) FILTER (WHERE metric = 'num_spikes') AS num_spikes
  FROM metrics
  WHERE model = {literal(model)} AND analyzer = 'mp_fit' AND head IS NULL
    AND metric IN ('sigma_mp', 'bulk_min', 'bulk_max', 'num_spikes') AND {in_list('step', steps)}{_component_filter(components)}
  GROUP BY tensor, component, step
), eigen AS (
  SELECT tensor, component, step, greatest(rows, cols) / least(rows, cols) AS q,
         list_transform(sv, lambda s: s * s) AS ev
  FROM spectra
  WHERE model = {literal(model)} AND kind = 'weight' AND head IS NULL AND tier = 'exact'
    AND {in_list('step', steps)}{_component_filter(components)}
)
SELECT tensor, component, step, sigma_mp, bulk_min, bulk_max, num_spikes, q,
       len(ev) / list_sum(ev) AS w_scale2,
       len(list_filter(ev, lambda e: e > bulk_max)) AS above,
       list_slice(list_reverse_sort(list_filter(ev, lambda e: e > bulk_max)), 1, {SPIKES_SHOWN}) AS spikes
FROM fit JOIN eigen USING (tensor, component, step)
WHERE sigma_mp IS NOT NULL AND bulk_max IS NOT NULL
ORDER BY tensor, component, step"""
