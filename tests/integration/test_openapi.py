"""spec/openapi.yaml against the live HTTP API: schemathesis generates requests for every
management and gateway operation and checks each response (no 5xx, documented status
code and content type, body matching the response schema). Bounded: a few dozen examples
per operation, one broker for the module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.broker_process import BrokerProcess
from tests.integration.helpers import connect
from tests.integration.http_helpers import http

SPEC = Path(__file__).resolve().parents[2] / "spec" / "openapi.yaml"
CHECKS: list[Any] = [not_a_server_error, status_code_conformance, content_type_conformance,
                     response_schema_conformance]
MAX_EXAMPLES = 25

schema = schemathesis.openapi.from_path(SPEC).include(tag=["management", "gateway"])
OPERATIONS = [r.ok() for r in schema.get_all_operations()]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path_factory.mktemp("openapi") / "data", "--http-port", "0",
                      "--fsync", "never").start()

    async def seed() -> None:
        # Something to find: a queue with messages, a dead-letter queue, a consumer.
        conn = await connect(b.url)
        try:
            await conn.declare_queue("st-q")
            await conn.declare_queue("st-dlq")
            for i in range(5):
                await conn.publish("", "st-q", f"m{i}".encode())
                await conn.publish("", "st-dlq", b"\xff" * i)
        finally:
            await conn.close()

    asyncio.run(seed())
    yield b
    b.stop()


def test_schema_lists_every_route() -> None:
    paths = set(schemathesis.openapi.from_path(SPEC).raw_schema["paths"])
    assert {"/api/overview", "/api/queues", "/api/queues/{name}", "/api/queues/{name}/peek",
            "/api/queues/{name}/purge", "/api/queues/{name}/redrive", "/api/exchanges",
            "/api/bindings", "/api/consumers", "/api/connections", "/api/connections/{id}",
            "/queues/{queue}/messages", "/queues/{queue}/messages/{receipt_handle}",
            "/queues/{queue}/messages/{receipt_handle}/visibility",
            "/queues/{queue}/messages/batch", "/queues/{queue}/messages/batch-delete",
            "/exchanges/{exchange}/messages", "/metrics", "/"} <= paths
    assert len(OPERATIONS) == 20


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_operation_conforms(operation: Any, http_broker: BrokerProcess) -> None:
    base_url = f"http://127.0.0.1:{http_broker.http_port}"

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
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
        op["GET /api/queues/{name}/peek"].Case(path_parameters={"name": "st-dlq"},
                                              query={"count": 3}),
        op["GET /queues/{queue}/messages"].Case(path_parameters={"queue": "st-dlq"},
                                               query={"batch_size": 2}),
        op["GET /queues/{queue}/messages"].Case(path_parameters={"queue": "st-q"},
                                               query={"wait_time_seconds": 2}),
        op["POST /queues/{queue}/messages/batch"].Case(
            headers=h, path_parameters={"queue": "st-q"},
            body={"entries": [{"id": "a", "message": "x", "correlation_id": "c"},
                              {"id": "b", "message": "y", "priority": 99}]}),
        op["POST /queues/{queue}/messages/batch-delete"].Case(
            headers=h, path_parameters={"queue": "st-q"},
            body={"entries": [{"id": "a", "receipt_handle": "1.x"}]}),
        op["POST /exchanges/{exchange}/messages"].Case(
            headers=h, path_parameters={"exchange": "amq.topic"},
            body={"routing_key": "k", "message": "hi", "type": "t"}),
        op["POST /queues/{queue}/messages"].Case(headers=h, path_parameters={"queue": "st-q"},
                                                body={"message": "hi", "delay": 0.5,
                                                      "priority": 3, "ttl": 60}),
        op["POST /api/queues/{name}/redrive"].Case(headers=h, path_parameters={"name": "st-dlq"},
                                                  query={"to": "st-q", "count": 1}),
        op["PUT /api/queues/{name}"].Case(headers=h, path_parameters={"name": "st-new"},
                                         body={"arguments": {"max_priority": 3}}),
        op["POST /api/queues/{name}/purge"].Case(headers=h, path_parameters={"name": "st-new"}),
        op["DELETE /api/queues/{name}"].Case(headers=h, path_parameters={"name": "st-new"}),
    ]
    for case in cases:
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=10)
        assert response.status_code < 300, (case.path, response.text)
    status, body = asyncio.run(http(http_broker, "GET", "/api/overview"))
    assert status == 200 and body["queues"] >= 2
