"""Memorization analyzer on a tiny GPT-NeoX trained here on repeated canaries plus random text:
the canaries end up memorized, unseen sequences never are, and every score equals a direct
`model.generate` reference on the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ckptscope
from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.corpus import load_corpus
from ckptscope.analyzers.memorization import MEMORIZATION, MemorizationAnalyzer
from ckptscope.analyzers.parallel import one_blas_thread
from ckptscope.analyzers.weights import WeightAnalyzer
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family
from ckptscope.rows import CheckpointRows
from ckptscope.store.db import Store
from runs import write_checkpoint

VOCAB, LENGTH, PROMPT = 64, 64, 32
STEPS = [0, 10, 60]  # saved steps; 60 is the end of training
EMPTY_TENSORS = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}


def train(root: Path) -> torch.Tensor:
    """Train with 4 canaries in every batch (plus fresh random sequences); returns the canaries."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
                        max_position_embeddings=LENGTH, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(cfg)
    config = {**cfg.to_dict(), "architectures": ["GPTNeoXForCausalLM"]}
    gen = torch.Generator().manual_seed(1)
    canaries = torch.randint(1, VOCAB, (4, LENGTH), generator=gen)  # no EOS (0) inside
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_blas_thread():
        for step in range(STEPS[-1] + 1):
            if step in STEPS:  # stored as float16 like Pythia, under Pythia's tensor names
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                state["embed_out.weight"] = state.pop("lm_head.weight")
                write_checkpoint(root / f"step{step}", state, config)
            if step == STEPS[-1]:
                break
            batch = torch.cat([canaries, torch.randint(1, VOCAB, (4, LENGTH), generator=gen)])
            model(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    return canaries


def word(i: int) -> str:
    """Token i as a letters-only word ("waa", "wab", ...)."""
    return "w" + chr(97 + i // 26) + chr(97 + i % 26)


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer mapping word(i) to id i, so text rows can be checked against token rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(VOCAB)}, unk_token=word(1)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word(1)).save_pretrained(str(directory))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("mem")
    canaries = train(base / "run")
    save_tokenizer(base / "run")
    rng = np.random.default_rng(2)
    unseen = rng.integers(1, VOCAB, (6, LENGTH))
    rows = [{"id": f"canary-{i}", "tokens": c.tolist(), "first_seen_step": 0} for i, c in enumerate(canaries)]
    rows += [{"id": f"unseen-{i}", "tokens": u.tolist()} for i, u in enumerate(unseen)]
    rows += [{"id": "short", "tokens": unseen[0, :40].tolist()}]
    return base / "run", jsonl(base / "corpus.jsonl", rows), canaries, unseen


def contexts(root: Path, steps: list[int] = STEPS) -> list[AnalysisContext]:
    ckpts = {s: Checkpoint(root / f"step{s}", step=s) for s in steps}
    final = ckpts[steps[-1]]
    return [AnalysisContext(checkpoint=c, family=family(c.config), config=c.config, references={"final": final if c is not final else None})
            for c in ckpts.values()]


@pytest.fixture(scope="module")
def results(run):
    root, corpus, _, _ = run
    analyzer = MemorizationAnalyzer.of(corpus=corpus, batch_size=4)
    return {ctx.checkpoint.step: analyzer.analyze(ctx) for ctx in contexts(root)}


def table(rows) -> dict[str, dict]:
    t = rows.tables["memorization"]
    return {sid: dict(zip(t, vals)) for sid, *vals in zip(t["sequence_id"], *t.values())}


def test_canaries_memorized_at_the_end_not_at_step_0_and_unseen_never(results):
    final, start = table(results[STEPS[-1]]), table(results[0])
    for i in range(4):
        assert final[f"canary-{i}"]["memorized"] and final[f"canary-{i}"]["score"] == 1.0
        assert not start[f"canary-{i}"]["memorized"] and start[f"canary-{i}"]["score"] < 0.5
        assert final[f"canary-{i}"]["loss"] < 0.5 < start[f"canary-{i}"]["loss"]
        assert final[f"canary-{i}"]["first_seen_step"] == 0
    for rows in results.values():
        for sid, row in table(rows).items():
            if sid.startswith("unseen"):
                assert not row["memorized"] and row["score"] < 0.5 and row["first_seen_step"] is None


