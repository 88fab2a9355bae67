"""No user id in the logs: the access log shows ``/users/{user_id}/interactions``, and no query string."""

import logging
import re

_USER_PATH = re.compile(r"^/users/[^/]+")
ACCESS_LOGGER = "uvicorn.access"


def redact_path(path: str) -> str:
    path, separator, _query = path.partition("?")
    return _USER_PATH.sub("/users/{user_id}", path) + ("?{query}" if separator else "")


class RedactUserIds(logging.Filter):
    """For uvicorn's access log, whose arguments are (client, method, path, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


def install() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactUserIds) for f in logger.filters):
        logger.addFilter(RedactUserIds())
