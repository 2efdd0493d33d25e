"""Where llmserve's own log records go.

Inside a Ray Serve replica, records of the ``llmserve`` loggers join the
replica's log (Serve's ``ray.serve`` logger: its file under the session's
``logs/serve/`` and the driver's console), with their level and request
context. Without this they reach only Python's last-resort handler, whose
output Serve buffers as plain print lines: an engine failure's traceback,
which the client's error message points to, never showed up.

vLLM sets up its logging with ``logging.config.dictConfig`` when its engine
is configured, and dictConfig closes every handler of the process: in a
replica, the one that writes Serve's log file. Nothing logged after that,
ours or vLLM's, was written anywhere. ``reopen_serve_replica_log`` puts
Serve's file back behind its buffer once the engine is up.

Example::

    log_into_serve_replica_log()   # in a deployment's __init__
    await engine.start()           # vLLM configures its logging
    reopen_serve_replica_log()
"""

from __future__ import annotations

import logging
import logging.handlers

_SERVE_LOGGER = "ray.serve"
# Serve buffers a replica's records in a MemoryHandler in front of its file
# handler; closing the buffer drops that file (its target).
_serve_log_files: list[tuple[logging.handlers.MemoryHandler, logging.Handler]] = []


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
    for handler in logging.getLogger(_SERVE_LOGGER).handlers:
        if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None:
            _serve_log_files.append((handler, handler.target))


def reopen_serve_replica_log() -> None:
    """Give Serve's log buffers back the files a ``dictConfig`` elsewhere closed; the
    records buffered meanwhile are written with the next flush (a file handler reopens
    its file when it writes again)."""
    for buffer, log_file in _serve_log_files:
        if buffer.target is None:
            buffer.setTarget(log_file)