def test_scores_and_losses_equal_a_direct_generate_reference(run, results):
    from transformers import GPTNeoXForCausalLM

    root, _, canaries, unseen = run
    seqs = torch.cat([canaries, torch.from_numpy(unseen)])
    for step, rows in results.items():
        model = GPTNeoXForCausalLM.from_pretrained(str(root / f"step{step}"), dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(seqs[:, :PROMPT], attention_mask=torch.ones(len(seqs), PROMPT, dtype=torch.long),
                                 do_sample=False, min_new_tokens=LENGTH - PROMPT, max_new_tokens=LENGTH - PROMPT, pad_token_id=0)
            logits = model(seqs).logits[:, PROMPT - 1 : -1]
        scores = (out[:, PROMPT:] == seqs[:, PROMPT:]).double().mean(1).tolist()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seqs[:, PROMPT:], reduction="none").mean(1).tolist()
        got = table(rows)
        ids = [f"canary-{i}" for i in range(4)] + [f"unseen-{i}" for i in range(6)]
        assert [got[i]["score"] for i in ids] == scores, step
        assert [got[i]["loss"] for i in ids] == pytest.approx(losses, rel=1e-4, abs=1e-5)
        lens = {l: v for l, k, v in zip(rows.metrics["layer"], rows.metrics["metric"], rows.metrics["value"])
                if k == "memorization_logit_lens"}
        top1 = float((logits.argmax(-1) == seqs[:, PROMPT:]).double().mean())
        assert sorted(lens) == [0, 1] and lens[1] == pytest.approx(top1) and 0 <= lens[0] <= 1  # last layer = the model itself


def test_provenance_short_sequences_and_store_views(run, results, tmp_path):
    _, corpus, _, _ = run
    final = results[STEPS[-1]]
    assert final.parameters["skipped_short"] == 1 and final.parameters["sequences"] == 10
    assert final.parameters["corpus"] == "corpus.jsonl" and len(final.parameters["corpus_sha256"]) == 64
    assert final.parameters["suppressed_tokens"] == [0] and final.parameters["prompt_len"] == 32
    assert ("short_sequences" in {a[1] for a in final.anomalies}) and "1 of 11" in final.anomalies[0][2]
    assert "float16" in final.dtype and "short" not in table(final)
    with Store(tmp_path / "s.duckdb") as db:
        for step, rows in results.items():
            db.write_checkpoint(CheckpointRows("m", step, None, f"step{step}", "test", None, EMPTY_TENSORS, [rows]),
                                tables=[("memorization", MEMORIZATION)])
        summary = db.sql("SELECT step, sequences, memorized_rate FROM memorization_summary ORDER BY step").rows()
    assert summary[0] == (0, 10, 0.0) and summary[-1] == (STEPS[-1], 10, 0.4)


def test_text_parquet_and_npy_corpora_give_the_same_rows(run, results, tmp_path):
    root, corpus, canaries, unseen = run
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    texts = jsonl(tmp_path / "text.jsonl", [{"id": r["id"], "text": " ".join(map(word, r["tokens"]))} for r in records])
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in records], "tokens": [r["tokens"] for r in records]}), parquet)
    npy = tmp_path / "c.npy"
    np.save(npy, np.concatenate([canaries.numpy(), unseen]).astype(np.uint16))
    ctx = contexts(root)[-1]
    expected = {k: v["score"] for k, v in table(results[STEPS[-1]]).items()}
    for path in (texts, parquet):
        assert {k: v["score"] for k, v in table(MemorizationAnalyzer.of(corpus=path).analyze(ctx)).items()} == expected
    by_row = {k: v["score"] for k, v in table(MemorizationAnalyzer.of(corpus=npy).analyze(ctx)).items()}
    assert by_row == {str(i): expected[k] for i, k in enumerate([f"canary-{i}" for i in range(4)] + [f"unseen-{i}" for i in range(6)])}


