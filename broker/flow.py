"""Publisher flow control: credit per connection, token buckets, resource watermarks.

The broker grants each publishing connection **credit** in messages and body bytes
(``PUBLISH_CREDIT``, spec/PROTOCOL.md section 12 "Publisher flow control"). A client never
publishes beyond its credit; the broker tops it up once the client has used half of its
window, unless something withholds it:

==============  =================================================================
blocked reason  when credit is withheld
==============  =================================================================
``memory``      the broker process's resident memory is above memory_high_watermark
``disk``        free space of the data directory is below disk_free_limit
``queue-full``  a reject-publish queue this connection published to (within the last
                second, or that has blocked it since) is at its max_length / bytes
``rate``        the producer's token bucket (rate and burst, per token subject or
                the per-connection default) is empty: credit arrives as it refills
==============  =================================================================

Publishers slow down; nothing is dropped and no connection is closed for it. Below the
disk limit publishes are also nacked (506): credit a client already holds would otherwise
be written past it (:meth:`Watermarks.debit`). A client that publishes beyond its credit
anyway is not disconnected either: the transport stops reading from it until the broker
would grant credit again (``hold`` hook).

Everything here is batch-shaped: the session counts publishes on its hot path (two
integer additions per PUBLISH / PUBLISH_BATCH frame) and calls :meth:`PublisherFlow.after_batch`
once per input batch; the token bucket is debited when credit is *granted*, never per
message. Watermarks are sampled at most once a second (:class:`Watermarks`); between
samples the bytes of each write batch are counted against the last disk sample. A
connection has at most one timer (refill or re-check), armed through the ``call_later``
hook the transport hands to :meth:`PublisherFlow.open`.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.protocol import PublishCredit

if TYPE_CHECKING:
    from conveyor.broker.auth import Principal
    from conveyor.broker.session import Session

log = logging.getLogger("conveyor.flow")

DEFAULT_CREDIT_MESSAGES = 4096
DEFAULT_CREDIT_BYTES = 16 << 20
DEFAULT_DISK_FREE_LIMIT = 64 << 20
MEMORY_FRACTION = 0.4  # memory_high_watermark 0 = this share of physical memory
WATERMARK_INTERVAL = 1.0  # seconds between two samples of memory and disk
BLOCKED_POLL = 0.25  # a connection blocked by memory/disk/queue-full re-checks this often
RECENT_QUEUE = 1.0  # seconds a published-to reject-publish queue keeps counting
GRANT_INTERVAL = 0.1  # a rate-limited connection gets credit about this often
U32_MAX = 0xFFFFFFFF

# (setting, help) for the `mq-cli server` flags (cli/flow_flags.py), in documentation order.
SETTINGS: tuple[tuple[str, str], ...] = (
    (
        "publish_credit_messages",
        f"Publish credit window per connection, in messages [{DEFAULT_CREDIT_MESSAGES}]",
    ),
    (
        "publish_credit_bytes",
        f"Publish credit window per connection, in body bytes [{DEFAULT_CREDIT_BYTES}]",
    ),
    ("publish_rate_messages", "Default publish rate per connection, messages/s; 0 = unlimited [0]"),
    ("publish_rate_bytes", "Default publish rate per connection, body bytes/s; 0 = unlimited [0]"),
    ("publish_burst_messages", "Token-bucket depth in messages; 0 = one second of the rate [0]"),
    (
        "memory_high_watermark",
        "Withhold publish credit while the broker's resident memory is above this many bytes; "
        "0 = 40% of physical memory or of a lower container (cgroup) limit [0]",
    ),
    (
        "disk_free_limit",
        "Withhold publish credit, and nack publishes with 506, while the data directory's "
        "file system has less free space than this many bytes; 0 = off "
        f"[{DEFAULT_DISK_FREE_LIMIT}]",
    ),
)


def validate(config: Any) -> str | None:
    """A one-line complaint about the flow-control settings of ``config``, or None."""
    if config.publish_credit_messages < 1 or config.publish_credit_messages > U32_MAX:
        return "publish_credit_messages must be 1..4294967295"
    if config.publish_credit_bytes < 4096:
        return "publish_credit_bytes must be >= 4096"
    for name in (
        "publish_rate_messages",
        "publish_rate_bytes",
        "publish_burst_messages",
        "memory_high_watermark",
        "disk_free_limit",
    ):
        if getattr(config, name) < 0:
            return f"{name} must be >= 0"
    return None


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the container's (cgroup)
    limit when that is lower; 0 if unknown."""
    try:
        total = int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        total = 0
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                limit = int(f.read().strip())  # "max" (no limit) is not an int
        except (OSError, ValueError):
            continue
        if 0 < limit < (total or limit + 1):
            total = limit
    return total


