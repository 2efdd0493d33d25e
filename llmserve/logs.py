"""Where llmserve's own log records go.

Inside a Ray Serve replica, records of the ``llmserve`` loggers join the
replica's log (Serve's ``ray.serve`` logger: its file under the session's
``logs/serve/`` and the driver's console), with their level and request
context. Without this they reach only Python's last-resort handler, whose
output Serve buffers as plain print lines: an engine failure's traceback,
which the client's error message points to, never showed up.

Example::

    log_into_serve_replica_log()   # in a deployment's __init__
"""

from __future__ import annotations

import logging

_SERVE_LOGGER = "ray.serve"


class _IntoServeLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(_SERVE_LOGGER).handle(record)


def log_into_serve_replica_log() -> None:
    """Send the ``llmserve`` loggers' records (INFO and up) to this Serve replica's log; once per process."""
    package_logger = logging.getLogger("llmserve")
    if any(isinstance(handler, _IntoServeLog) for handler in package_logger.handlers):
        return
    package_logger.addHandler(_IntoServeLog())
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
