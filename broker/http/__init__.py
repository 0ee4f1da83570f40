"""The broker's HTTP listener: management API (``/api``), REST messaging gateway
(``/queues/{queue}/messages``), ``/metrics`` and the dashboard's static files.

It runs inside the broker process on the same event loop as the binary protocol
(aiohttp), so handlers call the broker model directly, exactly like a Session does.
Started by ``broker.app.serve`` when ``Config.http_port`` is 0 (any free port) or a
port; -1 (the default) leaves it off. The whole API is described in spec/openapi.yaml.
"""

from __future__ import annotations

from conveyor.broker.http.app import HttpListener

__all__ = ["HttpListener"]
