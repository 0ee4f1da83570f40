"""Connection state machine, sans-IO (h11-style).

Rule 1: everything that decides which frame may arrive or leave in which state lives in
tables generated from ``[lifecycle]`` in spec/protocol.toml (RECEIVE_ALLOWED,
SEND_ALLOWED, ON_RECEIVE, ON_SEND, RECEIVE_DROPS in protocol._generated). Rule 2: this
module does not know what a queue or a socket is: the broker and the client feed it
bytes and frames and act on what it returns.

States (spec/PROTOCOL.md, "Connection lifecycle")::

  server: AWAIT_PREAMBLE -> AWAIT_AUTH -(AUTH)-> AUTHENTICATING -(send OPEN_OK)-> OPEN
  client: AWAIT_HELLO -(HELLO)-> HELLO_RECEIVED -(send AUTH)-> AWAIT_OPEN_OK -(OPEN_OK)-> OPEN
          AWAIT_HELLO -(send AUTH, pipelined)-> AUTH_PIPELINED -(HELLO)-> AWAIT_OPEN_OK
  both:   OPEN -(send CLOSE)-> CLOSING -(CLOSE_OK)-> CLOSED
          OPEN -(recv CLOSE)-> CLOSE_RECEIVED -(send CLOSE_OK)-> CLOSED

A fatal ERROR (either direction of blame) moves straight to CLOSED. Frames that arrive in
CLOSING other than CLOSE / CLOSE_OK are dropped, as they crossed our CLOSE on the wire.

Blame: what the peer got wrong raises a RemoteProtocolError subclass (MalformedFrame,
UnexpectedFrame ...: answer with ERROR and close); what this side was about to get wrong
(``send`` of a frame not allowed in this state or direction, a field outside its limits,
a frame over the peer's cap) raises LocalProtocolError before any byte is produced.
"""

from __future__ import annotations

from conveyor.protocol._generated import (
    CLIENT_FRAMES,
    FATAL_CODES,
    MAX_FRAME_SIZE_DEFAULT,
    MAX_FRAME_SIZE_FLOOR,
    ON_RECEIVE,
    ON_SEND,
    PREAMBLE,
    RECEIVE_ALLOWED,
    RECEIVE_DROPS,
    SEND_ALLOWED,
    SERVER_FRAMES,
    Auth,
    Close,
    CloseOk,
    Error,
    Frame,
    Heartbeat,
    Hello,
    OpenOk,
    Role,
    State,
    UnexpectedFrame,
)
from conveyor.protocol.codec import Decoder, check_frames, encode, encode_fields, parse_preamble
from conveyor.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ON_RECEIVE",
    "ON_SEND",
    "RECEIVE_ALLOWED",
    "SEND_ALLOWED",
    "Connection",
    "Role",
    "State",
    "check_fields",
]

S = State
# Frame types that take the table-driven slow path even in OPEN: the control frames and
# the handshake frames (a second AUTH / HELLO / OPEN_OK is unexpected-frame).
_CTRL = frozenset(
    {Close.TYPE, CloseOk.TYPE, Error.TYPE, Heartbeat.TYPE, Auth.TYPE, Hello.TYPE, OpenOk.TYPE}
)


def check_fields(frame: Frame) -> None:
    """LocalProtocolError unless the receiver's decoder would accept ``frame``'s fields.

    Runs the generated ``from_wire`` validators (the very checks the peer's decoder
    applies) on the frame's own field list, so every type and limit of spec/protocol.toml
    holds for what we send without a second copy of the rules."""
    try:
        type(frame).from_wire(frame.to_wire(), frame.NAME)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(
            f"{frame.NAME.upper()} not sent: {exc.message}", {"frame": frame.NAME}
        ) from None
    except (TypeError, ValueError, AttributeError) as exc:  # fields not even iterable
        raise LocalProtocolError(
            f"{frame.NAME.upper()} not sent: bad fields ({exc})", {"frame": frame.NAME}
        ) from None


