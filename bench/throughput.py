#!/usr/bin/env python3
"""Conveyor throughput and latency benchmark.

    python bench/throughput.py --scenario transient
    python bench/throughput.py --scenario durable --batch 100 --json bench/results/durable.json
    python bench/throughput.py --scenario all --messages 20000 --runs 1 --plot /tmp/plots
    python bench/throughput.py --scenario transient --compare rabbitmq \\
        --amqp-url amqp://guest:guest@127.0.0.1/

Unless ``--url`` is given, the bench starts its own broker (``python -m cli.main server
--port 0``) on a free port with a temporary data directory and always stops it (SIGTERM)
at exit. Every message body starts with ``time.perf_counter_ns()`` taken when the body is
built (8 bytes, little endian) and its sequence number (8 bytes), padded to ``--size``;
the consumer measures the latency of each message and checks that every message arrived
exactly once. Each measured run is bounded by ``--time-limit``; missing messages fail
the run with a message saying which.

All client calls go through the small adapter classes ``ConveyorConn`` / ``AmqpConn``
and the producer loop lives in :func:`produce`, so a faster client API can be swapped in
in one place.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, even without pip install -e
    sys.path.insert(0, str(REPO))

SCENARIOS = (
    "transient",
    "durable",
    "fanout",
    "competing",
    "latency",
    "publishers",
    "many-queues",
    "large",
)
DEFAULT_MESSAGES = {"large": 20000, "latency": 20000, "publishers": 20000}
DEFAULT_SIZE = {"large": 65536}
HEADER = 16  # 8 bytes send timestamp + 8 bytes sequence number
LISTEN_RE = re.compile(rb"conveyor listening on ([\d.]+):(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """A run failed (missing messages, broker error, time limit): one clear line."""


# ---------------------------------------------------------------------------- /proc stats
def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process in seconds, from /proc/<pid>/stat (None if unknown)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_mem_mb(pid: int | None, key: str = "VmRSS") -> float | None:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def find_pid_by_comm(name: str) -> int | None:
    """The pid of the only process whose comm is ``name`` (e.g. RabbitMQ's beam.smp)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == name:
                        found.append(int(d))
            except OSError:
                continue
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------------------- broker process
def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the broker if the bench dies without cleaning up (kill -9)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalBroker:
    """``python -m cli.main server --port 0`` in a temporary data directory."""

    def __init__(self, extra: Sequence[str] = (), startup_timeout: float = 30.0) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        self.data_dir = self.tmp / "data"
        self.log_path = self.tmp / "broker.log"
        self.extra = list(extra)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"mq://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> LocalBroker:
        cmd = [
            sys.executable,
            "-m",
            "conveyor.cli.main",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
            *self.extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=REPO,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + self.startup_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while (m := LISTEN_RE.search(buf)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not sel.select(remaining) and self.proc.poll() is not None):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
        if m is None:
            self.stop()
            raise BenchError(
                f"broker did not start (stdout {buf[-300:]!r}); log tail:\n"
                + self.log_text()[-2000:]
            )
        self.port = int(m.group(2))
        # Keep draining stdout so a chatty broker can never block on a full pipe.
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        return self

    @staticmethod
    def _drain(stream: Any) -> None:
        with contextlib.suppress(Exception):
            while stream.read(65536):
                pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def issues(self) -> list[str]:
        """WARNING / ERROR / CRITICAL / Traceback lines of the broker log."""
        return [
            ln
            for ln in self.log_text().splitlines()
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", ln)
        ]

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout``; idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            with contextlib.suppress(Exception):
                proc.stdout.close()
        return proc.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- client adapters
# Every client-facing call of the bench is in these two small classes.
Handler = Callable[[bytes], None]
ErrorSink = Callable[[BaseException], None]


class ConveyorConn:
    """Conveyor's asyncio client (``client.connect``)."""

    kind = "conveyor"
    _PROPS = {True: {"persistent": True}, False: {"persistent": False}}

    def __init__(self, conn: Any) -> None:
        from conveyor.client import Backpressure  # imported here: RabbitMQ-only runs never need it

        self.conn = conn
        self._backpressure = Backpressure

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float) -> ConveyorConn:
        from conveyor import client

        return cls(await client.connect(url, name=name, reconnect=False, timeout=timeout))

    async def declare_exchange(self, name: str, type_: str, durable: bool) -> None:
        await self.conn.declare_exchange(name, type_, durable=durable)

    async def declare_queue(self, name: str, durable: bool) -> None:
        await self.conn.declare_queue(name, durable=durable, exclusive=False, auto_delete=False)

    async def bind(self, exchange: str, queue: str, key: str) -> None:
        await self.conn.bind(exchange, queue, key)

    async def delete_queue(self, name: str) -> None:
        await self.conn.delete_queue(name)

    async def delete_exchange(self, name: str) -> None:
        await self.conn.delete_exchange(name)

    async def prepare(self, exchange: str) -> None:
        pass

    def publish(
        self, exchange: str, key: str, body: bytes, persistent: bool, timeout: float
    ) -> Awaitable[Any]:
        """One message; the awaitable completes when the broker confirmed it.

        Uses the pipelined ``publish_nowait`` (a future, no task per message); only when
        the client reports back-pressure does it fall back to the awaiting ``publish``.
        """
        props = self._PROPS[persistent]
        try:
            return self.conn.publish_nowait(exchange, key, body, properties=props)
        except self._backpressure:
            return self.conn.publish(exchange, key, body, properties=props, timeout=timeout)

    def publish_batch(
        self,
        exchange: str,
        keys: str | list[str],
        bodies: list[bytes],
        persistent: bool,
        timeout: float,
    ) -> Awaitable[Any]:
        """Many messages in PUBLISH_BATCH frames; completes when all are confirmed."""
        props = self._PROPS[persistent]
        if isinstance(keys, str):
            return self.conn.publish_batch(
                bodies, exchange=exchange, routing_key=keys, properties=props, timeout=timeout
            )
        from conveyor.client import OutgoingMessage

        msgs = [OutgoingMessage(b, k) for b, k in zip(bodies, keys, strict=True)]
        return self.conn.publish_batch(msgs, exchange=exchange, properties=props, timeout=timeout)

    async def start_consumer(
        self,
        queue: str,
        prefetch: int,
        handle: Handler,
        on_error: ErrorSink,
        handle_many: Callable[[list[bytes]], None] | None = None,
    ) -> _Consumer:
        consumer = await self.conn.consume(queue, prefetch=prefetch, no_ack=False)

        async def loop() -> None:
            try:
                async for msg in consumer:
                    handle(msg.body)
                    msg.ack()
            except Exception as exc:
                on_error(exc)

        async def batch_loop() -> None:
            # The batch API: one await per buffered batch, one call settles it.
            try:
                async for msgs in consumer.batches():
                    handle_many([msg.body for msg in msgs])  # type: ignore[misc]
                    consumer.ack_all(msgs)
            except Exception as exc:
                on_error(exc)

        if handle_many is not None:
            return _Consumer(asyncio.create_task(batch_loop()), consumer.cancel)

        return _Consumer(asyncio.create_task(loop()), consumer.cancel)

    async def close(self) -> None:
        await self.conn.close()


class AmqpConn:
    """RabbitMQ through aio-pika (for ``--compare rabbitmq``)."""

    kind = "rabbitmq"

    def __init__(self, conn: Any, channel: Any) -> None:
        import aio_pika

        self.aio_pika = aio_pika
        self.conn = conn
        self.channel = channel
        self.exchanges: dict[str, Any] = {"": channel.default_exchange}
        self.modes = {
            True: aio_pika.DeliveryMode.PERSISTENT,
            False: aio_pika.DeliveryMode.NOT_PERSISTENT,
        }

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float) -> AmqpConn:
        import aio_pika

        conn = await aio_pika.connect(
            url, timeout=timeout, client_properties={"connection_name": name}
        )
        return cls(conn, await conn.channel(publisher_confirms=True))

    async def declare_exchange(self, name: str, type_: str, durable: bool) -> None:
        self.exchanges[name] = await self.channel.declare_exchange(name, type_, durable=durable)

    async def declare_queue(self, name: str, durable: bool) -> None:
        await self.channel.declare_queue(name, durable=durable)

    async def bind(self, exchange: str, queue: str, key: str) -> None:
        q = await self.channel.get_queue(queue, ensure=False)
        await q.bind(exchange, key)

    async def delete_queue(self, name: str) -> None:
        await self.channel.queue_delete(name)

    async def delete_exchange(self, name: str) -> None:
        await self.channel.exchange_delete(name)

    async def prepare(self, exchange: str) -> None:
        if exchange not in self.exchanges:
            self.exchanges[exchange] = await self.channel.get_exchange(exchange, ensure=False)

    def publish(
        self, exchange: str, key: str, body: bytes, persistent: bool, timeout: float
    ) -> Awaitable[Any]:
        msg = self.aio_pika.Message(body, delivery_mode=self.modes[persistent])
        return self.exchanges[exchange].publish(msg, key, mandatory=False, timeout=timeout)

    def publish_batch(
        self,
        exchange: str,
        keys: str | list[str],
        bodies: list[bytes],
        persistent: bool,
        timeout: float,
    ) -> Awaitable[Any]:
        # AMQP has no batch publish: pipeline the batch and await all confirms.
        ks = [keys] * len(bodies) if isinstance(keys, str) else keys
        return asyncio.gather(
            *[
                self.publish(exchange, k, b, persistent, timeout)
                for k, b in zip(ks, bodies, strict=True)
            ]
        )

    async def start_consumer(
        self,
        queue: str,
        prefetch: int,
        handle: Handler,
        on_error: ErrorSink,
        handle_many: Callable[[list[bytes]], None] | None = None,
    ) -> _Consumer:
        channel = await self.conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.get_queue(queue, ensure=False)
        it = q.iterator()
        await it.consume()

        async def loop() -> None:
            try:
                async for msg in it:
                    handle(msg.body)
                    await msg.ack()
            except Exception as exc:
                on_error(exc)

        async def cancel() -> None:
            await it.close()
            await channel.close()

        return _Consumer(asyncio.create_task(loop()), cancel)

    async def close(self) -> None:
        await self.conn.close()


