"""RateLimitedLog: bursts per key and interval, the note counting suppressed messages,
flushing what is owed, laziness when suppressing, and thread safety; and its use by
the virtio-blk handler against a driver flooding it with bad requests.

Every test drives a fake clock; records are captured with ``caplog`` on a logger of
the test's own (the handler's logger for the handler).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from test_blk_handler import Driver, Ram

import pyvduse.blk.handler as handler_module
from pyvduse.blk import BlkConfig
from pyvduse.ratelimit import RateLimitedLog, flush_all
from pyvduse.uapi import virtio as v

NAME = "test.ratelimit"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=NAME)
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NAME]


def limiter(clock: Clock, **kwargs: object) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger(NAME), clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_burst_per_key_then_one_line_with_the_count(clock: Clock,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=3)
    results = []
    for n in range(10):
        results.append(rl.warning("bad-chain", "request %d: malformed", n))
        clock.now += 0.1
    assert results == [True] * 3 + [False] * 7
    assert messages(caplog) == [f"request {n}: malformed" for n in range(3)]
    clock.now = 1004.99  # still the first window
    assert not rl.warning("bad-chain", "request %d: malformed", 10)
    clock.now = 1005.0
    assert rl.warning("bad-chain", "request %d: malformed", 11)
    assert messages(caplog)[3:] == [
        "request 11: malformed (8 similar messages suppressed in the last 5 s)"]
    # The new window lets a burst through again, without a note.
    assert rl.warning("bad-chain", "request %d: malformed", 12)
    assert messages(caplog)[4:] == ["request 12: malformed"]


def test_keys_are_limited_separately(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=1)
    assert rl.warning("a", "first a")
    assert not rl.warning("a", "second a")
    assert rl.error(("b", 1), "first b")
    assert rl.log(logging.INFO, ("b", 2), "first b2")
    assert messages(caplog) == ["first a", "first b", "first b2"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR, logging.INFO]


def test_no_note_when_nothing_was_suppressed(clock: Clock,
                                             caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=1.0, burst=2)
    for _ in range(5):
        assert rl.warning("k", "line")
        clock.now += 1.0
    assert messages(caplog) == ["line"] * 5


def test_one_suppressed_message_is_singular_and_long_gaps_are_whole_seconds(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=0.5, burst=1)
    rl.warning("k", "x")
    rl.warning("k", "x")
    clock.now += 0.3
    rl.warning("k", "x")
    clock.now += 0.25
    rl.warning("k", "x")  # a new window, which suppresses one message
    rl.warning("k", "x")
    clock.now += 3600
    rl.warning("k", "x")
    assert messages(caplog) == [
        "x", "x (2 similar messages suppressed in the last 0.55 s)",
        "x (1 similar message suppressed in the last 3600 s)"]


def test_flush_reports_a_burst_that_nothing_follows(clock: Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=1)
    for n in range(4):
        rl.warning("k", "request %d failed", n)
    rl.warning("single", "only %s", "one")
    rl.warning("single", "only %s", "two")
    rl.warning("quiet", "nothing suppressed")
    assert rl.flush() == 0  # the windows are still open
    clock.now += 5.0
    assert rl.flush() == 2
    # The last suppressed message stands for itself; the note counts the others.
    assert sorted(messages(caplog)[3:]) == [
        "only two", "request 3 failed (2 similar messages suppressed in the last 5 s)"]
    assert rl.flush() == 0  # reported once
    # Every key starts afresh: a burst, no note.
    assert rl.warning("k", "again")
    assert messages(caplog)[-1] == "again"


def test_flush_forced_reports_open_windows_which_stay_open(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=1)
    for n in range(3):
        rl.warning("k", "line %d", n)
    assert rl.flush(force=True) == 1
    assert messages(caplog) == ["line 0",
                                "line 2 (1 similar message suppressed in the last 0 s)"]
    assert not rl.warning("k", "line %d", 3)  # the window is still open
    clock.now += 5.0
    assert rl.warning("k", "line %d", 4)
    assert messages(caplog)[-1] == "line 4 (1 similar message suppressed in the last 5 s)"


def test_suppressed_messages_are_never_formatted(clock: Clock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    formatted = []

    class Costly:
        def __str__(self) -> str:
            formatted.append(1)
            return "costly"

    rl = limiter(clock, interval=5.0, burst=1)
    rl.warning("k", "%s", Costly())
    assert formatted  # the logging handlers formatted the line let through
    count = len(formatted)
    for _ in range(1000):
        rl.warning("k", "%s", Costly())
    assert len(formatted) == count
    assert len(messages(caplog)) == 1


def test_suppressing_is_cheap(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=1)
    rl.warning("k", "first")
    started = time.perf_counter()
    for n in range(20000):
        rl.warning("k", "request %d", n)
    # Microseconds each (the budget is generous for slow, shared machines).
    assert time.perf_counter() - started < 1.0
    assert len(messages(caplog)) == 1


def test_percent_signs_survive_the_note(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=1.0, burst=1, note="{count} more at 100%")
    for _ in range(2):
        rl.warning("plain", "50% done")
        rl.warning("args", "%d%% done", 50)
    clock.now += 1
    rl.warning("plain", "50% done")
    rl.warning("args", "%d%% done", 50)
    assert messages(caplog) == ["50% done", "50% done", "50% done (1 more at 100%)",
                                "50% done (1 more at 100%)"]


def test_levels_the_logger_ignores_cost_nothing_and_count_nothing(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=NAME)
    rl = limiter(clock, interval=5.0, burst=1)
    for _ in range(3):
        assert not rl.warning("k", "hidden")
    assert rl.error("k", "shown")
    clock.now += 5
    assert rl.error("k", "shown again")
    assert messages(caplog) == ["shown", "shown again"]


def test_the_interval_can_change_and_zero_lets_everything_through(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=1)
    rl.warning("k", "a")
    assert not rl.warning("k", "b")
    rl.interval = 0.0
    assert rl.warning("k", "c")
    assert rl.warning("k", "d")
    assert messages(caplog) == ["a", "c (1 similar message suppressed in the last 0 s)", "d"]


def test_records_name_the_caller_and_carry_exc_info(clock: Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock)
    try:
        raise ZeroDivisionError("bug")
    except ZeroDivisionError as exc:
        rl.error("bug", "it failed", exc_info=exc)
    rl.log(logging.WARNING, "other", "plain")
    first, second = caplog.records
    assert first.exc_info is not None and first.exc_info[0] is ZeroDivisionError
    assert first.funcName == second.funcName == "test_records_name_the_caller_and_carry_exc_info"
    assert first.filename == "test_ratelimit.py"


def test_many_threads_count_every_message(clock: Clock,
                                          caplog: pytest.LogCaptureFixture) -> None:
    rl = limiter(clock, interval=5.0, burst=5)
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(2000):
            rl.warning("k", "flood")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert messages(caplog) == ["flood"] * 5
    clock.now += 5
    rl.warning("k", "flood")
    assert messages(caplog)[-1] == "flood (15995 similar messages suppressed in the last 5 s)"


@pytest.mark.parametrize("kwargs", [{"interval": -1.0}, {"interval": float("nan")},
                                    {"burst": 0}], ids=repr)
def test_bad_limits(clock: Clock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        limiter(clock, **kwargs)


# -- the virtio-blk handler -------------------------------------------------------------


class HandlerClock:
    """Stands in for the handler module's ``time``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def handler_clock(monkeypatch: pytest.MonkeyPatch) -> HandlerClock:
    clock = HandlerClock()
    monkeypatch.setattr(handler_module, "time", clock)
    return clock


