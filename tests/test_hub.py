"""The Hub backend against a real Hub-compatible server (olah on loopback) and the suite catalog.

Repos are built from tiny real GPT-NeoX weights, laid out the way each suite publishes them:
Pythia (fp16 `.bin` on `step{N}` branches, both formats on `main`), OLMo 2 (sharded
safetensors on `stage1-step{N}-tokens{M}B`, a few without the prefix), MultiBERTs (one repo per
step), plus a generic repo and fault repos.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from ckptscope.errors import MissingRevision, SourceError
from ckptscope.sources.catalog import FAMILIES, Suite, describe, list_suites, resolve
from ckptscope.sources.local import CheckpointRef
from hubserver import FaultProxy, LfsFile, checkpoint_files, glob_live, serve
from runs import neox_state, trajectory

PYTHIA_STEPS = [0, 1, 2, 4, 1000]
OLMO_BRANCHES = {150: "step150-tokens1B", 1000: "stage1-step1000-tokens3B", 2000: "stage1-step2000-tokens5B"}
MULTIBERTS_K = [0, 20, 40]


@pytest.fixture(scope="module")
def weights() -> dict[int, dict[str, torch.Tensor]]:
    state, _ = neox_state(seed=3)
    return trajectory(state, sorted({*PYTHIA_STEPS, *OLMO_BRANCHES, *(k * 1000 for k in MULTIBERTS_K), 10, 20}))


@pytest.fixture(scope="module")
def hub(tmp_path_factory, weights):
    _, config = neox_state(seed=3)
    root = tmp_path_factory.mktemp("hub")
    with serve(root) as server:
        bins = {s: checkpoint_files(weights[s], config, fmt="bin") for s in PYTHIA_STEPS}
        pythia = {f"step{s}": {**bins[s], "tokenizer.json": b"{}", "special_tokens_map.json": b"{}"} for s in PYTHIA_STEPS}
        pythia["main"] = {**bins[1000], **checkpoint_files(weights[1000], config)}
        pythia["step8"] = {".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
        server.add_repo("EleutherAI/pythia-14m", pythia)

        olmo = {name: checkpoint_files(weights[s], config, shards=2, dtype=None) for s, name in OLMO_BRANCHES.items()}
        olmo["stage2-ingredient1-step1000-tokens2B"] = olmo["stage1-step1000-tokens3B"]
        olmo["main"] = olmo["stage1-step2000-tokens5B"]
        server.add_repo("allenai/OLMo-2-0425-1B", olmo)

        for k in MULTIBERTS_K:
            files = {**checkpoint_files(weights[k * 1000], config, fmt="bin", dtype=None), "tf_model.h5": b"\x89HDF" * 64}
            server.add_repo(f"google/multiberts-seed_0-step_{k}k", {"main": files})

        run = {f"checkpoint-{s}": checkpoint_files(weights[s], config) for s in (10, 20)}
        server.add_repo("someorg/tiny-run", {**run, "main": run["checkpoint-20"], "notes": {"README.md": b"hi"}})
        server.add_repo("someorg/renamed", {f"v{s}": checkpoint_files(weights[s], config) for s in (10, 20)})
        server.add_repo("someorg/dupes", {"step10": run["checkpoint-10"], "checkpoint-10": run["checkpoint-20"]})

        st = checkpoint_files(weights[1], config)
        server.add_repo("faults/lie", {"step1": {"config.json": st["config.json"],
                                                "model.safetensors": LfsFile(st["model.safetensors"], len(st["model.safetensors"]) + 64)}})
        server.add_repo("faults/vanish", {f"step{s}": checkpoint_files(weights[s], config) for s in (1, 2)})
        yield server


def source(tmp_path: Path, name: str = "pythia-14m", **kw):
    from ckptscope.sources.hub import HubSource

    kw = {"retries": 1, "backoff": 0.01, "min_free_bytes": 0, **kw}
    return HubSource(name, cache_dir=tmp_path / "cache", **kw)


def cached_files(tmp_path: Path) -> list[str]:
    """Every file and symlink in the HF cache, lock files and the cache tag aside."""
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in glob_live(root, "**/*")
                  if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts and p.name != "CACHEDIR.TAG")


def assert_same(ckpt, expected: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor.to(dtype) if dtype else tensor), name


def by_step(refs) -> dict[int, CheckpointRef]:
    return {r.step: r for r in refs}


# ---- catalog ---------------------------------------------------------------------------------


def test_pythia_grid_and_tokens():
    suite = resolve("pythia-160m")
    assert suite is resolve("EleutherAI/pythia-160m") is resolve("PYTHIA-160M")
    assert len(suite.steps) == 154
    assert suite.steps[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000) and suite.steps[-1] == 143000
    assert suite.grid_text() == "154 steps: 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, every 1000 from 1000 to 143000"
    assert suite.tokens(143000, "step143000") == 143000 * 2_097_152
    assert resolve("pythia-410m-seed4").steps == suite.steps
    assert resolve("pythia-12b-deduped").repo == "EleutherAI/pythia-12b-deduped"


@pytest.mark.parametrize("name, revision, step, tokens", [
    ("pythia-160m", "step1000", 1000, 1000 * 2_097_152),
    ("pythia-160m", "main", None, None),
    ("OLMo-1B-hf", "step20000-tokens84B", 20000, 84 * 10**9),
    ("allenai/OLMo-2-1124-7B", "stage1-step928646-tokens3896B", 928646, 3896 * 10**9),
    ("OLMo-2-1124-7B", "step150-tokens1B", 150, 10**9),
    ("OLMo-2-1124-7B", "stage2-ingredient1-step11931-tokens50B", None, None),
    ("multiberts-seed_2", "google/multiberts-seed_2-step_1100k@main", 1_100_000, None),
    ("multiberts-seed_2", "google/multiberts-seed_3-step_20k@main", None, None),
    ("Amber", "ckpt_042", 42, None),
    ("alias-gpt2-small-x21", "checkpoint-400000", 400000, None),
    ("SmolLM2-135M-intermediate-checkpoints", "step-240000", 240000, 240000 * 1_048_576),
    ("some/run", "global_step30", 30, None),
    ("some/run", "checkpoint-500", 500, None),
    ("some/run", "0000020000", 20000, None),
    ("some/run", "step1000-tokens4B", 1000, 4 * 10**9),
    ("some/run", "main", None, None),
])
def test_revision_names(name, revision, step, tokens):
    suite = resolve(name)
    assert suite.step_of(revision) == step
    if step is not None:
        assert suite.tokens(step, revision) == tokens


def test_catalog_grids_and_listing():
    multiberts = resolve("multiberts-seed_0")
    assert multiberts.per_step_repos and len(multiberts.steps) == 29
    assert multiberts.repo_for(20000) == "google/multiberts-seed_0-step_20k"
    assert multiberts.repo_for(2_000_000) == "google/multiberts-seed_0-step_2000k"
    assert len(resolve("alias-gpt2-small-x21").steps) == 609
    assert resolve("LLM360/Amber").steps == tuple(range(360))
    assert resolve("OLMo-2-0425-1B").steps is None
    assert {"pythia", "polypythia", "olmo", "olmo-2", "multiberts", "amber", "crfm-gpt2", "smollm2"} <= set(FAMILIES)
    assert {s.family for s in list_suites()} == set(FAMILIES)
    assert [s.name for s in describe("pythia")][:2] == ["pythia-14m", "pythia-14m-deduped"] and len(describe("pythia")) == 20
    assert describe("pythia-70m") == [resolve("pythia-70m")]
    assert all(isinstance(s, Suite) and s.naming() for s in list_suites())


def test_unknown_names():
    with pytest.raises(SourceError, match="unknown suite 'pythia-16m'; closest catalog names: pythia-160m"):
        resolve("pythia-16m")
    with pytest.raises(SourceError, match="family of suites; name one member, e.g. pythia-14m"):
        resolve("pythia")
    with pytest.raises(SourceError, match="not a hub repo id"):
        resolve("a/b/c")
    generic = resolve("someone/my-run")
    assert (generic.family, generic.repo, generic.name) == ("hub", "someone/my-run", "my-run")


def test_revision_pattern_override():
    suite = resolve("OLMo-2-0425-1B", revision_pattern=r"stage2-ingredient2-step(?P<step>\d+)-tokens(?P<tokens>\d+)B")
    assert suite.step_of("stage2-ingredient2-step23852-tokens51B") == 23852
    assert suite.tokens(23852, "stage2-ingredient2-step23852-tokens51B") == 51 * 10**9
    assert suite.step_of("stage1-step1000-tokens3B") is None
    with pytest.raises(SourceError, match="captures no step"):
        resolve("x/y", revision_pattern="step")
    with pytest.raises(SourceError, match="bad --revision-pattern"):
        resolve("x/y", revision_pattern="step(")


# ---- listing and opening -----------------------------------------------------------------------


def test_pythia_refs_steps_and_tokens(hub, tmp_path):
    src = source(tmp_path)
    refs = src.refs()
    assert [r.step for r in refs] == [0, 1, 2, 4, 8, 1000]  # main is not a step; weightless step8 is kept
    assert [r.revision for r in refs][:2] == ["EleutherAI/pythia-14m@step0", "EleutherAI/pythia-14m@step1"]
    assert src.tokens(1000, refs[-1].revision) == 1000 * 2_097_152
    assert (src.id, src.default_name, src.kind) == ("hub:EleutherAI/pythia-14m", "pythia-14m", "hub")
    assert cached_files(tmp_path) == []  # listing downloads nothing


def test_open_step_branch_fetches_config_and_bin_only(hub, tmp_path, weights):
    src = source(tmp_path)
    ckpt = src.open(by_step(src.refs())[4])
    assert ckpt.format == "bin" and ckpt.step == 4 and ckpt.revision == "EleutherAI/pythia-14m@step4"
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["config.json", "pytorch_model.bin"]  # no tokenizer
    assert_same(ckpt, weights[4], torch.float16)
    assert ckpt.config["model_type"] == "gpt_neox"


def test_open_main_fetches_one_format(hub, tmp_path, weights):
    src = source(tmp_path)
    ckpt = src.open(CheckpointRef(143000, "EleutherAI/pythia-14m@main"))
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["config.json", "model.safetensors"]
    blobs = [f for f in cached_files(tmp_path) if "/blobs/" in f]
    assert len(blobs) == 2  # the .bin on main was never downloaded
    assert_same(ckpt, weights[1000], torch.float16)


def test_olmo_names_and_sharded_safetensors(hub, tmp_path, weights):
    src = source(tmp_path, "allenai/OLMo-2-0425-1B")
    refs = by_step(src.refs())
    assert sorted(refs) == [150, 1000, 2000]  # stage2 ingredient and main are not stage-1 steps
    assert refs[1000].revision == "allenai/OLMo-2-0425-1B@stage1-step1000-tokens3B"
    assert [src.tokens(s, r.revision) for s, r in sorted(refs.items())] == [10**9, 3 * 10**9, 5 * 10**9]
    ckpt = src.open(refs[1000])
    assert ckpt.format == "safetensors" and len(ckpt.files) == 2
    assert sorted(p.name for p in ckpt.path.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert_same(ckpt, weights[1000], None)


def test_one_repo_per_step(hub, tmp_path, weights):
    src = source(tmp_path, "multiberts-seed_0")
    refs = src.refs()  # 29 repos probed; only those on the server exist
    assert [r.step for r in refs] == [0, 20000, 40000]
    assert refs[1].revision == "google/multiberts-seed_0-step_20k@main"
    assert src.id == "hub:google/multiberts-seed_0-step_*k" and src.tokens(20000, refs[1].revision) is None
    ckpt = src.open(refs[1])
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["config.json", "pytorch_model.bin"]  # no tf_model.h5
    assert_same(ckpt, weights[20000], None)
    with pytest.raises(SourceError, match="none of the 29 repos google/multiberts-seed_3-step_\\*k exists"):
        source(tmp_path, "multiberts-seed_3").refs()


def test_generic_repo_default_rule_and_pattern(hub, tmp_path, weights):
    src = source(tmp_path, "someorg/tiny-run")
    assert [r.step for r in src.refs()] == [10, 20] and src.default_name == "tiny-run"
    assert_same(src.open(src.refs()[0]), weights[10], torch.float16)
    with pytest.raises(SourceError, match="no revision names a step.*revisions: v10, v20.*--revision-pattern"):
        source(tmp_path, "someorg/renamed").refs()
    assert [r.step for r in source(tmp_path, "someorg/renamed", revision_pattern=r"v(\d+)").refs()] == [10, 20]
    with pytest.raises(SourceError, match="both claim step 10"):
        source(tmp_path, "someorg/dupes").refs()


def test_unknown_suite_and_repo(hub, tmp_path):
    with pytest.raises(SourceError, match="closest catalog names: pythia-160m"):
        source(tmp_path, "pythia-16m")
    with pytest.raises(SourceError, match="hub repo nobody/pythia-160mm not found at http://127.0.0.1:.*closest catalog names: pythia-160m"):
        source(tmp_path, "nobody/pythia-160mm").refs()


# ---- missing revisions ---------------------------------------------------------------------------


def test_revision_without_weights_is_missing(hub, tmp_path):
    src = source(tmp_path)
    ref = by_step(src.refs())[8]
    with pytest.raises(MissingRevision, match="pythia-14m@step8 holds no weights"):
        src.open(ref)
    src.prefetch(ref)  # the background error surfaces in open()
    with pytest.raises(MissingRevision):
        src.open(ref)
    assert cached_files(tmp_path) == []


def test_vanished_revision_is_missing(hub, tmp_path):
    src = source(tmp_path, "faults/vanish")
    refs = src.refs()
    hub.delete_branch("faults/vanish", "step2")
    with pytest.raises(MissingRevision, match="faults/vanish@step2 no longer exists"):
        src.open(refs[1])
    assert src.open(refs[0]).step == 1


# ---- cache: prefetch, release, bounded disk --------------------------------------------------------


def test_release_evicts_but_spares_shared_blobs(hub, tmp_path, weights):
    src = source(tmp_path)
    refs = by_step(src.refs())
    first, second = src.open(refs[1]), src.open(refs[2])
    src.release(refs[1])
    assert not first.path.exists()
    assert sorted(p.name for p in second.path.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert second.config is not None  # config.json is one blob shared by both revisions
    assert_same(second, weights[2], torch.float16)
    assert len([f for f in cached_files(tmp_path) if "/blobs/" in f]) == 2
    src.release(refs[2])
    assert cached_files(tmp_path) == [] and not (tmp_path / "cache" / "models--EleutherAI--pythia-14m").exists()


def test_keep_leaves_files(hub, tmp_path):
    src = source(tmp_path, keep=True)
    ref = by_step(src.refs())[1]
    path = src.open(ref).path
    src.release(ref)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_prefetch_downloads_in_background(hub, tmp_path, weights):
    src = source(tmp_path)
    refs = by_step(src.refs())
    src.prefetch(refs[2])
    deadline = time.monotonic() + 10
    while not any(f.endswith("pytorch_model.bin") for f in cached_files(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(f.endswith("pytorch_model.bin") for f in cached_files(tmp_path)), "prefetch did not download on its own"
    ckpt = src.open(refs[2])
    assert_same(ckpt, weights[2], torch.float16)
    src.prefetch(refs[2])  # already fetched: no second download
    assert src.open(refs[2]).path == ckpt.path


def test_sweep_keeps_cache_bounded(hub, tmp_path, weights):
    """The pipeline's order: open current, prefetch next, analyze, release current (first/last kept as references)."""
    src = source(tmp_path)
    refs = [r for r in src.refs() if r.step != 8]
    first, last = src.open(refs[0]), src.open(refs[-1])
    most = 0
    for i, ref in enumerate(refs[1:-1], start=1):
        ckpt = src.open(ref)
        src.prefetch(refs[i + 1])
        assert_same(ckpt, weights[ref.step], torch.float16)
        snapshots = list((tmp_path / "cache" / "models--EleutherAI--pythia-14m" / "snapshots").iterdir())
        most = max(most, len(snapshots))
        src.release(ref)
    assert most <= 4  # first, last, current, next
    assert_same(first, weights[0], torch.float16)
    assert_same(last, weights[1000], torch.float16)
    src.release(refs[0])
    src.release(refs[-1])
    assert cached_files(tmp_path) == []
    with pytest.raises(MissingRevision):
        src.open(by_step(src.refs())[8])
    src.close()


