"""The documentation: the site builds with ``mkdocs build --strict``, README's links resolve.

The reference moved from README.md into the mkdocs site under docs/; a broken link,
anchor or navigation entry there would otherwise only show on a reader's screen, so the
suite builds the site (into a temporary directory, never into the tree) and fails on any
warning. The build is skipped only where mkdocs-material is not installed (the test extra
installs it).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 300

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs-material is not installed (pip install -e '.[test]' installs it)",
)


def _build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(project / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)},
    )


@needs_mkdocs
def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    r = _build(ROOT, site)
    assert r.returncode == 0, r.stdout + r.stderr
    # The pages included at build time carry their sources' content, and the diagrams are
    # handed to mermaid rather than shown as code.
    assert "Frame reference" in (site / "spec" / "index.html").read_text()
    assert "Changing the wire" in (site / "contributing" / "index.html").read_text()
    assert "Unreleased" in (site / "changelog" / "index.html").read_text()
    assert 'class="mermaid"' in (site / "architecture" / "index.html").read_text()
    assert (site / "durability" / "index.html").exists()


def _copy_project(dst: Path) -> Path:
    """What the site build reads: mkdocs.yml, docs/ and the files its pages include."""
    shutil.copytree(ROOT / "docs", dst / "docs")
    for rel in ("mkdocs.yml", "CONTRIBUTING.md", "CHANGELOG.md", "spec/PROTOCOL.md"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dst / rel)
    return dst


@needs_mkdocs
@pytest.mark.parametrize(
    ("page", "old", "new"),
    [
        ("limits.md", "(spec.md#limits)", "(spec.md#no-such-section)"),  # broken anchor
        ("index.md", "(durability.md)", "(durable.md)"),  # link to a missing page
    ],
)
def test_strict_build_fails_on_a_broken_link(tmp_path: Path, page: str, old: str, new: str) -> None:
    """The strict build is a real check: a broken anchor or page link fails it."""
    project = _copy_project(tmp_path / "project")
    path = project / "docs" / page
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    r = _build(project, tmp_path / "site")
    assert r.returncode != 0
    assert new.strip("()") in r.stdout + r.stderr


@needs_mkdocs
def test_strict_build_fails_on_a_page_missing_from_nav(tmp_path: Path) -> None:
    project = _copy_project(tmp_path / "project")
    (project / "docs" / "orphan.md").write_text("# Orphan\n")
    r = _build(project, tmp_path / "site")
    assert r.returncode != 0
    assert "orphan.md" in r.stdout + r.stderr


LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_repository_links_resolve(doc: str) -> None:
    """Relative links in the root documents (read on the repository, not in the site)
    point at files that exist."""
    text = (ROOT / doc).read_text()
    targets = [t for t in LINK_RE.findall(text) if "://" not in t and not t.startswith("#")]
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert missing == []
    if doc == "README.md":
        assert len(targets) >= 15  # the docs table and the spec links


def test_readme_keeps_the_two_commands_and_stays_short() -> None:
    """CI and newcomers read the two commands from README; the rest lives in docs/."""
    text = (ROOT / "README.md").read_text()
    start = (
        "python -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && mq-cli server"
    )
    tests = (
        "python -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' "
        "&& python -m pytest -q"
    )
    lines = text.splitlines()
    assert start in lines
    assert tests in lines
    assert len(lines) <= 180


# Reference tables that moved out of README (header rows, verbatim): they must be somewhere.
MOVED_TABLES = {
    "durability.md": [
        "| damage | start without `--repair` | `--repair` |",
        "| policy | confirm sent when | lost on a process crash (`kill -9`) "
        "| lost on power loss / kernel crash |",
    ],
    "delivery.md": ["| option | default | what it does |"],
    "auth.md": ["| operation | needs |"],
    "limits.md": ["| setting | default | refused with |"],
    "flow-control.md": ["| `blocked` | when | setting (flag and TOML) | default |"],
    "http.md": ["| endpoint | what |"],
    "monitoring.md": ["| Metric | Meaning |"],
}


@pytest.mark.parametrize("page", sorted(MOVED_TABLES))
def test_reference_tables_moved_not_dropped(page: str) -> None:
    lines = (ROOT / "docs" / page).read_text().splitlines()
    for header in MOVED_TABLES[page]:
        assert header in lines
        rows = lines[lines.index(header) + 2 :]
        body = rows[: next((i for i, r in enumerate(rows) if not r.startswith("|")), len(rows))]
        assert len(body) >= 3, (page, header)
