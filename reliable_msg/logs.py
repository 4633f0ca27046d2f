"""Logging of the ``reliable-msg`` command: readable text, or one JSON object a line.

Log calls about a message pass its id as ``extra={"message_id": ...}``: in JSON it is a
field of its own (``"message_id": "o-1001"``), so a log pipeline can follow a message
across instances; in text the message already names it. Log calls about a TCC
transaction pass its gid the same way, ``extra={"gid": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has; anything else on a record came as ``extra``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
#: Extras that only repeat the message (uvicorn's coloured copy of it).
_NOISE = frozenset({"color_message"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, the
    record's extras (``message_id``, ``group``, ...) and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _NOISE and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str, fmt: LogFormat) -> None:
    """Send every log record to stderr, as text or JSON lines, from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def json_enabled() -> bool:
    """Whether :func:`configure` chose JSON (uvicorn must then log through the root)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