Conn = ConveyorConn | AmqpConn


@dataclass
class _Consumer:
    task: asyncio.Task[None]
    cancel: Callable[[], Awaitable[Any]]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.cancel(), 5)
        self.task.cancel()
        await asyncio.wait([self.task], timeout=5)


@dataclass(frozen=True)
class Backend:
    kind: str  # conveyor | rabbitmq
    url: str
    broker_pid: int | None = None

    async def connect(self, name: str, timeout: float) -> Conn:
        cls = AmqpConn if self.kind == "rabbitmq" else ConveyorConn
        return await cls.connect(self.url, name, timeout)


# ---------------------------------------------------------------------------- scenario plans
@dataclass
class Plan:
    scenario: str
    tag: str
    messages: int
    size: int
    durable: bool
    persistent: bool
    exchange: str = ""
    exchange_type: str | None = None
    queues: list[str] = field(default_factory=list)
    bindings: list[tuple[str, str, str]] = field(default_factory=list)
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # queue, copy, conn
    copies: int = 1
    keys: list[str] = field(default_factory=list)  # routing keys, used round-robin
    producers: int = 1
    lockstep: bool = False  # latency: publish, wait for the delivery, repeat
    batch: int = 1  # > 1: the batch API on both sides (publish_batch; batches() + ack_all)


