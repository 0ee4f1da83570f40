"""Publisher flow control (broker.flow) driven without sockets or an event loop: a
Session with a fake clock, a fake ``call_later`` and a fake "hold reading" hook; every
PUBLISH_CREDIT it writes is decoded and checked."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conveyor.broker.auth import Principal
from conveyor.broker.core import Broker
from conveyor.broker.flow import FlowControl, PublisherFlow, TokenBucket, Watermarks
from conveyor.broker.session import Session
from conveyor.protocol import (
    SERVER_FRAMES,
    Confirm,
    Decoder,
    Frame,
    List,
    ListOk,
    Publish,
    PublishBatch,
    PublishCredit,
    PublishEntry,
    QueueDeclare,
    QueuePurge,
)


class Timer:
    def __init__(self, due: float, fn: Callable[[], None]) -> None:
        self.due = due
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Harness:
    """One open connection's Session, with time under the test's control."""

    def __init__(self, flow: FlowControl | None = None, principal: Principal | None = None) -> None:
        self.broker = Broker(max_message_size=1 << 20)
        if flow is not None:
            self.broker.flow = flow
        self.now = 1000.0
        self.timers: list[Timer] = []
        self.held: list[bool] = []
        self.frames: list[Frame] = []
        decoder = Decoder(1 << 20, SERVER_FRAMES)

        def write(chunks: list[bytes]) -> None:
            self.frames.extend(decoder.feed(b"".join(chunks)))

        self.session = Session(self.broker, self.broker.new_session_id(), write, 1 << 20)
        if principal is not None:
            self.session.principal = principal
        self.flow: PublisherFlow = self.session.flow
        self.flow.clock = lambda: self.now
        self.flow.open(self._call_later, self.held.append, "127.0.0.1:1")
        self.broker.pump()

    def _call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        t = Timer(self.now + delay, fn)
        self.timers.append(t)
        return t

    def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers in order."""
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.due <= end]
            if not due:
                break
            t = min(due, key=lambda t: t.due)
            self.timers.remove(t)
            self.now = max(self.now, t.due)
            t.fn()
        self.now = end

    def send(self, *frames: Frame) -> None:
        self.session.handle(list(frames))
        self.broker.pump()

    def publish(self, n: int, body: bytes = b"x", queue: str = "q", first_seq: int = 0) -> None:
        self.send(
            PublishBatch(first_seq, [PublishEntry("", queue, {}, body, False) for _ in range(n)])
        )

    def credits(self) -> list[PublishCredit]:
        out = [f for f in self.frames if isinstance(f, PublishCredit)]
        self.frames = [f for f in self.frames if not isinstance(f, PublishCredit)]
        return out

    def pending_timers(self) -> list[Timer]:
        return [t for t in self.timers if not t.cancelled]


def total(credits: list[PublishCredit]) -> tuple[int, int]:
    return sum(c.messages for c in credits), sum(c.bytes for c in credits)


# --------------------------------------------------------------------------- basics


def test_initial_grant_is_the_window_and_top_up_happens_at_half() -> None:
    h = Harness(FlowControl(credit_messages=100, credit_bytes=10_000))
    assert h.credits() == [PublishCredit(100, 10_000, "")]
    h.send(QueueDeclare(1, "q", False))
    h.publish(50)  # half used: not below half yet -> a top-up happens at exactly half
    assert total(h.credits()) == (50, 50)
    h.publish(10)
    assert h.credits() == []  # 90 left: plenty
    h.publish(41, body=b"")
    assert total(h.credits()) == (51, 10)  # back to the full window of 100 / 10,000
    assert h.flow.credit() == (100, 10_000)
    assert h.held == [] and h.pending_timers() == []


def test_byte_window_triggers_a_top_up_too() -> None:
    h = Harness(FlowControl(credit_messages=1000, credit_bytes=10_000))
    h.credits()
    h.send(QueueDeclare(1, "q", False))
    h.publish(1, body=b"y" * 6000)
    assert h.credits() == [PublishCredit(1, 6000, "")]


def test_unit_tests_sessions_are_inactive_until_opened() -> None:
    b = Broker()
    s = Session(b, b.new_session_id(), lambda chunks: None, 1 << 20)
    assert not s.flow.active
    s.handle([Publish(0, "", "nowhere", {}, b"abc", False)])
    assert (s.published, s.published_bytes) == (1, 3)  # counted, nothing granted


def test_connections_listing() -> None:
    h = Harness(FlowControl(credit_messages=10, credit_bytes=4096))
    h.credits()
    h.send(QueueDeclare(1, "q", False))
    h.publish(3, body=b"abcd")
    h.send(List(2, "connections"))
    reply = [f for f in h.frames if isinstance(f, ListOk)][-1]
    (item,) = reply.items
    assert item["id"] == h.session.id and item["peer"] == "127.0.0.1:1"
    assert item["subject"] == "anonymous" and item["blocked"] == ""
    assert (item["credit_messages"], item["credit_bytes"]) == (7, 4096 - 12)
    assert (item["published"], item["published_bytes"]) == (3, 12)


