"""Run a real broker process for tests: free port, temp data dir, always stopped.

The broker is started with ``--port 0``; its first stdout line names the port it bound,
so there is no race between picking a port and binding it. A broker with a TLS listener
(``--tls-cert``/``--tls-key``, e.g. ``--tls-port 0``) prints its line first: ``tls_port``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTEN_RE = re.compile(rb"conveyor listening on ([\d.]+):(\d+)")
TLS_LISTEN_RE = re.compile(rb"conveyor tls listening on ([\d.]+):(\d+)")
HTTP_LISTEN_RE = re.compile(rb"conveyor http listening on ([\d.]+):(\d+)")


class BrokerProcess:
    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        startup_timeout: float = 20.0,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        # How to run `mq-cli`: this interpreter's package by default; an installed script
        # (e.g. a fresh venv's bin/mq-cli) for the packaging test.
        self.command = command or [sys.executable, "-m", "conveyor.cli.main"]
        self.cwd = cwd
        self.extra = extra
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tls_port = 0  # the TLS listener's, if the broker has one
        self.http_port = 0  # the HTTP listener's (--http-port), printed before the others
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"

    @property
    def url(self) -> str:
        return f"mq://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def tls_url(self) -> str:
        return f"mqs://127.0.0.1:{self.tls_port}"

    def start(self, port: int = 0) -> BrokerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        cmd = [
            *self.command,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            *self.extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.cwd)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m_http = HTTP_LISTEN_RE.search(line)
            if m_http:
                self.http_port = int(m_http.group(2))
                continue
            m_tls = TLS_LISTEN_RE.search(line)
            if m_tls:
                self.tls_port = int(m_tls.group(2))
                if "--no-plain" in self.extra:
                    return self
                continue
            m = LISTEN_RE.search(line)
            if m:
                self.port = int(m.group(2))
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"broker did not start: {line!r}; log: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
