"""Unit tests of broker.limits, the limit settings and error-text clipping (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.broker import config
from conveyor.broker.core import Broker
from conveyor.broker.limits import (
    SETTINGS,
    ConnectionCounter,
    Limits,
    check_consumer_count,
    check_seq_range,
    publish_size,
)
from conveyor.broker.message import message_size
from conveyor.protocol import InvalidArgument, MalformedFrame, MessageTooLarge, ResourceError
from conveyor.protocol.errors import DETAIL_STR_MAX, MESSAGE_MAX


def test_defaults_match_config_and_settings() -> None:
    cfg = config.Config()
    assert Limits.from_config(cfg) == Limits()
    assert Limits() == Limits(128, 64 << 10, 10_000, 1_000, 10_000, 1_000)
    names = [name for name, _ in SETTINGS]
    assert names == [f for f in Limits.__dataclass_fields__]
    assert all(name in config.FIELDS for name in names)


def test_limits_from_toml_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nmax-queues = 7\nmax_headers = 3\n")
    cfg = config.load(str(path), max_connections=5)
    assert (cfg.max_queues, cfg.max_headers, cfg.max_connections) == (7, 3, 5)
    for name, _ in SETTINGS:
        with pytest.raises(config.ConfigError, match=name):
            config.load(None, **{name: 0})
    with pytest.raises(config.ConfigError, match="must be int"):
        config.load(None, max_queues="10")


def test_publish_size_matches_message_size_and_checks_headers() -> None:
    lim = Limits(max_headers=3, max_header_bytes=64)
    for props in ({}, {"headers": {}}, {"headers": {"a": 1, "b": "x" * 20}}, {"ttl": 5}):
        assert publish_size(lim, props, b"body") == message_size(props, b"body")
    with pytest.raises(InvalidArgument) as e1:
        publish_size(lim, {"headers": {"a": 1, "b": 2, "c": 3, "d": 4}}, b"")
    assert e1.value.details == {"limit": "max_headers", "max_headers": 3, "headers": 4}
    with pytest.raises(MessageTooLarge) as e2:
        publish_size(lim, {"headers": {"a": "x" * 100}}, b"")
    assert e2.value.details["limit"] == "max_header_bytes"
    assert "max_header_bytes" in e2.value.message


def test_connection_counter_total_and_per_subject() -> None:
    lim = Limits(max_connections=3, max_connections_per_subject=2)
    cc = ConnectionCounter()
    keys = [object() for _ in range(4)]
    cc.admit(lim, keys[0], "alice")
    cc.admit(lim, keys[0], "alice")  # admitting the same connection twice counts once
    cc.admit(lim, keys[1], "alice")
    with pytest.raises(ResourceError) as e:
        cc.admit(lim, keys[2], "alice")
    assert e.value.details["limit"] == "max_connections_per_subject"
    cc.admit(lim, keys[2], "bob")
    with pytest.raises(ResourceError) as e:
        cc.admit(lim, keys[3], "carol")
    assert e.value.details["limit"] == "max_connections"
    cc.release(keys[0])
    cc.release(keys[0])  # a second release (or one never admitted) is a no-op
    cc.release(object())
    cc.admit(lim, keys[3], "alice")
    assert (cc.total, cc.per_subject) == (3, {"alice": 2, "bob": 1})
    for k in keys:
        cc.release(k)
    assert (cc.total, cc.per_subject) == (0, {})


def test_broker_max_queues() -> None:
    b = Broker()
    b.limits = Limits(max_queues=2)
    b.declare_queue(None, "a")
    b.declare_queue(None, "")
    with pytest.raises(ResourceError) as e:
        b.declare_queue(None, "c")
    assert e.value.details == {"limit": "max_queues", "max_queues": 2}
    assert b.declare_queue(None, "a").name == "a"  # existing: not a new queue
    b.delete_queue(None, "a")
    b.declare_queue(None, "c")


def test_consumer_count_check() -> None:
    lim = Limits(max_consumers_per_connection=2)
    check_consumer_count(lim, 1)
    with pytest.raises(ResourceError):
        check_consumer_count(lim, 2)


@pytest.mark.parametrize("text", ["a" * 5000, "\u00e9" * 3000, "\U0001f600" * 2000])
def test_error_messages_and_details_are_clipped(text: str) -> None:
    """Errors echo peer input (a table key, an argument value): ERROR must still fit the
    4096-byte frame floor and the str limit."""
    err = InvalidArgument(f"unknown argument {text!r}", {"argument": text, "n": 5})
    assert len(err.message.encode()) <= MESSAGE_MAX
    assert err.message.startswith("unknown argument '") and err.message.endswith("...")
    assert len(err.details["argument"].encode()) <= DETAIL_STR_MAX and err.details["n"] == 5
    short = InvalidArgument("short", {"k": "v"})
    assert (short.message, short.details) == ("short", {"k": "v"})


def test_publish_batch_sequence_numbers_must_fit_u64() -> None:
    u64 = 2**64 - 1
    check_seq_range(0, 1000)  # unconfirmed: no sequence numbers
    check_seq_range(u64, 1)
    check_seq_range(u64 - 9, 10)
    with pytest.raises(MalformedFrame):
        check_seq_range(u64, 2)