def build_plan(scenario: str, opts: argparse.Namespace, tag: str, producers: int = 1) -> Plan:
    n, size = opts.messages_for(scenario), opts.size_for(scenario)
    durable = scenario in ("durable", "publishers")
    plan = Plan(
        scenario,
        tag,
        n,
        size,
        durable=durable,
        persistent=durable,
        producers=producers,
        batch=opts.batch,
    )
    q = f"{tag}.q"
    if scenario == "fanout":
        plan.exchange, plan.exchange_type = f"{tag}.fanout", "fanout"
        plan.queues = [f"{q}{i}" for i in range(opts.consumers)]
        plan.bindings = [(plan.exchange, name, "") for name in plan.queues]
        plan.consumers = [(name, i, i) for i, name in enumerate(plan.queues)]
        plan.copies, plan.keys = len(plan.queues), [""]
    elif scenario == "competing":
        plan.queues, plan.keys = [q], [q]
        plan.consumers = [(q, 0, i) for i in range(opts.consumers)]
    elif scenario == "many-queues":
        plan.queues = [f"{q}{i}" for i in range(opts.queues)]
        plan.keys = plan.queues
        plan.consumers = [(name, 0, 0) for name in plan.queues]
    else:  # transient, durable, latency, publishers, large
        plan.queues, plan.keys = [q], [q]
        plan.consumers = [(q, 0, 0)]
        plan.lockstep = scenario == "latency"
    return plan


# ---------------------------------------------------------------------------- bodies, tracking
_STAMP = struct.Struct("<qQ")  # send time (perf_counter_ns), seq: the first HEADER bytes


def body_factory(size: int) -> Callable[[int], bytes]:
    pad = b"\x00" * (size - HEADER)
    clock = time.perf_counter_ns
    pack = _STAMP.pack

    def make(seq: int) -> bytes:
        return pack(clock(), seq) + pad

    return make


def bodies_factory(size: int) -> Callable[[int, int], list[bytes]]:
    """Bodies for seqs a..b-1 of one publish_batch call: one clock read for the batch (they
    are sent together), one struct pack per body."""
    pad = b"\x00" * (size - HEADER)
    clock = time.perf_counter_ns
    pack = _STAMP.pack

    def make(a: int, b: int) -> list[bytes]:
        t = clock()
        return [pack(t, seq) + pad for seq in range(a, b)]

    return make


class Tracker:
    """Consumer side: latencies, exactly-once check per copy, completion future."""

    def __init__(
        self, messages: int, copies: int, consumers: int, signal_: Callable[[], None] | None = None
    ) -> None:
        self.messages = messages
        self.expected = messages * copies
        self.seen = [bytearray(messages) for _ in range(copies)]
        self.unique = 0
        self.duplicates = 0
        self.foreign = 0
        self.lat = array.array("q")
        self.last_ns = 0
        self.per_consumer = [0] * consumers
        self.signal = signal_
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(_quiet)  # a failure nobody waits for any more is fine

    def handler(self, copy: int, index: int) -> Handler:
        seen = self.seen[copy]
        limit = len(seen)
        lat = self.lat.append
        counts = self.per_consumer
        clock = time.perf_counter_ns
        signal_ = self.signal

        def handle(body: bytes) -> None:
            now = clock()
            seq = int.from_bytes(body[8:16], "little")
            if seq >= limit:
                self.foreign += 1
                return
            if seen[seq]:
                self.duplicates += 1
                return
            seen[seq] = 1
            lat(now - int.from_bytes(body[:8], "little"))
            counts[index] += 1
            self.last_ns = now
            self.unique += 1
            if self.unique >= self.expected and not self.done.done():
                self.done.set_result(None)
            if signal_ is not None:
                signal_()

        return handle

    def batch_handler(self, copy: int, index: int) -> Callable[[list[bytes]], None]:
        """``handler`` for the batch API: one clock read per delivered batch (its
        messages arrived together), one unpack per body, no call per message."""
        seen = self.seen[copy]
        limit = len(seen)
        lat = self.lat
        counts = self.per_consumer
        clock = time.perf_counter_ns
        signal_ = self.signal
        unpack = _STAMP.unpack_from

        def handle_many(bodies: list[bytes]) -> None:
            now = clock()
            fresh = 0
            sent: list[int] = []
            append = sent.append
            for body in bodies:
                t, seq = unpack(body)
                if seq >= limit:
                    self.foreign += 1
                elif seen[seq]:
                    self.duplicates += 1
                else:
                    seen[seq] = 1
                    append(t)
                    fresh += 1
            lat.extend([now - t for t in sent])
            counts[index] += fresh
            self.last_ns = now
            self.unique += fresh
            if self.unique >= self.expected and not self.done.done():
                self.done.set_result(None)
            if signal_ is not None:
                signal_()

        return handle_many

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(BenchError(f"consumer failed: {type(exc).__name__}: {exc}"))

    def missing(self) -> str:
        parts = []
        for copy, seen in enumerate(self.seen):
            miss = seen.count(0)
            if miss:
                first = [i for i, v in enumerate(seen) if not v][:5]
                parts.append(f"copy {copy}: {miss} missing (first seqs {first})")
        extra = f"; {self.duplicates} duplicates" if self.duplicates else ""
        return (
            f"delivered {self.unique} of {self.expected} "
            f"(missing {self.expected - self.unique}{extra}): " + "; ".join(parts)
        )

    def report(self) -> dict[str, Any]:
        return {
            "unique": self.unique,
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            "last_ns": self.last_ns,
            "per_consumer": self.per_consumer,
            "lat": self.lat.tobytes(),
        }

    async def wait(self, stall: float, published: Callable[[], bool]) -> None:
        """Until every message arrived; fail if nothing arrives for ``stall`` seconds
        once the producers are done."""
        last = -1
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self.done), stall)
                return
            except TimeoutError:
                if published() and self.unique == last:
                    raise BenchError(
                        f"stalled: no delivery for {stall:.0f} s after the "
                        f"last publish; {self.missing()}"
                    ) from None
                last = self.unique


