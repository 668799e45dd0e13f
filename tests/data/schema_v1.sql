-- ckptscope store schema, version 1. A public API: every table and view is documented in README.md.

CREATE TABLE IF NOT EXISTS meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- One row per model (a training run or a published suite member).
CREATE TABLE IF NOT EXISTS models (
    model           VARCHAR PRIMARY KEY,
    source          VARCHAR NOT NULL,   -- local path or hub repo id
    architecture    VARCHAR NOT NULL,   -- family: gpt_neox, llama, gpt2, bert, unknown
    num_layers      INTEGER,
    num_parameters  BIGINT,
    tokens_per_step BIGINT,
    config          JSON,
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- One row per step of a model: ingested, duplicate of another step, or missing.
CREATE TABLE IF NOT EXISTS checkpoints (
    model        VARCHAR NOT NULL,
    step         BIGINT NOT NULL,
    tokens       BIGINT,
    revision     VARCHAR,               -- directory name or hub revision
    source       VARCHAR NOT NULL,
    content_hash VARCHAR,               -- sha256 over the weight files, in name order
    duplicate_of BIGINT,                -- earlier step with byte-identical weights
    status       VARCHAR NOT NULL,      -- ok | missing (revision without weights)
    ingested_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (model, step)
);

-- One row per analyzer execution on one checkpoint: the provenance of every metric row.
CREATE SEQUENCE IF NOT EXISTS run_ids START 1;
CREATE TABLE IF NOT EXISTS runs (
    run_id      BIGINT PRIMARY KEY,
    model       VARCHAR NOT NULL,
    step        BIGINT NOT NULL,
    analyzer    VARCHAR NOT NULL,
    version     VARCHAR NOT NULL,
    parameters  JSON NOT NULL,
    dtype       VARCHAR NOT NULL,       -- precision of the computation (float64)
    backend     VARCHAR NOT NULL,       -- e.g. torch-2.13.0/cpu
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- One row per stored parameter of a checkpoint (buffers skipped).
CREATE TABLE IF NOT EXISTS tensors (
    model     VARCHAR NOT NULL,
    step      BIGINT NOT NULL,
    tensor    VARCHAR NOT NULL,         -- parameter name as stored in the checkpoint
    layer     INTEGER,
    component VARCHAR NOT NULL,
    shape     BIGINT[] NOT NULL,        -- as stored
    dtype     VARCHAR NOT NULL,         -- storage dtype, e.g. float16
    PRIMARY KEY (model, step, tensor)
);

-- Long-format statistics. component distinguishes the parts of a fused tensor (attn.qkv vs attn.q/k/v).
CREATE TABLE IF NOT EXISTS metric_values (
    run_id    BIGINT NOT NULL,
    model     VARCHAR NOT NULL,
    step      BIGINT NOT NULL,
    tensor    VARCHAR NOT NULL,
    layer     INTEGER,
    component VARCHAR NOT NULL,
    metric    VARCHAR NOT NULL,
    value     DOUBLE
);

-- Singular values (descending) of every analyzed matrix: of W itself (kind 'weight'),
-- of W - W_first ('delta_init') and W - W_previous ('delta_prev').
CREATE TABLE IF NOT EXISTS spectra (
    run_id    BIGINT NOT NULL,
    model     VARCHAR NOT NULL,
    step      BIGINT NOT NULL,
    tensor    VARCHAR NOT NULL,
    layer     INTEGER,
    component VARCHAR NOT NULL,
    kind      VARCHAR NOT NULL,
    rows      BIGINT NOT NULL,          -- oriented (out, in) shape of the matrix
    cols      BIGINT NOT NULL,
    sv        DOUBLE[] NOT NULL
);

-- Problems found while ingesting; they never stop a run.
CREATE TABLE IF NOT EXISTS anomalies (
    run_id   BIGINT,                    -- the analyzer run that found it; NULL for checkpoint-level ones
    model    VARCHAR NOT NULL,
    step     BIGINT NOT NULL,
    tensor   VARCHAR,                   -- NULL for checkpoint-level anomalies
    kind     VARCHAR NOT NULL,          -- nan | inf | duplicate_checkpoint | missing_revision
    detail   VARCHAR NOT NULL,
    found_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Pythia memorization score per sequence and step (analyzer `memorization`).
CREATE TABLE IF NOT EXISTS memorization (
    run_id          BIGINT NOT NULL,
    model           VARCHAR NOT NULL,
    step            BIGINT NOT NULL,
    sequence_id     VARCHAR NOT NULL,
    score           DOUBLE NOT NULL,    -- fraction of the continuation reproduced by greedy decoding
    memorized       BOOLEAN NOT NULL,   -- score = 1
    loss            DOUBLE,             -- mean cross-entropy (nats/token) of the true continuation
    first_seen_step BIGINT              -- when the sequence was trained on, if known
);

CREATE OR REPLACE VIEW metrics AS
SELECT v.model, v.step, c.tokens, v.layer, v.component, v.tensor, v.metric, v.value,
       r.analyzer, r.version AS analyzer_version, v.run_id
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

CREATE OR REPLACE VIEW memorization_summary AS
SELECT model, step, count(*) AS sequences, avg(memorized::INTEGER) AS memorized_rate,
       avg(score) AS mean_score, avg(loss) AS mean_loss
FROM memorization GROUP BY model, step;

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
