"""A real Hub-compatible server on loopback, for tests: olah serving local git repositories.

`olah` (PyPI) is a self-hosted Hub mirror. Run offline, it serves every git repository under
`mirrors/models/ORG/NAME` as model `ORG/NAME`, its branches and tags as revisions, through the
same HTTP API huggingface.co speaks, so tests drive the real `huggingface_hub` client.

What we found running olah 0.5.4 against huggingface_hub 2.4 (tests rely on these):
- `list_repo_refs`, `model_info(revision=…)`, `list_repo_tree`, `get_paths_info` and
  `hf_hub_download(revision=branch or full commit)` all work; no `main` branch is needed.
- Plain git blobs are served as they are, with their true sizes in tree / paths-info listings.
  A Git LFS pointer is served from `.git/lfs/objects/…`, but listed with the size the *pointer*
  states (olah only treats 121–149-byte blobs as pointers), which is how `LfsFile(listed_size=…)`
  makes the listing and the download disagree, like a truncated upload would.
- `model_info(files_metadata=True)` lists siblings without sizes; sizes come from the tree or
  paths-info endpoints.
- Error codes differ from the Hub: an unknown repo answers 404 on `/refs` (EntryNotFoundError)
  and 401 elsewhere (RepositoryNotFoundError); an unknown branch or file answers 401
  (RepositoryNotFoundError, where the Hub says RevisionNotFound / EntryNotFound); an unknown
  full commit hash answers 500.
- Repositories are read on every request, so branches added or deleted while it runs show up.
- It writes `./logs` under its working directory, so it runs with cwd inside the temp dir.
- huggingface_hub 2.x fetches `{constants.ENDPOINT}/api/agent-harnesses` (huggingface.co unless
  HF_ENDPOINT was set before it was imported) to build its user agent, unless telemetry is off.
  Patching `constants.ENDPOINT` afterwards is worse: `hf_hub_download` then stops rewriting its
  URL template and goes to huggingface.co. So `serve()` turns telemetry off, leaves ENDPOINT
  alone (HubSource passes its endpoint explicitly), and refuses every DNS lookup but loopback
  while it runs; olah's own upstream is a closed loopback port. Nothing leaves the machine.
- `hf_hub_download` retries a failed HEAD itself (5 times, 1+2+4+8+8 s) before raising, whatever
  the caller's retry policy; fault tests stop the server before a listing call, not mid-download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from runs import write_checkpoint

COMMITTER = "ckptscope tests <tests@ckptscope.invalid>"


@dataclass(frozen=True)
class LfsFile:
    """A file committed as a Git LFS pointer; `listed_size` makes the pointer claim another size."""

    data: bytes
    listed_size: int | None = None


Files = dict[str, "bytes | LfsFile"]


def checkpoint_files(state: dict[str, torch.Tensor], config: dict | None, **kw) -> dict[str, bytes]:
    """The files `runs.write_checkpoint` writes for one checkpoint, as {filename: bytes}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = write_checkpoint(Path(tmp) / "ckpt", state, config, **kw)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode().strip()


class OlahHub:
    """olah on a free loopback port over git repositories built under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.refused_hosts: list[str] = []  # non-loopback names this process tried to resolve
        (self.root / "olah-repos").mkdir(parents=True, exist_ok=True)
        self.mirrors.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    # ---- repositories ----------------------------------------------------------------------

    def add_repo(self, repo_id: str, branches: dict[str, Files]) -> dict[str, str]:
        """Create a git repo with one root commit per branch holding exactly `files`; returns {branch: commit}."""
        path = self.repo_path(repo_id)
        if not path.exists():
            path.mkdir(parents=True)
            _git(path, "init", "-q", "-b", "main")
            _git(path, "config", "user.name", "ckptscope tests")
            _git(path, "config", "user.email", "tests@ckptscope.invalid")
        # git fast-import writes every branch in one process; each commit is a root commit.
        stream = bytearray()
        for branch, files in branches.items():
            message = f"checkpoint {branch}".encode()
            stream += f"commit refs/heads/{branch}\ncommitter {COMMITTER} {int(time.time())} +0000\n".encode()
            stream += f"data {len(message)}\n".encode() + message + b"\n"
            for name, content in sorted(files.items()):
                blob = self._lfs_pointer(path, content) if isinstance(content, LfsFile) else content
                stream += f"M 100644 inline {name}\ndata {len(blob)}\n".encode() + blob + b"\n"
        _git(path, "fast-import", "--quiet", stdin=bytes(stream))
        return {branch: _git(path, "rev-parse", f"refs/heads/{branch}") for branch in branches}

    @staticmethod
    def _lfs_pointer(repo: Path, content: LfsFile) -> bytes:
        oid = hashlib.sha256(content.data).hexdigest()
        obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(content.data)
        size = len(content.data) if content.listed_size is None else content.listed_size
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()

    def delete_branch(self, repo_id: str, branch: str) -> None:
        _git(self.repo_path(repo_id), "update-ref", "-d", f"refs/heads/{branch}")

    # ---- process ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start olah and wait until it answers HTTP."""
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.root / "olah-repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            # Upstream is a closed loopback port: an offline mirror must never reach huggingface.co.
            'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
            "[accessibility]\noffline = true\n"
        )
        cli = shutil.which("olah-cli")
        cmd = [cli] if cli else [sys.executable, "-c", "from olah.server import cli; cli()"]
        log = open(self.root / "olah.log", "ab")
        self.proc = subprocess.Popen([*cmd, "-c", str(config)], cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/probe/probe/refs", timeout=1).close()
                return
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"olah did not answer on {self.endpoint} within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop olah and its process group (started in a session of its own); `start()` again reuses the port."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 2000) -> str:
        path = self.root / "olah.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def serve(root: Path) -> Iterator[OlahHub]:
    """A running OlahHub with HF_ENDPOINT pointed at it and no way off the machine; undone on exit.

    huggingface_hub reads its settings at import time, so telemetry and offline mode are set on
    its `constants` as well as in the environment (see the module docstring for why ENDPOINT is not).
    """
    pytest.importorskip("olah")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from huggingface_hub import constants

    hub = OlahHub(root)
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            hub.refused_hosts.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"tests may not resolve {host!r}; only the loopback hub is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.endpoint)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(socket, "getaddrinfo", loopback_only)
        hub.start()
        try:
            yield hub
        finally:
            hub.stop()
    if hub.refused_hosts:  # swallowed by a library, perhaps, but a test tried to leave the machine
        raise RuntimeError(f"tried to resolve non-loopback hosts: {sorted(set(hub.refused_hosts))}")


class FaultProxy:
    """A loopback HTTP relay in front of a hub that can answer the next requests with an error
    status, the way an overloaded (5xx) or rate-limiting (429) Hub does; olah itself never does."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.failed = 0  # error answers given so far
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _RelayHandler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._pending = [status] * count

    def take_failure(self) -> int | None:
        with self._lock:
            if not self._pending:
                return None
            self.failed += 1
            return self._pending.pop()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = proxy.take_failure()
        if status is not None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(key, value)
        # A HEAD answer carries the size of the body it does not send.
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


def glob_live(root: Path, pattern: str) -> list[Path]:
    """`root.glob(pattern)` on a cache that a download or an eviction is changing: a directory
    that vanishes mid-walk makes pathlib raise, so the walk starts over."""
    while True:
        try:
            return list(root.glob(pattern))
        except FileNotFoundError:
            continue