class Signal:
    """Latency scenario: the producer waits for the delivery of the message it sent."""

    def __init__(self) -> None:
        self.fut: asyncio.Future[None] | None = None

    def arm(self) -> asyncio.Future[None]:
        self.fut = asyncio.get_running_loop().create_future()
        return self.fut

    def fire(self) -> None:
        f = self.fut
        if f is not None and not f.done():
            f.set_result(None)


# ---------------------------------------------------------------------------- producer
@dataclass
class ProduceStats:
    issued: int = 0
    confirmed: int = 0


def _quiet(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


async def produce(
    conn: Conn,
    plan: Plan,
    seqs: range,
    *,
    batch: int,
    window: int,
    timeout: float,
    stats: ProduceStats,
) -> None:
    """Publish ``seqs`` and wait for every confirm.

    ``batch`` messages per publish call (``publish`` for 1, ``publish_batch`` above).
    ``window`` bounds messages in flight: calls are issued in gathered chunks of about
    ``window / 2`` messages, two chunks outstanding, so the pipe never drains; with
    ``window`` 1 every call is awaited before the next (a confirmed, synchronous
    publisher).
    """
    make = body_factory(plan.size)
    make_many = bodies_factory(plan.size)
    exchange, keys, persistent = plan.exchange, plan.keys, plan.persistent
    nkeys = len(keys)
    if batch <= 1:

        def call(a: int, b: int) -> Awaitable[Any]:
            return conn.publish(exchange, keys[a % nkeys], make(a), persistent, timeout)
    else:

        def call(a: int, b: int) -> Awaitable[Any]:
            ks: str | list[str] = keys[0] if nkeys == 1 else [keys[s % nkeys] for s in range(a, b)]
            return conn.publish_batch(exchange, ks, make_many(a, b), persistent, timeout)

    step = max(1, batch)
    if window <= 1:
        for a in range(seqs.start, seqs.stop, step):
            b = min(a + step, seqs.stop)
            stats.issued += b - a
            await call(a, b)
            stats.confirmed += b - a
        return
    chunk = max(step, (window // 2) // step * step)  # messages per gathered chunk
    inflight: deque[tuple[asyncio.Future[Any], int]] = deque()
    try:
        for c in range(seqs.start, seqs.stop, chunk):
            end = min(c + chunk, seqs.stop)
            fut = _confirmed_all([call(a, min(a + step, end)) for a in range(c, end, step)])
            inflight.append((fut, end - c))
            stats.issued += end - c
            if len(inflight) >= 2:
                f, count = inflight.popleft()
                await f
                stats.confirmed += count
        while inflight:
            f, count = inflight.popleft()
            await f
            stats.confirmed += count
    finally:
        for f, _ in inflight:
            f.cancel()
            f.add_done_callback(_quiet)


def _confirmed_all(aws: list[Awaitable[Any]]) -> asyncio.Future[Any]:
    """One future for a chunk of publishes. Conveyor's ``publish_nowait`` futures settle
    in publish order (confirms come in seq order), so the chunk is waited for through its
    last future and then checked, instead of ``gather``'s bookkeeping per message, which
    cost the bench about 1 us per message. Anything else (coroutines) goes to gather."""
    if not all(map(asyncio.isfuture, aws)):
        return asyncio.gather(*aws)
    futs = cast("list[asyncio.Future[Any]]", aws)

    async def wait() -> None:
        await asyncio.wait([futs[-1]])
        late = [f for f in futs if not f.done()]
        if late:  # not expected (confirms are in order), but none is left unwaited
            await asyncio.wait(late)
        for f in futs:
            exc = f.exception()  # raises CancelledError for a cancelled one
            if exc is not None:
                raise exc

    return asyncio.ensure_future(wait())


async def produce_lockstep(
    conn: Conn, plan: Plan, signal_: Signal, timeout: float, stats: ProduceStats
) -> None:
    """Latency scenario: publish one message, wait for its delivery (and confirm), repeat."""
    make = body_factory(plan.size)
    exchange, key, persistent = plan.exchange, plan.keys[0], plan.persistent
    for seq in range(plan.messages):
        delivered = signal_.arm()
        stats.issued += 1
        await conn.publish(exchange, key, make(seq), persistent, timeout)
        stats.confirmed += 1
        await delivered


# ---------------------------------------------------------------------------- consumer side
async def start_consumers(
    backend: Backend, plan: Plan, prefetch: int, tracker: Tracker, timeout: float
) -> tuple[list[_Consumer], list[Conn]]:
    nconns = max(c for _, _, c in plan.consumers) + 1
    conns = [await backend.connect(f"bench-consumer-{i}", timeout) for i in range(nconns)]
    consumers = await asyncio.gather(
        *[
            conns[ci].start_consumer(
                queue,
                prefetch,
                tracker.handler(copy, i),
                tracker.fail,
                tracker.batch_handler(copy, i) if plan.batch > 1 else None,
            )
            for i, (queue, copy, ci) in enumerate(plan.consumers)
        ]
    )
    return list(consumers), conns


async def stop_consumers(consumers: list[_Consumer], conns: Sequence[Conn]) -> None:
    await asyncio.gather(*[c.stop() for c in consumers], return_exceptions=True)
    await asyncio.gather(*[_close(c) for c in conns], return_exceptions=True)


async def _close(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 5)


def _consumer_process(pipe: Any, spec: dict[str, Any]) -> None:
    """``--processes``: the consumers run here, in their own process and event loop."""
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        try:
            uvloop.run(_consumer_process_main(pipe, spec))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))
            raise


async def _consumer_process_main(pipe: Any, spec: dict[str, Any]) -> None:
    plan: Plan = spec["plan"]
    backend: Backend = spec["backend"]
    loop = asyncio.get_running_loop()
    published = loop.create_future()

    def on_readable() -> None:
        with contextlib.suppress(EOFError, OSError):
            while pipe.poll():
                if pipe.recv()[0] == "published" and not published.done():
                    published.set_result(None)

    _add_pipe_reader(loop, pipe.fileno(), on_readable)
    tracker = Tracker(
        plan.messages,
        plan.copies,
        len(plan.consumers),
        (lambda: pipe.send(("tick",))) if plan.lockstep else None,
    )
    consumers, conns = await start_consumers(
        backend, plan, spec["prefetch"], tracker, spec["timeout"]
    )
    cpu0 = self_cpu_s()
    pipe.send(("ready",))
    try:
        remaining = (spec["deadline_ns"] - time.perf_counter_ns()) / 1e9
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                await tracker.wait(spec["stall"], published.done)
        except TimeoutError:
            raise BenchError(f"time limit reached: {tracker.missing()}") from None
        report = tracker.report()
        report["cpu_s"] = self_cpu_s() - cpu0
        pipe.send(("result", report))
    except BenchError as exc:
        pipe.send(("error", str(exc)))
    finally:
        loop.remove_reader(pipe.fileno())
        await stop_consumers(consumers, conns)


class ConsumerProcess:
    """Parent side of ``--processes``."""

    def __init__(self, spec: dict[str, Any], signal_: Signal | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_consumer_process, args=(child, spec), daemon=True, name="bench-consumers"
        )
        self.signal = signal_
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.result: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.proc.start()
        child.close()
        self._readers = [self.pipe.fileno(), self.proc.sentinel]
        _add_pipe_reader(loop, self.pipe.fileno(), self._on_readable)
        loop.add_reader(self.proc.sentinel, self._on_exit)

    def _on_readable(self) -> None:
        if not self._drain():
            self._on_exit()

    def _drain(self) -> bool:
        """Handle every message waiting in the pipe; False once the pipe is closed."""
        try:
            while self.pipe.poll():
                msg = self.pipe.recv()
                if msg[0] == "tick":
                    if self.signal is not None:
                        self.signal.fire()
                elif msg[0] == "ready":
                    _set(self.ready, None)
                elif msg[0] == "result":
                    _set(self.result, msg[1])
                elif msg[0] == "error":
                    self._fail(BenchError(f"consumer process: {msg[1]}"))
        except (EOFError, OSError):
            return False
        return True

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.proc.sentinel)
        loop.remove_reader(self.pipe.fileno())
        self._drain()  # the result may still be unread when the exit is noticed first
        self.proc.join(1)
        self._fail(
            BenchError(f"consumer process exited (code {self.proc.exitcode}) before reporting")
        )

    def _fail(self, exc: BenchError) -> None:
        for f in (self.ready, self.result):
            if not f.done():
                f.set_exception(exc)
                f.add_done_callback(_quiet)

    def published(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("published",))

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._readers:
            loop.remove_reader(fd)
        self.proc.join(10)  # the child stops its consumers and exits after reporting
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.pipe.close()


