"""Build the embedded demo checkpoint suite shipped as ``ckptscope/demo_suite``.

Why
---
``ckptscope demo`` and the test-suite need a real training run to analyze
without downloading Pythia: a model with the GPT-NeoX (Pythia) architecture,
trained on real English text, saved at a Pythia-like log-spaced step grid and
laid out like a Pythia release (one ``step{N}/`` directory per checkpoint with
``config.json`` and float16 ``model.safetensors``), with its training data order
shipped like Pythia's pre-shuffled Pile (an ``MMapIndexedDataset``).  The run is
tiny enough to ship in the wheel yet actually learns: its loss falls clearly, it
memorizes a few planted "canary" sequences, and training on a text window
lowers that window's surprisal measurably at the next checkpoint, so weight
analyzers (spectra, ranks, norms, deltas vs step 0), activation analyzers (CKA
to the final checkpoint, memorization) and memorisation profiles
(``corpus from-data`` -> ``sequence_stats`` -> ``analyze profile``) have real
dynamics to show.

How
---
1. Read ``scripts/data/kjv_genesis_exodus_matthew.txt`` (public-domain King
   James Bible text, committed so this needs no apt; its first line names the
   source and is skipped).
2. Train a 512-token byte-level BPE with ``tokenizers``; save it as
   ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by
   ``transformers.AutoTokenizer``).
3. Cut the token stream into 64-token blocks: 32 evenly spaced ones are the
   CKA probes (``probe.jsonl``); one random draw from the others gives
   NUM_HELDOUT never-trained held-out blocks (``data/heldout.{bin,idx}``)
   and the once-seen blocks.  Background windows (any start) never overlap
   any of these.  Draw 8 random 64-token canaries (``canaries.jsonl``).
4. Write the whole data order first, as the MMapIndexedDataset
   ``data/train.{bin,idx}`` (``ckptscope.data_order.write_indexed_dataset``):
   2000 batches of BATCH_SIZE 64-token sequences; the batch of update k
   (checkpoint k-1 -> k) is items [(k-1)·B, k·B), so item i has
   first_seen_step ⌊i/B⌋ + 1.  The batches of steps 1007, 1015, ..., 1999
   (ONCE_STEPS) hold B once-seen blocks: text that no other training
   sequence contains, trained on exactly once.  Every other batch is B - 1
   background windows (text seen many times over) plus one canary (cycling
   through the 8).  The demo profiles the once-seen sequences against the
   held-out ones (``corpus from-data --steps 1007:1999:8``): both are one
   random draw of blocks, so they move alike until the once-seen ones are
   trained on (parallel trends), and the profile shows a clear drop in
   surprisal at the checkpoint after training that decays afterwards.
5. Train ``GPTNeoXForCausalLM`` (hidden 32, 4 layers, 4 heads, MLP 128,
   rotary_pct 0.25, parallel residual, untied head) in float32 with AdamW,
   linear warmup + cosine decay, for 2000 steps, reading each batch back
   from the written dataset.  Step 0 is the initialization.
6. At every grid step save a float16 copy of the state dict with
   ``safetensors`` under Pythia's tensor names (the LM head as
   ``embed_out.weight``) and ``config.json``; the tokenizer goes into the
   final step and the suite root.
7. Reload every saved checkpoint with ``GPTNeoXForCausalLM.from_pretrained``
   (failing on any missing/unexpected key) and measure, on the shipped float16
   weights: loss on fixed train windows and on the probes, and how many
   canaries greedy decoding of their first 32 tokens reproduces exactly for the
   next 32.  Write ``suite.json`` and print the report.

Everything is seeded and runs with deterministic algorithms, so reruns on the
same software stack produce byte-identical files.

Usage::

    python scripts/make_demo_suite.py --out src/ckptscope/demo_suite
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

from ckptscope.data_order import IndexedDataset, write_indexed_dataset

TEXT_PATH = Path(__file__).resolve().parent / "data" / "kjv_genesis_exodus_matthew.txt"
EOS = "<|endoftext|>"
VOCAB_SIZE = 512
SEQ_LEN = 64
BATCH_SIZE = 8  # sequences per step; even steps: 7 text windows + 1 canary
TRAIN_STEPS = 2000
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(750, TRAIN_STEPS + 1, 250)]
PEAK_LR = 2e-3
WARMUP_STEPS = 20
MIN_LR_RATIO = 0.1
NUM_CANARIES = 8
CANARY_PREFIX = 32
NUM_PROBES = 32
NUM_HELDOUT = 256  # never-trained text blocks: the profile's control group
ONCE_EVERY, ONCE_FROM = 8, 1000  # steps s > ONCE_FROM with s % ONCE_EVERY == ONCE_EVERY - 1 train only on once-seen blocks
ONCE_STEPS = [s for s in range(ONCE_FROM + 1, TRAIN_STEPS + 1) if s % ONCE_EVERY == ONCE_EVERY - 1]
DATA_DIR = "data"  # data/train.{bin,idx}: the training order; data/heldout.{bin,idx}
NUM_TRAIN_EVAL = 64
SEED = 1234


def read_text() -> tuple[str, str]:
    """Return (header line naming the source, training text)."""
    header, body = TEXT_PATH.read_text(encoding="utf-8").split("\n", 1)
    return header, body


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path) -> None:
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "model_max_length": SEQ_LEN * 2,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def split_windows(ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the token stream into 64-token blocks: NUM_PROBES evenly spaced probe blocks, then, drawn at
    random from the others, NUM_HELDOUT held-out blocks and the once-seen blocks (one per item of the
    ONCE_STEPS batches). Held-out and once-seen blocks are one random draw, so until a once-seen
    block is trained on the two sets are exchangeable: the parallel trends a profile assumes.

    Returns (probe windows, held-out windows, once-seen windows, background window starts): a
    background start is valid when its whole window avoids every block of the three sets.
    """
    n_blocks = len(ids) // SEQ_LEN
    probe_blocks = torch.linspace(0, n_blocks - 1, NUM_PROBES).round().long()
    others = torch.ones(n_blocks, dtype=torch.bool)
    others[probe_blocks] = False
    candidates = others.nonzero()[:, 0]
    drawn = candidates[torch.randperm(len(candidates), generator=gen)[: NUM_HELDOUT + len(ONCE_STEPS) * BATCH_SIZE]]
    heldout_blocks, once_blocks = drawn[:NUM_HELDOUT].sort().values, drawn[NUM_HELDOUT:]
    probes, heldout, once = ([ids[b * SEQ_LEN : (b + 1) * SEQ_LEN] for b in blocks]
                             for blocks in (probe_blocks, heldout_blocks, once_blocks))
    held_out = torch.zeros(len(ids), dtype=torch.bool)
    for b in torch.cat([probe_blocks, drawn]):
        held_out[b * SEQ_LEN : (b + 1) * SEQ_LEN] = True
    # window [s, s + SEQ_LEN) is clean iff the prefix count of held-out tokens does not change over it
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), held_out.long().cumsum(0)])
    starts = torch.arange(len(ids) - SEQ_LEN + 1)
    clean = prefix[starts + SEQ_LEN] == prefix[starts]
    return torch.stack(list(probes)), torch.stack(list(heldout)), torch.stack(list(once)), starts[clean]


