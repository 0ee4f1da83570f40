"""The distribution as a user gets it: a wheel installed into a fresh venv outside the tree.

One top-level name (``conveyor``) lands in site-packages; ``spec/`` and ``monitoring/`` ship
inside it as package data; ``mq-cli server`` from that venv serves ``GET /openapi.yaml``;
a user script ``import conveyor`` type-checks under ``mypy --strict`` with the package's
real types (a wrong annotation is caught, so the types are not ``Any``) and runs against
the installed broker.

The fresh venv gets the wheel with ``--no-deps``; its dependencies (msgpack, aiohttp, ...)
come from the running environment through one ``.pth`` line, so the test needs no network.
That environment holds no ``conveyor`` directory of its own (an editable install is an
import hook, which a ``.pth``-added directory does not run), and the venv's own
site-packages comes first on its path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.broker_process import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL_TREES = ("broker", "protocol", "client", "cli", "spec", "monitoring")

USER_SCRIPT = '''\
"""A user's program: the installed client, typed."""

import asyncio
import sys

import conveyor
from conveyor import Message, connect
from conveyor.client import Connection


async def main(url: str) -> list[bytes]:
    conn: Connection = await connect(url)
    try:
        await conn.declare_queue("pkg-check")
        for i in range(3):
            await conn.publish("", "pkg-check", f"m{i}".encode())
        msgs: list[Message] = await conn.get("pkg-check", 3)
        for m in msgs:
            m.ack()
        return [m.body for m in msgs]
    finally:
        await conn.close()


if __name__ == "__main__":
    print(conveyor.__version__, asyncio.run(main(sys.argv[1])))
'''

WRONG_SCRIPT = """\
from conveyor import connect


async def main() -> None:
    conn: int = await connect("mq://127.0.0.1:1")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` of a copy of this tree (the build writes build/ and egg-info)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            "__pycache__",
            "*.egg-info",
            "build",
            "dist",
            ".*_cache",
            "data",
            "tests",
            "venv",
            ".ci",
        ),
    )
    out = base / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (whl,) = out.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv, outside the repository, with only the wheel installed into it."""
    env = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_deps_from_test_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return env


def _site_packages(env: Path) -> Path:
    (site,) = (env / "lib").glob("python3*/site-packages")
    return site


def test_wheel_holds_one_top_level_package_and_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"conveyor"}, sorted(tops)
    for want in (
        "conveyor/__init__.py",
        "conveyor/py.typed",
        "conveyor/client/py.typed",
        "conveyor/broker/core.py",
        "conveyor/broker/http/static/index.html",
        "conveyor/protocol/_generated.py",
        "conveyor/cli/main.py",
        "conveyor/spec/openapi.yaml",
        "conveyor/spec/protocol.toml",
        "conveyor/spec/PROTOCOL.md",
        "conveyor/spec/vectors/frames.json",
        "conveyor/spec/vectors/invalid.json",
        "conveyor/monitoring/alerts.yml",
        "conveyor/monitoring/grafana-dashboard.json",
    ):
        assert want in names, want
    # Every module of the tree is in the wheel (a package missing from the mapping would
    # install without it).
    for tree in ("broker", "protocol", "client", "cli"):
        for path in (ROOT / tree).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            assert f"conveyor/{rel}" in names, rel
    licenses = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
    assert licenses, sorted(names)[-8:]
    text = zipfile.ZipFile(wheel).read(licenses[0])
    assert b"Apache License" in text and b"Version 2.0, January 2004" in text


def test_installed_venv_has_no_other_top_level_name(venv: Path) -> None:
    site = _site_packages(venv)
    assert (site / "conveyor" / "__init__.py").is_file()
    for name in TOP_LEVEL_TREES:
        assert not (site / name).exists(), f"{name}/ installed at the top of site-packages"
    entry = (venv / "bin" / "mq-cli").read_text()
    assert "conveyor.cli.main" in entry


def test_user_script_type_checks_with_real_types(venv: Path, tmp_path: Path) -> None:
    """mypy --strict resolves ``conveyor`` to the installed, typed package (py.typed)."""
    work = tmp_path / "app"
    work.mkdir()
    (work / "app.py").write_text(USER_SCRIPT)
    (work / "wrong.py").write_text(WRONG_SCRIPT)
    py = str(venv / "bin" / "python")

    def mypy(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                py,
                "-m",
                "mypy",
                "--strict",
                "--no-incremental",
                "--cache-dir",
                str(tmp_path / "c"),
                name,
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    ok = mypy("app.py")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Success" in ok.stdout
    bad = mypy("wrong.py")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'expression has type "Connection", variable has type "int"' in bad.stdout, bad.stdout


def test_installed_broker_serves_openapi_and_messages(venv: Path, tmp_path: Path) -> None:
    """``mq-cli server`` from the venv, run outside the tree: /openapi.yaml is 200 (the
    packaged spec), and the user script publishes and gets through the installed client."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    b = BrokerProcess(
        tmp_path / "data", "--http-port", "0", command=[str(venv / "bin" / "mq-cli")], cwd=elsewhere
    ).start()
    try:
        assert b.http_port, b.log_text()[-2000:]
        with urllib.request.urlopen(f"{b.http_url}/openapi.yaml", timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert body == (ROOT / "spec" / "openapi.yaml").read_text()
        (elsewhere / "app.py").write_text(textwrap.dedent(USER_SCRIPT))
        run = subprocess.run(
            [str(venv / "bin" / "python"), "app.py", b.url],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().endswith("[b'm0', b'm1', b'm2']"), run.stdout
        probe = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import conveyor, conveyor.broker as b; print(conveyor.__file__, b.__file__)",
            ],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        site = str(_site_packages(venv).resolve())
        files = probe.stdout.split()
        assert len(files) == 2 and all(str(Path(f).resolve()).startswith(site) for f in files), (
            probe.stdout + probe.stderr
        )
    finally:
        b.stop()