_PAGE = resource.getpagesize()


def process_rss() -> int:
    """Resident memory of this process in bytes (/proc/self/statm; else peak RSS)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_free(path: str) -> int | None:
    """Bytes available to the broker on ``path``'s file system (None if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# What admitting one byte / one message of credit may cost in resident memory before the
# next sample sees it (the body, its copies on the way in and to the log; the message and
# queue entry objects): credit is granted only while that fits under the watermark.
CREDIT_BYTE_COST = 1
CREDIT_MESSAGE_COST = 256


class Watermarks:
    """Broker-wide resource checks, sampled at most every ``WATERMARK_INTERVAL`` seconds.

    Memory is also accounted *before* it is used: each sample sets the headroom left
    under ``memory_high_watermark`` after the resident memory, and each grant of credit
    (:meth:`admit`) is taken from it. So between two samples publishers are granted no
    more than the watermark leaves, however fast they publish; the overshoot is bounded
    by the credit they held at the sample (at most one window per connection).
    """

    def __init__(
        self, memory_high_watermark: int = 0, disk_free_limit: int = 0, data_dir: str = ""
    ) -> None:
        if memory_high_watermark == 0:
            phys = physical_memory()
            memory_high_watermark = int(phys * MEMORY_FRACTION) if phys else 0
        self.memory_high_watermark = memory_high_watermark  # 0 = not checked
        self.disk_free_limit = disk_free_limit if data_dir else 0  # 0 = not checked
        self.data_dir = data_dir
        self.rss = 0
        self.free: int | None = None  # last sample, less the bytes written since (debit)
        # Non-empty (the error message) while free space is below disk_free_limit:
        # publishes are then refused with 506, credit held by the client or not.
        self.refusal = ""
        self._reason = ""
        self._sampled = -math.inf
        self.headroom = 0  # bytes of memory left to grant credit for until the next sample

    def reason(self, now: float) -> str:
        """ "memory", "disk" or "" (cached for up to ``WATERMARK_INTERVAL`` seconds)."""
        if now - self._sampled >= WATERMARK_INTERVAL:
            self._sampled = now
            self._reason = self._sample()
            # Credit may be granted for what is left under the watermark (admit).
            self.headroom = self.memory_high_watermark - self.rss
        return self._reason

    def invalidate(self) -> None:
        """Sample again at the next check (after a setting changed)."""
        self._sampled = -math.inf

    def debit(self, nbytes: int) -> None:
        """A write batch adds ``nbytes`` to the data directory (the log's and the
        streams' append paths call this): count it against the last sample, so a fast
        publisher is refused once the limit is crossed, not up to a second later, when
        it may have written its whole credit window beyond it. Writing also keeps the
        sample fresh (once a second), however much credit the publishers hold."""
        if not self.disk_free_limit:
            return
        now = time.monotonic()
        if now - self._sampled >= WATERMARK_INTERVAL:
            self.reason(now)
        free = self.free
        if free is None:
            return
        self.free = free = free - nbytes
        if free < self.disk_free_limit and not self.refusal:
            self._refuse(free)
            if not self._reason:
                self._reason = "disk"
                log.warning(
                    "disk watermark: about %d bytes free in %s < %d; publishers blocked",
                    free,
                    self.data_dir,
                    self.disk_free_limit,
                )

    def refusing(self, now: float) -> str:
        """The refusal while free space is below the limit, sampled again when due
        (refused publishes call this: a publisher holding credit is the one that sees
        the space come back)."""
        self.reason(now)
        return self.refusal

    def _refuse(self, free: int) -> None:
        self.refusal = (
            f"free space in the data directory is below disk_free_limit "
            f"({free} < {self.disk_free_limit} bytes); not stored, retry later"
        )

    def admit(self, messages: int, nbytes: int, now: float) -> bool:
        """Take the memory ``messages`` / ``nbytes`` of new credit may cost from the
        headroom; False (nothing taken) if it does not fit."""
        if not self.memory_high_watermark:
            return True
        self.reason(now)  # a sample due now refreshes the headroom first
        cost = CREDIT_BYTE_COST * nbytes + CREDIT_MESSAGE_COST * messages
        if cost > self.headroom:
            return False
        self.headroom -= cost
        return True

    def _sample(self) -> str:
        was = self._reason
        reason = ""
        if self.memory_high_watermark:
            self.rss = process_rss()
            if self.rss > self.memory_high_watermark:
                reason = "memory"
        if self.disk_free_limit:
            self.free = disk_free(self.data_dir)
            if self.free is not None and self.free < self.disk_free_limit:
                reason = reason or "disk"
                self._refuse(self.free)
            else:
                self.refusal = ""
        if reason != was:
            if reason == "memory":
                log.warning(
                    "memory watermark: resident %d bytes > %d; publishers blocked",
                    self.rss,
                    self.memory_high_watermark,
                )
            elif reason == "disk":
                log.warning(
                    "disk watermark: %s bytes free in %s < %d; publishers blocked",
                    self.free,
                    self.data_dir,
                    self.disk_free_limit,
                )
            else:
                log.warning("resource watermarks clear again; publishers resume")
        return reason


