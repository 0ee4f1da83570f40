"""Connection state machine, sans-IO (h11-style).

Rule 1: everything that decides which frame may arrive or leave in which state lives in
the tables below. Rule 2: this module does not know what a queue or a socket is: the
broker and the client feed it bytes and frames and act on what it returns.

States (spec/PROTOCOL.md, "Connection lifecycle")::

  server: AWAIT_PREAMBLE -> AWAIT_AUTH -(AUTH)-> AUTHENTICATING -(send OPEN_OK)-> OPEN
  client: AWAIT_HELLO -(HELLO)-> HELLO_RECEIVED -(send AUTH)-> AWAIT_OPEN_OK -(OPEN_OK)-> OPEN
  both:   OPEN -(send CLOSE)-> CLOSING -(CLOSE_OK)-> CLOSED
          OPEN -(recv CLOSE)-> CLOSE_RECEIVED -(send CLOSE_OK)-> CLOSED

A fatal ERROR (either direction of blame) moves straight to CLOSED. Frames that arrive in
CLOSING other than CLOSE / CLOSE_OK are dropped, as they crossed our CLOSE on the wire.
"""

from __future__ import annotations

import enum

from protocol._generated import (
    CLIENT_FRAMES,
    FATAL_CODES,
    MAX_FRAME_SIZE_DEFAULT,
    MAX_FRAME_SIZE_FLOOR,
    PREAMBLE,
    SERVER_FRAMES,
    Auth,
    Close,
    CloseOk,
    Error,
    Frame,
    Heartbeat,
    Hello,
    OpenOk,
    UnexpectedFrame,
)
from protocol.codec import Decoder, check_frames, encode, encode_fields, parse_preamble


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_PREAMBLE = "await-preamble"
    AWAIT_AUTH = "await-auth"
    AUTHENTICATING = "authenticating"
    AWAIT_HELLO = "await-hello"
    HELLO_RECEIVED = "hello-received"
    AWAIT_OPEN_OK = "await-open-ok"
    OPEN = "open"
    CLOSING = "closing"
    CLOSE_RECEIVED = "close-received"
    CLOSED = "closed"


S = State
# Frame types that take the table-driven slow path even in OPEN: the control frames and
# the handshake frames (a second AUTH / HELLO / OPEN_OK is unexpected-frame).
_CTRL = frozenset(
    {Close.TYPE, CloseOk.TYPE, Error.TYPE, Heartbeat.TYPE, Auth.TYPE, Hello.TYPE, OpenOk.TYPE}
)

# (role, state) -> frame types that may be received
RECEIVE_ALLOWED: dict[tuple[Role, State], frozenset[int]] = {
    (Role.SERVER, S.AWAIT_AUTH): frozenset({Auth.TYPE}),
    (Role.SERVER, S.AUTHENTICATING): frozenset(),
    (Role.SERVER, S.OPEN): CLIENT_FRAMES - {Auth.TYPE},
    (Role.CLIENT, S.AWAIT_HELLO): frozenset({Hello.TYPE, Error.TYPE}),
    (Role.CLIENT, S.HELLO_RECEIVED): frozenset({Error.TYPE}),
    (Role.CLIENT, S.AWAIT_OPEN_OK): frozenset({OpenOk.TYPE, Error.TYPE, Close.TYPE}),
    (Role.CLIENT, S.OPEN): SERVER_FRAMES - {Hello.TYPE, OpenOk.TYPE},
}

# (role, state, received frame type) -> next state
ON_RECEIVE: dict[tuple[Role, State, int], State] = {
    (Role.SERVER, S.AWAIT_AUTH, Auth.TYPE): S.AUTHENTICATING,
    (Role.CLIENT, S.AWAIT_HELLO, Hello.TYPE): S.HELLO_RECEIVED,
    (Role.CLIENT, S.AWAIT_OPEN_OK, OpenOk.TYPE): S.OPEN,
    (Role.CLIENT, S.AWAIT_OPEN_OK, Close.TYPE): S.CLOSE_RECEIVED,
    (Role.SERVER, S.OPEN, Close.TYPE): S.CLOSE_RECEIVED,
    (Role.CLIENT, S.OPEN, Close.TYPE): S.CLOSE_RECEIVED,
}

# (role, state, sent frame type) -> next state
ON_SEND: dict[tuple[Role, State, int], State] = {
    (Role.SERVER, S.AUTHENTICATING, OpenOk.TYPE): S.OPEN,
    (Role.CLIENT, S.HELLO_RECEIVED, Auth.TYPE): S.AWAIT_OPEN_OK,
    (Role.SERVER, S.OPEN, Close.TYPE): S.CLOSING,
    (Role.CLIENT, S.OPEN, Close.TYPE): S.CLOSING,
    (Role.SERVER, S.CLOSE_RECEIVED, CloseOk.TYPE): S.CLOSED,
    (Role.CLIENT, S.CLOSE_RECEIVED, CloseOk.TYPE): S.CLOSED,
}


class Connection:
    """One side of a Conveyor connection: validates the stream and tracks its state.

    ``receive_data`` returns the frames the application must act on; ``send`` returns the
    bytes to write. Both raise ``ProtocolError`` subclasses (MalformedFrame,
    FrameTooLarge, UnexpectedFrame, UnsupportedVersion) whose ``code`` the server puts in
    its ERROR frame.
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
            if state is S.CLOSING:
                if frame.TYPE in (Close.TYPE, CloseOk.TYPE):
                    if frame.TYPE == CloseOk.TYPE:
                        self.state = S.CLOSED
                    out.append(frame)
                continue
            allowed = RECEIVE_ALLOWED.get((self.role, state), frozenset())
            if frame.TYPE not in allowed:
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

        Raises LocalProtocolError, without changing state, if the frame would exceed the
        peer's maximum frame size (``send_limit``)."""
        data = encode_fields(frame.TYPE, frame.to_wire()[:-trim]) if trim else encode(frame)
        if len(data) - 4 > self.send_limit:
            check_frames([data], self.send_limit)
        self.state = ON_SEND.get((self.role, self.state, frame.TYPE), self.state)
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
