"""The documentation: README stays a short front page whose links work on GitHub, and the mkdocs
site builds strictly (a broken link or anchor, a missing page, or a page left out of the nav fails)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub (and mkdocs' toc) gives a heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(), flags=re.S)  # '# comments' in code are not headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def relative_links(markdown: Path) -> list[str]:
    return [t for t in LINK.findall(markdown.read_text()) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert len(text.encode()) < 15_000, f"README.md is {len(text.encode())} bytes; move reference material to docs/"
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    demo, tests = blocks[0], blocks[1]
    assert text.index("```bash") < 200  # the first thing a reader sees
    assert demo == "pip install torch==2.13.0 && pip install -e . && ckptscope demo"
    assert tests == 'pip install torch==2.13.0 && pip install -e ".[test]" && python3 -m pytest -q tests'
    # CI runs README's test command: the same torch, extra and pytest invocation
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and '-e ".[test]"' in ci
    assert re.search(r"^python3 -m pytest -q .*\btests$", ci, flags=re.M), ci


def test_every_relative_link_in_readme_resolves():
    links = relative_links(README)
    assert {"docs/store.md", "docs/report.png", "docs/api.md"} <= {t.split("#")[0] for t in links}, links
    for target in links:
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(file), f"README links to {target}; {path} has no heading with that anchor"


def test_every_docs_page_is_in_the_nav():
    """mkdocs' own check, done here too so it holds where mkdocs is not installed."""
    config = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(re.search(rf":\s+{re.escape(p)}$", config, flags=re.M) for p in pages), pages


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (pip install -e '.[docs]')")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300)


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = mkdocs(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr
    for page in (ROOT / "docs").glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), page
    api = (site / "api" / "index.html").read_text()
    # mkdocstrings rendered the docstrings, not just the page text
    assert 'id="ckptscope.store.db.Store.sql"' in api and "A ckptscope DuckDB file" in api
    assert 'id="ckptscope.ingest"' in api and 'id="ckptscope.errors.CkptscopeError"' in api
    assert (site / "report.png").is_file() and 'src="../report.png"' in (site / "reports" / "index.html").read_text()


def test_mkdocs_build_strict_fails_on_a_broken_anchor_and_a_page_outside_the_nav(tmp_path):
    """The strictness the CI relies on is configured, not assumed: a copy of the docs with two planted faults."""
    import yaml

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "orphan.md").write_text("# Orphan\n")
    with (docs / "store.md").open("a") as f:
        f.write("\nSee [the tiers](metrics.md#no-such-heading).\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-heading" in result.stderr and "orphan.md" in result.stderr, result.stderr


def test_readme_tour_runs_as_written(tmp_path):
    """Every command of README's tour runs as it is, after `ckptscope demo`, and so does its Python."""
    text = README.read_text()
    tour = text[text.index("## A short tour"):]
    commands = [line for block in re.findall(r"```bash\n(.*?)\n```", tour, flags=re.S) for line in block.splitlines()]
    python = re.findall(r"```python\n(.*?)\n```", tour, flags=re.S)
    assert len(commands) >= 5 and python
    res = subprocess.run(["ckptscope", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    for command in commands:
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and "error" not in res.stderr.lower(), (command, res.stdout, res.stderr)
    assert (tmp_path / "alpha.parquet").stat().st_size > 0 and (tmp_path / "report.html").stat().st_size > 0
    res = subprocess.run([sys.executable, "-c", python[0]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
