"""Error hierarchy shared by broker and client.

Every error that can cross the wire is a :class:`ConveyorError` subclass carrying the
stable numeric ``code`` from ``spec/protocol.toml``. The concrete classes (``NotFound``,
``MalformedFrame`` ...) are generated into :mod:`protocol._generated`; this module holds
the base classes and the code -> class registry so both sides map codes one-to-one.

Two axes, as the spec's error table says:

* ``fatal``: the connection is closed after the error (:class:`FatalError`) versus only
  the request fails (:class:`RequestError`).
* ``origin``: ``"peer"`` (the sender of the request made a mistake) or ``"server"``
  (ours); ``retriable`` says whether the same request may later succeed.

Protocol violations are :class:`ProtocolError`: :class:`RemoteProtocolError` when the peer
broke the spec, :class:`LocalProtocolError` when this side was about to.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "DETAIL_STR_MAX",
    "MESSAGE_MAX",
    "ConveyorError",
    "FatalError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestError",
    "error_for_code",
]


# Error messages travel as `str` fields (ERROR, CONFIRM nacks) and an ERROR must fit the
# smallest frame a peer may negotiate (4096 bytes). Messages and string details often echo
# what a peer sent (a table key, an argument value) which may be up to a frame long, so
# they are clipped: message to MESSAGE_MAX bytes of UTF-8, string details to DETAIL_STR_MAX.
MESSAGE_MAX = 1024
DETAIL_STR_MAX = 256


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (ending in "...") if longer."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


class ConveyorError(Exception):
    """Base of every error with a wire code."""

    code: ClassVar[int] = 541
    name: ClassVar[str] = "internal-error"
    fatal: ClassVar[bool] = False
    retriable: ClassVar[bool] = False
    origin: ClassVar[str] = "server"

    _registry: ClassVar[dict[int, type[ConveyorError]]] = {}

    def __init__(self, message: str = "", details: dict[str, Any] | None = None) -> None:
        message = clip(message, MESSAGE_MAX) if message else self.name
        super().__init__(message)
        self.message = message
        if details:
            details = {
                k: clip(v, DETAIL_STR_MAX) if type(v) is str else v for k, v in details.items()
            }
        self.details: dict[str, Any] = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only leaf classes that declare their own code register themselves.
        if "code" in cls.__dict__ and cls.code > 0:
            ConveyorError._registry.setdefault(cls.code, cls)

    def __str__(self) -> str:
        return f"{self.name} ({self.code}): {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class RequestError(ConveyorError):
    """Fails one request; the connection stays usable."""


class FatalError(ConveyorError):
    """Closes the connection."""

    fatal = True


class ProtocolError(ConveyorError):
    """The protocol was broken; the subclass says by whom, so the right side is blamed.

    :class:`RemoteProtocolError`: the peer broke it (our decoder caught it; the receiving
    side answers with a fatal ERROR). :class:`LocalProtocolError`: this side was about to
    break it (``Connection.send`` refused; nothing was sent and the connection is intact).
    """


class RemoteProtocolError(ProtocolError, FatalError):
    """The peer's byte stream broke the protocol (bad frame, size, state or version).

    Raised by the sans-IO decoder and state machine; the receiving side answers with an
    ERROR frame carrying ``code`` and closes the connection. The generated 501/502/503/505
    classes (``MalformedFrame`` ...) derive from it.
    """


class LocalProtocolError(ProtocolError):
    """This side was about to break the protocol: a frame not allowed in this state or in
    this direction, a field outside its limits, a frame over the peer's max_frame_size.

    Not a wire error (code 0, never sent): nothing was written and the state is unchanged,
    so the peer is not to blame and the connection stays usable; the caller must not send
    the frame (spec/PROTOCOL.md sections 5 and 6)."""

    code = 0
    name = "local-protocol-error"
    origin = "local"


def error_for_code(
    code: int, message: str = "", details: dict[str, Any] | None = None
) -> ConveyorError:
    """Build the exception class registered for ``code`` (unknown codes -> base class)."""
    # Importing here guarantees the generated subclasses have registered.
    from conveyor.protocol import _generated  # noqa: F401

    cls = ConveyorError._registry.get(code)
    if cls is None:
        err = ConveyorError(message or f"error code {code}", details)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, details)
