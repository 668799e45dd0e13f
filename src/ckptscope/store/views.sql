-- Views over the core tables, re-created whenever a migration runs (they follow the columns).

CREATE OR REPLACE VIEW metrics AS
SELECT v.model, v.step, c.tokens, v.layer, v.component, v.tensor, v.metric, v.value,
       r.analyzer, r.version AS analyzer_version, v.tier, v.head, v.run_id
FROM metric_values v
JOIN runs r USING (run_id)
LEFT JOIN checkpoints c ON c.model = v.model AND c.step = v.step;

-- Metrics with layers at relative depth and steps as training progress, for comparing
-- models of different depth and length on one axis.
CREATE OR REPLACE VIEW layer_metrics AS
SELECT m.*, m.layer::DOUBLE / NULLIF(md.num_layers, 0) AS relative_depth,
       m.step::DOUBLE / NULLIF(last.last_step, 0) AS progress
FROM metrics m
JOIN models md USING (model)
JOIN (SELECT model, max(step) AS last_step FROM checkpoints WHERE status = 'ok' GROUP BY model) last USING (model);

-- First step from which CKA to the final checkpoint stays at or above `threshold` for good.
CREATE OR REPLACE MACRO stabilization_at(threshold) AS TABLE
SELECT model, layer, component, min(step) AS stabilization_step,
       min(step)::DOUBLE / any_value(last_step) AS stabilization_fraction
FROM (
    SELECT m.model, m.layer, m.component, m.step, l.last_step,
           min(m.value) OVER (PARTITION BY m.model, m.layer, m.component ORDER BY m.step DESC) AS worst_after
    FROM metrics m
    JOIN (SELECT model, max(step) AS last_step FROM checkpoints WHERE status = 'ok' GROUP BY model) l USING (model)
    WHERE m.metric = 'cka_final'
)
WHERE worst_after >= threshold
GROUP BY model, layer, component;

CREATE OR REPLACE VIEW stabilization AS SELECT * FROM stabilization_at(0.9);

-- Across the seeds of a group (models.group_name): one row per step every seed has and per
-- layer, component, tensor, head and metric. tokens is NULL unless every seed has the same count.
CREATE OR REPLACE VIEW seed_metrics AS
WITH members AS (SELECT model, group_name FROM models WHERE group_name IS NOT NULL),
common AS (
    SELECT m.group_name, c.step,
           CASE WHEN count(c.tokens) = count(*) AND min(c.tokens) = max(c.tokens) THEN min(c.tokens) END AS tokens
    FROM checkpoints c JOIN members m USING (model)
    WHERE c.status = 'ok'
    GROUP BY m.group_name, c.step
    HAVING count(DISTINCT c.model) = (SELECT count(*) FROM members g WHERE g.group_name = m.group_name)
)
SELECT m.group_name, v.step, any_value(c.tokens) AS tokens, v.layer, v.component, v.tensor, v.metric, v.head,
       count(v.value) AS n_seeds, avg(v.value) AS mean, stddev_samp(v.value) AS std, min(v.value) AS min, max(v.value) AS max
FROM metric_values v
JOIN members m USING (model)
JOIN common c ON c.group_name = m.group_name AND c.step = v.step
GROUP BY m.group_name, v.step, v.layer, v.component, v.tensor, v.metric, v.head;

-- Across the seed pairs of a group: `convergence --reference-model` rows (cka_model,
-- cka_model_debiased, model_relative_distance) of a model against another seed of its group,
-- averaged over the pairs, as metrics cka_seed, cka_seed_debiased and seed_relative_distance.
-- Each unordered pair counts once (run both ways, the lower seed's run against the higher is
-- kept); n_pairs says how many pairs a row averages, of n_seeds·(n_seeds−1)/2.
CREATE OR REPLACE VIEW seed_similarity AS
WITH pairs AS (
    SELECT a.group_name, v.step, v.layer, v.component, v.tensor, v.value,
           CASE v.metric WHEN 'cka_model' THEN 'cka_seed' WHEN 'cka_model_debiased' THEN 'cka_seed_debiased'
                         ELSE 'seed_relative_distance' END AS metric
    FROM metric_values v
    JOIN runs r USING (run_id)
    JOIN models a ON a.model = v.model
    JOIN models b ON b.model = r.parameters->>'reference_model'
    WHERE v.metric IN ('cka_model', 'cka_model_debiased', 'model_relative_distance')
      AND a.group_name IS NOT NULL AND a.group_name = b.group_name AND a.seed <> b.seed
    QUALIFY row_number() OVER (PARTITION BY a.group_name, least(a.seed, b.seed), greatest(a.seed, b.seed), v.step, v.tensor,
                                            v.component, v.metric ORDER BY a.seed < b.seed DESC) = 1
)
SELECT p.group_name, p.step, any_value(c.tokens) AS tokens, p.layer, p.component, p.tensor, p.metric,
       count(*) AS n_pairs, avg(p.value) AS mean, stddev_samp(p.value) AS std, min(p.value) AS min, max(p.value) AS max
FROM pairs p
LEFT JOIN (SELECT m.group_name, c.step, CASE WHEN count(c.tokens) = count(*) AND min(c.tokens) = max(c.tokens) THEN min(c.tokens) END AS tokens
           FROM checkpoints c JOIN models m USING (model) WHERE m.group_name IS NOT NULL AND c.status = 'ok'
           GROUP BY m.group_name, c.step) c ON c.group_name = p.group_name AND c.step = p.step
GROUP BY p.group_name, p.step, p.layer, p.component, p.tensor, p.metric;
