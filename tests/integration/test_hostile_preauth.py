"""Connections that never authenticate cannot exhaust the broker: before OPEN_OK a frame
may be at most MAX_FRAME_SIZE_PREAUTH (502 beyond), unauthenticated connections are capped
in total and per address (the oldest is closed with 506 when a new one comes), and near
the open-file limit the oldest unauthenticated connections are shed (and logged) so that
authenticated clients and new ones keep being served. The broker raises its soft open-file
limit to the hard one at start.
"""

from __future__ import annotations

import asyncio
import resource
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.protocol._generated import MAX_FRAME_SIZE_CEILING, MAX_FRAME_SIZE_PREAUTH
from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.integration.bystanders import Bystanders, rss_bytes

pytestmark = pytest.mark.timeout(240)

FRAME_TOO_LARGE = wire.code("frame-too-large")
RESOURCE_ERROR = wire.code("resource-error")
PREAMBLE = wire.MAGIC + bytes([wire.MAJOR, wire.MINOR])


def _open(port: int, n: int, payload: bytes) -> list[socket.socket]:
    """``n`` connections that each send ``payload`` and then nothing (run in a thread)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            if payload:
                s.sendall(payload)
        except OSError:
            pass  # the broker may already have closed it: that is the point
        socks.append(s)
    return socks


def _outcomes(socks: list[socket.socket], seconds: float) -> tuple[int, list[bytes]]:
    """Read from every socket for ``seconds``: (how many are still open, what each of the
    closed ones received)."""
    data = {s: b"" for s in socks}
    open_ = set(socks)
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + seconds
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_)[:1000], [], [], 0.1)
        for s in ready:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            if chunk:
                data[s] += chunk
            else:
                open_.discard(s)
    return len(open_), [data[s] for s in socks if s not in open_]


def _last_error(data: bytes) -> wire.Frame:
    frames = wire.Decoder(MAX_FRAME_SIZE_CEILING, "server").feed(data)
    assert frames and frames[-1].kind == "error", frames
    return frames[-1]


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


async def _flood(
    b: BrokerProcess, n: int, payload: bytes, wait: float
) -> tuple[int, int, int, list[bytes]]:
    """``n`` connections each send ``payload`` and stall while the bystanders work;
    returns RSS before and during, how many stayed open after ``wait`` s, and what the
    closed ones received. The bystanders' figures are checked here."""
    assert b.proc is not None
    by = await Bystanders(b.url).start()
    rss_before = rss_bytes(b.proc.pid)
    socks = await asyncio.to_thread(_open, b.port, n, payload)
    try:
        rss_after = rss_bytes(b.proc.pid)
        still_open, closed = await asyncio.to_thread(_outcomes, socks, wait)
    finally:
        _close(socks)
        await by.stop()
    print(
        f"\nbystanders {by.figures()}; RSS {rss_before >> 20} -> {rss_after >> 20} MiB; "
        f"{still_open} of {n} still open"
    )
    by.check()
    return rss_before, rss_after, still_open, closed


async def test_preauth_frames_are_small(broker_factory: Callable[..., BrokerProcess]) -> None:
    """300 connections each declaring a 1 MiB AUTH-time frame and sending half of it."""
    b = broker_factory()
    assert b.proc is not None
    header = struct.pack(">IB", 1 << 20, wire.ftype("auth"))
    rss_before, rss_after, still_open, closed = await _flood(
        b, 300, PREAMBLE + header + b"\0" * (512 << 10), 5.0
    )
    assert still_open == 0
    for data in closed:
        assert _last_error(data)["code"] == FRAME_TOO_LARGE
    assert rss_after - rss_before < 32 << 20
    assert b.alive()


@pytest.mark.parametrize("limit", ["max_unauthenticated", "max_unauthenticated_per_ip"])
async def test_unauthenticated_connections_are_capped(
    broker_factory: Callable[..., BrokerProcess], limit: str
) -> None:
    """600 connections, each stuck in an unfinished AUTH frame that fits the pre-auth cap:
    beyond the limit the oldest are closed with 506, so memory stays bounded and new
    clients (the bystanders' fresh connection) get in."""
    cap = 100
    flags = {"max_unauthenticated": "1000", "max_unauthenticated_per_ip": "1000"}
    flags[limit] = str(cap)
    b = broker_factory(*[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)])
    assert b.proc is not None
    body = MAX_FRAME_SIZE_PREAUTH - 100
    header = struct.pack(">IB", body, wire.ftype("auth"))
    rss_before, rss_after, still_open, closed = await _flood(
        b, 600, PREAMBLE + header + b"\0" * (body // 2), 3.0
    )
    assert 0 < still_open <= cap
    err = _last_error(closed[0])
    assert err["code"] == RESOURCE_ERROR and err["details"]["limit"] == limit
    assert rss_after - rss_before < 48 << 20
    assert b.alive()


async def test_near_the_file_limit_unauthenticated_connections_are_shed(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The broker's open-file limit lowered to 400 while it runs; 500 idle sockets (no
    preamble): the oldest are shed with a warning in the log, authenticated connections
    stay and a new client connects."""
    b = broker_factory("--max-unauthenticated", "10000", "--max-unauthenticated-per-ip", "10000")
    assert b.proc is not None
    by = await Bystanders(b.url).start()
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (400, 400))
    socks = await asyncio.to_thread(_open, b.port, 500, b"")
    try:
        still_open, closed = await asyncio.to_thread(_outcomes, socks, 3.0)
    finally:
        _close(socks)
        await by.stop()
    print(f"\nbystanders {by.figures()}; {still_open} of 500 idle sockets still open")
    by.check()
    assert still_open < 400 - 3
    assert closed and _last_error(closed[0])["details"]["limit"] == "open_files"
    assert "near the open-file limit" in b.log_text()
    assert b.alive()


def test_soft_file_limit_is_raised_at_start(broker_factory: Callable[..., BrokerProcess]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard open-file limit {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        b = broker_factory()  # inherits the soft limit of 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert b.proc is not None
    for line in Path(f"/proc/{b.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            assert line.split()[3:5] == [str(hard), str(hard)], line
            break
    else:
        raise AssertionError("no open-file limit in /proc")
