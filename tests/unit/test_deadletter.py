"""The pure dead-lettering rules (broker.deadletter): x-death records and the
automatic-cycle guard, checked without a broker."""

from __future__ import annotations

from typing import Any

from conveyor.broker.deadletter import automatic_cycle, dead_letter_properties
from conveyor.broker.message import death_records


def _dl(
    props: dict[str, Any], queue: str = "q", reason: str = "rejected", now: int = 1000
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return dead_letter_properties(
        props, queue=queue, reason=reason, exchange="ex", routing_key="rk", now=now
    )


def test_first_death_adds_one_record_with_the_original_route() -> None:
    props, deaths = _dl({"content_type": "text/plain"})
    assert props["content_type"] == "text/plain"
    assert props["headers"]["x-death"] == deaths
    assert deaths == [
        {
            "reason": "rejected",
            "queue": "q",
            "exchange": "ex",
            "routing_key": "rk",
            "count": 1,
            "time": 1000,
        }
    ]
    assert death_records(props["headers"]["x-death"]) == deaths


def test_same_queue_and_reason_raises_the_count_and_moves_to_front() -> None:
    props, _ = _dl({}, queue="a", reason="expired", now=1)
    props, _ = _dl(props, queue="b", reason="expired", now=2)
    props, deaths = _dl(props, queue="a", reason="expired", now=3)
    assert [(d["queue"], d["count"], d["time"]) for d in deaths] == [("a", 2, 3), ("b", 1, 2)]
    props, deaths = _dl(props, queue="a", reason="rejected", now=4)
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
        ("a", "rejected", 1),
        ("a", "expired", 2),
        ("b", "expired", 1),
    ]


def test_input_is_not_modified_and_ttl_delay_are_dropped() -> None:
    headers = {"x-death": [{"queue": "q", "reason": "rejected", "count": 4}], "k": "v"}
    original = {"headers": headers, "ttl": 5, "delay": 7, "priority": 2}
    props, deaths = _dl(original)
    assert original == {
        "headers": {"x-death": [{"queue": "q", "reason": "rejected", "count": 4}], "k": "v"},
        "ttl": 5,
        "delay": 7,
        "priority": 2,
    }
    assert "ttl" not in props and "delay" not in props and props["priority"] == 2
    assert props["headers"]["k"] == "v"
    assert deaths[0]["count"] == 5 and len(deaths) == 1


def test_unreadable_history_is_dropped_not_fatal() -> None:
    bad: list[Any] = [
        {"queue": 1, "reason": "x"},
        "junk",
        {"queue": "q", "reason": "rejected", "count": -3},
    ]
    _, deaths = _dl({"headers": {"x-death": bad}})
    assert deaths == [{"queue": "q", "reason": "rejected", "count": 1, "time": 1000}]
    _, deaths = _dl({"headers": "not a map"})
    assert [d["count"] for d in deaths] == [1]


def test_automatic_cycle_rule() -> None:
    _, deaths = _dl({}, queue="a", reason="expired")
    assert automatic_cycle("expired", deaths, "a")
    assert not automatic_cycle("expired", deaths, "b")
    assert not automatic_cycle("rejected", deaths, "a")  # a rejection is never a loop
    props, _ = _dl({}, queue="a", reason="rejected")
    _, deaths = _dl(props, queue="b", reason="expired")
    assert not automatic_cycle("expired", deaths, "a")  # a rejection breaks the cycle
    assert automatic_cycle("expired", deaths, "b")
