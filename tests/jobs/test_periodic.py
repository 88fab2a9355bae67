"""The one background loop (jobs/periodic.py): it runs, survives a failing round, and stops promptly."""

import logging
import threading
import time

import pytest

from jobs.periodic import Periodic


def test_runs_every_interval_and_first_right_away_when_asked() -> None:
    rounds: list[float] = []
    started = time.monotonic()
    loop = Periodic("test-loop", lambda: rounds.append(time.monotonic() - started), 0.05, immediately=True)
    loop.start()
    time.sleep(0.3)
    loop.stop()
    loop.join(timeout=1)
    assert not loop.is_alive()
    assert rounds[0] < 0.04, "the first round did not wait for the interval"
    assert 3 <= len(rounds) <= 8


def test_waits_one_interval_before_the_first_round_by_default() -> None:
    ran = threading.Event()
    loop = Periodic("test-loop", ran.set, 0.2)
    loop.start()
    assert not ran.wait(0.1)
    assert ran.wait(1.0)
    loop.stop()
    loop.join(timeout=1)


def test_a_failing_round_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    again = threading.Event()

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("ledger away")
        again.set()

    with caplog.at_level(logging.ERROR, logger="jobs.periodic"):
        loop = Periodic("flaky-loop", flaky, 0.02, immediately=True)
        loop.start()
        assert again.wait(1.0), "the loop died with its first round"
        loop.stop()
        loop.join(timeout=1)
    [record] = [r for r in caplog.records if "flaky-loop failed" in r.getMessage()]
    assert record.exc_info is not None and "ledger away" in str(record.exc_info[1])


def test_stop_ends_a_long_wait_at_once() -> None:
    loop = Periodic("slow-loop", lambda: None, 3600)
    loop.start()
    started = time.monotonic()
    loop.stop()
    loop.join(timeout=2)
    assert not loop.is_alive() and time.monotonic() - started < 0.5
    assert loop.daemon, "a forgotten loop never holds the process open"


def test_a_stopped_loop_runs_no_first_round() -> None:
    ran = threading.Event()
    loop = Periodic("never", ran.set, 3600, immediately=True)
    loop.stop()
    loop.start()
    loop.join(timeout=1)
    assert not ran.is_set()
