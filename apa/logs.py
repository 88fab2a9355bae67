"""One logging configuration for every process: apa's own loggers, uvicorn's and RQ's.

Every line carries a UTC timestamp, the level and the logger; ``APA_LOG_FORMAT=json`` writes one JSON
object per line instead (for a log shipper). uvicorn is started with ``log_config=None`` and RQ finds
the root handler, so both write through this configuration instead of their own formats.
"""

import json
import logging
import sys
import time
from typing import Any

from apa.settings import get_settings

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JSONFormatter(UTCFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str | None = None, level: str | None = None) -> None:
    """Install the one handler on the root logger (replacing any); defaults from the settings
    (``APA_LOG_FORMAT``, ``text``; ``APA_LOG_LEVEL``, ``INFO``). An unknown value is an error, not a
    silent default."""
    settings = get_settings() if log_format is None or level is None else None
    log_format = (log_format or (settings and settings.log_format) or "text").lower()
    level = (level or (settings and settings.log_level) or "INFO").upper()
    if log_format not in FORMATS:
        raise ValueError(f"APA_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"APA_LOG_LEVEL must be a logging level (DEBUG, INFO, WARNING, ERROR), not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else UTCFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker"):  # theirs propagate to ours
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.disabled = False  # uvicorn's own logging config (an in-process uvicorn.Config) disables them,
        logger.setLevel(logging.NOTSET)  # or sets their level: ours decides
