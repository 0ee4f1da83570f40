"""Heartbeats, orderly close and graceful server shutdown (PROTOCOL.md 6, 14)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Closed, Conn, open_conn

AUTH_HB_500 = ("anonymous", "", {"library": "raw"}, 0, 500)


def test_server_sends_heartbeats_when_idle(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        assert c.handshake(*AUTH_HB_500)["heartbeat_ms"] == 500
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            c.send_frame("heartbeat")  # keep the server's idle timer happy
            try:
                f = c.recv_any(0.25)
            except TimeoutError:
                continue
            assert f.kind == "heartbeat", f
            c.heartbeats += 1
        # Idle for 2 s with a 500 ms interval: at least 2 heartbeats (one per interval is a MUST).
        assert c.heartbeats >= 2
        assert not c.eof
        assert c.request("queue_declare", 1, "", False, True, True).kind == "queue_declare_ok"


def test_silent_client_gets_heartbeat_timeout(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.handshake(*AUTH_HB_500)
        start = time.monotonic()
        frames: list[wire.Frame] = []
        while True:
            try:
                frames.append(c.recv_any(4.0))
            except Closed:
                break
        elapsed = time.monotonic() - start
        kinds = [f.kind for f in frames]
        assert kinds[-1] == "error", kinds
        assert (frames[-1]["rid"], frames[-1]["code"]) == (0, wire.HEARTBEAT_TIMEOUT)
        assert set(kinds[:-1]) <= {"heartbeat"} and len(kinds) >= 2, kinds
        # Closed after more than 2 intervals of silence, but not much later.
        assert 0.9 <= elapsed < 3.0, elapsed
    assert module_broker.alive()


def test_heartbeat_from_client_counts_as_traffic(module_broker: BrokerProcess) -> None:
    """A client that only sends HEARTBEATs (every 300 ms) is not timed out."""
    with Conn(module_broker.port) as c:
        c.handshake(*AUTH_HB_500)
        end = time.monotonic() + 1.6
        while time.monotonic() < end:
            c.send_frame("heartbeat")
            c.expect_silence(0.3)
        assert not c.eof


def test_close_gets_close_ok_then_socket_closes(module_broker: BrokerProcess) -> None:
    with open_conn(module_broker.port) as c:
        c.send_frame("close", wire.OK_CODE, "bye")
        frames = c.expect_closed(timeout=3.0)
        assert [f.kind for f in frames] == ["close_ok"]


def test_close_with_defaults_and_pending_requests(module_broker: BrokerProcess) -> None:
    """Requests before CLOSE in the same write are answered first; CLOSE() uses defaults."""
    with open_conn(module_broker.port) as c:
        c.send(wire.encode("queue_declare", 5, "", False, True, True) + wire.encode("close"))
        frames = c.expect_closed(timeout=3.0)
        assert [f.kind for f in frames] == ["queue_declare_ok", "close_ok"]
        assert frames[0]["rid"] == 5


def test_graceful_shutdown_sends_close_320(broker: BrokerProcess) -> None:
    with open_conn(broker.port) as c, open_conn(broker.port) as idle:
        assert c.request("queue_declare", 1, "", False, True, True).kind == "queue_declare_ok"
        result: list[int | None] = []
        stopper = threading.Thread(target=lambda: result.append(broker.stop(timeout=15)))
        stopper.start()
        try:
            close = c.expect("close", timeout=5.0)
            assert close["code"] == wire.CONNECTION_FORCED
            c.send_frame("close_ok")
            assert c.expect_closed(timeout=5.0) == []
            # The other connection gets the same CLOSE; answer it too.
            assert idle.expect("close", timeout=5.0)["code"] == wire.CONNECTION_FORCED
            idle.send_frame("close_ok")
            assert idle.expect_closed(timeout=5.0) == []
        finally:
            stopper.join(20)
        assert result == [0], f"exit status {result}; log:\n{broker.log_text()[-3000:]}"
        assert not broker.alive()


def test_server_without_heartbeats_keeps_them_off(broker_factory: Any) -> None:
    """A server proposing 0 keeps heartbeats off whatever the client asks (section 4)."""
    b = broker_factory("--heartbeat-ms", "0")
    with Conn(b.port) as c:
        c.send(wire.PREAMBLE)
        assert c.expect("hello")["heartbeat_ms"] == 0
        c.send_frame("auth", "anonymous", "", {}, 0, 500)
        assert c.expect("open_ok")["heartbeat_ms"] == 0
        c.expect_silence(1.3)  # no HEARTBEAT and no 408 although 2 * 500 ms passed
        assert c.heartbeats == 0 and not c.eof


def test_configured_max_frame_size_is_announced_and_enforced(broker_factory: Any) -> None:
    b = broker_factory("--max-frame-size", "65536")
    with Conn(b.port) as c:
        c.send(wire.PREAMBLE)
        assert c.expect("hello")["max_frame_size"] == 65536
        c.send_frame("auth", "anonymous", "", {}, 0, 0)
        assert c.expect("open_ok")["max_frame_size"] == 65536
        c.send(wire.HEADER.pack(65537, wire.ftype("publish")))
        c.expect_fatal(wire.FRAME_TOO_LARGE)


def test_heartbeat_negotiation_has_a_floor(module_broker: BrokerProcess) -> None:
    """PROTOCOL.md 4: a non-zero negotiated heartbeat is at least heartbeat_ms_floor."""
    with Conn(module_broker.port) as c:
        got = c.handshake("anonymous", "", {}, 0, 100)["heartbeat_ms"]
        assert got == wire.HEARTBEAT_MS_FLOOR
    with Conn(module_broker.port) as c:
        assert c.handshake("anonymous", "", {}, 0, 300)["heartbeat_ms"] == 300


def test_shutdown_when_client_never_answers_close(broker_factory: Any, tmp_path: Path) -> None:
    """Without CLOSE_OK the server waits briefly, drops the connection and still exits 0."""
    cfg = tmp_path / "grace.toml"
    cfg.write_text("shutdown_grace_ms = 300\n")
    b = broker_factory("--config", str(cfg))
    with open_conn(b.port) as c:
        assert b.proc is not None
        start = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        assert c.expect("close", timeout=5.0)["code"] == wire.CONNECTION_FORCED
        assert c.expect_closed(timeout=5.0) == []  # we never answer CLOSE_OK
        assert b.proc.wait(10) == 0
        assert time.monotonic() - start < 5.0


def test_replies_queued_before_a_fatal_error_go_out_before_it(broker: BrokerProcess) -> None:
    """A reply the server owed for an earlier request of the same write goes out before
    the fatal ERROR, never after it (section 6: ERROR rid 0 fatal is the last frame)."""
    for _ in range(20):  # one write each: the reply is still queued when the fatal frame is read
        c = open_conn(broker.port)
        request = wire.encode("queue_declare", 6, "no-such-queue", False, False, False, True, {})
        # sequence numbers past 2^64-1: a fatal 501 raised while the batch is handled
        overflow = wire.encode("publish_batch", (1 << 64) - 1, [["", "q", {}, b"m", False]] * 2)
        c.send(request + overflow)
        frames = c.expect_closed()
        kinds = [(f.kind, f["rid"], f["code"]) for f in frames if f.kind == "error"]
        assert kinds[-1][1] == 0 and kinds[-1][2] in wire.FATAL_CODES, kinds
        assert ("error", 6, wire.code("not-found")) in kinds[:-1], kinds
        c.sock.close()
