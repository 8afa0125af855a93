"""The control socket client: ControlClient, argument conversion, rendering, ``pyvduse ctl``."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvduse.control import CommandError, ControlServer
from pyvduse.ctl import (
    ControlClient,
    ControlError,
    add_ctl_parser,
    build_arguments,
    parse_value,
    render_event,
    render_human,
    render_table,
    run_ctl,
)

EXPORTS = [
    {"name": "vduse0", "backend": "file", "size": 1073741824, "readonly": False},
    {"name": "vduse-long-name", "backend": "memory", "size": 4096, "readonly": True},
]


class Daemon:
    """A control server with a few fake daemon commands; ``calls`` records arguments."""

    def __init__(self, path: Path) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.server = ControlServer(str(path), {
            "query-exports": self._record("query-exports", lambda a: EXPORTS),
            "export-add": self._record("export-add", self._add),
            "echo": self._record("echo", lambda a: a),
            "quit": self._record("quit", lambda a: None),
        }, version="1.2.3")
        self.path = str(path)

    def _record(self, name: str, handler: Callable[[dict[str, Any]], Any]
                ) -> Callable[[dict[str, Any]], Any]:
        def call(arguments: dict[str, Any]) -> Any:
            self.calls.append((name, arguments))
            return handler(arguments)
        return call

    def _add(self, arguments: dict[str, Any]) -> Any:
        self.server.emit("EXPORT_ADDING", {"name": arguments.get("name")})
        if arguments.get("name") == "taken":
            raise CommandError("export taken exists already")
        return {"name": arguments.get("name")}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    fake = Daemon(tmp_path / "ctl.sock")
    fake.server.start()
    yield fake
    fake.server.close(timeout=0.5)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pyvduse")
    add_ctl_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ctl", *argv])


def ctl(*argv: str) -> tuple[int, str, str]:
    """Run ``pyvduse ctl ARGV``: the exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    try:
        status = run_ctl(parse(*argv), stdout=out, stderr=err)
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    return status, out.getvalue(), err.getvalue()


# -- ControlClient -----------------------------------------------------------------------


def test_client_executes_commands(daemon: Daemon) -> None:
    with ControlClient(daemon.path) as client:
        assert client.greeting == {"QMP": {"version": {"pyvduse": "1.2.3"}, "capabilities": []}}
        assert client.execute("query-exports") == EXPORTS
        assert client.execute("echo", {"read-only": True}, size=5) == {"read-only": True,
                                                                       "size": 5}
        assert client.execute("echo", arguments=1, name="x") == {"arguments": 1, "name": "x"}
        assert client.execute("quit") == {}
        with pytest.raises(CommandError) as error:
            client.execute("nope")
        assert error.value.error_class == "CommandNotFound"
        assert error.value.desc == "The command nope has not been found"
        with pytest.raises(CommandError, match="exists already") as error:
            client.execute("export-add", name="taken")
        assert error.value.error_class == "GenericError"
    assert [name for name, _ in daemon.calls] == [
        "query-exports", "echo", "echo", "quit", "export-add"]


def test_client_keeps_events_that_come_before_a_reply(daemon: Daemon) -> None:
    with ControlClient(daemon.path) as client:
        assert client.execute("export-add", name="vduse1") == {"name": "vduse1"}
        event = client.next_event(0)
        assert event is not None
        assert event["event"] == "EXPORT_ADDING" and event["data"] == {"name": "vduse1"}
        assert client.next_event(0.05) is None
        daemon.server.emit("LATER", {"x": 1})
        event = client.next_event(5)
        assert event is not None and event["event"] == "LATER"


def test_client_without_negotiation(daemon: Daemon) -> None:
    client = ControlClient(daemon.path)
    client.connect(negotiate=False)
    try:
        with pytest.raises(CommandError, match="capabilities negotiation"):
            client.execute("query-exports")
        reply = client.request({"execute": "qmp_capabilities", "id": "mine"})
        assert reply == {"return": {}, "id": "mine"}
        client.send_line(b"not json")
        assert "JSON parse error" in client.request({"execute": "echo"})["error"]["desc"]
    finally:
        client.close()
        client.close()