@dataclass
class FlowControl:
    """Broker-wide flow-control settings (``Broker.flow``; the transport sets it from
    its Config). The defaults leave rates unlimited and watermarks off, as the model's
    unit tests expect."""

    credit_messages: int = DEFAULT_CREDIT_MESSAGES
    credit_bytes: int = DEFAULT_CREDIT_BYTES
    rate_messages: float = 0.0
    rate_bytes: float = 0.0
    burst_messages: int = 0
    watermarks: Watermarks | None = None
    # Largest body a message may have: byte credit may be overdrawn by one message.
    max_message_size: int = 1 << 20
    # A token's rate is one bucket per (subject, rate, burst), shared by its connections.
    shared: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> FlowControl:
        return cls(
            config.publish_credit_messages,
            config.publish_credit_bytes,
            float(config.publish_rate_messages),
            float(config.publish_rate_bytes),
            config.publish_burst_messages,
            Watermarks(config.memory_high_watermark, config.disk_free_limit, config.data_dir),
            config.effective_max_message_size(),
        )


class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; starts full. Debited on grants.

    Credit the client holds counts against the depth (:meth:`refill`'s ``held``), so a
    producer idle for long can publish at most ``burst`` at once, not credit + burst."""

    __slots__ = ("burst", "chunk", "held", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, chunk: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.chunk = chunk  # smallest grant worth sending while limited
        self.tokens = burst
        self.stamp = now
        self.held = 0  # credit the client held at the last refill (or grant)

    def refill(self, now: float, held: int = 0) -> int:
        """Whole tokens available now, the client holding ``held`` credit. Tokens that
        accrued since the last call are capped by what it held then (it may have spent
        that credit only just now)."""
        if now > self.stamp:
            room = self.burst - max(0, self.held)
            self.tokens = min(self.tokens + (now - self.stamp) * self.rate, room)
            self.stamp = now
        self.held = held
        self.tokens = min(self.tokens, self.burst - max(0, held))
        return max(0, int(self.tokens))

    def grant(self, n: int) -> None:
        self.tokens -= n
        self.held += n

    def until(self, n: int) -> float:
        """Seconds until ``n`` whole tokens are available (after :meth:`refill`)."""
        return max(0.0, (n - self.tokens) / self.rate)


def _bucket(rate: float, burst: float, window: int, now: float) -> TokenBucket | None:
    if rate <= 0:
        return None
    chunk = max(1, min(window // 2, math.ceil(rate * GRANT_INTERVAL)))
    return TokenBucket(rate, max(burst, chunk), chunk, now)


class SharedBucket:
    """One connection's handle on a subject's :class:`TokenBucket`: a token's rate holds
    for the subject as a whole, however many connections it opens (every grant to any
    of them is debited from the one bucket, so they share ``rate`` and ``burst``).

    Unlike a private bucket, credit a connection holds does not cap the shared one (an
    idle connection holding its window must not starve its siblings); a subject's
    largest burst is therefore ``burst`` plus what its connections hold unused."""

    __slots__ = ("bucket", "key", "registry")

    def __init__(
        self, bucket: TokenBucket, key: tuple[Any, ...], registry: dict[tuple[Any, ...], list[Any]]
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.registry = registry

    @property
    def burst(self) -> float:
        return self.bucket.burst

    @property
    def chunk(self) -> int:
        return self.bucket.chunk

    @property
    def tokens(self) -> float:
        return self.bucket.tokens

    def refill(self, now: float, held: int = 0) -> int:
        return self.bucket.refill(now, 0)

    def grant(self, n: int) -> None:
        self.bucket.tokens -= n

    def until(self, n: int) -> float:
        return self.bucket.until(n)

    def release(self) -> None:
        """The connection closed; the last one of the subject drops the bucket."""
        entry = self.registry.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.registry[self.key]


def _shared(
    registry: dict[tuple[Any, ...], list[Any]],
    key: tuple[Any, ...],
    rate: float,
    burst: float,
    window: int,
    now: float,
) -> SharedBucket | None:
    """The share of the bucket ``key`` names (created, full, by the first connection)."""
    entry = registry.get(key)
    if entry is None:
        bucket = _bucket(rate, burst, window, now)
        if bucket is None:
            return None
        entry = registry[key] = [bucket, 0]
    entry[1] += 1
    return SharedBucket(entry[0], key, registry)


def _rates(fc: FlowControl, p: Principal) -> tuple[float, float, int, float]:
    """(messages/s, bytes/s, burst in messages, seconds the byte burst covers) for ``p``:
    its own rate, else the broker's per-connection default."""
    rate_m = fc.rate_messages if p.rate_messages is None else float(p.rate_messages)
    rate_b = fc.rate_bytes if p.rate_bytes is None else float(p.rate_bytes)
    burst_m = fc.burst_messages if p.burst_messages is None else p.burst_messages
    # The burst covers ``seconds`` of the rate (one second unless set in messages).
    seconds = burst_m / rate_m if burst_m and rate_m > 0 else 1.0
    return rate_m, rate_b, burst_m, seconds


def _subject_rated(p: Principal) -> bool:
    """A restricted principal with its own rate: limited per subject, not per connection."""
    return p.permissions is not None and (p.rate_messages is not None or p.rate_bytes is not None)


def _subject_keys(
    p: Principal, rate_m: float, rate_b: float, burst_m: int, seconds: float
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("m", p.subject, rate_m, burst_m), ("b", p.subject, rate_b, seconds)


SHARED_MAX = 10_000  # buckets kept for subjects without an open connection (HTTP only)


def take_http(fc: FlowControl, p: Principal, nbytes: int, now: float) -> float:
    """An HTTP publish of ``nbytes`` by ``p``: 0.0 if its subject's bucket allows it now
    (debited), else the seconds until it would. The same buckets as the subject's
    connections, so HTTP is no way around a token's rate."""
    if not _subject_rated(p):
        return 0.0
    rate_m, rate_b, burst_m, seconds = _rates(fc, p)
    reg = fc.shared
    buckets: list[TokenBucket] = []
    for key, rate, burst, window in zip(
        _subject_keys(p, rate_m, rate_b, burst_m, seconds),
        (rate_m, rate_b),
        (burst_m or rate_m, rate_b * seconds),
        (fc.credit_messages, fc.credit_bytes),
        strict=True,
    ):
        entry = reg.get(key)
        if entry is None:
            bucket = _bucket(rate, burst, window, now)
            if bucket is None:
                continue
            if len(reg) >= SHARED_MAX:  # forget idle HTTP-only subjects
                for k in [k for k, e in reg.items() if e[1] <= 0]:
                    del reg[k]
            entry = reg[key] = [bucket, 0]
        buckets.append(entry[0])
    wait = 0.0
    for b in buckets:
        b.refill(now, 0)
        if b.tokens < 1:
            wait = max(wait, b.until(1))
    if wait:
        return wait
    if buckets:
        buckets[0].tokens -= 1 if rate_m > 0 else nbytes
        if len(buckets) > 1:
            buckets[1].tokens -= nbytes
    return 0.0


class PublisherFlow:
    """Publish credit of one connection (``Session.flow``).

    Usage is counted by the session (``Session.published`` messages and
    ``Session.published_bytes`` body bytes, all publishes, nacked ones included);
    credit granted so far is ``granted_messages`` / ``granted_bytes``. Inactive (no
    grants, no timers) until the transport calls :meth:`open`.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.clock: Callable[[], float] = time.monotonic  # seconds; tests substitute it
        self.active = False
        self.window_messages = DEFAULT_CREDIT_MESSAGES
        self.window_bytes = DEFAULT_CREDIT_BYTES
        self.half_messages = self.window_messages // 2
        self.half_bytes = self.window_bytes // 2
        self.granted_messages = 0
        self.granted_bytes = 0
        self.seen = 0  # session.published at the last check
        self.blocked = ""
        self.blocked_since = 0.0
        self.blocked_total = 0.0  # seconds spent blocked, closed intervals
        self.paused = False  # the transport stopped reading (credit overdrawn)
        self.peer = ""
        self.rate_messages = 0.0
        self.rate_bytes = 0.0
        self._messages: TokenBucket | SharedBucket | None = None
        self._bytes: TokenBucket | SharedBucket | None = None
        self._watermarks: Watermarks | None = None
        self._overdraft = DEFAULT_CREDIT_BYTES
        # reject-publish queues published to -> monotonic time of the last publish/block
        self.recent: dict[str, float] = {}
        self._call_later: Callable[[float, Callable[[], None]], Any] | None = None
        self._hold: Callable[[bool], None] | None = None
        self._timer: Any = None
        self._due = 0.0

    # ------------------------------------------------------------------ transport
    def open(
        self,
        call_later: Callable[[float, Callable[[], None]], Any],
        hold_reading: Callable[[bool], None],
        peer: str = "",
    ) -> None:
        """The connection is open: take the principal's rates and send the initial grant.

        ``call_later(delay, fn)`` arms a loop timer; ``hold_reading(True/False)`` stops and
        restarts reading from the socket."""
        fc: FlowControl = self.session.broker.flow
        p = self.session.principal
        now = self.clock()
        self.window_messages = fc.credit_messages
        self.window_bytes = fc.credit_bytes
        self.half_messages = self.window_messages // 2
        self.half_bytes = self.window_bytes // 2
        self._overdraft = max(fc.max_message_size, 1)
        rate_m, rate_b, burst_m, seconds = _rates(fc, p)
        self.rate_messages, self.rate_bytes = rate_m, rate_b
        if _subject_rated(p):
            # A token's (or certificate's) rate: one bucket per subject, all connections.
            key_m, key_b = _subject_keys(p, rate_m, rate_b, burst_m, seconds)
            self._messages = _shared(
                fc.shared, key_m, rate_m, burst_m or rate_m, self.window_messages, now
            )
            self._bytes = _shared(
                fc.shared, key_b, rate_b, rate_b * seconds, self.window_bytes, now
            )
        else:
            self._messages = _bucket(rate_m, burst_m or rate_m, self.window_messages, now)
            # (A message larger than the byte burst still passes: byte credit > 0 admits
            # one message whatever its size, and the overdraft is paid back before the next.)
            self._bytes = _bucket(rate_b, rate_b * seconds, self.window_bytes, now)
        # A rate-limited client never holds more credit than its bucket is deep.
        if self._messages is not None:
            self.window_messages = max(1, min(self.window_messages, int(self._messages.burst)))
        if self._bytes is not None:
            self.window_bytes = max(1, min(self.window_bytes, int(self._bytes.burst)))
        self.half_messages = self.window_messages // 2
        self.half_bytes = self.window_bytes // 2
        self._watermarks = fc.watermarks
        self.peer = peer
        self._call_later = call_later
        self._hold = hold_reading
        self.active = True
        self.update(now, eager=True, force=True)

    def close(self) -> None:
        self.active = False
        for b in (self._messages, self._bytes):
            if isinstance(b, SharedBucket):
                b.release()
        self._messages = self._bytes = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._hold = None
        self._call_later = None

    # ------------------------------------------------------------------ accounting
    def note(self, targets: list[str]) -> None:
        """Publishes went to these queues (only called while some queue rejects
        publishes when full): remember the reject-publish ones for a second."""
        queues = self.session.broker.queues
        now = 0.0
        for name in targets:
            q = queues.get(name)
            if q is not None and q.opts.rejects_publish:
                now = now or self.clock()
                self.recent[name] = now

    def after_batch(self) -> None:
        """Called by the session after an input batch that contained publishes."""
        s = self.session
        self.seen = s.published
        if (
            self.granted_messages - s.published > self.half_messages
            and self.granted_bytes - s.published_bytes > self.half_bytes
        ):
            return  # plenty of credit left (the common case)
        self.update(self.clock())

    def credit(self) -> tuple[int, int]:
        """Credit the client has left (negative if it overdrew)."""
        s = self.session
        return self.granted_messages - s.published, self.granted_bytes - s.published_bytes

    def _withheld(self, now: float) -> str:
        wm = self._watermarks
        if wm is not None:
            why = wm.reason(now)
            if why:
                return why
        if self.recent:
            s = self.session
            queues = s.broker.queues
            # "Full" for the next message of this publisher: about its average body size.
            avg = max(1, s.published_bytes // s.published) if s.published else 1
            for name, t in list(self.recent.items()):
                q = queues.get(name)
                if q is None or not q.opts.rejects_publish:
                    del self.recent[name]
                elif q.is_full(avg):
                    self.recent[name] = now  # keeps counting while it blocks us
                    return "queue-full"
                elif now - t > RECENT_QUEUE:
                    del self.recent[name]
        return ""

    def update(self, now: float, eager: bool = False, force: bool = False) -> None:
        """Grant what the window, the buckets and the watermarks allow; hold reading while
        the client is over its credit. ``eager``: top up below the full window (timers),
        not only once half of it is used. ``force``: send a frame even if it adds nothing
        (the initial grant)."""
        if not self.active:
            return
        s = self.session
        out_m = self.granted_messages - s.published
        out_b = self.granted_bytes - s.published_bytes
        low_m = out_m <= (self.window_messages - 1 if eager else self.half_messages)
        low_b = out_b <= (self.window_bytes - 1 if eager else self.half_bytes)
        if not (low_m or low_b or force):
            if self._set_blocked("", now):
                self._send(0, 0)
            self._hold_reading(False)
            return
        why = self._withheld(now)
        if why:
            if self._set_blocked(why, now) or force:
                self._send(0, 0)
            self._hold_reading(out_m < 0 or out_b <= -self._overdraft)
            self._arm(BLOCKED_POLL)
            return
        want_m = max(0, self.window_messages - out_m)
        want_b = max(0, self.window_bytes - out_b)
        give_m = self._allow(self._messages, want_m, out_m, now)
        give_b = self._allow(self._bytes, want_b, out_b, now)
        if (low_m and want_m and not give_m) or (low_b and want_b and not give_b):
            give_m = give_b = 0  # one of the two is exhausted: wait for both
        wm = self._watermarks
        if (give_m or give_b) and wm is not None and not wm.admit(give_m, give_b, now):
            # What this grant may cost does not fit under the memory watermark.
            if self._set_blocked("memory", now) or force:
                self._send(0, 0)
            self._hold_reading(out_m < 0 or out_b <= -self._overdraft)
            self._arm(BLOCKED_POLL)
            return
        if give_m or give_b:
            if self._messages is not None:
                self._messages.grant(give_m)
            if self._bytes is not None:
                self._bytes.grant(give_b)
            self.granted_messages += give_m
            self.granted_bytes += give_b
        limited = give_m < want_m or give_b < want_b
        if self._set_blocked("rate" if limited else "", now) or give_m or give_b or force:
            self._send(give_m, give_b)
        self._hold_reading(out_m + give_m < 0 or out_b + give_b <= -self._overdraft)
        if limited:
            wait = 0.0
            for bucket, rest in ((self._messages, want_m - give_m), (self._bytes, want_b - give_b)):
                if bucket is not None and rest > 0:
                    wait = max(wait, bucket.until(min(rest, bucket.chunk)))
            self._arm(max(wait, 0.005))

    @staticmethod
    def _allow(bucket: TokenBucket | SharedBucket | None, want: int, held: int, now: float) -> int:
        """How much of ``want`` the bucket allows now: all of it, what it holds, or 0 if
        that is less than a chunk (grants come in chunks, at most ~10 a second)."""
        if bucket is None or not want:
            return want
        avail = bucket.refill(now, held)
        if avail >= want:
            return want
        return avail if avail >= min(want, bucket.chunk) else 0

    # ------------------------------------------------------------------ helpers
    def _send(self, messages: int, nbytes: int) -> None:
        s = self.session
        while messages > U32_MAX:  # only after a huge overdraft
            s.send(PublishCredit(U32_MAX, 0, self.blocked))
            messages -= U32_MAX
        s.send(PublishCredit(messages, nbytes, self.blocked))

    def _set_blocked(self, why: str, now: float) -> bool:
        if why == self.blocked:
            return False
        if self.blocked:
            self.blocked_total += now - self.blocked_since
        if why:
            self.blocked_since = now
        log.debug("%s: publishing %s", self.session.id, f"blocked ({why})" if why else "resumes")
        self.blocked = why
        return True

    def _hold_reading(self, hold: bool) -> None:
        if hold != self.paused and self._hold is not None:
            self.paused = hold
            self._hold(hold)

    def _arm(self, delay: float) -> None:
        if self._call_later is None:
            return
        due = self.clock() + delay
        if self._timer is not None:
            if self._due <= due:
                return
            self._timer.cancel()
        self._due = due
        self._timer = self._call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        s = self.session
        if not self.active or s.closed:
            return
        self.update(self.clock(), eager=True)
        s.flush()

    # ------------------------------------------------------------------ listing
    def info(self) -> dict[str, Any]:
        """The LIST ``connections`` item of this connection."""
        s = self.session
        m, b = self.credit()
        blocked_s = self.blocked_total
        if self.blocked:
            blocked_s += self.clock() - self.blocked_since
        return {
            "id": s.id,
            "peer": self.peer,
            "subject": s.principal.subject,
            "credit_messages": m,
            "credit_bytes": b,
            "blocked": self.blocked,
            "blocked_ms": int(blocked_s * 1000),
            "published": s.published,
            "published_bytes": s.published_bytes,
            "rate_messages": self.rate_messages,
            "rate_bytes": self.rate_bytes,
        }
