-- ckptscope core tables as first released (migration 0001_core_tables); later migrations
-- (store/migrations.py) extend them. A public API: every table and view is documented in the docs.

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
    sv        DOUBLE[] NOT NULL         -- all min(rows, cols) values (tier exact) or the top k (tier fast)
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
