"""Ingesting from the HF cache with HF_HUB_OFFLINE=1, the way a compute node without internet does.

A "login node" phase downloads against olah on loopback (`ckptscope ingest --keep` for some steps,
the real `hf download` for another), then the server is stopped for good. The offline ingests run
through the real CLI in subprocesses whose every Python process (spawned workers included) loads a
`sitecustomize` that refuses and records any DNS lookup or internet socket connect, so "never
touches the network" is checked, not assumed. In-process tests turn huggingface_hub's offline
constant on (it reads HF_HUB_OFFLINE at import) while `serve()`'s loopback-only DNS guard stays up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptscope
from ckptscope.errors import SourceError
from hubserver import checkpoint_files, serve
from runs import neox_state, trajectory, write_run

REPO = "EleutherAI/pythia-14m"
STEPS = [0, 1, 2, 4, 8]
ONLINE = "0,1,4,8"  # fetched by `ckptscope ingest --keep`; step 2 comes from `hf download`
TOKENS = 2_097_152
Q = "SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL"
GUARD = '''\
import os, socket

def _refuse(what):
    with open(os.environ["NETGUARD_LOG"], "a") as log:
        log.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network use refused in an offline test: {what}")

def _getaddrinfo(host, *args, **kwargs):
    _refuse(f"getaddrinfo {host!r}")

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

def _guarded(real):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(f"connect {address!r}")
        return real(self, address)
    return connect

socket.getaddrinfo = _getaddrinfo
socket.socket.connect = _guarded(_connect)
socket.socket.connect_ex = _guarded(_connect_ex)
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The login node's work: a Pythia-style repo (fp16 .bin on step branches) and a generic safetensors
    repo downloaded into one HF cache; then the server stops and stays stopped for the whole module."""
    root = tmp_path_factory.mktemp("offline")
    state, config = neox_state(seed=11)
    weights = trajectory(state, STEPS)
    cache = root / "cache"
    with serve(root / "hub") as hub:
        commits = hub.add_repo(REPO, {f"step{s}": checkpoint_files(weights[s], config, fmt="bin") for s in STEPS})
        hub.add_repo("someorg/run", {f"checkpoint-{s}": checkpoint_files(weights[s], config) for s in (1, 2)})
        ckptscope.ingest("pythia-14m", store=root / "online.duckdb", steps=ONLINE, keep=True, cache_dir=cache)
        ckptscope.ingest("someorg/run", store=root / "run.duckdb", keep=True, cache_dir=cache)
        for k in (0, 20):  # MultiBERTs-style: one repo per step, the checkpoint on main
            hub.add_repo(f"google/multiberts-seed_0-step_{k}k", {"main": checkpoint_files(weights[k // 10], config, fmt="bin")})
        ckptscope.ingest("multiberts-seed_0", store=root / "mb.duckdb", keep=True, cache_dir=cache)
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        hf = [sys.executable, "-c", "from huggingface_hub.cli.hf import main; main()"]
        subprocess.run([*hf, "download", REPO, "--revision", "step2", "--cache-dir", str(cache)],
                       env=env, check=True, capture_output=True, timeout=120)
        hub.stop()
        yield root, cache, commits, weights, config


def listing(cache: Path) -> dict[str, int]:
    """Every file, symlink and ref in the cache with its size, lock files aside."""
    return {str(p.relative_to(cache)): p.lstat().st_size for p in sorted(cache.rglob("*"))
            if not p.is_dir() and ".locks" not in p.parts}


def offline_cli(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ckptscope ingest ARGS` with HF_HUB_OFFLINE=1, every Python process under the network guard."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    src = Path(ckptscope.__file__).parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NETGUARD_LOG": str(tmp_path / "network.log"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": os.pathsep.join([str(guard), str(src)]), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-m", "ckptscope.cli", "ingest", *args, "--cache-dir", str(cache)],
                          env=env, capture_output=True, text=True, timeout=300)
    attempts = (tmp_path / "network.log").read_text() if (tmp_path / "network.log").exists() else ""
    assert attempts == "", f"offline ingest tried the network:\n{attempts}"
    return done


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "HF_HUB_OFFLINE" in line]


def test_kept_downloads_record_their_branch(cache):
    _, cache_dir, commits, _, _ = cache
    refs = cache_dir / "models--EleutherAI--pythia-14m" / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == {f"step{s}": commits[f"step{s}"] for s in (0, 1, 2, 4, 8)}


def test_offline_ingest_matches_online_and_names_uncached_steps(cache, tmp_path):
    root, cache_dir, _, _, _ = cache
    before = listing(cache_dir)
    store = tmp_path / "offline.duckdb"
    done = offline_cli(tmp_path, cache_dir, "pythia-14m", "--store", str(store), "--steps", f"{ONLINE},16", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert notes(done.stderr) == [
        f"HF_HUB_OFFLINE: 1 selected step(s) of {REPO} are not in the HF cache at {cache_dir}, skipped: 16; download them "
        f"where there is internet, e.g. `hf download {REPO} --revision step16`"]
    with ckptscope.Store(store, read_only=True) as off, ckptscope.Store(root / "online.duckdb", read_only=True) as on:
        assert off.sql(Q).height > 0 and off.sql(Q).equals(on.sql(Q))
        ck = "SELECT step, tokens, status, revision FROM checkpoints ORDER BY step"
        assert off.sql(ck).equals(on.sql(ck))
        assert off.sql("SELECT source FROM models").item() == "hub:EleutherAI/pythia-14m"
    assert listing(cache_dir) == before  # offline implies keep: nothing evicted, though --keep was not given


def test_offline_all_uses_the_published_grid_and_hf_download_revisions(cache, tmp_path):
    root, cache_dir, _, weights, config = cache
    before = listing(cache_dir)
    store = tmp_path / "offline.duckdb"
    done = offline_cli(tmp_path, cache_dir, "pythia-14m", "--store", str(store))
    assert done.returncode == 0, done.stderr
    [note] = notes(done.stderr)
    assert ("149 selected step(s)" in note and
            "skipped: 16, 32, 64, 128, 256, 512, every 1000 from 1000 to 143000;" in note)
    local = write_run(tmp_path / "local", weights, config, fmt="bin")
    ckptscope.ingest(local, store=tmp_path / "local.duckdb", name="pythia-14m")
    with ckptscope.Store(store, read_only=True) as off, ckptscope.Store(tmp_path / "local.duckdb", read_only=True) as loc:
        assert off.sql(Q).equals(loc.sql(Q))
        ck = off.sql("SELECT step, tokens, revision FROM checkpoints ORDER BY step")
        assert ck["step"].to_list() == STEPS
        assert ck["tokens"].to_list() == [s * TOKENS for s in STEPS]
        assert ck["revision"][2] == f"{REPO}@step2"  # cached by `hf download`, not by ckptscope
    assert listing(cache_dir) == before


def test_nothing_cached_is_one_line_and_no_store(cache, tmp_path):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    done = offline_cli(tmp_path, empty, "pythia-14m", "--store", str(tmp_path / "s.duckdb"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: HF_HUB_OFFLINE is set and the HF cache at {empty} holds no checkpoint of {REPO}; download some where there is "
        f"internet, e.g. `hf download {REPO} --revision step0`, then rerun (or unset HF_HUB_OFFLINE)"]
    assert not (tmp_path / "s.duckdb").exists()


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode for this process (it read HF_HUB_OFFLINE when imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_no_selected_step_cached_is_an_error(cache, offline, tmp_path):
    _, cache_dir, _, _, _ = cache
    with pytest.raises(SourceError) as err:
        ckptscope.ingest("pythia-14m", store=tmp_path / "s.duckdb", steps="16,32", cache_dir=cache_dir)
    assert str(err.value) == (
        f"HF_HUB_OFFLINE is set and none of the selected steps of {REPO} (16, 32) is in the HF cache at {cache_dir} "
        f"(cached: 0, 1, 2, 4, 8); download them where there is internet, e.g. `hf download {REPO} --revision step16`, then rerun")
    assert not (tmp_path / "s.duckdb").exists()


def copy_cache(cache_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy, symlinks=True)
    return copy


def truncate(snapshot_file: Path, keep: float = 0.6) -> int:
    blob = snapshot_file.resolve()
    size = int(blob.stat().st_size * keep)
    with open(blob, "r+b") as fh:
        fh.truncate(size)
    return size


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_cached_file_is_one_line_before_any_write(cache, offline, tmp_path, fmt):
    _, cache_dir, commits, _, _ = cache
    copy = copy_cache(cache_dir, tmp_path)
    if fmt == "bin":
        name, revision, spec = "pythia-14m", f"{REPO}@step4", "0,4"
        size = truncate(copy / "models--EleutherAI--pythia-14m" / "snapshots" / commits["step4"] / "pytorch_model.bin")
        problem = f"truncated or corrupt ({size} bytes)"
    else:
        name, revision, spec = "someorg/run", "someorg/run@checkpoint-2", "1,2"
        folder = copy / "models--someorg--run"
        weights_file = folder / "snapshots" / (folder / "refs" / "checkpoint-2").read_text() / "model.safetensors"
        whole = weights_file.stat().st_size
        size = truncate(weights_file)
        problem = f"truncated ({size} bytes, its header needs {whole})"
    branch = revision.split("@")[1]
    with pytest.raises(SourceError) as err:
        ckptscope.ingest(name, store=tmp_path / "s.duckdb", steps=spec, cache_dir=copy)
    assert str(err.value) == (
        f"{revision}: {'pytorch_model.bin' if fmt == 'bin' else 'model.safetensors'} in the HF cache at {copy} is {problem}; "
        f"it cannot be fetched again offline: run `hf download {revision.split('@')[0]} --revision {branch} --force-download` "
        "where there is internet, then rerun")
    assert not (tmp_path / "s.duckdb").exists()


def test_incomplete_snapshot_counts_as_not_cached(cache, offline, tmp_path, caplog):
    """A revision whose weights left the cache (a deleted blob) is listed as not cached, never opened."""
    _, cache_dir, commits, _, _ = cache
    copy = copy_cache(cache_dir, tmp_path)
    (copy / "models--EleutherAI--pythia-14m" / "snapshots" / commits["step8"] / "pytorch_model.bin").resolve().unlink()
    report = ckptscope.ingest("pythia-14m", store=tmp_path / "s.duckdb", steps="0:8", cache_dir=copy)
    assert sorted(report["step"].to_list()) == [0, 1, 2, 4]
    assert [r.getMessage() for r in caplog.records if "HF_HUB_OFFLINE" in r.getMessage()] == [
        f"HF_HUB_OFFLINE: 1 selected step(s) of {REPO} are not in the HF cache at {copy}, skipped: 8; "
        f"download them where there is internet, e.g. `hf download {REPO} --revision step8`"]


def test_one_repo_per_step_offline(cache, offline):
    """Each cached repo of the grid is one checkpoint; the weights are those of the step's own repo."""
    from ckptscope.sources.hub import HubSource

    _, cache_dir, _, weights, _ = cache
    src = HubSource("multiberts-seed_0", cache_dir=cache_dir)
    refs = src.refs()
    assert [(r.step, r.revision) for r in refs] == [(0, "google/multiberts-seed_0-step_0k@main"),
                                                    (20000, "google/multiberts-seed_0-step_20k@main")]
    name = "gpt_neox.layers.0.attention.dense.weight"
    assert torch.equal(src.open(refs[1]).read(name), weights[2][name].half())