def _add_pipe_reader(
    loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None]
) -> None:
    """add_reader for a multiprocessing pipe. uvloop makes the fd non-blocking, which
    breaks ``recv`` of a message larger than what has arrived so far: undo that (the
    callback only runs once data is there, and a message is written whole)."""
    loop.add_reader(fd, callback)
    os.set_blocking(fd, True)


def _set(f: asyncio.Future[Any], value: Any) -> None:
    if not f.done():
        f.set_result(value)


# ---------------------------------------------------------------------------- one measured run
def percentiles(lat_ns: array.array[int]) -> dict[str, float | None]:
    if not lat_ns:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    s = sorted(lat_ns)
    n = len(s)

    def pct(p: float) -> float:
        return round(s[max(0, math.ceil(p * n) - 1)] / 1e6, 3)

    return {
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "max": round(s[-1] / 1e6, 3),
        "mean": round(sum(s) / n / 1e6, 3),
    }


async def setup_topology(admin: Conn, plan: Plan) -> None:
    if plan.exchange_type:
        await admin.declare_exchange(plan.exchange, plan.exchange_type, plan.durable)
    await asyncio.gather(*[admin.declare_queue(q, plan.durable) for q in plan.queues])
    await asyncio.gather(*[admin.bind(e, q, k) for e, q, k in plan.bindings])


async def teardown_topology(admin: Conn, plan: Plan) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            await asyncio.gather(
                *[admin.delete_queue(q) for q in plan.queues], return_exceptions=True
            )
            if plan.exchange_type:
                await admin.delete_exchange(plan.exchange)


