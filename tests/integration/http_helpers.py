"""Helpers for the HTTP listener tests: a broker with --http-port 0, JSON requests, mq-cli."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import aiohttp

from tests.broker_process import BrokerProcess

CLI = [sys.executable, "-m", "conveyor.cli.main"]


async def http(
    b: BrokerProcess,
    method: str,
    path: str,
    *,
    json: Any = None,
    token: str | None = None,
    host: str = "127.0.0.1",
    params: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON body or text or None)."""
    # What the dashboard sends too: anonymous state changes need this header.
    headers = {"X-Conveyor-Request": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.request(
            method, f"http://{host}:{b.http_port}{path}", json=json, headers=headers, params=params
        ) as r,
    ):
        if r.status == 204:
            return r.status, None
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


async def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("CONVEYOR_URL", "CONVEYOR_TOKEN", "MQ_TOKEN"):
        env.pop(k, None)
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], capture_output=True, timeout=timeout, env=env, check=False
    )