# ---- faults ------------------------------------------------------------------------------------------


def test_listed_size_mismatch_is_retried_then_refused(hub, tmp_path, caplog):
    src = source(tmp_path, "faults/lie")
    with pytest.raises(SourceError, match="model.safetensors downloaded as \\d+ bytes but the hub lists \\d+.*deleted it"):
        src.open(src.refs()[0])
    assert [r.message.rsplit("; ", 1)[1] for r in caplog.records if "the hub lists" in r.message] == [
        "downloading it again", "giving up"]
    assert cached_files(tmp_path) == []  # nothing truncated is left to analyze


def test_truncated_cached_file_is_downloaded_again(hub, tmp_path, weights):
    src = source(tmp_path, keep=True)
    ref = by_step(src.refs())[1]
    path = src.open(ref).path / "pytorch_model.bin"
    blob = path.resolve()
    size = blob.stat().st_size
    with open(blob, "r+b") as fh:
        fh.truncate(size // 2)
    src.release(ref)  # keep=True: files stay, the next open() checks them again
    ckpt = src.open(ref)
    assert (ckpt.path / "pytorch_model.bin").stat().st_size == size
    assert_same(ckpt, weights[1], torch.float16)


def test_disk_nearly_full_stops_before_writing(hub, tmp_path):
    src = source(tmp_path, min_free_bytes=1 << 60)
    ref = by_step(src.refs())[1]
    with pytest.raises(SourceError, match="not enough disk space in .* for EleutherAI/pythia-14m@step1: it needs"):
        src.open(ref)
    assert cached_files(tmp_path) == []


def test_server_down_is_a_clear_error_and_a_rerun_resumes(hub, tmp_path, weights):
    src = source(tmp_path, retries=2)
    refs = by_step(src.refs())
    src.open(refs[1])
    hub.stop()
    try:
        started = time.monotonic()
        with pytest.raises(SourceError) as err:
            src.open(refs[2])
        assert time.monotonic() - started < 5
        message = str(err.value)
        assert message.startswith(f"hub at {hub.endpoint} unreachable: ") and message.endswith("; rerun to resume")
        assert "\n" not in message and "(after 3 attempts)" in message
        with pytest.raises(SourceError, match="unreachable"):
            src.refs()
    finally:
        hub.start()
    assert_same(src.open(refs[2]), weights[2], torch.float16)


def test_retries_ride_out_a_restart(hub, tmp_path):
    src = source(tmp_path, retries=8, backoff=0.1)
    hub.stop()
    restart = threading.Timer(0.3, hub.start)
    restart.start()
    try:
        assert [r.step for r in src.refs()][:2] == [0, 1]
    finally:
        restart.join()


def test_5xx_are_retried(hub, tmp_path, weights):
    with FaultProxy(hub.endpoint) as proxy:
        src = source(tmp_path, endpoint=proxy.endpoint, retries=3)
        ref = by_step(src.refs())[1]
        proxy.fail_next(2, 503)
        assert_same(src.open(ref), weights[1], torch.float16)
        assert proxy.failed == 2
        proxy.fail_next(100, 502)
        with pytest.raises(SourceError, match="failed listing EleutherAI/pythia-14m@step2 \\(HTTP 502\\) after 4 attempts; rerun to resume"):
            src.open(CheckpointRef(2, "EleutherAI/pythia-14m@step2"))
        assert proxy.failed == 2 + 4


def test_rate_limit_is_retried_then_reported(hub, tmp_path):
    with FaultProxy(hub.endpoint) as proxy:
        src = source(tmp_path, endpoint=proxy.endpoint, retries=2)
        proxy.fail_next(100, 429)
        with pytest.raises(SourceError, match="rate-limited listing revisions of EleutherAI/pythia-14m after 3 attempts; set HF_TOKEN"):
            src.refs()
        assert proxy.failed == 3


def test_token_never_in_ids_or_errors(hub, tmp_path, monkeypatch):
    secret = "hf_DoNotLeakThisToken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    src = source(tmp_path, endpoint=hub.endpoint.replace("http://", f"http://user:{secret}@"))
    ref = by_step(src.refs())[1]
    assert src.open(ref).step == 1
    assert secret not in src.id + repr(src) + src.host + ref.revision
    hub.stop()
    try:
        with pytest.raises(SourceError) as err:
            src.open(CheckpointRef(2, "EleutherAI/pythia-14m@step2"))
        assert secret not in str(err.value)
    finally:
        hub.start()
