"""sequence_stats on real demo-suite checkpoints: every statistic equals a direct, unpadded
`transformers` forward pass per sequence, reduced in float64 numpy in the test, for sequences
of different lengths batched (and so right-padded) together."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.parallel import one_blas_thread
from ckptscope.analyzers.sequence_stats import SequenceStatsAnalyzer, SequenceStatsOptions
from ckptscope.errors import CkptscopeError
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family
from runs import write_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "src" / "ckptscope" / "demo_suite"
STEPS = (0, 2000)
LENGTHS = (64, 2, 37, 64, 5, 50, 64, 23, 3, 64, 11)  # mixed, so batches of 3 hold padded rows


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """The demo's first and last checkpoints re-saved in float64 (so the analyzer computes in float64),
    and a corpus of probe, canary and random sequences of mixed lengths."""
    base = tmp_path_factory.mktemp("seqstats")
    for step in STEPS:
        src = DEMO / f"step{step}"
        config = json.loads((src / "config.json").read_text())
        write_checkpoint(base / "f64" / f"step{step}", load_file(str(src / "model.safetensors")), {**config, "dtype": "float64"},
                         dtype=torch.float64)
    probe, canaries = lines(DEMO / "probe.jsonl"), lines(DEMO / "canaries.jsonl")
    rng = np.random.default_rng(7)
    rows = []
    for i, n in enumerate(LENGTHS):
        if i % 3 == 0:
            tokens, split, seen = probe[i]["tokens"][:n], "heldout", None
        elif i % 3 == 1:
            tokens, split, seen = canaries[i % len(canaries)]["tokens"][:n], "train", 1000 + i
        else:
            tokens, split, seen = rng.integers(0, 512, n).tolist(), "train", i
        rows.append({"id": f"s{i}", "tokens": tokens, "split": split, "first_seen_step": seen})
    rows.append({"id": "lonely", "tokens": [5], "split": "train"})  # one token: nothing to predict, skipped
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base / "f64", corpus, rows


def context(path: Path, step: int) -> AnalysisContext:
    ckpt = Checkpoint(path, step=step)
    return AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config)


@functools.cache
def float64_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()


def reference(path: Path, tokens: list[int]) -> dict[str, float]:
    """One sequence alone (no padding) through transformers in float64; statistics in numpy."""
    with torch.no_grad():
        logits = float64_model(path)(torch.tensor([tokens])).logits[0, :-1].numpy().astype(np.float64)
    target = np.asarray(tokens[1:])
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    true = logp[np.arange(len(target)), target]
    rank = (logp > true[:, None]).sum(1)
    return {"sup_seq": float(-true.mean()), "acc_seq": float((rank == 0).mean()), "avg_rank": float(rank.mean()),
            "entr_seq": float(-(np.exp(logp) * logp).sum(1).mean()), "tokens": len(target)}


def by_id(rows) -> dict[str, dict]:
    t = rows.tables["sequence_stats"]
    return {sid: dict(zip(t, vals)) for sid, *vals in zip(t["sequence_id"], *t.values())}


@pytest.mark.parametrize("step", STEPS)
def test_statistics_equal_an_unpadded_float64_forward_pass(suite, step):
    root, corpus, rows = suite
    analyzer = SequenceStatsAnalyzer(SequenceStatsOptions.build(corpus=corpus, batch_size=3))
    with one_blas_thread():
        out = analyzer.analyze(context(root / f"step{step}", step))
        got = by_id(out)
        assert set(got) == {r["id"] for r in rows} - {"lonely"}
        assert out.dtype == "float64" and out.parameters["skipped_short"] == 1
        assert [a[1] for a in out.anomalies] == ["short_sequences"]
        for r in rows[:-1]:
            want, have = reference(root / f"step{step}", r["tokens"]), got[r["id"]]
            assert (have["split"], have["first_seen_step"]) == (r["split"], r["first_seen_step"])
            assert have["tokens"] == want["tokens"] == len(r["tokens"]) - 1
            for key in ("sup_seq", "entr_seq", "acc_seq", "avg_rank"):
                assert have[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), (r["id"], key)
    # a trained model predicts the demo text better than its initialization does
    if step == STEPS[-1]:
        assert got["s0"]["sup_seq"] < 4.0 < np.log(512) - 0.5


def test_half_precision_checkpoint_computes_in_float32_close_to_float64(suite):
    """The shipped float16 demo checkpoint runs in float32 on CPU; surprisal and entropy stay within 1e-4 nats."""
    root, corpus, rows = suite
    analyzer = SequenceStatsAnalyzer(SequenceStatsOptions.build(corpus=corpus, batch_size=4))
    with one_blas_thread():
        got = by_id(analyzer.analyze(context(DEMO / "step2000", 2000)))
        for r in rows[:4]:
            want = reference(root / "step2000", r["tokens"])  # the same float16 weights, held in float64
            assert got[r["id"]]["sup_seq"] == pytest.approx(want["sup_seq"], abs=1e-4)
            assert got[r["id"]]["entr_seq"] == pytest.approx(want["entr_seq"], abs=1e-4)


def test_bad_corpora_are_one_line_errors(suite, tmp_path):
    root, _, _ = suite
    ctx = context(root / "step0", 0)

    def run(rows: list[dict]) -> str:
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(CkptscopeError) as exc:
            SequenceStatsAnalyzer(SequenceStatsOptions.build(corpus=path)).analyze(ctx)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "the id 'a' is used by more than one sequence" in run([{"id": "a", "tokens": [1, 2]}, {"id": "a", "tokens": [3, 4]}])
    assert "outside the model's vocabulary of 512" in run([{"id": "a", "tokens": [1, 512]}])
    assert "the model has 128" in run([{"id": "a", "tokens": [1] * 130}])  # 129 inputs > 128 positions
    with pytest.raises(CkptscopeError, match="--corpus .*no such file"):
        SequenceStatsOptions.build(corpus=tmp_path / "missing.jsonl")
    with pytest.raises(CkptscopeError, match="needs --corpus"):
        SequenceStatsOptions.build()
    with pytest.raises(CkptscopeError, match="--batch-size 0"):
        SequenceStatsOptions.build(corpus=tmp_path / "c.jsonl", batch_size=0)


def test_longest_sequence_fills_every_position(suite, tmp_path):
    """129 tokens = 128 inputs, exactly the model's positions (Pythia: 2049 tokens, 2048 positions)."""
    root, _, _ = suite
    tokens = np.random.default_rng(3).integers(0, 512, 129).tolist()
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "tokens": tokens}) + "\n")
    with one_blas_thread():
        got = by_id(SequenceStatsAnalyzer(SequenceStatsOptions.build(corpus=path)).analyze(context(root / "step2000", 2000)))
        want = reference(root / "step2000", tokens)
    assert got["long"]["tokens"] == 128
    assert got["long"]["sup_seq"] == pytest.approx(want["sup_seq"], rel=1e-10)