def test_client_connection_failures(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"cannot connect to .*: No such file or directory"):
        ControlClient(str(tmp_path / "missing")).connect()
    stale = tmp_path / "stale"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(ControlError, match=r"connection refused \(is the daemon running"):
        ControlClient(str(stale)).connect()
    with pytest.raises(ControlError, match="not connected"):
        ControlClient(str(stale)).execute("x")


def _listener(path: Path, behaviour: Callable[[socket.socket], object]) -> socket.socket:
    """A one-connection server at ``path`` doing ``behaviour`` with the connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            behaviour(conn)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_client_timeout_and_closed_connection(tmp_path: Path) -> None:
    done = threading.Event()
    mute = _listener(tmp_path / "mute", lambda conn: done.wait(10))
    try:
        started = time.monotonic()
        with pytest.raises(ControlError, match=r"timed out after 0.2 s"):
            ControlClient(str(tmp_path / "mute"), timeout=0.2).connect()
        assert time.monotonic() - started < 2
    finally:
        done.set()
        mute.close()
    rude = _listener(tmp_path / "rude", lambda conn: None)
    try:
        with pytest.raises(ControlError, match="the daemon closed the connection"):
            ControlClient(str(tmp_path / "rude")).connect()
    finally:
        rude.close()
    other = _listener(tmp_path / "other", lambda conn: conn.sendall(b"SSH-2.0-OpenSSH\n"))
    try:
        with pytest.raises(ControlError, match="something else than JSON"):
            ControlClient(str(tmp_path / "other")).connect()
    finally:
        other.close()


def test_client_refused_by_a_full_server(tmp_path: Path) -> None:
    with (ControlServer(str(tmp_path / "s"), {}, version="1", max_clients=1) as server,
          ControlClient(server.path),
          pytest.raises(ControlError, match="refused the connection: GenericError: "
                        "too many control clients")):
        ControlClient(server.path).connect()


# -- arguments and rendering -------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("false", False), ("0", 0), ("42", 42), ("-7", -7),
    ("007", "007"), ("1.5", "1.5"), ("1e3", "1e3"), ("0x10", "0x10"), ("", ""),
    ("True", "True"), ("null", "null"), ("vduse0", "vduse0"), ("a=b", "a=b"), ("-", "-"),
])
def test_parse_value(text: str, value: Any) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_build_arguments() -> None:
    assert build_arguments(None, []) == {}
    assert build_arguments({"a": [1], "b": 1}, [("b", 2), ("c", "x")]) == {
        "a": [1], "b": 2, "c": "x"}
    with pytest.raises(ValueError, match="'b' given twice"):
        build_arguments(None, [("b", 1), ("b", 2)])


def test_render_table() -> None:
    assert render_table(EXPORTS).splitlines() == [
        "name             backend  size        readonly",
        "vduse0           file     1073741824  false",
        "vduse-long-name  memory   4096        true",
    ]
    assert render_table([{"a": 1}, {"b": {"x": [1]}}]).splitlines() == [
        "a  b", "1  -", '-  {"x":[1]}']


@pytest.mark.parametrize(("value", "text"), [
    ({"name": "vduse0", "size": 4096, "ro": False, "opts": {"a": 1}, "none": None},
     'name: vduse0\nsize: 4096\nro: false\nopts: {"a":1}\nnone: null'),
    ({}, ""),
    ([], "(none)"),
    (["a", 1, None], "a\n1\nnull"),
    ("text", "text"),
    (12, "12"),
    (True, "true"),
    (None, "null"),
])
def test_render_human(value: Any, text: str) -> None:
    assert render_human(value) == text


def test_render_event() -> None:
    line = render_event({"event": "EXPORT_DELETED", "data": {"name": "vduse1", "n": 2},
                         "timestamp": {"seconds": 1700000000, "microseconds": 250000}})
    _date, clock, rest = line.split(" ", 2)
    assert clock.endswith(":20.250")
    assert rest == "EXPORT_DELETED name=vduse1 n=2"
    assert render_event({"event": "X", "timestamp": "junk"}) == "X"


# -- pyvduse ctl -------------------------------------------------------------------------


def test_ctl_prints_json(daemon: Daemon) -> None:
    status, out, err = ctl(daemon.path, "query-exports")
    assert (status, err) == (0, "")
    assert out == json.dumps(EXPORTS, indent=2) + "\n"
    assert daemon.calls == [("query-exports", {})]


def test_ctl_human(daemon: Daemon) -> None:
    status, out, _ = ctl("--human", daemon.path, "query-exports")
    assert status == 0
    assert out.splitlines()[0].split() == ["name", "backend", "size", "readonly"]
    status, out, _ = ctl(daemon.path, "echo", "name=x", "size=5", "--human")
    assert (status, out) == (0, "name: x\nsize: 5\n")
    status, out, _ = ctl(daemon.path, "quit", "--human")
    assert (status, out) == (0, "")


def test_ctl_arguments(daemon: Daemon) -> None:
    status, out, _ = ctl(daemon.path, "echo", "name=vduse1", "readonly=true", "size=1024",
                         "serial=007", "path=/a=b")
    assert status == 0
    sent = {"name": "vduse1", "readonly": True, "size": 1024, "serial": "007", "path": "/a=b"}
    assert json.loads(out) == sent
    assert daemon.calls[-1] == ("echo", sent)
    status, out, _ = ctl("--json", '{"opts": {"x": [1, 2]}, "size": 1}', daemon.path,
                         "echo", "size=2")
    assert status == 0
    assert json.loads(out) == {"opts": {"x": [1, 2]}, "size": 2}


def test_ctl_error_reply(daemon: Daemon) -> None:
    status, out, err = ctl(daemon.path, "export-add", "name=taken")
    assert (status, out) == (1, "")
    assert err == "pyvduse ctl: error: GenericError: export taken exists already\n"
    status, _, err = ctl(daemon.path, "no-such")
    assert status == 1
    assert err == ("pyvduse ctl: error: CommandNotFound: "
                   "The command no-such has not been found\n")


def test_ctl_connection_failures(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    status, out, err = ctl(str(missing), "query-exports")
    assert (status, out) == (1, "")
    assert err == (f"pyvduse ctl: error: cannot connect to {missing}: "
                   "No such file or directory\n")
    done = threading.Event()
    mute = _listener(tmp_path / "mute", lambda conn: done.wait(10))
    try:
        status, _, err = ctl("--timeout", "0.1", str(tmp_path / "mute"), "query-exports")
        assert status == 1
        assert "timed out after 0.1 s" in err and err.count("\n") == 1
    finally:
        done.set()
        mute.close()


@pytest.mark.parametrize("argv", [
    ["SOCK", "cmd", "novalue"],
    ["SOCK", "cmd", "=value"],
    ["--json", "[1]", "SOCK", "cmd"],
    ["--json", "{bad", "SOCK", "cmd"],
    ["--timeout", "-1", "SOCK", "cmd"],
    ["--timeout", "soon", "SOCK", "cmd"],
    [],
])
def test_ctl_bad_syntax_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = ctl(*argv)
    assert (status, out) == (2, "")


@pytest.mark.parametrize(("argv", "message"), [
    (["SOCK"], "a COMMAND (or --events) is required"),
    (["SOCK", "cmd", "a=1", "a=2"], "argument 'a' given twice"),
    (["--events", "SOCK", "cmd"], "--events takes no COMMAND nor arguments"),
])
def test_ctl_bad_usage_exits_2(argv: list[str], message: str) -> None:
    status, out, err = ctl(*argv)
    assert (status, out) == (2, "")
    assert err == f"pyvduse ctl: error: {message}\n"


def test_ctl_parser_defaults() -> None:
    args = parse("/run/x.sock", "query-exports")
    assert args.run is run_ctl
    assert args.log_level == "warning"
    assert args.timeout == 30.0 and not args.human and not args.events


def test_ctl_events(daemon: Daemon) -> None:
    out, err = io.StringIO(), io.StringIO()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_ctl(parse("--events", daemon.path), stdout=out, stderr=err)))
    thread.start()
    deadline = time.monotonic() + 10
    while not out.getvalue():  # until the stream has negotiated and gets events
        assert time.monotonic() < deadline
        daemon.server.emit("READY", {})
        time.sleep(0.01)
    daemon.server.emit("ONE", {"n": 1})
    daemon.server.emit("TWO", {})
    while "TWO" not in out.getvalue():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    daemon.server.close()
    thread.join(10)
    assert result == [1]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["data"]) for e in events if e["event"] != "READY"] == [
        ("ONE", {"n": 1}), ("TWO", {})]
    assert err.getvalue().endswith("the daemon closed the connection\n")
