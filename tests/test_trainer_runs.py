"""Hugging Face runs as researchers have them: tied GPT-2 weights in `.bin` and safetensors, a real
`Trainer` run (trainer_state.json, no step 0) and its initialization added with --steps STEP=PATH."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import ckptscope
from ckptscope.reports import build_report
from ckptscope.sources.checkpoint import Checkpoint
from runs import write_checkpoint
from test_reports import assert_renders_cleanly, open_report

GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
TRAIN_STEPS, SAVE_STEPS = 6, 2
CHECKPOINTS = [2, 4, 6]


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2))


def save_bin(model, path: Path) -> Path:
    """What `save_pretrained(safe_serialization=False)` wrote before transformers 5 (which only
    writes safetensors): the config and `torch.save(state_dict())`, tied tensors sharing storage."""
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def nudge(model, seed: int) -> None:
    """One 'training step': every parameter moves; tied weights stay tied (parameters() yields them once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


# -- tied weights -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_runs(tmp_path_factory):
    """The same GPT-2 weights at steps 0 and 1, as safetensors (save_pretrained) and as .bin."""
    root = tmp_path_factory.mktemp("tied")
    model = gpt2()
    for step in (0, 1):
        if step:
            nudge(model, step)
        model.save_pretrained(root / "st" / f"step{step}")
        save_bin(model, root / "bin" / f"step{step}")
    store = root / "s.duckdb"
    for fmt in ("st", "bin"):
        ckptscope.ingest(root / fmt, store=store, name=fmt)
    return root, store, sum(p.numel() for p in model.parameters())


def test_bin_ties_are_counted_and_analyzed_once(tied_runs):
    root, store, parameters = tied_runs
    assert "lm_head.weight" in torch.load(root / "bin" / "step1" / "pytorch_model.bin", weights_only=True)  # the copy is there
    with ckptscope.Store(store, read_only=True) as db:
        counted = dict(db.sql("SELECT model, num_parameters FROM models").rows())
        assert counted == {"st": parameters, "bin": parameters}  # 29,568 for both: lm_head is wte
        assert db.sql("SELECT count(*) FROM metrics WHERE tensor = 'lm_head.weight' OR component = 'unembed'").item() == 0
        ties = db.sql("SELECT step, tensor, component, tied_to FROM tensors WHERE model = 'bin' AND tied_to IS NOT NULL ORDER BY step").rows()
        assert ties == [(0, "lm_head.weight", "unembed", "transformer.wte.weight"), (1, "lm_head.weight", "unembed", "transformer.wte.weight")]
        # Every metric of the .bin run equals the safetensors run's: same tensors, same values.
        rows = {fmt: db.sql("SELECT step, tensor, component, metric, value FROM metrics WHERE model = ? ORDER BY ALL", [fmt]).rows()
                for fmt in ("st", "bin")}
    assert len(rows["bin"]) == len(rows["st"]) > 0
    for a, b in zip(rows["bin"], rows["st"]):
        assert a[:4] == b[:4] and (a[4] == pytest.approx(b[4], rel=1e-9, abs=1e-12) or (math.isnan(a[4]) and math.isnan(b[4])))


def test_safetensors_copy_is_tied_only_when_equal_and_not_untied(tmp_path):
    """safetensors cannot share storage: a stored copy of wte is a tie when its bytes are equal and
    the config does not set tie_word_embeddings false; equal zero biases are never ties."""
    model = gpt2()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # lm_head a separate copy
    config = model.config.to_dict()

    def checkpoint(name: str, state: dict, **cfg) -> Checkpoint:
        path = tmp_path / name
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({**config, **cfg}))
        return Checkpoint(path, step=0)

    tied = checkpoint("tied", state)
    assert tied.ties == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in tied.tensors and set(tied.stored) == set(state)
    assert torch.equal(tied.read("lm_head.weight"), state["transformer.wte.weight"])
    assert state["transformer.h.0.attn.c_attn.bias"].abs().sum() == 0 == state["transformer.h.1.attn.c_attn.bias"].abs().sum()
    assert checkpoint("untied", state, tie_word_embeddings=False).ties == {}
    different = {**state, "lm_head.weight": state["lm_head.weight"] + 1e-3}
    assert checkpoint("different", different).ties == {}


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_bin_copy_is_tied(tmp_path, shards):
    """Shards are separate pickles, so a tie split across two is a copy: tied by equal bytes, as in safetensors."""
    model = gpt2()
    path = write_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), fmt="bin", shards=shards, dtype=None)
    ckpt = Checkpoint(path, step=0)
    assert ckpt.ties == {"lm_head.weight": "transformer.wte.weight"}
    assert sum(math.prod(i.shape) for i in ckpt.tensors.values()) == sum(p.numel() for p in model.parameters())


