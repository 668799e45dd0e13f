"""Memorisation-profile computation at Pythia's scale: 154 checkpoints x 100,000 sequences.

Why: `analyze profile` reads every `sequence_stats` row of a model and estimates ATT(g, t) for
143 cohorts x 153 checkpoints (~22k cells) plus the summary; at Pythia's scale that is 15.4M
rows, and the computation must stay interactive.

How: a `sequence_stats`-shaped polars frame is synthesized in memory: Pythia's checkpoint steps
(0, 1, 2, 4, ..., 512, 1000, ..., 143000), 600 train sequences per 1000-step cohort (143 cohorts,
first_seen_step uniform within the cohort's interval, after step 512 for the first) and 14,200 heldout ones (100,000 sequences,
15.4M rows), outcome = sequence level + trend + planted effect + noise, rows shuffled. Then
`compute_profile` runs without bootstrap (`--repeats` times, median reported), and with
`--bootstrap` multiplier draws. Peak RSS is the process high-water mark, reset before each
timed call where the kernel allows (/proc/self/clear_refs), and the frame's own size is shown.

    POLARS_MAX_THREADS=2 OMP_NUM_THREADS=1 python benchmarks/bench_profile.py [--bootstrap 100] [--early-cohorts]

OMP_NUM_THREADS=1: the matrices are small (154 x 154); on a busy 2-core machine two BLAS threads
made the aggregation 10x slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import polars as pl

from ckptscope.profile import compute_profile

PYTHIA_STEPS = np.array([0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000)), dtype=np.int64)


def synthesize(per_cohort: int = 600, heldout: int = 14_200, seed: int = 0, early: bool = False) -> pl.DataFrame:
    """A sequence_stats frame for one model: 143 intervals of `per_cohort` plus `heldout` sequences.

    `early`: the first interval's sequences are spread over steps 1..1000, so they form cohorts at
    Pythia's log-spaced checkpoints 1, 2, 4, ..., 512 too (153 cohorts, ~1,300 distinct event times).
    """
    rng = np.random.default_rng(seed)
    steps = PYTHIA_STEPS
    cohort_steps = np.arange(1000, 143001, 1000)
    # first_seen_step uniform in (g - 1000, g]; for g = 1000 only in (512, 1000], so that the
    # 143 cohorts are Pythia's 1000-step intervals (earlier steps would form cohorts 1, 2, 4, ...)
    first = np.concatenate([g - rng.integers(0, 488 if g == 1000 and not early else 1000, per_cohort) for g in cohort_steps])
    n_train = len(first)
    n = n_train + heldout
    ids = pl.Series("sequence_id", [f"train:{i}" for i in range(n_train)] + [f"heldout:{i}" for i in range(heldout)])
    g_idx = np.searchsorted(steps, first)  # checkpoint index of each train sequence's cohort
    y = rng.normal(3.0, 0.5, (n, 1)) + 2.0 * np.exp(-steps / 20_000.0)[None, :] + rng.normal(0.0, 0.3, (n, len(steps)))
    k = np.arange(len(steps))[None, :] - g_idx[:, None]
    y[:n_train] -= np.where(k >= 0, 0.1 + 0.4 * 0.5 ** np.maximum(k, 0), 0.0)
    unit = np.repeat(np.arange(n), len(steps))
    frame = pl.DataFrame({
        "model": pl.Series(["pythia-synthetic"]).gather(np.zeros(n * len(steps), dtype=np.int64)),
        "step": np.tile(steps, n),
        "sequence_id": ids.gather(unit),
        "split": pl.Series(["train", "heldout"]).gather((unit >= n_train).astype(np.int64)),
        "first_seen_step": pl.Series(np.concatenate([first, np.zeros(heldout, dtype=np.int64)])).gather(unit),
        "sup_seq": y.ravel(),
    }).with_columns(pl.when(pl.col("split") == "heldout").then(None).otherwise(pl.col("first_seen_step")).alias("first_seen_step"))
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def timed(stats: pl.DataFrame, **kwargs) -> tuple[float, float, object]:
    reset_peak()
    start = time.perf_counter()
    result = compute_profile(stats, **kwargs)
    return time.perf_counter() - start, rss_mib("VmHWM"), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, nargs="*", default=[100])
    parser.add_argument("--early-cohorts", action="store_true", help="also cohorts at steps 1..512 (see synthesize)")
    args = parser.parse_args()

    start = time.perf_counter()
    stats = synthesize(early=args.early_cohorts)
    print(f"synthesized {stats.height:,} rows ({stats['sequence_id'].n_unique():,} sequences, {len(PYTHIA_STEPS)} checkpoints) "
          f"in {time.perf_counter() - start:.1f} s; frame {stats.estimated_size('mb'):.0f} MiB, RSS now {rss_mib('VmRSS'):.0f} MiB")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS', '-')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"peak reset {'yes' if reset_peak() else 'no'}")
    for control in ("heldout", "not-yet-treated"):
        runs = [timed(stats, control=control) for _ in range(args.repeats)]
        cells, summary = runs[-1][2]
        inst = summary.filter(pl.col("kind") == "instantaneous").row(0, named=True)
        print(f"control={control:16s} analytic: median {statistics.median(r[0] for r in runs):6.2f} s "
              f"(runs {', '.join(f'{r[0]:.2f}' for r in runs)}), peak RSS {max(r[1] for r in runs):.0f} MiB; "
              f"{cells.height:,} cells, {summary.height} summary rows; instantaneous ATT {inst['att']:.3f} +- {inst['se']:.3f} (planted -0.5)")
        for draws in args.bootstrap:
            seconds, peak, _ = timed(stats, control=control, bootstrap=draws, seed=1)
            print(f"control={control:16s} bootstrap {draws}: {seconds:6.2f} s, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
