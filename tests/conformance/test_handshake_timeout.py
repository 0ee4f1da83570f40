"""Slow or idle half-open connections are closed (PROTOCOL.md 4 and 15 "Limits").

A connection that has not received OPEN_OK within the server's handshake timeout gets
ERROR(rid 0, 503 unexpected-frame) and is closed, however it spends the time: sending
nothing, part of the preamble, the preamble one byte at a time, or no AUTH after HELLO.
Trickling bytes does not extend the deadline. A connection that finished the handshake
is not affected, and the broker keeps serving throughout.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

import pytest

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, open_conn

TIMEOUT_MS = 1000
T = TIMEOUT_MS / 1000


@pytest.fixture
def slow_broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory("--handshake-timeout-ms", str(TIMEOUT_MS))


def _closed_for_timeout(c: Conn, t0: float) -> float:
    """The connection ends with ERROR(rid 0, 503) once the timeout passed; return when."""
    err = c.expect_fatal(wire.UNEXPECTED_FRAME, timeout=T + 5)
    took = time.monotonic() - t0
    assert T - 0.1 <= took <= T + 3, f"closed after {took:.2f}s, timeout is {T}s"
    assert "handshake" in err["message"]
    return took


def _trickle(c: Conn, data: bytes, interval: float) -> int:
    """Send ``data`` one byte per ``interval`` until the server answers; bytes sent."""
    for i, byte in enumerate(data):
        readable, _, _ = select.select([c.sock], [], [], interval)
        if readable:  # the server's ERROR (and close) arrived: stop writing
            return i
        if not c.try_send(bytes([byte])):
            return i
    return len(data)


def test_idle_connection_is_closed(slow_broker: BrokerProcess) -> None:
    with Conn(slow_broker.port) as c:
        _closed_for_timeout(c, time.monotonic())


def test_partial_preamble_is_closed(slow_broker: BrokerProcess) -> None:
    with Conn(slow_broker.port) as c:
        t0 = time.monotonic()
        c.send(wire.PREAMBLE[:5])
        _closed_for_timeout(c, t0)


def test_preamble_one_byte_at_a_time_is_closed(slow_broker: BrokerProcess) -> None:
    """Steady trickling does not extend the deadline (one byte per 0.3 s here)."""
    with Conn(slow_broker.port) as c:
        t0 = time.monotonic()
        sent = _trickle(c, wire.PREAMBLE, 0.3)
        assert sent < len(wire.PREAMBLE)
        _closed_for_timeout(c, t0)


def test_hello_but_no_auth_is_closed(slow_broker: BrokerProcess) -> None:
    with Conn(slow_broker.port) as c:
        t0 = time.monotonic()
        c.send(wire.PREAMBLE)
        c.expect("hello")
        _closed_for_timeout(c, t0)


def test_auth_trickled_is_closed(slow_broker: BrokerProcess) -> None:
    with Conn(slow_broker.port) as c:
        t0 = time.monotonic()
        c.send(wire.PREAMBLE)
        c.expect("hello")
        auth = wire.encode("auth", "anonymous", "", {"library": "slow"}, 0, 0)
        assert _trickle(c, auth, 0.2) < len(auth)
        _closed_for_timeout(c, t0)


def test_many_half_open_connections_are_all_closed(slow_broker: BrokerProcess) -> None:
    """Fifty at once, in every pre-OPEN state; an open connection is untouched."""
    assert slow_broker.proc is not None
    fd_dir = f"/proc/{slow_broker.proc.pid}/fd"
    fds_before = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else 0
    with open_conn(slow_broker.port) as good:
        conns = []
        try:
            t0 = time.monotonic()
            for i in range(50):
                c = Conn(slow_broker.port, timeout=T + 5)
                conns.append(c)
                if i % 3 == 1:
                    c.send(wire.PREAMBLE[: 1 + i % 7])
                elif i % 3 == 2:
                    c.send(wire.PREAMBLE)
            for c in conns:
                c.expect_closed(timeout=max(0.1, t0 + T + 5 - time.monotonic()))
            assert time.monotonic() - t0 <= T + 5
        finally:
            for c in conns:
                c.close()
        # Past the timeout, the open connection still works.
        assert good.open_ok is not None
        good.send_frame("queue_declare", 1, "", False, True, True)
        reply = good.recv()
        while reply.kind != "queue_declare_ok":  # tolerate frames sent after OPEN_OK
            assert reply.kind != "error", reply
            reply = good.recv()
    assert slow_broker.alive()
    if fds_before:  # no leaked sockets (the good connection is closed too by now)
        deadline = time.monotonic() + 5
        while len(os.listdir(fd_dir)) > fds_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(fd_dir)) <= fds_before + 2, sorted(os.listdir(fd_dir))