def make_config(eos_id: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ_LEN * 2,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        architectures=["GPTNeoXForCausalLM"],
    )


def pythia_name(name: str) -> str:
    """transformers 5 calls the LM head ``lm_head``; Pythia checkpoints call it ``embed_out``."""
    return "embed_out." + name.removeprefix("lm_head.") if name.startswith("lm_head.") else name


def save_checkpoint(model: GPTNeoXForCausalLM, directory: Path) -> None:
    directory.mkdir(parents=True)
    state = {pythia_name(k): v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights = directory / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it owner-only; it ships as package data
    model.config.to_json_file(str(directory / "config.json"))


def lr_at(step: int) -> float:
    """Learning-rate multiplier for the update that follows ``step`` updates.

    LambdaLR asks for step 0 before the first update, so warmup starts at 1/WARMUP_STEPS:
    starting at 0 would make step 1 a byte-identical copy of the initialization.
    """
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS + 1) / (TRAIN_STEPS - WARMUP_STEPS)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def data_order(ids: torch.Tensor, starts: torch.Tensor, once: torch.Tensor, canaries: torch.Tensor) -> np.ndarray:
    """Every training sequence in training order: [TRAIN_STEPS * BATCH_SIZE, SEQ_LEN] token ids.

    The batch of update k (1-based) is rows [(k-1)·B, k·B). For k in ONCE_STEPS it is B once-seen
    blocks, text no other training sequence overlaps; every other batch is B - 1 random background
    windows (text seen many times over) and canary k mod 8.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    picks = starts[torch.randint(len(starts), (TRAIN_STEPS * BATCH_SIZE,), generator=gen)]
    order = ids[picks[:, None] + torch.arange(SEQ_LEN)].view(TRAIN_STEPS, BATCH_SIZE, SEQ_LEN)
    for step in range(1, TRAIN_STEPS + 1):
        order[step - 1, -1] = canaries[step % NUM_CANARIES]
    order[torch.tensor(ONCE_STEPS) - 1] = once.view(len(ONCE_STEPS), BATCH_SIZE, SEQ_LEN)
    return order.reshape(-1, SEQ_LEN).numpy()


def train(data: IndexedDataset, eos_id: int, out: Path) -> float:
    """Train on ``data`` in its order and save every grid step under ``out``; return the training wall time in seconds."""
    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(make_config(eos_id))
    model.config.dtype = torch.float16  # dtype of the saved copies; training stays in float32
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    save_checkpoint(model, out / "step0")
    t0 = time.perf_counter()
    for step in range(1, TRAIN_STEPS + 1):
        # update `step` turns checkpoint step-1 into step: it trains on items [(step-1)·B, step·B)
        items = np.arange((step - 1) * BATCH_SIZE, step * BATCH_SIZE)
        batch = torch.from_numpy(data.read(items, SEQ_LEN).astype(np.int64))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step in STEPS:
            save_checkpoint(model, out / f"step{step}")
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(directory: Path, train_eval: torch.Tensor, probes: torch.Tensor, canaries: torch.Tensor) -> dict:
    """Reload a saved checkpoint and measure it (float16 weights, computed in float32)."""
    model, info = GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"{directory}: loading problems {problems}")
    model.eval()
    seq = canaries[:, :CANARY_PREFIX]
    for _ in range(SEQ_LEN - CANARY_PREFIX):
        seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    matches = seq[:, CANARY_PREFIX:] == canaries[:, CANARY_PREFIX:]
    return {
        "train_loss": model(input_ids=train_eval, labels=train_eval).loss.item(),
        "probe_loss": model(input_ids=probes, labels=probes).loss.item(),
        "canaries_memorized": int(matches.all(dim=1).sum()),
        "canary_tokens_matched": matches.float().mean().item(),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="suite directory (step dirs are replaced)")
    out = parser.parse_args().out

    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()  # one bar per reloaded checkpoint would drown the report
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("step*"):
        shutil.rmtree(stale)

    header, text = read_text()
    tok = train_tokenizer(text)
    eos_id = tok.token_to_id(EOS)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED + 2)
    probes, heldout, once, starts = split_windows(ids, gen)
    # canaries are uniform over the non-special tokens (every id except EOS)
    canaries = torch.randint(VOCAB_SIZE - 1, (NUM_CANARIES, SEQ_LEN), generator=gen)
    canaries += (canaries >= eos_id).long()
    train_eval = ids[starts[torch.randint(len(starts), (NUM_TRAIN_EVAL,), generator=gen)][:, None] + torch.arange(SEQ_LEN)]

    for filename, prefix, rows in (("canaries.jsonl", "canary", canaries), ("probe.jsonl", "probe", probes)):
        with open(out / filename, "w") as f:
            for i, row in enumerate(rows.tolist()):
                f.write(json.dumps({"id": f"{prefix}-{i}", "tokens": row}) + "\n")
    save_tokenizer(tok, out)
    (out / DATA_DIR).mkdir(exist_ok=True)
    data = IndexedDataset.open(write_indexed_dataset(out / DATA_DIR / "train", data_order(ids, starts, once, canaries)))
    write_indexed_dataset(out / DATA_DIR / "heldout", heldout.numpy())

    print(f"text: {header}")
    print(f"      {len(text.encode())} bytes -> {len(ids)} tokens (vocab {tok.get_vocab_size()}), "
          f"{len(starts)} background window starts, {NUM_PROBES} probe, {NUM_HELDOUT} held-out and {len(once)} once-seen blocks")
    seconds = train(data, eos_id, out)
    print(f"trained {TRAIN_STEPS} steps x {BATCH_SIZE}x{SEQ_LEN} tokens in {seconds:.1f} s "
          f"({torch.get_num_threads()} threads)")

    final = out / f"step{TRAIN_STEPS}"
    save_tokenizer(tok, final)
    hf_tok = AutoTokenizer.from_pretrained(final)
    sample = text[:20000]
    if hf_tok(sample, verbose=False)["input_ids"] != tok.encode(sample).ids or hf_tok.eos_token_id != eos_id:
        raise RuntimeError("AutoTokenizer does not reproduce the trained tokenizer")

    results = {step: evaluate(out / f"step{step}", train_eval, probes, canaries) for step in STEPS}
    print(f"{'step':>6} {'train_loss':>10} {'probe_loss':>10} {'canaries':>8} {'canary_tok':>10}")
    for step, r in results.items():
        print(f"{step:>6} {r['train_loss']:>10.4f} {r['probe_loss']:>10.4f} "
              f"{r['canaries_memorized']:>6}/{NUM_CANARIES} {r['canary_tokens_matched']:>10.3f}")

    suite = {
        "name": "demo-neox",
        "architecture": "gpt_neox",
        "tokens_per_step": BATCH_SIZE * SEQ_LEN,
        "steps": STEPS,
        "text_source": header,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "canaries_per_batch": f"1, except in the batches of steps {ONCE_STEPS[0]}:{ONCE_STEPS[-1]}:{ONCE_EVERY}",
        "data_order": {"train": f"{DATA_DIR}/train", "heldout": f"{DATA_DIR}/heldout", "batch_size": BATCH_SIZE,
                       "seq_len": SEQ_LEN, "train_sequences": len(data), "heldout_sequences": NUM_HELDOUT,
                       # what `ckptscope demo` profiles: the once-seen batches, held-out controls, checkpoints ONCE_FROM..
                       "profile": {"steps": f"{ONCE_STEPS[0]}:{ONCE_STEPS[-1]}:{ONCE_EVERY}", "per_step": BATCH_SIZE // 2,
                                   "heldout_count": NUM_HELDOUT, "checkpoints": f"{ONCE_FROM}:{TRAIN_STEPS}", "batch_size": 64}},
        "seed": SEED,
        "train_loss": {str(s): round(r["train_loss"], 4) for s, r in results.items()},
        "probe_loss": {str(s): round(r["probe_loss"], 4) for s, r in results.items()},
        "canaries_memorized": {str(s): r["canaries_memorized"] for s, r in results.items()},
        "num_canaries": NUM_CANARIES,
        "canaries_memorized_at_final": results[TRAIN_STEPS]["canaries_memorized"],
    }
    (out / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    print(f"demo suite: {dir_bytes(out)} bytes in {out}")


if __name__ == "__main__":
    main()