async def run_once(backend: Backend, plan: Plan, opts: argparse.Namespace) -> dict[str, Any]:
    """One measured run: topology, consumers, producers; returns the run's numbers."""
    limit = opts.time_limit
    stats = ProduceStats()
    signal_ = Signal() if plan.lockstep else None
    consumers: list[_Consumer] = []
    cconns: list[Conn] = []
    pconns: list[Conn] = []
    child: ConsumerProcess | None = None
    tracker: Tracker | None = None
    admin = await backend.connect("bench-admin", opts.timeout)
    t_start = time.perf_counter_ns()
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            await setup_topology(admin, plan)
            if opts.processes:
                child = ConsumerProcess(
                    {
                        "plan": plan,
                        "backend": backend,
                        "prefetch": opts.prefetch,
                        "timeout": opts.timeout,
                        "stall": opts.stall,
                        "deadline_ns": t_start + int((limit - 1.0) * 1e9),
                    },
                    signal_,
                )
                await child.ready
            else:
                tracker = Tracker(
                    plan.messages,
                    plan.copies,
                    len(plan.consumers),
                    signal_.fire if signal_ is not None else None,
                )
                consumers, cconns = await start_consumers(
                    backend, plan, opts.prefetch, tracker, opts.timeout
                )
            pconns = [admin] + [
                await backend.connect(f"bench-producer-{i}", opts.timeout)
                for i in range(1, plan.producers)
            ]
            for c in pconns:
                await c.prepare(plan.exchange)
            bcpu0, ccpu0 = proc_cpu_s(backend.broker_pid), self_cpu_s()
            t0 = time.perf_counter_ns()
            if signal_ is not None:
                await produce_lockstep(admin, plan, signal_, limit, stats)
            else:
                n, p = plan.messages, plan.producers
                bounds = [n * i // p for i in range(p + 1)]
                window = 1 if plan.scenario == "publishers" else opts.effective_window(plan.size)
                await asyncio.gather(
                    *[
                        produce(
                            c,
                            plan,
                            range(bounds[i], bounds[i + 1]),
                            batch=opts.batch,
                            window=window,
                            timeout=limit,
                            stats=stats,
                        )
                        for i, c in enumerate(pconns)
                    ]
                )
            t_pub = time.perf_counter_ns()
            if child is not None:
                child.published()
                report = await child.result
            else:
                assert tracker is not None
                await tracker.wait(opts.stall, lambda: True)
                report = tracker.report()
                report["cpu_s"] = 0.0
            ccpu1, bcpu1 = self_cpu_s(), proc_cpu_s(backend.broker_pid)
    except TimeoutError as exc:
        state = (
            tracker.missing()
            if tracker is not None
            else "the consumer process did not report in time"
        )
        what = (
            f"time limit of {limit:.0f} s reached"
            if deadline.expired()
            else f"{type(exc).__name__}: {exc}"
        )
        raise BenchError(
            f"{what}: published {stats.issued}, confirmed {stats.confirmed} "
            f"of {plan.messages}; {state}"
        ) from None
    finally:
        await stop_consumers(consumers, cconns)
        if child is not None:
            child.close()
        await teardown_topology(admin, plan)
        await asyncio.gather(*[_close(c) for c in [*pconns[1:], admin]])

    lat = array.array("q")
    lat.frombytes(report["lat"])
    deliveries = report["unique"]
    if deliveries != plan.messages * plan.copies:
        raise BenchError(f"expected {plan.messages * plan.copies} deliveries, got {deliveries}")
    elapsed = max(report["last_ns"] - t0, 1) / 1e9
    publish_s = max(t_pub - t0, 1) / 1e9
    bcpu = None if bcpu0 is None or bcpu1 is None else round(bcpu1 - bcpu0, 3)
    return {
        "messages": plan.messages,
        "deliveries": deliveries,
        "size": plan.size,
        "publish_s": round(publish_s, 4),
        "elapsed_s": round(elapsed, 4),
        "publish_rate": round(plan.messages / publish_s, 1),
        "e2e_rate": round(deliveries / elapsed, 1),
        "latency_ms": percentiles(lat),
        "broker_cpu_s": bcpu,
        "broker_cpu_util": None if bcpu is None else round(bcpu / elapsed, 3),
        "broker_rss_mb": proc_mem_mb(backend.broker_pid),
        "broker_rss_peak_mb": proc_mem_mb(backend.broker_pid, "VmHWM"),
        "client_cpu_s": round(ccpu1 - ccpu0 + report["cpu_s"], 3),
        "client_cpu_detail": {
            "main_process": round(ccpu1 - ccpu0, 3),
            "consumer_process": round(report["cpu_s"], 3),
        },
        "duplicates": report["duplicates"],
        "per_consumer": report["per_consumer"] if len(report["per_consumer"]) <= 64 else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "_lat": lat,
    }


async def run_scenario_once(
    backend: Backend, scenario: str, opts: argparse.Namespace, run_no: int
) -> dict[str, Any]:
    tag = f"bench.{os.getpid()}.{scenario}.r{run_no}"
    if scenario != "publishers":
        result = await run_once(backend, build_plan(scenario, opts, tag), opts)
        result["run"] = run_no
        return result
    levels = []
    for p in opts.publishers:
        r = await run_once(backend, build_plan(scenario, opts, f"{tag}.p{p}", producers=p), opts)
        r["publishers"] = p
        levels.append(r)
    top = dict(levels[-1])  # the highest concurrency level is the run's headline
    top["run"] = run_no
    top["levels"] = [{k: v for k, v in lv.items() if k != "_lat"} for lv in levels]
    top["_levels_lat"] = [lv["_lat"] for lv in levels]
    return top


# ---------------------------------------------------------------------------- reporting
def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["e2e_rate"])[(len(runs) - 1) // 2]


def summarize(
    scenario: str, backend: Backend, runs: list[dict[str, Any]], opts: argparse.Namespace
) -> dict[str, Any]:
    med = median_run(runs)
    keys = (
        "messages",
        "deliveries",
        "size",
        "publish_rate",
        "e2e_rate",
        "latency_ms",
        "publish_s",
        "elapsed_s",
        "broker_cpu_s",
        "broker_cpu_util",
        "broker_rss_mb",
        "broker_rss_peak_mb",
        "client_cpu_s",
        "client_cpu_detail",
        "duplicates",
    )
    out: dict[str, Any] = {"scenario": scenario, "backend": backend.kind}
    out.update({k: med.get(k) for k in keys})
    if "levels" in med:
        out["levels"] = med["levels"]
    out["median_run"] = med["run"]
    out["settings"] = opts.settings(scenario)
    out["runs"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    return out


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def print_summary(res: dict[str, Any]) -> None:
    s = res["settings"]
    lat = res["latency_ms"]
    print(
        f"\n== {res['scenario']} [{res['backend']}]: {res['messages']:,} msgs x "
        f"{res['size']:,} B, batch {s['batch']}, prefetch {s['prefetch']}, window "
        f"{s['window']}, {'consumer process' if s['processes'] else 'one process'}, "
        f"median of {len(res['runs'])} run(s)"
    )
    unit = "deliveries/s" if res["deliveries"] != res["messages"] else "msg/s"
    print(
        f"   publish {fmt_rate(res['publish_rate'])} msg/s   end-to-end "
        f"{fmt_rate(res['e2e_rate'])} {unit}   ({res['elapsed_s']:.2f} s)"
    )
    print(f"   latency ms  p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    bcpu = res["broker_cpu_s"]
    print(
        f"   broker cpu {'-' if bcpu is None else f'{bcpu:.2f} s'} "
        f"(util {res['broker_cpu_util']})  rss {res['broker_rss_mb']} MiB "
        f"(peak {res['broker_rss_peak_mb']})   client cpu {res['client_cpu_s']:.2f} s"
    )
    for lv in res.get("levels", []):
        print(
            f"   {lv['publishers']:>3} publishers: publish {fmt_rate(lv['publish_rate'])} "
            f"msg/s  e2e {fmt_rate(lv['e2e_rate'])} msg/s  p99 {lv['latency_ms']['p99']} ms"
        )
    if len(res["runs"]) > 1:
        print("   runs e2e: " + "  ".join(fmt_rate(r["e2e_rate"]) for r in res["runs"]))
    if res["duplicates"]:
        print(f"   note: {res['duplicates']} duplicate deliveries")


def write_plots(plot_dir: Path, results: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """results: (summary, median run with raw latencies) pairs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed, skipping plots (pip install matplotlib)")
        return
    plot_dir.mkdir(parents=True, exist_ok=True)

    def save(fig: Any, path: Path) -> None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        print(f"plot: wrote {path}")

    by_scenario: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for res, run in results:
        by_scenario.setdefault(res["scenario"], []).append((res, run))
    for scenario, items in by_scenario.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for res, run in items:
            lat_ms = [v / 1e6 for v in run["_lat"]]
            if lat_ms:
                lo, hi = max(min(lat_ms), 1e-3), max(lat_ms)
                edges = [lo * (hi / lo) ** (i / 80) for i in range(81)] if hi > lo else 50
                ax.hist(
                    lat_ms,
                    bins=edges,
                    alpha=0.6,
                    label=f"{res['backend']} p50 {res['latency_ms']['p50']} ms",
                )
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, send to delivery)")
        ax.set_ylabel("messages")
        ax.set_title(f"{scenario}: latency of the median run")
        ax.legend()
        save(fig, plot_dir / f"{scenario}-latency.png")
        if scenario == "publishers":
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for res, _ in items:
                xs = [lv["publishers"] for lv in res["levels"]]
                ax.plot(
                    xs,
                    [lv["publish_rate"] for lv in res["levels"]],
                    "o-",
                    label=f"{res['backend']} publish",
                )
                ax.plot(
                    xs,
                    [lv["e2e_rate"] for lv in res["levels"]],
                    "s--",
                    label=f"{res['backend']} end-to-end",
                )
            ax.set_xscale("log")
            ax.set_xlabel("concurrent confirmed publishers")
            ax.set_ylabel("messages / s")
            ax.set_title("publishers: rate vs concurrency")
            ax.legend()
            save(fig, plot_dir / "publishers-rate.png")

    backends = sorted({res["backend"] for res, _ in results})
    if len(backends) > 1:  # Conveyor beside RabbitMQ, scenario by scenario
        names = list(by_scenario)
        fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(names)), 4.5))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            rates = [
                next((r["e2e_rate"] for r, _ in by_scenario[n] if r["backend"] == backend), 0)
                for n in names
            ]
            ax.bar([x + i * width for x in range(len(names))], rates, width, label=backend)
        ax.set_xticks(
            [x + width * (len(backends) - 1) / 2 for x in range(len(names))], names, rotation=20
        )
        ax.set_yscale("log")
        ax.set_ylabel("end-to-end messages (deliveries) / s, log scale")
        ax.set_title("Conveyor beside RabbitMQ (same bench, same machine)")
        ax.legend()
        save(fig, plot_dir / "compare.png")


# ---------------------------------------------------------------------------- main
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--scenario", required=True, choices=[*SCENARIOS, "all"])
    p.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per run [200000; large, latency, publishers: 20000 "
        "(publishers: per concurrency level)]",
    )
    p.add_argument(
        "--size", type=int, default=None, help=f"body bytes, >= {HEADER} [128; large: 65536]"
    )
    p.add_argument("--runs", type=int, default=3, help="report the median run by e2e_rate")
    p.add_argument(
        "--batch", type=int, default=1, help="messages per publish call (>1: publish_batch)"
    )
    p.add_argument("--prefetch", type=int, default=1000, help="consumer credit window")
    p.add_argument(
        "--window", type=int, default=1000, help="messages in flight (unconfirmed) per producer"
    )
    p.add_argument(
        "--window-bytes", type=int, default=32 << 20, help="caps the window for large bodies"
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="run the consumers in a separate process (multiprocessing)",
    )
    p.add_argument("--consumers", type=int, default=4, help="fanout queues / competing consumers")
    p.add_argument("--queues", type=int, default=1000, help="many-queues: number of queues")
    p.add_argument(
        "--publishers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 64],
        help="publishers scenario concurrency levels",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=120.0,
        help="seconds per measured run (per level for publishers)",
    )
    p.add_argument(
        "--stall",
        type=float,
        default=10.0,
        help="fail if no delivery for this long after the last publish",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="connect / request timeout")
    p.add_argument("--url", default=None, help="use a running broker instead of starting one")
    p.add_argument(
        "--broker-pid",
        type=int,
        default=None,
        help="with --url: pid of the broker, for its CPU and RSS",
    )
    p.add_argument("--broker-args", default="", help="extra flags for the started broker")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write PNG plots here (matplotlib)")
    p.add_argument(
        "--compare",
        choices=["rabbitmq"],
        default=None,
        help="also run against RabbitMQ (aio-pika), alternating runs",
    )
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1/", help="for --compare")
    p.add_argument(
        "--amqp-broker-pid",
        type=int,
        default=None,
        help="RabbitMQ's pid for CPU/RSS [the only beam.smp process, if any]",
    )
    opts = p.parse_args(argv)
    if opts.size is not None and opts.size < HEADER:
        p.error(f"--size must be >= {HEADER}")
    for name in ("messages", "runs", "batch", "prefetch", "window", "consumers", "queues"):
        v = getattr(opts, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1")
    if opts.time_limit <= 2:
        p.error("--time-limit must be > 2")

    def messages_for(scenario: str) -> int:
        return opts.messages or DEFAULT_MESSAGES.get(scenario, 200000)

    def size_for(scenario: str) -> int:
        return opts.size or DEFAULT_SIZE.get(scenario, 128)

    def effective_window(size: int) -> int:
        return max(1, min(opts.window, opts.window_bytes // size))

    def settings(scenario: str) -> dict[str, Any]:
        import uvloop

        s: dict[str, Any] = {
            "batch": 1 if scenario == "latency" else opts.batch,
            "prefetch": opts.prefetch,
            "window": (
                1 if scenario in ("latency", "publishers") else effective_window(size_for(scenario))
            ),
            "runs": opts.runs,
            "processes": opts.processes,
            "time_limit_s": opts.time_limit,
            "python": platform.python_version(),
            "uvloop": uvloop.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "broker": opts.url or "started by the bench",
            "git_commit": _git_commit(),
        }
        if scenario in ("fanout", "competing"):
            s["consumers"] = opts.consumers
        if scenario == "many-queues":
            s["queues"] = opts.queues
        if scenario == "publishers":
            s["publishers"] = opts.publishers
        if opts.compare:
            s["compare"] = opts.compare
            s["aio_pika"] = _version("aio_pika")
        return s

    opts.messages_for, opts.size_for = messages_for, size_for
    opts.effective_window, opts.settings = effective_window, settings
    return opts


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):
        return str(__import__(module).__version__)
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    return None


async def bench(opts: argparse.Namespace, backends: list[Backend]) -> list[dict[str, Any]]:
    scenarios = list(SCENARIOS) if opts.scenario == "all" else [opts.scenario]
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    summaries: list[dict[str, Any]] = []
    plots: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for scenario in scenarios:
        runs: dict[str, list[dict[str, Any]]] = {b.kind: [] for b in backends}
        for i in range(1, opts.runs + 1):
            for b in backends:  # alternate backends run by run
                r = await run_scenario_once(b, scenario, opts, i)
                runs[b.kind].append(r)
                print(
                    f"{scenario} [{b.kind}] run {i}/{opts.runs}: publish "
                    f"{fmt_rate(r['publish_rate'])} msg/s, e2e {fmt_rate(r['e2e_rate'])}/s, "
                    f"p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms",
                    flush=True,
                )
        first: dict[str, Any] | None = None
        for b in backends:
            res = summarize(scenario, b, runs[b.kind], opts)
            print_summary(res)
            plots.append((res, median_run(runs[b.kind])))
            if first is None:
                first = res
            else:
                ratio = {
                    k: (round(first[k] / res[k], 3) if res[k] else None)
                    for k in ("publish_rate", "e2e_rate")
                }
                first["compare"] = {b.kind: res, "ratio": ratio}
                print(
                    f"   ratio conveyor/{b.kind}: publish {ratio['publish_rate']}x, "
                    f"end-to-end {ratio['e2e_rate']}x (median runs)"
                )
        assert first is not None
        summaries.append(first)
    if opts.plot is not None:
        write_plots(opts.plot, plots)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.compare == "rabbitmq":
        try:
            import aio_pika  # noqa: F401
        except ImportError:
            print("bench: --compare rabbitmq needs aio-pika: pip install aio-pika", file=sys.stderr)
            return 2
    try:
        import uvloop
    except ImportError:
        print("bench: uvloop is required: pip install uvloop", file=sys.stderr)
        return 2

    broker: LocalBroker | None = None

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C must stop the run even when started from a shell that ignores SIGINT in
    # background jobs (Python then inherits SIG_IGN and never raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    summaries: list[dict[str, Any]] = []
    try:
        if opts.url:
            backends = [Backend("conveyor", opts.url, opts.broker_pid)]
        else:
            broker = LocalBroker(shlex.split(opts.broker_args))
            atexit.register(broker.cleanup)
            broker.start()
            print(
                f"bench: broker pid {broker.pid} on {broker.url} (data {broker.data_dir})",
                flush=True,
            )
            backends = [Backend("conveyor", broker.url, broker.pid)]
        if opts.compare == "rabbitmq":
            pid = opts.amqp_broker_pid or find_pid_by_comm("beam.smp")
            backends.append(Backend("rabbitmq", opts.amqp_url, pid))
        summaries = uvloop.run(bench(opts, backends))
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        code = 130
    except asyncio.CancelledError:  # SIGTERM while running
        print("bench: terminated", file=sys.stderr)
        code = 143
    except Exception as exc:  # connection refused, broker errors ...
        print(f"bench: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        issues: list[str] = []
        if broker is not None:
            rc = broker.stop()
            issues = broker.issues()
            if issues:
                print(
                    f"bench: broker log has {len(issues)} warning/error line(s), first ones:",
                    file=sys.stderr,
                )
                for ln in issues[:10]:
                    print("   " + ln[:300], file=sys.stderr)
            if rc not in (0, None, -signal.SIGTERM):
                print(f"bench: broker exited with code {rc}", file=sys.stderr)
            broker.cleanup()
    if code == 0 and opts.json is not None:
        for s in summaries:
            s["broker_log_issues"] = issues[:50]
        doc = summaries[0] if len(summaries) == 1 else {"scenario": "all", "results": summaries}
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"bench: wrote {opts.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
