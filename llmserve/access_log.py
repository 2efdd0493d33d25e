"""The access log: one line per answer, written by the process that made it.

Fields: ``time`` (UTC, when the answer ended), ``request_id``, ``model``,
``adapter``, ``endpoint``, ``status``, ``prompt_tokens``, ``completion_tokens``,
``ttft_s`` (streams: from the ingress getting the request to the first event),
``duration_s``, ``replica`` (the Serve replica that made the answer) and
``migrated`` (true on the part of a stream that went on at another replica).

Where lines go is a path, so it is set by environment variables (which every
process of a Ray that ``llmserve run`` starts inherits; under ``serve run``, set
them in ``runtime_env.env_vars`` or the cluster's environment):

- ``LLMSERVE_ACCESS_LOG``: a file each process appends to (on each node);
  unset, lines go to the replica's Serve log (``logs/serve/replica_*.log``).
- ``LLMSERVE_ACCESS_LOG_FORMAT``: ``text`` (``key=value`` pairs, the default) or ``json`` (JSON lines).

``llmserve run --access-log FILE|- [--access-log-format json]`` sets both; ``-`` shows the
lines in its own output.

Example line (text)::

    2026-12-02T16:50:01.123Z request_id=9f1c model=qwen adapter=sql endpoint=chat status=200 prompt_tokens=12 completion_tokens=30 ttft_s=0.045 duration_s=0.812 replica=LLMServer:qwen#ab12 migrated=false
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, TextIO

PATH_ENV = "LLMSERVE_ACCESS_LOG"
FORMAT_ENV = "LLMSERVE_ACCESS_LOG_FORMAT"
FORMATS = ("text", "json")
FIELDS = (
    "time", "request_id", "model", "adapter", "endpoint", "status", "prompt_tokens", "completion_tokens",
    "ttft_s", "duration_s", "replica", "migrated",
)  # fmt: skip

logger = logging.getLogger("llmserve.access")
_file: Optional[TextIO] = None
_replica: Optional[str] = None


def write(**fields: Any) -> None:
    """One access line with ``fields`` (those of ``FIELDS``; ``time`` and ``replica`` are filled in)."""
    try:
        fields = {"time": _utc(time.time()), **fields, "replica": _this_replica()}
        fields = {name: round(value, 6) if isinstance(value, float) else value for name, value in fields.items()}
        line = _formatted({name: fields.get(name) for name in FIELDS})
        target = _target()
        if target is None:
            logger.info("%s", line)
        else:
            target.write(line + "\n")
            target.flush()
    except Exception:  # a full disk must not fail the answer it records
        logging.getLogger(__name__).warning("could not write an access log line", exc_info=True)


def _formatted(fields: dict[str, Any]) -> str:
    if os.environ.get(FORMAT_ENV, "text") == "json":
        return json.dumps(fields, separators=(",", ":"))
    rest = " ".join(f"{name}={_text(value)}" for name, value in fields.items() if name != "time")
    return f"{fields['time']} {rest}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def _target() -> Optional[TextIO]:
    global _file
    path = os.environ.get(PATH_ENV)
    if not path:
        return None
    if _file is None or _file.name != path:
        # Appends of whole lines from the node's processes do not interleave (O_APPEND).
        _file = open(path, "a", buffering=1, encoding="utf-8")
    return _file


def _this_replica() -> str:
    global _replica
    if _replica is None:
        from llmserve.placement import replica_name

        _replica = replica_name(outside_serve=f"pid{os.getpid()}")
    return _replica
