"""JSON-lines logs, for log shippers: ``STREAMRANK_LOG_FORMAT=json``.

>>> import logging
>>> record = logging.LogRecord("streamrank", logging.INFO, "app.py", 1, "ranked %d", (3,), None)
>>> line = JsonLines().format(record)
>>> line.startswith('{"ts":'), line.endswith('"logger":"streamrank","message":"ranked 3"}')
(True, True)
"""

from __future__ import annotations

import logging
from typing import Any

import orjson


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def json_logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that writes every record as a JSON line to stdout."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "streams.logs.JsonLines"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }
