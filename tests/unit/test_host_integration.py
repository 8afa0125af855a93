"""The daemon and its host: systemd notifications, signals, status lines, its parent.

The notifications go to a real Unix datagram socket of the test's (as systemd's
``$NOTIFY_SOCKET``); the daemon runs as a real process (``python -m pyvduse``)
on a fake kernel where it needs one, so these tests need no VDUSE; the
real-kernel side (READY=1 only once ``/dev/vdX`` exists, the status line naming
the real node) is in ``tests/guest/test_host.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.host import Signals, status_lines, wait_for_nodes, write_status
from pyvduse.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield path, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    """One notification, as its KEY=VALUE lines."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


# -- sd_notify --------------------------------------------------------------------------


def test_notifications_reach_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("serving vd0 on /dev/vda\nsecond line")
    assert received(sock) == {"READY": "1", "STATUS": "serving vd0 on /dev/vda second line"}
    assert notifier.status("busy")
    assert received(sock) == {"STATUS": "busy"}
    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1", "STATUS": "stopping"}
    assert not notifier.watchdog_due()  # no watchdog asked for


def test_an_abstract_socket_address_starts_with_an_at_sign() -> None:
    name = f"pyvduse-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier(f"@{name}").send(READY=1)
        assert received(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_the_watchdog_is_pinged_at_half_its_timeout(
        notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000",
                                      "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 1.5
    assert notifier.watchdog_due(now=100.0)
    assert notifier.watchdog(now=100.0)
    assert received(sock) == {"WATCHDOG": "1"}
    assert not notifier.watchdog_due(now=101.0)
    assert notifier.watchdog_due(now=101.5)


def test_a_reader_that_falls_behind_never_stalls_the_daemon(
        notify_socket: tuple[str, socket.socket]) -> None:
    # A datagram socket queues only net.unix.max_dgram_qlen messages; a blocking send
    # then waits for the reader, which kept the daemon's main loop (and its signal
    # handling) waiting once. Pings are dropped instead, other notifications wait a bit.
    path, sock = notify_socket
    notifier = Notifier(path, watchdog_usec=1_000_000)
    started = time.monotonic()
    sent = [notifier.watchdog() for _ in range(2000)]
    assert time.monotonic() - started < 2
    assert sent[0] and not sent[-1]
    started = time.monotonic()
    assert not notifier.send(wait=0.2, STATUS="queue full")
    assert 0.15 < time.monotonic() - started < 2
    assert received(sock) == {"WATCHDOG": "1"}  # room again: the next ping goes
    assert notifier.watchdog()


def test_the_watchdog_of_another_process_is_not_ours() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).watchdog_interval is None


def test_no_socket_means_nothing_is_sent_and_a_dead_one_raises_nothing(tmp_path: Path) -> None:
    assert not Notifier.from_environ({}).enabled
    assert not Notifier.from_environ({}).ready("x")
    assert not Notifier(str(tmp_path / "gone")).ready("x")  # logged once, not raised


# -- signals ----------------------------------------------------------------------------


def test_information_signals_wake_the_loop_and_do_not_stop_it() -> None:
    signals = Signals()
    previous = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                                                 signal.SIGINT, signal.SIGTERM)}
    signals.install()
    try:
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(os.getpid(), signum)
        assert signals.wake.wait(5)
        assert signals.take_info() == [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
        assert signals.take_info() == []
        assert not signals.stopping
        signals.wake.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wake.wait(5) and signals.stop_signal == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- status -----------------------------------------------------------------------------


def test_status_lines_are_one_json_object_each(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    statuses = [{"name": "vd0", "path": "/dev/vda"}, {"name": "vd1", "path": None}]
    text = status_lines(statuses)
    assert [json.loads(line) for line in text.splitlines()] == statuses
    write_status(text, None)
    assert capsys.readouterr().out == text
    target = tmp_path / "status.json"
    write_status(text, str(target))
    assert target.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left


def test_waiting_for_device_nodes(tmp_path: Path) -> None:
    there = tmp_path / "vda"
    there.touch()
    assert wait_for_nodes([str(there), None], timeout=1) == []
    started = time.monotonic()
    assert wait_for_nodes([str(there), str(tmp_path / "vdb")], timeout=0.3) == [
        str(tmp_path / "vdb")]
    assert time.monotonic() - started < 2


# -- the daemon as a process ------------------------------------------------------------


def test_a_pidfile_in_a_missing_directory_fails_before_any_device(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pyvduse", "serve", "--pidfile",
                           str(tmp_path / "no" / "pid"), "null", "size=1M"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == (f"pyvduse: error: cannot write pidfile {tmp_path}/no/pid: "
                           f"no directory {tmp_path}/no\n")


CHILD = """
import signal, sys, time
from pathlib import Path
import pyvduse.host as host
host.exit_with_parent()
signal.signal(signal.SIGTERM, lambda *_: (Path(sys.argv[1]).write_text("TERM"), sys.exit(0)))
Path(sys.argv[1]).write_text("armed")
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_exit_with_parent_gets_sigterm_when_the_parent_dies(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert int(parent.stdout.readline()) > 0  # the child's pid: it runs
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text() == "armed"):
            assert time.monotonic() < deadline, "the child never armed"
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        while marker.read_text() != "TERM":
            assert time.monotonic() < deadline, "the child got no SIGTERM"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


# -- log formats ------------------------------------------------------------------------


def emit_records(fmt: str, level: str = "info") -> list[str]:
    import io
    import logging

    from pyvduse.logs import setup_logging

    stream = io.StringIO()
    logger = logging.getLogger(f"pyvduse-test-{fmt}")
    setup_logging(logger, level, fmt, stream)
    logger.info("vd0: serving")
    logger.warning("vd0: the backend is slow")
    logger.debug("hidden at info")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("vd0: failed")
    return stream.getvalue().splitlines()


def test_text_logs_have_a_timestamp_and_a_level() -> None:
    import re

    lines = emit_records("text")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(stamp + r" INFO pyvduse: vd0: serving", lines[0]), lines
    assert re.fullmatch(stamp + r" WARNING pyvduse: vd0: the backend is slow", lines[1])
    assert re.fullmatch(stamp + r" ERROR pyvduse: vd0: failed", lines[2])
    assert lines[-1] == "ValueError: boom"  # the traceback follows
    assert not any("hidden" in line for line in lines)


def test_journal_logs_carry_priorities_and_no_timestamp() -> None:
    lines = emit_records("journal")
    assert lines[:2] == ["<6>pyvduse: vd0: serving", "<4>pyvduse: vd0: the backend is slow"]
    assert len(lines) == 3 and lines[2].startswith("<3>pyvduse: vd0: failed | Traceback")
    assert lines[2].endswith("ValueError: boom")


def test_json_logs_are_one_object_per_line() -> None:
    records = [json.loads(line) for line in emit_records("json")]
    assert [(r["level"], r["message"]) for r in records] == [
        ("info", "vd0: serving"), ("warning", "vd0: the backend is slow"),
        ("error", "vd0: failed")]
    assert "ValueError: boom" in records[2]["exception"]
    assert records[0]["time"][10] == "T" and records[0]["thread"] == "MainThread"


def test_auto_is_the_journal_only_when_stderr_is_its_stream(tmp_path: Path) -> None:
    from pyvduse.logs import stderr_is_journal

    with (tmp_path / "f").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, f"{st.st_dev}:{st.st_ino}")
        assert not stderr_is_journal(stream, f"{st.st_dev}:{st.st_ino + 1}")
        assert not stderr_is_journal(stream, "")
        assert not stderr_is_journal(stream, "garbage")


# -- the command line's conventions ---------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvduse", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    from pyvduse import __version__

    done = run_cli(flag)
    assert (done.returncode, done.stdout) == (0, f"pyvduse {__version__}\n")


@pytest.mark.parametrize(("backend", "mentions"), [
    ("file", ["path= (required)", "direct=on|off"]),
    ("memory", ["size= (required)"]),
    ("null", ["size= (default 1G)"]),
    ("nbd", ["uri= (required", "connections=N"]),
    ("rbd", ["pool=POOL and image=NAME (required)", "cache=on|off"]),
    ("python", ["script=", "module="]),
])
def test_each_backend_has_its_own_help(backend: str, mentions: list[str]) -> None:
    done = run_cli("serve", "--name", "x", backend, "key=value", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: pyvduse serve [OPTIONS] {backend} [key=value ...]")
    for text in mentions:
        assert text in done.stdout, (text, done.stdout)
    assert "``" not in done.stdout


def test_serve_help_without_a_backend_is_the_serve_help() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0 and "--exit-with-parent" in done.stdout
    assert "'pyvduse serve BACKEND --help'" in done.stdout.replace("\n", " ")


@pytest.mark.skipif(os.path.exists("/dev/vduse/control"), reason="needs a host without VDUSE")
def test_a_remote_backend_is_not_contacted_when_no_device_can_be_made() -> None:
    # A listening server that records whether anyone connected.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        done = run_cli("serve", "--name", "x", "nbd", f"uri=nbd://127.0.0.1:{port}/x")
        assert done.returncode == 1
        assert done.stderr.startswith("pyvduse: error: /dev/vduse/control does not exist")
        with pytest.raises(TimeoutError):
            server.accept()  # nobody came
    finally:
        server.close()


def complete(script: str, *words: str) -> list[str]:
    """What the completion script offers for the command line ``words`` (the last one
    being completed)."""
    program = (f"{script}\nCOMP_WORDS=({' '.join(map(repr, words))}); "
               f"COMP_CWORD={len(words) - 1}; _pyvduse; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.split())


def test_bash_completion_offers_commands_options_choices_and_backends() -> None:
    script = run_cli("completion", "bash").stdout
    assert "complete -F _pyvduse pyvduse" in script
    assert complete(script, "pyvduse", "") == sorted(
        ["serve", "ctl", "list", "destroy", "completion", "man", "-h", "--help", "-V",
         "--version"])
    assert complete(script, "pyvduse", "serve", "--log-f") == ["--log-format"]
    assert complete(script, "pyvduse", "serve", "--log-format", "j") == ["journal", "json"]
    assert complete(script, "pyvduse", "serve", "--name", "x", "r") == ["rbd"]
    assert complete(script, "pyvduse", "destroy", "--f") == ["--force"]


def test_the_man_page_has_every_command_and_option() -> None:
    from pyvduse.cli import build_parser

    page = run_cli("man").stdout
    assert page.startswith(".TH PYVDUSE 1 ")
    for section in ("NAME", "SYNOPSIS", "SERVE", "CTL", "LIST", "DESTROY", "BACKENDS",
                    "EXIT STATUS", "SIGNALS"):
        assert f"\n.SH {section}\n" in page, section
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert "\\fB" + option.replace("-", "\\-") + "\\fR" in page, option
    assert "(default: pyvduse0)" in page and "%(default)s" not in page


def test_a_closed_stdout_costs_the_status_line_only(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    write_status('{"name":"vd0"}\n', None)  # no exception
    assert "the status line could not be written to stdout" in caplog.text


def test_a_vdpa_family_hidden_by_a_network_namespace_is_explained(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyvduse import netlink

    def missing(self: object, family: str, **_: object) -> None:
        raise netlink.FamilyNotFoundError(family, netlink.VdpaClient.family_missing_hint)

    monkeypatch.setattr(netlink.GenericNetlink, "__init__", missing)
    # The vdpa module is not loaded: the old hint (load it).
    monkeypatch.setattr(netlink, "VDPA_BUS_DIR", str(tmp_path / "absent"))
    with pytest.raises(netlink.FamilyNotFoundError) as excinfo:
        netlink.VdpaClient()
    assert "modprobe" in str(excinfo.value)
    # It is loaded (the bus exists), yet the family is not seen: another namespace.
    monkeypatch.setattr(netlink, "VDPA_BUS_DIR", str(tmp_path))
    with pytest.raises(netlink.FamilyNotFoundError) as excinfo:
        netlink.VdpaClient()
    text = str(excinfo.value)
    assert "exists only in the host's initial network namespace" in text
    assert "--attach none" in text and "modprobe" not in text
