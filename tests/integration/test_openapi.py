"""spec/openapi.yaml against the live HTTP API: schemathesis generates requests for every
management and gateway operation and checks each response (no 5xx, documented status
code and content type, body matching the response schema). Bounded: a few dozen examples
per operation, one broker for the module."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import JsonSchemaError
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.broker_process import BrokerProcess
from tests.integration.helpers import connect
from tests.integration.http_helpers import http

SPEC = Path(__file__).resolve().parents[2] / "spec" / "openapi.yaml"
CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 25

schema = schemathesis.openapi.from_path(SPEC).include(tag=["management", "gateway"])
OPERATIONS = [cast(Any, r).ok() for r in schema.get_all_operations()]  # Ok or Err: raise on Err

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = BrokerProcess(
        tmp_path_factory.mktemp("openapi") / "data", "--http-port", "0", "--fsync", "never"
    ).start()

    async def seed() -> None:
        # Something to find: a queue with messages, a dead-letter queue, a consumer.
        conn = await connect(b.url)
        try:
            await conn.declare_queue("st-q")
            await conn.declare_queue("st-dlq")
            await conn.declare_queue("st-held")
            await conn.declare_queue("st-gw")  # read once, by the gateway drift case
            await conn.publish("", "st-gw", b"gw", message_id="gw-1", headers={"h": "v"})
            await conn.declare_exchange("st-ex", "topic")
            await conn.bind("st-ex", "st-q", "st.#")
            await conn.declare_queue("st-stream", queue_type="stream")
            for i in range(5):
                await conn.publish("", "st-q", f"m{i}".encode())
                await conn.publish("", "st-dlq", b"\xff" * i)
                await conn.publish("", "st-stream", f"s{i}".encode())
            async with conn.stream(
                "st-stream", group="st-group", offset="first", auto_commit=False
            ) as s:
                msg = await s.get(10)
                assert msg is not None
                msg.ack()
        finally:
            await conn.close()

    asyncio.run(seed())
    # A client connection (with a consumer) that stays open while the module runs, so the
    # connection and consumer listings have items for their schemas to check.
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_URL"}
    held = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli.main", "consume", "-q", "st-held", "--url", b.url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _get(b, "/api/consumers"):
            time.sleep(0.05)
        assert _get(b, "/api/consumers"), "the held consumer never appeared"
        yield b
    finally:
        held.kill()
        held.wait()
        b.stop()


def _get(b: BrokerProcess, path: str) -> Any:
    r = requests.get(f"http://127.0.0.1:{b.http_port}{path}", timeout=10)
    r.raise_for_status()
    return r.json()


def test_schema_lists_every_route() -> None:
    paths = set(schemathesis.openapi.from_path(SPEC).raw_schema["paths"])
    assert {
        "/api/overview",
        "/api/queues",
        "/api/queues/{name}",
        "/api/queues/{name}/peek",
        "/api/queues/{name}/purge",
        "/api/queues/{name}/redrive",
        "/api/exchanges",
        "/api/bindings",
        "/api/consumers",
        "/api/connections",
        "/api/connections/{id}",
        "/queues/{queue}/messages",
        "/queues/{queue}/messages/{receipt_handle}",
        "/queues/{queue}/messages/{receipt_handle}/visibility",
        "/queues/{queue}/messages/batch",
        "/queues/{queue}/messages/batch-delete",
        "/exchanges/{exchange}/messages",
        "/metrics",
        "/",
        "/api/queues/{name}/history",
        "/api/exchanges/{name}",
        "/api/bindings/{exchange}/{queue}/{key}",
        "/api/whoami",
    } <= paths
    assert len(OPERATIONS) == 27


def test_queue_declare_documents_every_queue_argument() -> None:
    """PUT /api/queues/{name} takes the queue arguments of spec/protocol.toml."""
    import tomllib

    raw = schemathesis.openapi.from_path(SPEC).raw_schema
    documented = raw["components"]["schemas"]["QueueDeclare"]["properties"]["arguments"]
    toml = tomllib.loads((SPEC.parent / "protocol.toml").read_text())
    assert set(documented["properties"]) == set(toml["queue_arguments"])


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_operation_conforms(operation: Any, http_broker: BrokerProcess) -> None:
    base_url = f"http://127.0.0.1:{http_broker.http_port}"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=10)

    check()


def test_known_objects_conform(http_broker: BrokerProcess) -> None:
    """Requests that hit existing objects (generated names mostly do not)."""
    op = {o.label: o for o in OPERATIONS}
    base_url = f"http://127.0.0.1:{http_broker.http_port}"
    h = {"X-Conveyor-Request": "1"}  # anonymous state changes need it (CSRF guard)
    cases = [
        op["GET /api/queues/{name}"].Case(path_parameters={"name": "st-q"}),
        op["GET /api/queues/{name}/peek"].Case(
            path_parameters={"name": "st-dlq"}, query={"count": 3}
        ),
        op["GET /queues/{queue}/messages"].Case(
            path_parameters={"queue": "st-dlq"}, query={"batch_size": 2}
        ),
        op["GET /queues/{queue}/messages"].Case(
            path_parameters={"queue": "st-q"}, query={"wait_time_seconds": 2}
        ),
        op["POST /queues/{queue}/messages/batch"].Case(
            headers=h,
            path_parameters={"queue": "st-q"},
            body={
                "entries": [
                    {"id": "a", "message": "x", "correlation_id": "c"},
                    {"id": "b", "message": "y", "priority": 99},
                ]
            },
        ),
        op["POST /queues/{queue}/messages/batch-delete"].Case(
            headers=h,
            path_parameters={"queue": "st-q"},
            body={"entries": [{"id": "a", "receipt_handle": "1.x"}]},
        ),
        op["POST /exchanges/{exchange}/messages"].Case(
            headers=h,
            path_parameters={"exchange": "amq.topic"},
            body={"routing_key": "k", "message": "hi", "type": "t"},
        ),
        op["POST /queues/{queue}/messages"].Case(
            headers=h,
            path_parameters={"queue": "st-q"},
            body={"message": "hi", "delay": 0.5, "priority": 3, "ttl": 60},
        ),
        op["POST /api/queues/{name}/redrive"].Case(
            headers=h, path_parameters={"name": "st-dlq"}, query={"to": "st-q", "count": 1}
        ),
        op["PUT /api/queues/{name}"].Case(
            headers=h, path_parameters={"name": "st-new"}, body={"arguments": {"max_priority": 3}}
        ),
        op["POST /api/queues/{name}/purge"].Case(headers=h, path_parameters={"name": "st-new"}),
        op["DELETE /api/queues/{name}"].Case(headers=h, path_parameters={"name": "st-new"}),
        op["GET /api/queues/{name}/history"].Case(path_parameters={"name": "st-q"}),
        op["PUT /api/exchanges/{name}"].Case(
            headers=h,
            path_parameters={"name": "st-x2"},
            body={"type": "fanout", "auto_delete": False},
        ),
        op["POST /api/bindings"].Case(
            headers=h, body={"exchange": "st-x2", "queue": "st-q", "routing_key": "k"}
        ),
        op["POST /api/bindings"].Case(headers=h, body={"exchange": "st-x2", "queue": "st-q"}),
        op["DELETE /api/bindings"].Case(
            headers=h, body={"exchange": "st-x2", "queue": "st-q", "routing_key": "k"}
        ),
        op["DELETE /api/bindings/{exchange}/{queue}/{key}"].Case(
            headers=h, path_parameters={"exchange": "st-x2", "queue": "st-q", "key": ""}
        ),
        op["DELETE /api/exchanges/{name}"].Case(headers=h, path_parameters={"name": "st-x2"}),
        op["GET /api/whoami"].Case(),
    ]
    for case in cases:
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=10)
        assert response.status_code < 300, (case.path, response.text)
    status, body = asyncio.run(http(http_broker, "GET", "/api/overview"))
    assert status == 200 and body["queues"] >= 2


# Real responses, then the same with one drift each: every one must be caught.
# (operation path, the path requested, the status it answers)
DRIFT_CASES = [
    ("/api/overview", "/api/overview", 200),
    ("/api/queues", "/api/queues", 200),
    ("/api/queues/{name}", "/api/queues/st-stream", 200),
    ("/api/queues/{name}", "/api/queues/st-q", 200),
    ("/api/queues/{name}", "/api/queues/st-missing", 404),
    ("/api/exchanges", "/api/exchanges", 200),
    ("/api/bindings", "/api/bindings", 200),
    ("/api/consumers", "/api/consumers", 200),
    ("/api/connections", "/api/connections", 200),
    ("/api/queues/{name}/history", "/api/queues/st-q/history", 200),
    ("/api/whoami", "/api/whoami", 200),
    ("/api/queues/{name}/peek", "/api/queues/st-dlq/peek?count=2", 200),
    ("/queues/{queue}/messages", "/queues/st-gw/messages?batch_size=1", 200),
]


def _first_object(body: Any) -> dict[str, Any]:
    """The object a drift is applied to: the body, or its first listed item."""
    if isinstance(body, list):
        assert body, "a listing to check must not be empty"
        obj = body[0]
    elif isinstance(body.get("messages"), list) and body["messages"]:
        obj = body["messages"][0]
    else:
        obj = body
    assert isinstance(obj, dict)
    return obj


def _drifts(body: Any) -> Iterator[tuple[str, Any]]:
    obj = _first_object(body)
    extra = copy.deepcopy(body)
    _first_object(extra)["undocumented"] = 1
    yield "an undocumented property", extra
    for key, value in obj.items():
        missing = copy.deepcopy(body)
        del _first_object(missing)[key]
        yield f"{key} missing", missing
        wrong = copy.deepcopy(body)
        _first_object(wrong)[key] = (
            "true"
            if isinstance(value, bool)
            else True
            if isinstance(value, str | int | float | dict | list)
            else 1
        )
        yield f"{key} of the wrong type", wrong


@pytest.mark.parametrize(
    ("operation", "path", "status"), DRIFT_CASES, ids=[c[1] for c in DRIFT_CASES]
)
def test_response_schemas_are_strict(
    operation: str, path: str, status: int, http_broker: BrokerProcess
) -> None:
    """additionalProperties false, every property required, exact types: a response that
    drifts from the spec (say "blocked": "" where it says boolean) fails validation."""
    op = schema[operation]["GET"]
    r = requests.get(f"http://127.0.0.1:{http_broker.http_port}{path}", timeout=10)
    assert r.status_code == status, r.text
    op.validate_response(r)  # the real response conforms
    missed = []
    for what, body in _drifts(r.json()):
        r._content = json.dumps(body).encode()  # same status and headers, drifted body
        try:
            op.validate_response(r)
        except FailureGroup as exc:
            assert all(isinstance(e, JsonSchemaError) for e in exc.exceptions), exc
            continue
        except JsonSchemaError:
            continue
        missed.append(what)
    assert missed == [], f"{path}: the schema accepts a response with {missed}"