# --------------------------------------------------------------------------- rates


def test_rate_limit_grants_in_chunks_as_the_bucket_refills() -> None:
    h = Harness(FlowControl(credit_messages=1000, credit_bytes=1 << 20, rate_messages=100))
    # The window of a limited connection is the bucket depth (one second = 100).
    assert h.credits() == [PublishCredit(100, 1 << 20, "")]
    h.send(QueueDeclare(1, "q", False))
    h.publish(100)
    (c,) = h.credits()
    assert (c.messages, c.blocked) == (0, "rate")
    assert h.session.flow.blocked == "rate"
    # Chunks of a tenth of a second (10 messages) every 0.1 s.
    h.advance(0.1)
    assert [(c.messages, c.blocked) for c in h.credits()] == [(10, "rate")]
    h.advance(0.35)
    assert total(h.credits())[0] == 30
    # Idle: credit refills up to the window, then "rate" clears.
    h.advance(2.0)
    got = h.credits()
    assert h.flow.credit()[0] == 100
    assert got[-1].blocked == "" and h.flow.blocked == ""
    assert h.pending_timers() == []


def test_publishing_flat_out_at_a_rate_takes_the_expected_time() -> None:
    """10,000 messages at 1,000/s (burst 1,000): 1,000 at once, the rest at the rate."""
    h = Harness(FlowControl(rate_messages=1000))
    credit = total(h.credits())[0]
    h.send(QueueDeclare(1, "q", False))
    sent = 0
    start = h.now
    while sent < 10_000:
        n = min(credit, 10_000 - sent)
        if n:
            h.publish(n)
            sent += n
            credit -= n
        credit += total(h.credits())[0]
        if sent < 10_000 and not credit:
            h.advance(0.01)
    assert 8.9 <= h.now - start <= 9.2


def test_principal_rate_overrides_the_default() -> None:
    h = Harness(
        FlowControl(rate_messages=1000),
        principal=Principal("svc", rate_messages=10, burst_messages=5),
    )
    assert h.credits() == [PublishCredit(5, h.flow.window_bytes, "")]
    assert h.flow.rate_messages == 10
    h2 = Harness(FlowControl(rate_messages=1000), principal=Principal("free", rate_messages=0))
    assert h2.credits()[0].messages == 4096  # explicit 0 = unlimited: the full window


def test_byte_rate_and_a_message_larger_than_the_byte_credit() -> None:
    h = Harness(FlowControl(credit_messages=100, credit_bytes=1 << 20, rate_bytes=1000))
    (first,) = h.credits()
    assert first.bytes == 1000  # one second of the byte rate
    h.send(QueueDeclare(1, "q", False))
    h.publish(1, body=b"z" * 5000)  # allowed: byte credit was > 0; now overdrawn by 4000
    assert h.flow.credit()[1] == -4000
    assert h.held == []  # an overdraft of one message is within the rules
    h.advance(3.9)
    assert h.flow.credit()[1] <= 0
    h.advance(0.3)
    assert h.flow.credit()[1] > 0  # the 4,000 overdrawn are paid back at 1,000 bytes/s


def test_idle_rate_limited_client_cannot_burst_beyond_the_bucket() -> None:
    h = Harness(FlowControl(rate_messages=100))
    h.send(QueueDeclare(1, "q", False))
    h.advance(60)
    assert h.flow.credit()[0] == 100
    h.publish(100)
    h.credits()
    h.advance(0.001)
    assert h.flow.credit()[0] == 0  # not another 100 at once: the bucket holds the held credit


# --------------------------------------------------------------------------- overdraft


def test_overdrawn_client_is_held_not_closed_then_released() -> None:
    h = Harness(FlowControl(rate_messages=100))
    h.credits()
    h.send(QueueDeclare(1, "q", False))
    h.publish(300, first_seq=1)  # 200 beyond the credit of 100
    assert h.held == [True]
    confirms = [f for f in h.frames if isinstance(f, Confirm)]
    assert confirms and confirms[-1].last_seq == 300 and all(c.ack for c in confirms)
    assert h.broker.queues["q"].ready == 300  # nothing dropped
    h.advance(1.9)
    assert h.held == [True]  # still paying back 200 at 100/s
    h.advance(0.3)
    assert h.held == [True, False]
    assert h.flow.credit()[0] > 0


def test_unlimited_overdraft_is_granted_back_at_once() -> None:
    h = Harness(FlowControl(credit_messages=10, credit_bytes=4096))
    h.credits()
    h.send(QueueDeclare(1, "q", False))
    h.publish(25)
    assert h.held == []  # nothing withholds credit: the window is restored, deficit included
    assert h.flow.credit()[0] == 10


# --------------------------------------------------------------------------- blocking


