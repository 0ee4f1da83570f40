"""README's Python example runs as written against a real broker.

The example is the first code a newcomer copies, so it is extracted from README.md and
run in a fresh interpreter, pointed at a broker of its own; then what it left behind (the
queue "tasks" holding the 1,000 batch messages after the first one was consumed and
acked) is checked over a separate connection. The example imports the ``conveyor``
namespace; where that is not installed the test skips, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
README_URL = "mq://127.0.0.1:5680"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)


@pytest.mark.skipif(
    importlib.util.find_spec("conveyor") is None,
    reason="the conveyor namespace the README example imports is not installed",
)
async def test_readme_python_example_runs(broker: BrokerProcess, conn: client.Connection) -> None:
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1
    code = blocks[0]
    assert README_URL in code
    r = subprocess.run(
        [sys.executable, "-c", code.replace(README_URL, broker.url)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("b'resize image 42' False 1")
    info = await conn.declare_queue("tasks")
    assert info.messages == 1000