class Connection:
    """One side of a Conveyor connection: validates the stream and tracks its state.

    ``receive_data`` returns the frames the application must act on and raises
    ``RemoteProtocolError`` subclasses (MalformedFrame, FrameTooLarge, UnexpectedFrame,
    UnsupportedVersion) whose ``code`` the server puts in its ERROR frame. ``send``
    returns the bytes to write and raises ``LocalProtocolError`` (nothing to write, state
    unchanged) for a frame this side may not send.
    """

    __slots__ = ("_decoder", "_preamble", "peer_minor", "role", "send_limit", "state")

    def __init__(self, role: Role, max_frame_size: int = MAX_FRAME_SIZE_DEFAULT) -> None:
        self.role = role
        accept = CLIENT_FRAMES if role is Role.SERVER else SERVER_FRAMES
        self._decoder = Decoder(max_frame_size, accept)
        self._preamble = bytearray()
        self.state = S.AWAIT_PREAMBLE if role is Role.SERVER else S.AWAIT_HELLO
        # Server role: the client's minor version, from its preamble. Additions of a later
        # minor version are sent to it only if both sides speak that version.
        self.peer_minor = 0
        # Largest frame the peer accepts (section 5, "Size cap"): the floor until the peer
        # says (HELLO for a client), then the negotiated value from OPEN_OK. send() never
        # produces a larger frame.
        self.send_limit = MAX_FRAME_SIZE_FLOOR

    @property
    def max_frame_size(self) -> int:
        return self._decoder.max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._decoder.max_frame_size = value

    @property
    def compression(self) -> bool:
        """True once OPEN_OK negotiated compression: COMPRESSED frames are then accepted."""
        return self._decoder.compression

    @compression.setter
    def compression(self, value: bool) -> None:
        self._decoder.compression = value

    @property
    def preamble_needed(self) -> int:
        """Server role: bytes of the preamble still to come (0 once it was read)."""
        if self.state is not S.AWAIT_PREAMBLE:
            return 0
        return len(PREAMBLE) - len(self._preamble)

    def preamble(self) -> bytes:
        """The bytes a client writes first."""
        return PREAMBLE

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed received bytes; return the frames the application should handle."""
        if self.state is S.CLOSED:
            return []
        if self.state is S.AWAIT_PREAMBLE:
            need = len(PREAMBLE) - len(self._preamble)
            self._preamble += data[:need]
            data = data[need:]
            if len(self._preamble) < len(PREAMBLE):
                return []
            self.peer_minor = parse_preamble(bytes(self._preamble))[1]
            self.state = S.AWAIT_AUTH
            if not data:
                return []
        frames = self._decoder.feed(data)
        if not frames:
            return frames
        out: list[Frame] = []
        for frame in frames:
            state = self.state
            if state is S.OPEN and frame.TYPE not in _CTRL:
                out.append(frame)  # hot path: one set lookup per frame
                continue
            if state is S.CLOSED:
                break
            allowed = RECEIVE_ALLOWED.get((self.role, state), frozenset())
            if frame.TYPE not in allowed:
                if (self.role, state) in RECEIVE_DROPS:
                    continue  # it crossed our CLOSE on the wire
                raise UnexpectedFrame(
                    f"{frame.NAME.upper()} not allowed in state {state.value}",
                    {"state": state.value, "frame": frame.NAME},
                )
            self.state = ON_RECEIVE.get((self.role, state, frame.TYPE), state)
            if isinstance(frame, (Hello, OpenOk)):
                self.send_limit = max(MAX_FRAME_SIZE_FLOOR, frame.max_frame_size)
            if isinstance(frame, Error) and frame.code in FATAL_CODES:
                self.state = S.CLOSED
            out.append(frame)
        return out

    def send(self, frame: Frame, trim: int = 0) -> bytes:
        """Encode ``frame`` and advance the state machine; ``trim`` trailing fields are
        left out (additions of a minor version the peer does not speak, section 18).

        Raises LocalProtocolError, without changing state or producing a byte, if this
        side may not send the frame now (SEND_ALLOWED: state and direction), if a field
        breaks its limits (:func:`check_fields`) or if the frame would exceed the peer's
        maximum frame size (``send_limit``).

        The broker's and the client's DELIVER / CONFIRM / PUBLISH hot paths encode with
        ``encode_fields`` from values they built and checked themselves, not through
        here: measured with bench/send_checks.py, the field checks cost 3-7x the encoding
        (100k DELIVERs: encode 0.16 s, check_fields + encode 1.04 s; 100k CONFIRMs 0.29 s
        and 0.96 s), so on those paths ``check_send`` guards only the frame size."""
        state = self.state
        allowed = SEND_ALLOWED.get((self.role, state))
        if allowed is None or frame.TYPE not in allowed:
            who = self.role.value
            raise LocalProtocolError(
                f"{frame.NAME.upper()} may not be sent by the {who} in state {state.value}",
                {"state": state.value, "frame": frame.NAME},
            )
        check_fields(frame)
        try:
            data = encode_fields(frame.TYPE, frame.to_wire()[:-trim]) if trim else encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:  # a table value msgpack lacks
            raise LocalProtocolError(
                f"{frame.NAME.upper()} not sent: cannot encode ({exc})", {"frame": frame.NAME}
            ) from None
        if len(data) - 4 > self.send_limit:
            check_frames([data], self.send_limit)
        self.state = ON_SEND.get((self.role, state, frame.TYPE), state)
        if isinstance(frame, Error) and frame.code in FATAL_CODES:
            self.state = S.CLOSED
        if isinstance(frame, OpenOk):
            self.send_limit = max(MAX_FRAME_SIZE_FLOOR, frame.max_frame_size)
        return data

    def check_send(self, frames: list[bytes]) -> None:
        """For frames encoded outside :meth:`send` (hot paths): LocalProtocolError if one
        exceeds the peer's maximum frame size."""
        check_frames(frames, self.send_limit)

    def fail(self) -> None:
        """Enter CLOSED after a fatal error: nothing more is decoded."""
        self.state = S.CLOSED