# -- a real Trainer run -------------------------------------------------------------------------

TRAIN = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(**{gpt2}))
model.save_pretrained(sys.argv[2])  # the initialization, which the Trainer never saves
class Data(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i):
        ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(i))
        return {{"input_ids": ids, "labels": ids}}
args = TrainingArguments(output_dir=sys.argv[1], max_steps={steps}, save_steps={save}, logging_steps=1, eval_strategy="steps",
    eval_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
    include_num_input_tokens_seen=True, seed=0, dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data()).train()
"""


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """`transformers.Trainer` on a tiny GPT-2 for 6 steps, saving every 2 (about 8 s); the
    initial weights saved beside the run in `init/`."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("trainer")
    script = TRAIN.format(gpt2=GPT2, steps=TRAIN_STEPS, save=SAVE_STEPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-c", script, str(root / "run"), str(root / "init")], check=True, env=env,
                   capture_output=True, timeout=300)
    assert sorted(p.name for p in (root / "run").iterdir()) == [f"checkpoint-{s}" for s in CHECKPOINTS]
    return root


def history(path: Path) -> dict[tuple[int, str], float]:
    """Every numeric scalar of a trainer_state.json's log_history, later entries winning."""
    out = {}
    for entry in json.loads(path.read_text())["log_history"]:
        out.update(((entry["step"], k), float(v)) for k, v in entry.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return out


def training_log(store: Path, model: str) -> dict[tuple[int, str], float]:
    with ckptscope.Store(store, read_only=True) as db:
        return {(s, m): v for s, m, v in db.sql("SELECT step, metric, value FROM training_log WHERE model = ?", [model]).rows()}


def test_training_log_and_tokens_from_trainer_state(trainer_run, tmp_path):
    run = trainer_run / "run"
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(run, store=store, name="gpt")
    last = history(run / "checkpoint-6" / "trainer_state.json")
    assert {m for _, m in last} >= {"loss", "learning_rate", "grad_norm", "epoch", "eval_loss", "num_input_tokens_seen"}
    assert training_log(store, "gpt") == last  # the union of the three histories is the last one
    with ckptscope.Store(store, read_only=True) as db:
        tokens = dict(db.sql("SELECT step, tokens FROM checkpoints WHERE model = 'gpt'").rows())
    seen = {s: json.loads((run / f"checkpoint-{s}" / "trainer_state.json").read_text())["num_input_tokens_seen"] for s in CHECKPOINTS}
    assert tokens == seen == {2: 128, 4: 256, 6: 384}  # 4 sequences x 16 tokens per step
    # --tokens-per-step, when given, is what the user says
    ckptscope.ingest(run, store=store, name="per-step", tokens_per_step=10)
    with ckptscope.Store(store, read_only=True) as db:
        assert dict(db.sql("SELECT step, tokens FROM checkpoints WHERE model = 'per-step'").rows()) == {2: 20, 4: 40, 6: 60}


def test_later_checkpoint_wins_whatever_order_they_are_written(trainer_run, tmp_path):
    """A history rewritten by a later checkpoint (a run resumed from an earlier one) wins, also when
    the later checkpoint is ingested first."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trainer_run / "run", run)
    early = run / "checkpoint-2" / "trainer_state.json"
    state = json.loads(early.read_text())
    state["log_history"][0]["loss"] = 99.0  # step 1's loss, as checkpoint-2 saw it
    state["log_history"][0]["only_early"] = 7.0
    early.write_text(json.dumps(state))
    store = tmp_path / "s.duckdb"
    for step in ("6", "2"):  # sparsity needs no reference steps: each ingest writes only the step it names
        assert ckptscope.ingest(run, store=store, steps=step, analyzers="sparsity")["step"].to_list() == [int(step)]
    got = training_log(store, "run")
    assert got[(1, "loss")] == history(run / "checkpoint-6" / "trainer_state.json")[(1, "loss")] != 99.0
    assert got[(1, "only_early")] == 7.0  # a union: what only an earlier file logged stays
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT DISTINCT checkpoint FROM training_log WHERE step = 1 AND metric = 'loss'").item() == 6


def test_corrupt_trainer_state_is_one_line_before_any_write(trainer_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trainer_run / "run", run)
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"log_history": [')
    store = tmp_path / "s.duckdb"
    with pytest.raises(ckptscope.CkptscopeError, match=r"checkpoint-4/trainer_state.json: not valid JSON; fix or remove it"):
        ckptscope.ingest(run, store=store)
    assert not store.exists()


def test_report_shows_training_log_above_layer_charts(trainer_run, tmp_path):
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(trainer_run / "run", store=store, name="gpt")
    html = build_report(store, tmp_path / "r.html").read_text()
    charts = json.loads(html.split('<script type="application/json" id="report-data">')[1].split("</script>")[0])
    training = [c for c in charts if c["type"] == "training"]
    assert len(training) == 1 and charts.index(training[0]) < min(i for i, c in enumerate(charts) if c["type"] == "layers")
    series = training[0]["series"][0]
    last = history(trainer_run / "run" / "checkpoint-6" / "trainer_state.json")
    assert series["steps"] == list(range(1, TRAIN_STEPS + 1))
    assert series["loss"] == [last[(s, "loss")] for s in series["steps"]]
    assert series["learning_rate"] == [last[(s, "learning_rate")] for s in series["steps"]]
    assert html.index('<h2>Training log</h2>') < html.index("<h2>Layers over training: gpt</h2>")


# -- the initialization of a Trainer run ----------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


WARNING = "delta_init is measured from step 2, not from initialization"


def test_init_joins_a_trainer_run_and_is_remembered(trainer_run, tmp_path):
    run, store = trainer_run / "run", tmp_path / "s.duckdb"
    plain = cli("ingest", str(run), "--store", str(store), "--name", "plain", "--steps", "2,4")
    assert plain.returncode == 0, plain.stderr
    assert sum(WARNING in line for line in plain.stderr.splitlines()) == 1  # one line
    first = cli("ingest", str(run), "--store", str(store), "--steps", "0=../init,log", "--max", "3")
    assert first.returncode == 0, first.stderr
    assert "delta_init is measured" not in first.stderr
    rerun = cli("ingest", str(run), "--store", str(store))  # plain: step 0 is found again
    assert rerun.returncode == 0, rerun.stderr
    assert "delta_init is measured" not in rerun.stderr
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT step FROM checkpoints WHERE model = 'run' ORDER BY step")["step"].to_list() == [0, *CHECKPOINTS]
        assert db.sql("SELECT step, path FROM step_paths").rows() == [(0, "../init")]
        assert db.sql("SELECT revision FROM checkpoints WHERE model = 'run' AND step = 0").item() == "../init"
        got = dict(db.sql("SELECT step, value FROM metrics WHERE model = 'run' AND tensor = 'transformer.h.1.mlp.c_fc.weight' "
                          "AND metric = 'delta_init_relative'").rows())
    init = load_file(str(trainer_run / "init" / "model.safetensors"))["transformer.h.1.mlp.c_fc.weight"].astype(np.float64)
    for step in CHECKPOINTS:  # measured from the initialization, not from checkpoint-2
        w = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))["transformer.h.1.mlp.c_fc.weight"].astype(np.float64)
        assert got[step] == pytest.approx(np.linalg.norm(w - init) / np.linalg.norm(init), rel=1e-9)
    assert got[0] == 0.0


def test_init_and_all_in_one_ingest(trainer_run, tmp_path):
    store = tmp_path / "s.duckdb"
    report = ckptscope.ingest(trainer_run / "run", store=store, steps="0=../init,all")
    assert report["step"].to_list() == [0, *CHECKPOINTS]
    only = ckptscope.ingest(trainer_run / "run", store=store, name="only", steps="0=../init")
    assert 0 in only["step"].to_list()
    with pytest.raises(ckptscope.CkptscopeError, match=r"--steps 0=nowhere: .*nowhere is not a directory"):
        ckptscope.ingest(trainer_run / "run", store=store, name="bad", steps="0=nowhere,all")
    with pytest.raises(ckptscope.CkptscopeError, match="bad --steps term 'x=init'"):
        ckptscope.ingest(trainer_run / "run", store=store, name="bad", steps="x=init,all")


def test_training_chart_draws_in_the_browser(trainer_run, browser, tmp_path):
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(trainer_run / "run", store=store, name="gpt")
    report = build_report(store, tmp_path / "r.html", metrics=["stable_rank"])
    info = open_report(browser, report, tmp_path / "r.png")
    assert_renders_cleanly(info, tmp_path / "r.png", min_charts=4)  # checkpoints, training, stable_rank x2
    drawn = {c["id"]: c for c in info["charts"]}
    assert drawn["chart2-0"]["traces"] == 2 and drawn["chart2-0"]["marks"] == 2 + 2 * TRAIN_STEPS  # 2 lines, their points
    assert browser.execute_script("return document.querySelector('#chart2 h3').textContent") == "Training loss and learning rate"
