"""Log output: human-readable text (default) or one JSON object per line.

``log_format = "json"`` (``--log-format json``) writes lines such as::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "conveyor.server",
     "msg": "connection c-1 open from 127.0.0.1:50000 ...", "event": "connection.open",
     "peer": "127.0.0.1:50000", "id": "c-1", "subject": "anonymous"}

``ts``, ``level``, ``logger`` and ``msg`` are always there; anything a call passes in
``extra={...}`` (``event``, ``peer``, ``queue``, ``reason`` ...) becomes a field of its
own, and an exception adds ``exc``. Lines with an ``event`` field are the ones meant for
machines: connection.open / connection.close, auth.failed, queue.declared /
queue.deleted / queue.expired, consumer.slow, recovery.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: everything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, msg, then extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger on stderr (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