class FakeWatermarks(Watermarks):
    def __init__(self) -> None:
        super().__init__(memory_high_watermark=1 << 60, disk_free_limit=0)
        self.value = ""
        self.samples = 0

    def _sample(self) -> str:
        self.samples += 1
        return self.value


def test_memory_watermark_withholds_credit_and_is_sampled_at_most_once_a_second() -> None:
    wm = FakeWatermarks()
    wm.value = "memory"
    h = Harness(FlowControl(credit_messages=10, credit_bytes=4096, watermarks=wm))
    assert h.credits() == [PublishCredit(0, 0, "memory")]
    assert h.flow.blocked == "memory"
    for _ in range(20):
        h.advance(0.1)
    assert wm.samples <= 3
    assert h.credits() == []  # no frame while nothing changes
    wm.value = ""
    h.advance(1.3)
    assert total(h.credits()) == (10, 4096)
    assert h.flow.blocked == "" and h.flow.blocked_total > 0


def test_watermarks_sample_real_values() -> None:
    assert Watermarks(memory_high_watermark=1).reason(0.0) == "memory"
    assert Watermarks(memory_high_watermark=1 << 60).reason(0.0) == ""
    assert Watermarks(1 << 60, disk_free_limit=1 << 62, data_dir=".").reason(0.0) == "disk"
    assert Watermarks(1 << 60, disk_free_limit=1, data_dir=".").reason(0.0) == ""
    assert Watermarks(0).memory_high_watermark > 0  # 0 = 40% of physical memory


def test_full_reject_publish_queue_withholds_credit_until_it_drains() -> None:
    h = Harness(FlowControl(credit_messages=20, credit_bytes=4096))
    h.credits()
    h.send(
        QueueDeclare(
            1, "full", False, False, False, False, {"max_length": 5, "overflow": "reject-publish"}
        )
    )
    h.publish(20, queue="full", first_seq=1)
    confirms = [f for f in h.frames if isinstance(f, Confirm)]
    assert any(not c.ack and c.code == 409 for c in confirms)
    assert h.credits() == [PublishCredit(0, 0, "queue-full")]
    h.advance(3.0)  # still full: still blocked (the queue keeps counting while it blocks)
    assert h.flow.blocked == "queue-full" and h.credits() == []
    h.send(QueuePurge(2, "full"))
    h.advance(0.3)
    assert total(h.credits())[0] == 20 and h.flow.blocked == ""


def test_drop_head_queue_never_blocks() -> None:
    h = Harness(FlowControl(credit_messages=20, credit_bytes=4096))
    h.credits()
    h.send(QueueDeclare(1, "dh", False, False, False, False, {"max_length": 5}))
    h.publish(20, queue="dh")
    assert [c.blocked for c in h.credits()] == [""]


def test_close_cancels_the_timer() -> None:
    h = Harness(FlowControl(rate_messages=10))
    h.send(QueueDeclare(1, "q", False))
    h.publish(10)
    assert h.pending_timers()
    h.session.close()
    assert h.pending_timers() == []
    assert not h.flow.active


# --------------------------------------------------------------------------- bucket


@pytest.mark.parametrize("held, expect", [(0, 10), (4, 6), (-5, 10), (20, 0)])
def test_token_bucket_counts_held_credit(held: int, expect: int) -> None:
    b = TokenBucket(rate=10, burst=10, chunk=1, now=0.0)
    assert b.refill(5.0, held) == expect


def test_token_bucket_does_not_accrue_while_the_client_holds_a_full_window() -> None:
    b = TokenBucket(rate=10, burst=10, chunk=1, now=0.0)
    assert b.refill(0.0) == 10
    b.grant(10)
    assert b.refill(100.0, held=0) == 0  # it held 10 all along and spent them just now
    assert b.refill(100.5, held=0) == 5


def test_config_round_trip() -> None:
    from conveyor.broker.config import Config, ConfigError, load

    fc = FlowControl.from_config(Config(publish_rate_messages=1000, memory_high_watermark=7))
    assert fc.rate_messages == 1000.0 and fc.watermarks is not None
    assert fc.watermarks.memory_high_watermark == 7
    with pytest.raises(ConfigError):
        load(publish_credit_messages=0)
    with pytest.raises(ConfigError):
        load(disk_free_limit=-1)


def test_credit_is_admitted_only_while_it_fits_under_the_memory_watermark() -> None:
    """Between two samples the grants are taken from what the last sample left under the
    watermark: the second grant that would pass it is refused until the next sample."""

    class Resident(Watermarks):
        def _sample(self) -> str:
            self.rss = self.memory_high_watermark - (1 << 20)
            return ""

    wm = Resident(memory_high_watermark=100 << 20)
    assert wm.admit(0, 600 << 10, 0.0)
    assert not wm.admit(0, 600 << 10, 0.5)  # 1.2 MiB would pass the watermark
    assert wm.admit(0, 300 << 10, 0.6)
    assert wm.admit(0, 600 << 10, 1.1)  # a new sample: headroom again
