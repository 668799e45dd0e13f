"""A/B of the ingest full step between two versions of ckptscope's code, on the same checkpoints.

Why: "no slower than before" (a refactor, a new default) is a few percent at most, below what two
runs minutes apart on a shared machine agree to. So both versions run on one checkpoint run with
Pythia's shapes (`bench_analyzers.build`: steps 0, 500, 1000, 2000), each in a fresh process with
its own `src` directory first on the path, alternating, and the step-1000 time `ckptscope.ingest`
reports is compared (reading, analysis, store writes; steps 0 and 2000 open as references).

    git worktree add /tmp/old bcbdd55
    python benchmarks/bench_ab.py --old /tmp/old/src --new src --model 160m --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_analyzers import SHAPES, build

CHILD = r"""
import sys, tempfile, ckptscope
with tempfile.TemporaryDirectory() as t:
    r = ckptscope.ingest(sys.argv[1], store=f"{t}/s.duckdb", steps="500,1000", force=True, analyzers=sys.argv[2])
    print(r.filter(r["step"] == 1000)["seconds"].item())
"""


def step_seconds(src: Path, root: Path, analyzers: str) -> float:
    """One fresh process importing ckptscope from `src`: the step-1000 seconds it reports."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), analyzers], env=env, capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the `src` directory of the version to compare against")
    ap.add_argument("--new", type=Path, required=True, help="the `src` directory of the version under test")
    ap.add_argument("--model", choices=sorted(SHAPES), default="160m")
    ap.add_argument("--runs", type=int, default=3, help="runs of each version, alternating; medians are compared")
    ap.add_argument("--analyzers", default="weights", help="the analyzers both versions run (both must know them)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    for side in (args.old, args.new):
        if not (side / "ckptscope" / "__init__.py").is_file():
            ap.error(f"{side} holds no ckptscope package; give a checkout's src directory")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        build(args.model, root)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.runs):  # alternating, so a change of load touches both alike
            for name, src in (("old", args.old), ("new", args.new)):
                times[name].append(step_seconds(src, root, args.analyzers))
                print(f"{name} {times[name][-1]:.2f} s", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"\n| pythia-{args.model} | old ({args.old}) | new ({args.new}) | change |\n| --- | --- | --- | --- |")
    print(f"| step-1000 s, median of {args.runs} | {old:.2f} ({', '.join(f'{t:.2f}' for t in times['old'])}) | "
          f"{new:.2f} ({', '.join(f'{t:.2f}' for t in times['new'])}) | {100 * (new / old - 1):+.1f}% |")


if __name__ == "__main__":
    main()
