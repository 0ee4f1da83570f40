"""Per-subject quotas and the shared token bucket (broker.limits, broker.flow)."""

from __future__ import annotations

import os
import socket

import pytest

from conveyor.broker.auth import ANONYMOUS, Permissions, Principal
from conveyor.broker.flow import FlowControl, _shared, take_http
from conveyor.broker.limits import Limits, QueueOwners, connection_subject
from conveyor.broker.peeruid import peer_uid
from conveyor.protocol import ResourceError


def test_queue_owners_count_per_subject() -> None:
    limits = Limits(max_queues_per_subject=2)
    owners = QueueOwners()
    owners.add("a1", "a")
    owners.add("a1", "a")  # the same queue twice counts once
    owners.add("a2", "a")
    with pytest.raises(ResourceError) as info:
        owners.check(limits, "a")
    assert info.value.details["limit"] == "max_queues_per_subject"
    owners.check(limits, "b")
    owners.remove("a1")
    owners.remove("never-added")
    owners.check(limits, "a")
    owners.remove("a2")
    assert owners.per_subject == {} and owners.owner == {}


def test_connection_subject() -> None:
    assert connection_subject("anonymous", True, "127.0.0.1") == "anonymous@127.0.0.1"
    assert connection_subject("svc", False, "127.0.0.1") == "svc"


def test_shared_bucket_is_one_bucket_for_all_shares() -> None:
    reg: dict[tuple[object, ...], list[object]] = {}
    a = _shared(reg, ("m", "t"), 10.0, 10.0, 100, now=0.0)
    b = _shared(reg, ("m", "t"), 10.0, 10.0, 100, now=0.0)
    assert a is not None and b is not None and a.bucket is b.bucket
    assert a.refill(0.0) == 10
    a.grant(10)
    assert b.refill(0.0) == 0  # what one share took, the other cannot
    assert b.refill(0.5) == 5  # refills at the rate, once for both
    a.release()
    assert ("m", "t") in reg
    b.release()
    assert reg == {}
    assert _shared(reg, ("m", "x"), 0.0, 0.0, 100, now=0.0) is None and reg == {}


def test_http_publishes_draw_from_the_subject_bucket() -> None:
    fc = FlowControl()
    p = Principal("t", rate_messages=2.0, burst_messages=2, permissions=Permissions(write=("*",)))
    assert take_http(fc, p, 10, 0.0) == 0.0
    assert take_http(fc, p, 10, 0.0) == 0.0
    wait = take_http(fc, p, 10, 0.0)
    assert wait == pytest.approx(0.5)
    assert take_http(fc, p, 10, 0.5) == 0.0
    # Unlimited principals never wait.
    assert take_http(fc, ANONYMOUS, 10, 0.0) == 0.0
    assert take_http(fc, Principal("u", permissions=Permissions()), 10, 0.0) == 0.0


def test_connection_subject_with_a_local_user() -> None:
    assert connection_subject("anonymous", True, "127.0.0.1", 1000) == (
        "anonymous@127.0.0.1/uid:1000"
    )
    assert connection_subject("svc", False, "127.0.0.1", 1000) == "svc"


def test_peer_uid_names_the_owner_of_a_loopback_socket() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.create_connection(srv.getsockname())
    accepted, peer = srv.accept()
    try:
        assert peer_uid(peer, accepted.getsockname()) == os.getuid()
        assert peer_uid(("127.0.0.1", 1), ("127.0.0.1", 2)) is None  # no such socket
        assert peer_uid(("not-an-ip", 1), ("127.0.0.1", 2)) is None
        assert peer_uid(("::1", 1), ("127.0.0.1", 2)) is None  # families differ
    finally:
        for s in (client, accepted, srv):
            s.close()
