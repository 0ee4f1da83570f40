"""The sans-IO connection blames the right side (spec/PROTOCOL.md sections 5-7).

What the peer got wrong raises RemoteProtocolError (answered with a fatal ERROR); what this
side was about to get wrong raises LocalProtocolError from ``Connection.send`` before any
byte is produced, with the state unchanged. The lifecycle and reply tables it runs come
from spec/protocol.toml; here they are checked against the frame directions independently
of the generator. Also: nothing outside protocol/ reaches into its internals, and the wheel
ships spec/ and monitoring/ where the broker looks for them.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from conveyor import protocol
from conveyor.protocol import (
    Auth,
    Close,
    CloseOk,
    Deliver,
    Error,
    FatalError,
    Hello,
    LocalProtocolError,
    MalformedFrame,
    OpenOk,
    ProtocolError,
    Publish,
    QueueDeclare,
    QueueDeclareOk,
    RemoteProtocolError,
    UnexpectedFrame,
    encode,
)
from conveyor.protocol.connection import (
    ON_SEND,
    RECEIVE_ALLOWED,
    SEND_ALLOWED,
    Connection,
    Role,
    State,
)
from conveyor.protocol.limits import REPLIES, REPLY_CLASSES

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "spec" / "protocol.toml").read_text())


def open_client() -> Connection:
    conn = Connection(Role.CLIENT)
    conn.receive_data(encode(Hello("1.2", 1 << 20, 0, {}, ["anonymous"], 0)))
    conn.send(Auth())
    conn.receive_data(encode(OpenOk("c-1", 1 << 20, 0)))
    assert conn.state is State.OPEN
    return conn


def open_server() -> Connection:
    conn = Connection(Role.SERVER)
    conn.receive_data(protocol.PREAMBLE + encode(Auth()))
    conn.send(OpenOk("c-1", 1 << 20, 0))
    assert conn.state is State.OPEN
    return conn


# ------------------------------------------------------------------ error hierarchy


def test_local_and_remote_protocol_errors_are_both_protocol_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, FatalError)
    # A local mistake does not close the connection nor travel on the wire.
    assert not issubclass(LocalProtocolError, FatalError)
    assert LocalProtocolError.code == 0
    assert protocol.error_for_code(0).__class__ is not LocalProtocolError
    for code, cls in ((501, MalformedFrame), (503, UnexpectedFrame)):
        assert issubclass(cls, RemoteProtocolError)
        assert type(protocol.error_for_code(code)) is cls


def test_decoder_errors_blame_the_peer() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(protocol.PREAMBLE + encode(Publish(1, "", "q")))
    assert info.value.code == 503


# ------------------------------------------------------------------ send: state and direction


def test_client_publish_before_open_is_refused_locally() -> None:
    conn = Connection(Role.CLIENT)
    for step in ("await-hello", "hello-received", "await-open-ok"):
        before = conn.state
        assert before.value == step
        with pytest.raises(LocalProtocolError, match="PUBLISH may not be sent by the client"):
            conn.send(Publish(1, "", "q", {}, b"x"))
        assert conn.state is before
        if step == "await-hello":
            conn.receive_data(encode(Hello("1.2", 1 << 20, 0, {}, ["anonymous"], 0)))
        elif step == "hello-received":
            conn.send(Auth())
    conn.receive_data(encode(OpenOk("c-1", 1 << 20, 0)))
    assert conn.send(Publish(1, "", "q", {}, b"x"))  # and in OPEN it goes


def test_server_may_not_send_a_client_frame() -> None:
    conn = open_server()
    with pytest.raises(LocalProtocolError, match="QUEUE_DECLARE may not be sent by the server"):
        conn.send(QueueDeclare(1, "q"))
    with pytest.raises(LocalProtocolError):
        conn.send(Publish(1))
    assert conn.state is State.OPEN
    assert conn.send(QueueDeclareOk(1, "q"))


def test_client_may_not_send_a_server_frame() -> None:
    conn = open_client()
    for frame in (Deliver("t", 1), Error(0, 404), Hello("1.2", 4096, 0)):
        with pytest.raises(LocalProtocolError):
            conn.send(frame)
    assert conn.state is State.OPEN


def test_nothing_is_sent_after_close_but_close_ok_when_closes_cross() -> None:
    conn = open_client()
    conn.send(Close(200, "bye"))
    assert conn.state is State.CLOSING
    with pytest.raises(LocalProtocolError):
        conn.send(Publish(1))
    assert conn.receive_data(encode(Close(200, "also bye")))  # both closed at once
    conn.send(CloseOk())
    assert conn.receive_data(encode(CloseOk()))
    state: State = conn.state
    assert state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(CloseOk())


def test_pipelined_auth_is_allowed_before_hello() -> None:
    """Section 4: a client MAY write the preamble and AUTH without waiting for HELLO."""
    conn = Connection(Role.CLIENT)
    conn.send(Auth(), trim=1)
    assert conn.state is State.AUTH_PIPELINED
    with pytest.raises(LocalProtocolError):
        conn.send(Auth())  # one AUTH only
    conn.receive_data(encode(Hello("1.2", 1 << 20, 0, {}, ["anonymous"], 0)))
    state: State = conn.state
    assert state is State.AWAIT_OPEN_OK
    conn.receive_data(encode(OpenOk("c-1", 1 << 20, 0)))
    final: State = conn.state
    assert final is State.OPEN


# ------------------------------------------------------------------ send: field limits


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (Publish(-5, "ex"), r"publish\.seq: -5 out of range"),
        (Publish(1, "e" * 1000), r"publish\.exchange: longer than 255 bytes"),
        (Publish(1, "", "q", {"priority": 10}), r"priority"),
        (Publish(1, "", "q", {"nope": 1}), r"unknown property"),
        (Publish(1, "", "q", {}, "x"), r"publish\.body: expected bin"),  # type: ignore[arg-type]
        (QueueDeclare(0, "q"), r"queue_declare\.rid: 0 out of range"),
        (QueueDeclare(1, "q", arguments={1: 2}), r"map keys must be str"),  # type: ignore[dict-item]
    ],
)
def test_fields_outside_the_spec_are_refused_before_any_byte(frame: object, why: str) -> None:
    conn = open_client()
    with pytest.raises(LocalProtocolError, match=why) as info:
        conn.send(frame)  # type: ignore[arg-type]
    assert not isinstance(info.value, RemoteProtocolError)
    assert conn.state is State.OPEN
    assert conn.send(Publish(1, "", "q"))  # the connection is intact


def test_unencodable_table_value_is_a_local_error() -> None:
    conn = open_client()
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        conn.send(QueueDeclare(1, "q", arguments={"x": {1, 2}}))
    assert conn.state is State.OPEN


def test_the_server_checks_its_own_frames_too() -> None:
    conn = open_server()
    with pytest.raises(LocalProtocolError, match=r"deliver\.delivery_tag"):
        conn.send(Deliver("t", -1))
    with pytest.raises(LocalProtocolError, match=r"error\.code"):
        conn.send(Error(0, 70000))


# ------------------------------------------------------------------ the tables vs the spec


def _sends(role: Role) -> set[int]:
    side = role.value
    return {f.TYPE for f in protocol.FRAME_TYPES.values() if f.DIRECTION in (side, "both")}


def test_every_state_of_each_role_has_send_and_receive_rows() -> None:
    for s in SPEC["lifecycle"]["state"]:
        roles = [Role.SERVER, Role.CLIENT] if s["role"] == "both" else [Role(s["role"])]
        for role in roles:
            state = State(s["name"])
            assert (role, state) in SEND_ALLOWED, (role, state)
            if state is not State.AWAIT_PREAMBLE or role is Role.SERVER:
                assert (role, state) in RECEIVE_ALLOWED, (role, state)


def test_tables_respect_frame_directions() -> None:
    for (role, state), types in SEND_ALLOWED.items():
        assert types <= _sends(role), (role, state)
    for (role, state), types in RECEIVE_ALLOWED.items():
        peer = Role.CLIENT if role is Role.SERVER else Role.SERVER
        assert types <= _sends(peer), (role, state)
    for (role, _state, ftype), _next in ON_SEND.items():
        assert ftype in _sends(role)


def test_open_allows_every_frame_of_the_direction_but_the_handshake() -> None:
    assert SEND_ALLOWED[(Role.CLIENT, State.OPEN)] == _sends(Role.CLIENT) - {Auth.TYPE}
    assert SEND_ALLOWED[(Role.SERVER, State.OPEN)] == _sends(Role.SERVER) - {
        Hello.TYPE,
        OpenOk.TYPE,
    }


def test_replies_cover_every_request_with_a_rid() -> None:
    requests = {
        f
        for f in protocol.FRAME_TYPES.values()
        if f.DIRECTION == "client" and "rid" in getattr(f, "__dataclass_fields__", {})
    }
    assert set(REPLY_CLASSES) == requests
    for req, rep in REPLY_CLASSES.items():
        assert rep.DIRECTION == "server" and "rid" in getattr(rep, "__dataclass_fields__", {})
        assert REPLIES[req.TYPE] == rep.TYPE
    assert REPLY_CLASSES[QueueDeclare] is QueueDeclareOk


def test_client_matches_replies_with_the_generated_map() -> None:
    from conveyor.client import connection

    assert connection._REPLIES is REPLY_CLASSES


def test_protocol_md_reply_table_is_the_spec() -> None:
    doc = (ROOT / "spec" / "PROTOCOL.md").read_text()
    block = doc.split("<!-- BEGIN GENERATED: replies -->")[1].split("<!-- END GENERATED")[0]
    rows = re.findall(r"\| `(\w+)` \| `(\w+)` \|", block)
    assert dict(rows) == {k.upper(): v.upper() for k, v in SPEC["replies"].items()}


# ------------------------------------------------------------------ internals stay inside


INTERNAL = re.compile(
    r"^\s*(from\s+(conveyor\.)?protocol(\.codec)?\s+import\s+[^\n]*\b_(generated|checks|unpack_body)\b"
    r"|from\s+(conveyor\.)?protocol\._(generated|checks)\b"
    r"|import\s+(conveyor\.)?protocol\._(generated|checks)\b"
    r"|from\s+(conveyor\.)?protocol\.codec\s+import\s*\([^)]*\b_unpack_body\b)",
    re.M,
)


def test_nothing_outside_protocol_imports_its_internals() -> None:
    offenders = []
    for pkg in ("broker", "client", "cli"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if INTERNAL.search(path.read_text()):
                offenders.append(rel)
    assert offenders == []


def test_the_internal_import_check_can_fail() -> None:
    for line in (
        "from protocol._generated import X",
        "from protocol._checks import NAME_MAX",
        "import protocol._generated as g",
        "from protocol import _generated",
        "from protocol.codec import HEADER, _unpack_body",
        "from protocol.codec import (\n    HEADER,\n    _unpack_body,\n)",
        "from conveyor.protocol._generated import X",
        "import conveyor.protocol._checks as c",
        "from conveyor.protocol.codec import HEADER, _unpack_body",
    ):
        assert INTERNAL.search(line), line
    assert not INTERNAL.search("from protocol.limits import NAME_MAX")
    assert not INTERNAL.search("from protocol.codec import unpack_body")
    assert not INTERNAL.search("from conveyor.protocol.limits import NAME_MAX")