@pytest.fixture
def drv() -> Iterator[Driver]:
    ram = Ram(1 << 20)
    d = Driver(ram, BlkConfig.for_backend(ram))
    yield d
    d.close()


def handler_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pyvduse.blk.handler"]


def test_a_flood_of_chains_without_a_status_byte_is_rate_limited(
        drv: Driver, handler_clock: HandlerClock, caplog: pytest.LogCaptureFixture) -> None:
    header = v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 0)
    burst = handler_module.MALFORMED_LOG_BURST
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        for _ in range(100):
            assert drv.run([drv.out(header)]) == 0
        assert len(handler_messages(caplog)) == burst
        handler_clock.now += drv.handler.ERROR_LOG_INTERVAL
        assert drv.run([drv.out(header)]) == 0
    last = handler_messages(caplog)[-1]
    assert len(handler_messages(caplog)) == burst + 1
    assert "no status byte" in last
    assert f"({100 - burst} similar messages suppressed in the last 5 s)" in last
    assert drv.request(v.VIRTIO_BLK_T_FLUSH)[0] == v.VIRTIO_BLK_S_OK


def test_rejected_requests_do_not_hide_a_backend_failure(
        drv: Driver, handler_clock: HandlerClock, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(drv.backend, Ram)
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        for _ in range(50):  # misaligned: rejected before the backend is asked
            assert drv.request(v.VIRTIO_BLK_T_IN, 0, in_len=100)[0] == v.VIRTIO_BLK_S_IOERR
        drv.backend.fail_with = OSError(errno.EIO, "bad sector")
        for _ in range(50):
            assert drv.request(v.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == v.VIRTIO_BLK_S_IOERR
    lines = handler_messages(caplog)
    assert len(lines) == 2
    assert "not aligned" in lines[0]
    assert "bad sector" in lines[1]


def test_flush_all_reports_every_limiter(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiters = [RateLimitedLog(logging.getLogger(f"flush-all-{i}"), interval=1.0, burst=1,
                               clock=lambda: now[0]) for i in range(2)]
    for limiter in limiters:
        for _ in range(3):
            limiter.warning("k", "again")
    now[0] = 2.0
    with caplog.at_level(logging.WARNING):
        assert flush_all() >= 2
    flushed = [r for r in caplog.records if r.name.startswith("flush-all-")
               and "1 similar message suppressed" in r.getMessage()]
    assert sorted(r.name for r in flushed) == ["flush-all-0", "flush-all-1"]
