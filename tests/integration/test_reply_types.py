"""The client matches a reply by rid *and* type (spec/PROTOCOL.md section 7).

A real broker behind a relay on 127.0.0.1 that rewrites one QUEUE_DECLARE_OK into an OK
with the same rid: the request fails with 503 unexpected-frame instead of completing with
the wrong frame, and the connection goes on serving requests.
"""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from conveyor import client
from conveyor.protocol import LocalProtocolError, Ok, QueueDeclareOk, UnexpectedFrame, encode
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect


class Relay:
    """TCP relay client <-> broker; broker-to-client frames may be rewritten."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rewritten = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        br, bw = await asyncio.open_connection("127.0.0.1", self.port)
        up = asyncio.create_task(self._copy(cr, bw))
        down = asyncio.create_task(self._frames(br, cw))
        self.tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for w in (bw, cw):
            w.close()

    async def _copy(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await r.readexactly(5)
                length, ftype = struct.unpack(">IB", head)
                body = await r.readexactly(length - 1)
            except asyncio.IncompleteReadError:
                return
            if ftype == QueueDeclareOk.TYPE and not self.rewritten:
                self.rewritten += 1
                w.write(encode(Ok(msgpack.unpackb(body)[0])))
            else:
                w.write(head + body)
            await w.drain()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_reply_of_the_wrong_type_fails_its_request(broker: BrokerProcess) -> None:
    relay = Relay(broker.port)
    port = await relay.start()
    conn: client.Connection = await connect(f"mq://127.0.0.1:{port}")
    try:
        with pytest.raises(UnexpectedFrame, match=r"ok in reply to request .*queue_declare_ok"):
            await asyncio.wait_for(conn.declare_queue("q1", durable=False), WAIT)
        assert relay.rewritten == 1
        # Only that request failed: the connection still serves requests and replies.
        await asyncio.wait_for(conn.declare_exchange("x1", "fanout", durable=False), WAIT)
        info = await asyncio.wait_for(conn.declare_queue("q2", durable=False), WAIT)
        assert info.name == "q2"
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
        await relay.stop()


async def test_a_request_the_broker_would_refuse_fails_locally(broker: BrokerProcess) -> None:
    """A queue name over 255 bytes is refused by the client (LocalProtocolError, nothing
    sent) instead of reaching the broker as a malformed frame that closes the connection."""
    conn: client.Connection = await connect(broker.url)
    try:
        with pytest.raises(LocalProtocolError, match=r"queue_declare\.queue: longer than 255"):
            await asyncio.wait_for(conn.declare_queue("q" * 1000, durable=False), WAIT)
        with pytest.raises(LocalProtocolError, match=r"bind\.routing_key"):
            await asyncio.wait_for(conn.bind("amq.fanout", "q", "k" * 256), WAIT)
        info = await asyncio.wait_for(conn.declare_queue("q" * 255, durable=False), WAIT)
        assert info.name == "q" * 255
        assert conn.is_open
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    assert "malformed" not in broker.log_text()
