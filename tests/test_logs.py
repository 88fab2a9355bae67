"""One logging configuration: timestamps on every line, a JSON option, uvicorn's and RQ's loggers through it."""

import json
import logging
import re
from collections.abc import Iterator

import pytest

from apa import logs


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_text_lines_carry_a_utc_timestamp_level_and_logger(root_logger: logging.Logger,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text", "INFO")
    logging.getLogger("apa.test").info("hello %s", "world")
    logging.getLogger("apa.test").debug("not shown at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO apa\.test: hello world", lines[0])


def test_json_lines_parse_and_uvicorn_and_rq_write_through_the_same_handler(
        root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("uvicorn.access").addHandler(logging.NullHandler())  # as uvicorn's own config would
    logging.getLogger("uvicorn.access").propagate = False
    logs.configure("json", "INFO")
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
    logging.getLogger("rq.worker").warning("job failed")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("apa.test").exception("with a traceback")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["logger"] for e in entries] == ["uvicorn.access", "rq.worker", "apa.test"]
    assert entries[0]["message"] == '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200'
    assert entries[1]["level"] == "WARNING"
    assert "RuntimeError: boom" in entries[2]["exception"]
    assert all(e["time"].endswith("Z") for e in entries)


def test_configure_takes_back_loggers_another_configuration_disabled(root_logger: logging.Logger,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    access = logging.getLogger("uvicorn.access")
    access.disabled, access.propagate = True, False  # as uvicorn's own logging config can leave it
    access.setLevel(logging.WARNING)  # uvicorn.Config(log_level="warning")
    try:
        logs.configure("text", "INFO")
        access.info("GET /healthz")
        assert "uvicorn.access: GET /healthz" in capsys.readouterr().err
    finally:
        access.disabled = False
        access.setLevel(logging.NOTSET)


@pytest.mark.parametrize(("log_format", "level"), [("xml", "INFO"), ("text", "LOUD")])
def test_an_unknown_format_or_level_is_an_error(log_format: str, level: str) -> None:
    with pytest.raises(ValueError, match="APA_LOG_"):
        logs.configure(log_format, level)


def test_the_format_and_level_default_to_the_settings(root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from apa.settings import get_settings

    monkeypatch.setenv("APA_LOG_FORMAT", "JSON")
    monkeypatch.setenv("APA_LOG_LEVEL", "warning")
    get_settings.cache_clear()
    try:
        logs.configure()
    finally:
        get_settings.cache_clear()
    logging.getLogger("apa.test").info("below the level")
    logging.getLogger("apa.test").warning("shown")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["message"] for e in entries] == ["shown"]
