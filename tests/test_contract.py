"""The analyzer contract seen from outside: options checked before the store opens, changed
parameters never ignored, numbered reference steps, declared options on the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.cli import main
from ckptscope.store.db import Store
from runs import neox_state, trajectory, write_run

STEPS = [0, 10, 20, 30]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract")
    state, config = neox_state()
    root = write_run(base / "run", trajectory(state, STEPS), config)
    rng = np.random.default_rng(0)
    probe = base / "probe.jsonl"
    probe.write_text("".join(json.dumps({"id": f"p{i}", "tokens": rng.integers(0, 96, 12).tolist()}) + "\n" for i in range(6)))
    other = base / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"q{i}", "tokens": rng.integers(0, 96, 12).tolist()}) + "\n" for i in range(6)))
    huge = base / "huge.jsonl"
    huge.write_text(json.dumps({"id": "x", "tokens": [1, 2, 10_000]}) + "\n")
    store = base / "s.duckdb"
    ckptscope.ingest(root, store=store, name="m", tokens_per_step=100)
    return root, store, probe, other, huge, config


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("args,fragments", [
    (["--rtol", "5"], ["--rtol 5.0:", "strictly between 0 and 1"]),
    (["--rtol", "-1"], ["--rtol -1.0:", "strictly between 0 and 1"]),
    (["--rtol", "nan"], ["--rtol nan:", "strictly between 0 and 1"]),
    (["--analyzers", "weights,convergence", "--probe", "{probe}", "--batch-size", "-3"], ["--batch-size -3:", "give at least 1"]),
    (["--analyzers", "convergence", "--probe", "{probe}", "--reference-step", "15"], ["--reference-step 15 is not in the source",
                                                                                      "10, 20"]),
    (["--analyzers", "convergence", "--probe", "{huge}"], ["token id 10000", "vocabulary of"]),
    (["--analyzers", "convergence"], ["analyzer convergence needs --probe"]),
    (["--probe", "{probe}"], ["--probe: it is an option of analyzer convergence: add it to --analyzers"]),
    (["--analyzers", "nosuch"], ["unknown analyzer 'nosuch'", "weights"]),
    (["--tokens-per-step", "7"], ["was ingested with --tokens-per-step 100", "--force"]),
    (["--rtol", "0.01"], ["analyzer weights: steps 0, 10, 20, 30", "rtol=0.001 (this run: 0.01)", "--force"]),
], ids=["rtol-5", "rtol-neg", "rtol-nan", "batch-neg", "ref-missing", "vocab", "no-probe", "probe-unchosen", "unknown",
        "tokens-changed", "rtol-changed"])
def test_bad_options_are_one_line_errors_and_leave_the_store_untouched(suite, args, fragments):
    root, store, probe, _, huge, _ = suite
    before = digest(store)
    res = invoke("ingest", root, "--store", store, "--name", "m", *(a.format(probe=probe, huge=huge) for a in args))
    one_line_error(res, *fragments)
    assert digest(store) == before


def test_changed_probe_is_an_error_and_force_recomputes(suite, tmp_path):
    root, _, probe, other, _, _ = suite
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, name="m", analyzers="convergence", probe=probe, steps="0,30")
    before = digest(store)
    res = invoke("analyze", "convergence", "m", "--store", store, "--probe", other)
    one_line_error(res, "analyzer convergence", "probe_sha256=", "--force")
    assert digest(store) == before
    res = invoke("analyze", "convergence", "m", "--store", store, "--probe", probe)  # same content: nothing to do
    assert res.exit_code == 0 and "nothing to do" in res.output
    res = invoke("analyze", "convergence", "m", "--store", store, "--probe", other, "--force")
    assert res.exit_code == 0, res.output
    with Store(store, read_only=True) as db:
        shas = db.sql("SELECT DISTINCT parameters->>'probe_sha256' AS sha FROM runs WHERE analyzer = 'convergence'")["sha"]
    assert shas.to_list() == [hashlib.sha256(other.read_bytes()).hexdigest()]


def test_force_rewrites_tokens_and_batch_size_is_not_a_changed_parameter(suite, tmp_path):
    root, _, probe, _, _, _ = suite
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, name="m", tokens_per_step=100, analyzers="weights,convergence", probe=probe, batch_size=2)
    report = ckptscope.ingest(root, store=store, name="m", analyzers="weights,convergence", probe=probe, batch_size=5)
    assert report.height == 0  # batch size changes how, not what, is computed
    ckptscope.ingest(root, store=store, name="m", tokens_per_step=7, force=True)
    with Store(store, read_only=True) as db:
        assert db.sql("SELECT step, tokens FROM checkpoints ORDER BY step").rows() == [(s, 7 * s) for s in STEPS]
        assert db.model("m")["tokens_per_step"] == 7


def test_reference_step_any_stored_step(suite, tmp_path):
    """`analyze convergence --reference-step N` compares every step with step N, whichever it is."""
    root, _, probe, _, _, _ = suite
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, name="m")
    res = invoke("analyze", "convergence", "m", "--store", store, "--probe", probe, "--reference-step", "20", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    with Store(store, read_only=True) as db:
        got = db.sql("SELECT step, layer, component, value FROM metrics WHERE metric = 'cka_ref'")
        refs = db.sql("SELECT DISTINCT parameters->>'reference' AS r FROM runs WHERE analyzer = 'convergence'")["r"].to_list()
    assert refs == ["20"] and sorted(set(got["step"])) == STEPS
    assert set(got.filter(got["step"] == 20)["value"]) == {1.0}  # step 20 is the reference itself
    # Independent: CKA of residual-stream activations of steps 10 and 20 on the probe, in float64.
    import torch
    from transformers import GPTNeoXForCausalLM

    acts = {}
    for step in (10, 20):
        model = GPTNeoXForCausalLM.from_pretrained(root / f"step{step}", torch_dtype="float32").eval()
        rows = [json.loads(line)["tokens"] for line in probe.read_text().splitlines()]
        with torch.no_grad():
            hidden = [model(torch.tensor([r]), output_hidden_states=True).hidden_states[1][0] for r in rows]
        acts[step] = torch.cat(hidden).double().numpy()
    layer0 = got.filter((got["step"] == 10) & (got["layer"] == 0) & (got["component"] == "resid"))["value"].item()
    x, y = (a - a.mean(0) for a in (acts[10], acts[20]))
    expected = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert layer0 == pytest.approx(expected, abs=1e-4)


def test_declarations_drive_the_cli_and_the_registry():
    weights = registry.get("weights")
    res = invoke("ingest", "--help")
    for d in weights.Options.declared():
        assert d.flag in res.output
    res = invoke("analyzers")
    assert res.exit_code == 0
    for name in ("weights", "convergence", "memorization"):
        cls = registry.get(name)
        assert f"{name} {cls.version} (from ckptscope)" in res.output
    assert "progress in batches; references: final; tables: metric_values, spectra only" in res.output


def test_a_flat_option_beside_a_built_object_is_an_error_not_ignored(suite, tmp_path):
    """`rtol=0.5` beside analyzers={"weights": <built options>} (or `device` beside a built executor,
    `steps` beside a built source) would be silently dropped; it is a one-line error instead."""
    from ckptscope.errors import CkptscopeError
    from ckptscope.pipeline.executors import ExecutorSpec
    from ckptscope.sources.spec import SourceSpec

    root, store = suite[0], tmp_path / "new.duckdb"
    weights = registry.get("weights").Options.build(rtol=0.01)
    cases = [({"analyzers": {"weights": weights}, "rtol": 0.5}, "rtol=0.5: analyzer weights is given as a built object"),
             ({"executor": ExecutorSpec.build(), "device": "cpu"}, "device='cpu': the executor is given as a built object"),
             ({"steps": "0"}, "steps='0': the source is given as a built object")]
    for kwargs, message in cases:
        source = SourceSpec.build(source=str(root)) if "steps" in kwargs else root
        with pytest.raises(CkptscopeError, match=message):
            ckptscope.ingest(source, store=store, **kwargs)
    assert not store.exists()
    ckptscope.ingest(root, store=store, analyzers={"weights": weights}, steps="0")  # the object alone is used
    with Store(store, read_only=True) as db:
        assert {json.loads(p)["rtol"] for p in db.sql("SELECT parameters FROM runs")["parameters"]} == {0.01}


def test_a_flat_option_reaches_the_analyzers_built_here_beside_a_built_one(suite):
    """`batch_size` is declared by convergence and sequence_stats: beside a built convergence it is
    not ignored (sequence_stats, built from a mapping, takes it), so it is no error; the built
    object keeps its own value."""
    from ckptscope.pipeline.driver import resolve

    root, _, probe, _, _, _ = suite
    built = registry.get("convergence").Options.build(probe=probe, batch_size=2)
    _, _, chosen = resolve(root, {"convergence": built, "sequence_stats": {"corpus": probe}}, None, {"batch_size": 5})
    assert {a.name: a.options.batch_size for a in chosen} == {"convergence": 2, "sequence_stats": 5}


def test_declared_tables_keep_their_key_and_never_shadow_core_tables(tmp_path):
    """Rows of a declared table that repeat its key (within a step) are refused and nothing is
    written; a declared table named like a core table is refused too."""
    from ckptscope.rows import RunRows, Table
    from ckptscope.store.db import StoreError

    table = Table("per_sequence", {"sequence_id": "VARCHAR NOT NULL", "score": "DOUBLE"}, key=("sequence_id",))
    store = tmp_path / "s.duckdb"

    def run(ids: list[str], steps: list[int], name: Table = table) -> RunRows:
        rows = RunRows("toy", "1.0", {}, "float64", "numpy")
        rows.tables[name.name] = {"sequence_id": ids, "score": [0.5] * len(ids), "step": steps}
        return rows

    with Store(store) as db:
        db.replace_analysis("m", 2, run(["a", "b", "a"], [1, 1, 2]), [("toy", table)], {})  # "a" at two steps: fine
    with Store(store) as db, pytest.raises(StoreError, match=r"per_sequence: 1 row\(s\) repeat the key \(step, sequence_id\)"):
        db.replace_analysis("m", 2, run(["a", "b", "b"], [1, 1, 1]), [("toy", table)], {})
    core = Table("spectra", {"sequence_id": "VARCHAR NOT NULL", "score": "DOUBLE"}, key=("sequence_id",))
    with Store(store) as db, pytest.raises(StoreError, match="which is a core table; rename it"):
        db.replace_analysis("m", 2, run(["c"], [1], core), [("toy", core)], {})
    with Store(store, read_only=True) as db:
        assert sorted(db.sql("SELECT step, sequence_id FROM per_sequence").rows()) == [(1, "a"), (1, "b"), (2, "a")]
        assert db.sql("SELECT count(*) FROM runs").item() == 1 and db.sql("SELECT count(*) FROM spectra").item() == 0
