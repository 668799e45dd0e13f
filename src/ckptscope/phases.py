"""Training phases: a Gaussian HMM over per-step metric vectors, fitted across the seeds of a group.

After Hu, Chen, Saphra and Cho, "Latent State Models of Training Dynamics" (TMLR 2023): each
checkpoint becomes a vector of summary statistics, z-scored per model over its steps; one
`hmmlearn.hmm.GaussianHMM` (diagonal covariances) is fitted to the sequences of every model of
the group jointly, for 1..`max_states` states with several restarts each, and the number of
states with the lowest BIC is kept. A model's phases are its Viterbi path, with each step's
posterior probability of the state on that path.

This reads the store, not checkpoints, so it is `ckptscope phases`, not an `analyze NAME`
analyzer. Results go to the core table `training_phases` (one row per model and step) and, per
model, one `runs` row (analyzer 'phases', at the model's last step) whose parameters hold the
features, the BIC of every candidate and the fitted means, covariances, start and transition
probabilities.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from ckptscope.errors import CkptscopeError
from ckptscope.store.db import Store, default_store_path

VERSION = "1.0.0"
# The default features: per step, the mean over every weight matrix of each of these per-layer
# weight statistics (present for any `weights` run, whatever its --spectrum tier).
# After Hu et al.'s weight statistics (l2 norm, spectral norm, singular-value spread, mean and variance of
# the weights); all are defined at step 0, unlike updates since the previous step.
DEFAULT_METRICS = ("frobenius_norm", "spectral_norm", "stable_rank", "mean", "std")
RESTARTS = 5


def features(db: Store, models: list[str], metrics: tuple[str, ...]) -> pl.DataFrame:
    """model, step, one column per metric: the mean over layer tensors (whole matrices) at steps where every metric is present."""
    whole = " AND head IS NULL" if db.has_column("metric_values", "head") else ""  # not circuits' per-head rows
    rows = db.sql(f"""
        SELECT model, step, metric, avg(value) AS value FROM metric_values
        WHERE model IN ({', '.join('?' * len(models))}) AND metric IN ({', '.join('?' * len(metrics))})
          AND layer IS NOT NULL AND isfinite(value){whole}
        GROUP BY model, step, metric""", [*models, *metrics])
    missing = sorted(set(metrics) - set(rows["metric"].unique().to_list()))
    if missing:
        raise CkptscopeError(f"metric {missing[0]} is not in the store for {', '.join(models)}; choose --metrics among "
                             "the metrics of `metric_values` (run the weights analyzer for the default ones)")
    wide = rows.pivot(on="metric", index=["model", "step"], values="value").drop_nulls().sort("model", "step")
    return wide.select("model", "step", *metrics)


def _standardize(x: np.ndarray) -> np.ndarray:
    """z-score each column over a model's steps; a constant column becomes 0."""
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def fit_phases(target: str, *, store: str | Path | None = None, metrics: tuple[str, ...] | list[str] | None = None,
               max_states: int = 8, seed: int = 0, write: bool = True) -> pl.DataFrame:
    """Fit training phases to a model, or jointly to every seed of a group, and store them.

    `target` is a seed group (models.group_name) or a model. `metrics` are names in `metric_values`
    (default `DEFAULT_METRICS`), each averaged over the layer tensors of a step. Candidates with
    1..`max_states` states are fitted (`RESTARTS` restarts each, seeded from `seed`) and the lowest
    BIC wins. Returns model, step, state, probability (and writes them, unless `write` is False).
    The same store and arguments give the same states.
    """
    from hmmlearn.hmm import GaussianHMM

    metrics = tuple(metrics or DEFAULT_METRICS)
    if max_states < 1:
        raise CkptscopeError(f"--max-states {max_states}: give at least 1")
    path = Path(store) if store is not None else default_store_path()
    with Store(path, read_only=True) as db:
        models = _models(db, target)
        table = features(db, models, metrics)
    sequences = [(m, part) for (m,), part in table.group_by(["model"], maintain_order=True)]
    short = [m for m, part in sequences if part.height < 2]
    if short or len(sequences) < len(models):
        who = short or sorted(set(models) - {m for m, _ in sequences})
        raise CkptscopeError(f"model {who[0]} has fewer than 2 steps with every metric of --metrics; ingest more steps")
    x = np.concatenate([_standardize(part.select(metrics).to_numpy().astype(np.float64)) for _, part in sequences])
    lengths = [part.height for _, part in sequences]
    rng = np.random.default_rng(seed)
    candidates = []
    for n in range(1, max_states + 1):
        if free_parameters(n, x.shape[1]) >= len(x):  # more parameters than steps: a degenerate fit, BIC meaningless
            break
        best = None
        for _ in range(RESTARTS):
            hmm = GaussianHMM(n_components=n, covariance_type="diag", n_iter=200, tol=1e-4,
                              random_state=int(rng.integers(2**31 - 1)), min_covar=1e-3)
            with warnings.catch_warnings(), _quiet():  # hmmlearn logs restarts that stop improving; the best restart is kept
                warnings.simplefilter("ignore")
                try:
                    hmm.fit(x, lengths)
                    score = hmm.score(x, lengths)
                except ValueError:  # a state no step stays in (its transition row is empty): more states than the data holds
                    continue
            if best is None or score > best[0]:
                best = (score, hmm)
        if best is not None:
            candidates.append((best[1].bic(x, lengths), n, best[1]))
    if not candidates:
        raise CkptscopeError(f"{len(x)} steps of {len(metrics)} metrics are too few to fit even one state "
                             f"({free_parameters(1, x.shape[1])} parameters); ingest more steps or pass fewer --metrics")
    bic, n, hmm = min(candidates, key=lambda c: (c[0], c[1]))
    out = []
    start = 0
    for (model, part), length in zip(sequences, lengths):
        xs = x[start:start + length]
        start += length
        _, states = hmm.decode(xs, algorithm="viterbi")
        post = hmm.predict_proba(xs)
        out.append(pl.DataFrame({"model": model, "step": part["step"], "state": states.astype(np.int32),
                                 "probability": post[np.arange(length), states]}))
    phases = pl.concat(out)
    if write:
        params = {"target": target, "models": models, "metrics": list(metrics), "max_states": max_states, "seed": seed,
                  "restarts": RESTARTS, "covariance_type": "diag", "standardized": "per model over its steps",
                  "n_states": n, "bic": bic, "bic_by_states": {str(k): b for b, k, _ in candidates},
                  "startprob": hmm.startprob_.tolist(), "transmat": hmm.transmat_.tolist(), "means": hmm.means_.tolist(),
                  "covars": np.array([np.diag(c) for c in hmm.covars_]).tolist()}
        runs = [(m, int(part["step"].max()), VERSION, params) for m, part in sequences]
        with Store(path) as db:
            db.write_training_phases(runs, phases)
    return phases


def free_parameters(n: int, d: int) -> int:
    """Free parameters of an n-state diagonal Gaussian HMM over d features: start, transitions, means, variances."""
    return (n - 1) + n * (n - 1) + 2 * n * d


@contextmanager
def _quiet() -> Iterator[None]:
    log = logging.getLogger("hmmlearn")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _models(db: Store, target: str) -> list[str]:
    from ckptscope.seeds import has_groups

    if has_groups(db):
        members = db.sql("SELECT model FROM models WHERE group_name = ? ORDER BY seed", [target])["model"].to_list()
        if members:
            return members
    if db.model(target) is not None:
        return [target]
    raise CkptscopeError(f"{target!r} is neither a seed group nor a model in {db.path}; see `ckptscope ls`")
