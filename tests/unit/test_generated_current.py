"""The files generated from spec/protocol.toml must be current.

``tools/gen_protocol.py --check`` exits 1 if protocol/_generated.py, spec/vectors/frames.json
or the GENERATED tables of spec/PROTOCOL.md differ from what the spec produces.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "tools" / "gen_protocol.py"


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "gen_protocol.py"), "--check"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_generated_files_are_current() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_check_detects_a_stale_table(tmp_path: Path) -> None:
    """Guard against a vacuous check: a copy with one edited table must be reported."""
    for rel in (
        "tools/gen_protocol.py",
        "spec/protocol.toml",
        "spec/PROTOCOL.md",
        "spec/vectors/frames.json",
        "protocol/_generated.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    assert run_check(tmp_path).returncode == 0
    doc = tmp_path / "spec" / "PROTOCOL.md"
    text = doc.read_text()
    assert "| 404 | `not-found` |" in text
    doc.write_text(text.replace("| 404 | `not-found` |", "| 404 | `missing` |"))
    result = run_check(tmp_path)
    assert result.returncode == 1
    assert result.stdout.strip() == "stale: spec/PROTOCOL.md (run python tools/gen_protocol.py)"