def test_bad_corpora_give_one_line_errors(run, tmp_path):
    root, _, canaries, _ = run
    ctx = contexts(root)[-1]
    short = jsonl(tmp_path / "short.jsonl", [{"id": 1, "tokens": [1, 2, 3]}])
    with pytest.raises(CkptscopeError, match="all 1 sequences are shorter than 64 tokens"):
        MemorizationAnalyzer.of(corpus=short).analyze(ctx)
    oov = jsonl(tmp_path / "oov.jsonl", [{"id": "x", "tokens": [1] * 63 + [VOCAB + 5]}])
    with pytest.raises(CkptscopeError, match=f"token id {VOCAB + 5}, outside the model's vocabulary of {VOCAB}"):
        MemorizationAnalyzer.of(corpus=oov).analyze(ctx)
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet at all")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": 1, "tokens": [1, 2]}\n{oops\n')
    floats = jsonl(tmp_path / "floats.jsonl", [{"id": 1, "tokens": [1.5, 2.0]}])
    twice = jsonl(tmp_path / "twice.jsonl", [{"id": "a", "tokens": [1]}, {"id": "b", "tokens": [2]}, {"id": "a", "tokens": [3]}])
    for path, message in ((garbage, "cannot read it"), (bad_json, "line 2: not valid JSON"), (floats, "integer token ids"),
                          (twice, "the id 'a' is used by more than one sequence"),
                          (tmp_path / "missing.jsonl", "no such file"), (tmp_path / "c.csv", "unknown format")):
        if path.suffix == ".csv":
            path.write_text("id,tokens\n")
        with pytest.raises(CkptscopeError, match=message) as err:
            load_corpus(path)
        assert "\n" not in str(err.value)
    with pytest.raises(CkptscopeError, match="needs --corpus"):
        MemorizationAnalyzer.of(prompt_len=8)


def test_text_without_tokenizer_bert_and_unbuildable_architecture(run, tmp_path):
    root, _, _, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(root / f"step{STEPS[-1]}", bare / "step1")
    text = jsonl(tmp_path / "t.jsonl", [{"id": 1, "text": "wab wac"}])
    with pytest.raises(CkptscopeError, match="no tokenizer"):
        MemorizationAnalyzer.of(corpus=text).analyze(contexts(bare, [1])[0])

    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               vocab_size=VOCAB)).save_pretrained(tmp_path / "bert" / "step0")
    corpus = jsonl(tmp_path / "c.jsonl", [{"id": 1, "tokens": list(range(LENGTH))}])
    out = MemorizationAnalyzer.of(corpus=corpus).analyze(contexts(tmp_path / "bert", [0])[0])
    assert not out.tables and [a[1] for a in out.anomalies] == ["not_applicable"]

    odd = tmp_path / "odd" / "step1"
    shutil.copytree(root / f"step{STEPS[-1]}", odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]}))
    ctx = contexts(tmp_path / "odd", [1])[0]
    with pytest.raises(SourceError, match="transformers cannot build") as err:
        MemorizationAnalyzer.of(corpus=corpus).analyze(ctx)
    assert "\n" not in str(err.value)
    assert WeightAnalyzer.of().analyze(ctx).metrics["metric"]  # the weights analyzer is unaffected


def test_pipeline_memorization(run, tmp_path):
    """Through `ckptscope.ingest` (needs the pipeline to forward `corpus` and friends to analyzers)."""
    root, corpus, _, _ = run
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, analyzers="weights,memorization", corpus=corpus, batch_size=8,
                     prompt_len=PROMPT, continuation_len=LENGTH - PROMPT)
    with Store(store, read_only=True) as db:
        summary = db.sql("SELECT step, sequences, memorized_rate FROM memorization_summary ORDER BY step").rows()
        canary = db.sql("SELECT bool_and(memorized) FROM memorization WHERE sequence_id LIKE 'canary%' AND step = 60").item()
    assert summary[0] == (0, 10, 0.0) and summary[-1] == (60, 10, 0.4) and canary


@pytest.mark.parametrize("arch", ["gpt2", "llama", "olmo2"])
def test_other_causal_families_match_generate(arch, tmp_path):
    """GPT-2 (fused Conv1D, tied head), Llama and OLMo-2: greedy decoding reproduces `generate` token for token."""
    import transformers

    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    cfg = {"gpt2": lambda: transformers.GPT2Config(n_embd=32, n_positions=LENGTH, **small),
           "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, **small),
           "olmo2": lambda: transformers.Olmo2Config(hidden_size=32, intermediate_size=64, **small)}[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "run" / "step0")
    prompts = torch.randint(1, VOCAB, (5, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the model's own greedy continuation, then every other token changed in the last two
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              min_new_tokens=LENGTH - PROMPT, max_new_tokens=LENGTH - PROMPT, pad_token_id=0)
    seqs[3:, PROMPT::2] = seqs[3:, PROMPT::2] % (VOCAB - 1) + 1
    corpus = jsonl(tmp_path / "c.jsonl", [{"id": i, "tokens": s.tolist()} for i, s in enumerate(seqs)])
    out = MemorizationAnalyzer.of(corpus=corpus, batch_size=2).analyze(contexts(tmp_path / "run", [0])[0])
    assert out.tables["memorization"]["score"] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert sorted(out.metrics["layer"]) == [0, 1] and out.dtype == "float32"
