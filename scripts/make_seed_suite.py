"""Train a few seeds of the demo model, briefly: a real seed group for tests and examples.

Why
---
`ckptscope seeds` and `ckptscope phases` compare replicates of one recipe that differ only in
their seed, as PolyPythias does (the seed sets both the initialization and the data order).
The embedded demo suite is one run; this makes several, small and fast enough to build inside a
test fixture (a few seconds on one CPU core).

How
---
The demo suite's recipe (scripts/make_demo_suite.py: its GPT-NeoX config, text and checkpoint
layout), with its shipped tokenizer, for `--train-steps` steps of `--batch` windows, one of which
is a canary (so the memorization analyzer has per-sequence outcomes that change). Seed K
initializes the model with `torch.manual_seed(K)` and draws the batches from a generator seeded
K + 1; the canaries are the demo suite's. Run K is written to `OUT/seedK/step{N}/` at a
log-spaced grid; `OUT/canaries.jsonl` holds the canaries in the memorization corpus format.

Usage::

    python scripts/make_seed_suite.py --out /tmp/seeds --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_suite import SEQ_LEN, make_config, read_text, save_checkpoint, split_windows  # noqa: E402

DEMO = Path(str(files("ckptscope") / "demo_suite"))
TRAIN_STEPS = 64
STEPS = (0, 1, 2, 4, 8, 16, 32, 64)
BATCH = 8
NUM_CANARIES = 4
LR = 3e-3


def make_seed_suite(out: Path, seeds: tuple[int, ...] = (1, 2, 3), *, train_steps: int = TRAIN_STEPS,
                    steps: tuple[int, ...] = STEPS) -> dict[int, Path]:
    """Train one run per seed into `out/seedK`; returns seed -> run directory."""
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    _, text = read_text()
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    *_, starts = split_windows(ids, torch.Generator().manual_seed(0))  # background windows: those the demo trains on
    canaries = [json.loads(line)["tokens"] for line in (DEMO / "canaries.jsonl").read_text().splitlines()[:NUM_CANARIES]]
    with open(out / "canaries.jsonl", "w") as f:
        for i, row in enumerate(canaries):
            f.write(json.dumps({"id": f"canary-{i}", "tokens": row}) + "\n")
    canary_ids = torch.tensor(canaries, dtype=torch.long)
    runs = {}
    for seed in seeds:
        run = out / f"seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        _train(run, seed, ids, starts, canary_ids, eos_id, train_steps, steps)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the memorization analyzer reads the final step's tokenizer
            shutil.copy(DEMO / name, run / f"step{max(steps)}" / name)
        runs[seed] = run
    return runs


def _train(run: Path, seed: int, ids: torch.Tensor, starts: torch.Tensor, canaries: torch.Tensor, eos_id: int,
           train_steps: int, steps: tuple[int, ...]) -> None:
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(make_config(eos_id))
    model.config.dtype = torch.float16
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    data = torch.Generator().manual_seed(seed + 1)
    offsets = torch.arange(SEQ_LEN)
    save_checkpoint(model, run / "step0")
    for step in range(1, train_steps + 1):
        picks = starts[torch.randint(len(starts), (BATCH - 1,), generator=data)]
        batch = torch.cat([ids[picks[:, None] + offsets], canaries[step % len(canaries)][None]])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step in steps:
            save_checkpoint(model, run / f"step{step}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for seedK/ runs (replaced)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    grid = tuple(s for s in (0, *(2**k for k in range(20))) if s <= args.train_steps)
    for seed, run in make_seed_suite(args.out, seeds, train_steps=args.train_steps, steps=grid).items():
        print(f"seed {seed}: {run}")
    print(f"ingest each with: ckptscope ingest {args.out}/seedK --name seedK --group demo-seeds --seed K "
          f"--tokens-per-step {BATCH * SEQ_LEN}")


if __name__ == "__main__":
    main()
