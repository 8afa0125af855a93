"""The control socket server: protocol, errors, events, hostile clients, the socket file."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvduse.control import CommandError, ControlServer, check_arguments
from pyvduse.errors import ConfigError, PyvduseError

TIMEOUT = 10.0


class Raw:
    """A control connection at the byte level."""

    def __init__(self, path: Path | str, *, greet: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""
        self.greeting = self.message() if greet else None

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def message(self) -> dict[str, Any]:
        value = json.loads(self.line())
        assert isinstance(value, dict)
        return value

    def reply(self) -> dict[str, Any]:
        """The next message that is no event."""
        while True:
            message = self.message()
            if "event" not in message:
                return message

    def request(self, request: Any) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def negotiate(self) -> None:
        assert self.request({"execute": "qmp_capabilities"}) == {"return": {}}

    def at_eof(self) -> bool:
        """Read (and drop) what is left; True once the server closed the connection."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            return False
        return True


class Slow:
    """A command that waits until released; ``started`` is set when it runs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, arguments: dict[str, Any]) -> Any:
        self.started.set()
        assert self.release.wait(TIMEOUT)
        return {"slow": arguments.get("n", 0)}


def _fail(arguments: dict[str, Any]) -> Any:
    raise CommandError(arguments.get("desc", "it failed"), arguments.get("class", "GenericError"))


def _boom(arguments: dict[str, Any]) -> Any:
    raise ValueError("a bug in the handler")


def _refuse(arguments: dict[str, Any]) -> Any:
    raise ConfigError("size=12q is not a size")


@pytest.fixture
def slow() -> Iterator[Slow]:
    command = Slow()
    yield command
    command.release.set()


@pytest.fixture
def commands(slow: Slow) -> dict[str, Callable[[dict[str, Any]], Any]]:
    return {
        "echo": lambda arguments: arguments,
        "none": lambda arguments: None,
        "fail": _fail,
        "boom": _boom,
        "refuse": _refuse,
        "not-json": lambda arguments: {"x": object()},
        "big": lambda arguments: "x" * arguments["size"],
        "slow": slow,
    }


@pytest.fixture
def make_server(tmp_path: Path, commands: dict[str, Callable[[dict[str, Any]], Any]]
                ) -> Iterator[Callable[..., ControlServer]]:
    servers: list[ControlServer] = []

    def make(path: Path | None = None, **kwargs: Any) -> ControlServer:
        server = ControlServer(str(path or tmp_path / "ctl.sock"),
                               {**commands, **kwargs.pop("commands", {})},
                               version="9.8.7", **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close(timeout=0.5)


@pytest.fixture
def server(make_server: Callable[..., ControlServer]) -> ControlServer:
    return make_server()


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """The records of the control logger (independent of how other tests set up logging)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pyvduse.control")
    handler = Collect(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def negotiated(server: ControlServer) -> Raw:
    client = Raw(server.path)
    client.negotiate()
    return client


# -- the protocol ------------------------------------------------------------------------


def test_greeting(server: ControlServer) -> None:
    client = Raw(server.path)
    assert client.greeting == {"QMP": {"version": {"pyvduse": "9.8.7"}, "capabilities": []}}


@pytest.mark.parametrize("name", ["echo", "query-commands", "no-such-command"])
def test_commands_need_negotiation_first(server: ControlServer, name: str) -> None:
    client = Raw(server.path)
    reply = client.request({"execute": name, "id": 5})
    assert reply == {"id": 5, "error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    client.negotiate()
    assert client.request({"execute": "echo", "arguments": {"a": 1}}) == {"return": {"a": 1}}


@pytest.mark.parametrize("name", ["qmp_capabilities", "capabilities"])
def test_negotiation_once(server: ControlServer, name: str) -> None:
    client = Raw(server.path)
    assert client.request({"execute": name, "id": "n"}) == {"return": {}, "id": "n"}
    reply = client.request({"execute": "qmp_capabilities"})
    assert reply["error"]["class"] == "CommandNotFound"
    assert "already complete" in reply["error"]["desc"]


def test_negotiation_refuses_unknown_capabilities(server: ControlServer) -> None:
    client = Raw(server.path)
    reply = client.request({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert reply == {"error": {"class": "GenericError",
                               "desc": 'Capability "oob" is not available'}}
    reply = client.request({"execute": "qmp_capabilities", "arguments": {"bogus": 1}})
    assert reply["error"]["desc"] == "Parameter 'bogus' is unexpected"
    reply = client.request({"execute": "qmp_capabilities", "arguments": {"enable": []}})
    assert reply == {"return": {}}


@pytest.mark.parametrize(("line", "desc"), [
    (b'{"execute": ', "JSON parse error, "),
    (b"hello", "JSON parse error, "),
    (b'{"execute": "echo", "arguments": {"x": NaN}}', "JSON parse error, NaN is not"),
    (b"\xff\xfe{}", "JSON parse error, the request is not valid UTF-8"),
    (b"[" * 60000, "JSON parse error, "),
    (b'"qmp_capabilities"', "QMP input must be a JSON object"),
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 7}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "echo", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "echo", "exec-oob": 1}', "QMP input member 'exec-oob' is unexpected"),
])
def test_malformed_requests_get_generic_errors(server: ControlServer, line: bytes,
                                               desc: str) -> None:
    client = negotiated(server)
    client.send(line + b"\n")
    reply = client.reply()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc), reply
    assert client.request({"execute": "echo"}) == {"return": {}}


def test_unknown_command(server: ControlServer) -> None:
    client = negotiated(server)
    assert client.request({"execute": "frobnicate", "id": [1]}) == {"id": [1], "error": {
        "class": "CommandNotFound", "desc": "The command frobnicate has not been found"}}


@pytest.mark.parametrize("request_id", [0, "text", None, {"a": [1, 2]}, 1.5, False])
def test_id_is_echoed(server: ControlServer, request_id: Any) -> None:
    client = negotiated(server)
    assert client.request({"execute": "none", "id": request_id}) == {
        "return": {}, "id": request_id}
    assert client.request({"execute": "nope", "id": request_id})["id"] == request_id
    assert client.request({"id": request_id})["id"] == request_id
    assert client.request({"execute": "echo", "junk": 1, "id": request_id})["id"] == request_id


def test_no_id_no_id(server: ControlServer) -> None:
    client = negotiated(server)
    assert client.request({"execute": "echo", "arguments": {"k": "v"}}) == {"return": {"k": "v"}}


def test_handler_returns(server: ControlServer) -> None:
    client = negotiated(server)
    assert client.request({"execute": "none"}) == {"return": {}}
    assert client.request({"execute": "echo"}) == {"return": {}}  # arguments default to {}
    assert client.request({"execute": "echo", "arguments": {"é": "ü", "n": [1, None]}}) == {
        "return": {"é": "ü", "n": [1, None]}}


def test_command_error(server: ControlServer) -> None:
    client = negotiated(server)
    reply = client.request({"execute": "fail", "arguments": {"desc": "no export x"}, "id": 2})
    assert reply == {"error": {"class": "GenericError", "desc": "no export x"}, "id": 2}
    reply = client.request({"execute": "fail", "arguments": {"class": "DeviceNotFound"}})
    assert reply == {"error": {"class": "DeviceNotFound", "desc": "it failed"}}


def test_handler_bug_is_a_generic_error_and_logged(server: ControlServer,
                                                   logs: list[logging.LogRecord]) -> None:
    client = negotiated(server)
    assert client.request({"execute": "boom", "id": 1}) == {
        "error": {"class": "GenericError", "desc": "a bug in the handler"}, "id": 1}
    assert client.request({"execute": "big"})["error"]["desc"] == "'size'"  # a KeyError
    assert any(r.levelno == logging.ERROR and r.exc_info for r in logs)
    assert client.request({"execute": "echo", "arguments": {"still": "here"}}) == {
        "return": {"still": "here"}}


def test_library_errors_are_generic_errors_without_traceback(
        server: ControlServer, logs: list[logging.LogRecord]) -> None:
    client = negotiated(server)
    assert client.request({"execute": "refuse"}) == {
        "error": {"class": "GenericError", "desc": "size=12q is not a size"}}
    [record] = [r for r in logs if "refuse" in r.getMessage()]
    assert record.levelno == logging.WARNING and not record.exc_info


def test_result_that_is_not_json(server: ControlServer, logs: list[logging.LogRecord]) -> None:
    client = negotiated(server)
    reply = client.request({"execute": "not-json", "id": 3})
    assert reply["id"] == 3
    assert reply["error"]["desc"].startswith("command not-json returned a value that is not JSON")
    assert any("not JSON" in r.getMessage() for r in logs)


def test_query_commands(server: ControlServer) -> None:
    client = negotiated(server)
    names = [entry["name"] for entry in client.request({"execute": "query-commands"})["return"]]
    assert names == sorted(names)
    assert {"echo", "slow", "qmp_capabilities", "query-commands"} <= set(names)
    assert names == server.command_names


def test_blank_lines_and_crlf(server: ControlServer) -> None:
    client = negotiated(server)
    client.send(b"\n  \n\r\n" + b'{"execute": "echo", "arguments": {"a": 1}}\r\n')
    assert client.reply() == {"return": {"a": 1}}


def test_reserved_command_names_and_limits() -> None:
    with pytest.raises(ValueError, match="qmp_capabilities"):
        ControlServer("x", {"qmp_capabilities": lambda a: None}, version="1")
    with pytest.raises(ValueError, match="query-commands"):
        ControlServer("x", {"query-commands": lambda a: None}, version="1")
    with pytest.raises(ValueError, match="positive"):
        ControlServer("x", {}, version="1", max_clients=0)


# -- events ----------------------------------------------------------------------------


def test_events_reach_negotiated_clients_only(server: ControlServer) -> None:
    fresh = Raw(server.path)
    ready = negotiated(server)
    before = time.time()
    server.emit("EXPORT_ADDED", {"name": "vduse1"})
    event = ready.message()
    assert event["event"] == "EXPORT_ADDED"
    assert event["data"] == {"name": "vduse1"}
    stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
    assert before - 1 <= stamp <= time.time() + 1
    assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
    server.emit("NO_DATA")
    assert ready.message()["data"] == {}
    # the fresh client got nothing: its next message is the reply to its request
    assert fresh.request({"execute": "qmp_capabilities", "id": "x"}) == {
        "return": {}, "id": "x"}
    server.emit("LATER", {})
    assert fresh.message()["event"] == "LATER"


def test_event_from_a_handler_comes_before_its_reply(
        make_server: Callable[..., ControlServer]) -> None:
    holder: list[ControlServer] = []

    def add(arguments: dict[str, Any]) -> Any:
        holder[0].emit("ADDED", {"n": 1})
        return {}

    server = make_server(commands={"add": add})
    holder.append(server)
    client = negotiated(server)
    client.send(b'{"execute": "add", "id": 1}\n')
    assert client.message()["event"] == "ADDED"
    assert client.message() == {"return": {}, "id": 1}


def test_events_with_data_that_is_not_json_are_dropped(
        server: ControlServer, logs: list[logging.LogRecord]) -> None:
    client = negotiated(server)
    server.emit("BAD", {"x": object()})
    server.emit("BAD", {"x": float("nan")})
    server.emit("GOOD", {"x": 1})
    assert client.message()["event"] == "GOOD"
    assert sum("BAD dropped" in r.getMessage() for r in logs) == 2


def test_emit_outside_the_running_state_does_nothing(tmp_path: Path) -> None:
    server = ControlServer(str(tmp_path / "s"), {}, version="1")
    server.emit("BEFORE", {})
    server.start()
    server.close()
    server.emit("AFTER", {})


def test_a_client_that_does_not_read_is_dropped_and_others_carry_on(
        make_server: Callable[..., ControlServer], logs: list[logging.LogRecord]) -> None:
    server = make_server(max_output_bytes=64 * 1024)
    lazy = negotiated(server)
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    busy = negotiated(server)
    payload = {"blob": "y" * 1000}
    emitted = 0
    started = time.monotonic()
    while server.client_count == 2:
        assert time.monotonic() - started < TIMEOUT, "the lazy client was never dropped"
        for _ in range(20):
            server.emit("FLOOD", payload)  # never blocks
        emitted += 20
        for _ in range(20):
            assert busy.message()["event"] == "FLOOD"
    assert emitted > 64  # the socket buffers took some, the limit the rest
    assert busy.request({"execute": "echo", "arguments": {"ok": 1}}) == {"return": {"ok": 1}}
    assert lazy.at_eof()
    assert any("not taken by the client" in r.getMessage() for r in logs)
    server.emit("AFTER", {})
    assert busy.message()["event"] == "AFTER"


def test_emit_does_not_wait_for_clients(make_server: Callable[..., ControlServer]) -> None:
    server = make_server(max_output_bytes=16 << 20)
    clients = [negotiated(server) for _ in range(4)]
    started = time.monotonic()
    for _ in range(2000):
        server.emit("FAST", {"blob": "z" * 2000})
    assert time.monotonic() - started < 5
    assert all(client.message()["event"] == "FAST" for client in clients)


# -- concurrency -------------------------------------------------------------------------


def test_a_slow_command_does_not_hold_up_other_clients(server: ControlServer,
                                                       slow: Slow) -> None:
    first = negotiated(server)
    first.send(b'{"execute": "slow", "arguments": {"n": 1}, "id": "slow"}\n')
    assert slow.started.wait(TIMEOUT)
    second = negotiated(server)
    assert second.request({"execute": "echo", "arguments": {"i": 2}}) == {"return": {"i": 2}}
    third = Raw(server.path)  # connecting and negotiating work meanwhile too
    third.negotiate()
    slow.release.set()
    assert first.reply() == {"return": {"slow": 1}, "id": "slow"}


def test_one_clients_commands_are_answered_in_order(server: ControlServer, slow: Slow) -> None:
    client = negotiated(server)
    client.send(b'{"execute": "slow", "id": 1}\n{"execute": "echo", "id": 2}\n'
                b'garbage\n{"execute": "none", "id": 4}\n')
    assert slow.started.wait(TIMEOUT)
    time.sleep(0.1)
    slow.release.set()
    assert client.reply()["id"] == 1
    assert client.reply()["id"] == 2
    assert "JSON parse error" in client.reply()["error"]["desc"]
    assert client.reply()["id"] == 4


def test_many_pipelined_requests(make_server: Callable[..., ControlServer]) -> None:
    server = make_server(max_queued_requests=4)
    client = negotiated(server)
    client.send(b"".join(b'{"execute": "echo", "arguments": {"i": %d}, "id": %d}\n' % (i, i)
                         for i in range(500)))
    for i in range(500):
        assert client.reply() == {"return": {"i": i}, "id": i}


def test_a_client_that_stops_sending_still_gets_its_replies(server: ControlServer) -> None:
    client = Raw(server.path)
    client.send(b'{"execute": "qmp_capabilities"}\n{"execute": "echo", "id": 9}\n'
                b'{"execute": "half')
    client.sock.shutdown(socket.SHUT_WR)
    assert client.reply() == {"return": {}}
    assert client.reply() == {"return": {}, "id": 9}
    assert client.at_eof()
    wait_until(lambda: server.client_count == 0)


# -- hostile clients ---------------------------------------------------------------------


def test_garbage(server: ControlServer) -> None:
    client = negotiated(server)
    client.send(random.Random(7).randbytes(200_000) + b'\n{"execute": "echo", "id": "end"}\n')
    while True:
        reply = client.reply()
        if reply.get("id") == "end":
            break
        assert reply["error"]["class"] == "GenericError"
    assert reply == {"return": {}, "id": "end"}


@pytest.mark.parametrize("chunks", [
    [b"a" * 100_000 + b"\n"],  # in one piece
    [b"[" * 70_000, b"]" * 70_000, b"\n"],  # arriving in parts
    [b"a" * 1_000_000, b"\n"],  # much longer than the limit
])
def test_an_overlong_line_is_refused_and_skipped(server: ControlServer,
                                                 chunks: list[bytes]) -> None:
    client = negotiated(server)
    for chunk in chunks:
        client.send(chunk)
    client.send(b'{"execute": "echo", "id": 1}\n')
    reply = client.reply()
    assert reply == {"error": {"class": "GenericError", "desc": (
        "request line longer than 65536 bytes; the line was skipped")}}
    assert client.reply() == {"return": {}, "id": 1}


def test_a_line_at_the_limit_is_taken(server: ControlServer) -> None:
    client = negotiated(server)
    request = b'{"execute": "echo", "arguments": {"s": "'
    request += b"s" * (65536 - len(request) - 3) + b'"}}'
    assert len(request) == 65536
    client.send(request + b"\n")
    assert len(client.reply()["return"]["s"]) > 65000


def test_disconnect_mid_line(server: ControlServer) -> None:
    client = negotiated(server)
    client.send(b'{"execute": "ec')
    client.close()
    wait_until(lambda: server.client_count == 0)
    assert negotiated(server).request({"execute": "echo"}) == {"return": {}}


def test_disconnect_mid_reply(server: ControlServer) -> None:
    client = negotiated(server)
    client.send(b'{"execute": "big", "arguments": {"size": 8000000}}\n')
    client.close()
    wait_until(lambda: server.client_count == 0)
    assert negotiated(server).request({"execute": "echo"}) == {"return": {}}


def test_a_reply_larger_than_the_output_limit_reaches_a_reading_client(
        make_server: Callable[..., ControlServer]) -> None:
    server = make_server(max_output_bytes=4096)
    client = negotiated(server)
    reply = client.request({"execute": "big", "arguments": {"size": 100_000}})
    assert reply == {"return": "x" * 100_000}


def test_clients_that_send_nothing_do_not_hinder_others(server: ControlServer) -> None:
    idle = [Raw(server.path) for _ in range(10)]
    silent = [Raw(server.path, greet=False) for _ in range(10)]
    active = negotiated(server)
    assert active.request({"execute": "echo"}) == {"return": {}}
    wait_until(lambda: server.client_count == 21)
    for client in [*idle, *silent, active]:
        client.close()
    wait_until(lambda: server.client_count == 0)


def test_too_many_clients(make_server: Callable[..., ControlServer],
                          logs: list[logging.LogRecord]) -> None:
    server = make_server(max_clients=3)
    clients = [Raw(server.path) for _ in range(3)]
    extra = Raw(server.path, greet=False)
    assert extra.message() == {"error": {"class": "GenericError",
                                         "desc": "too many control clients (at most 3)"}}
    assert extra.at_eof()
    assert any("too many clients" in r.getMessage() for r in logs)
    clients[0].close()
    wait_until(lambda: server.client_count == 2)
    assert negotiated(server).request({"execute": "echo"}) == {"return": {}}
    for client in clients[1:]:
        client.negotiate()


def test_default_client_limit(server: ControlServer) -> None:
    clients = [Raw(server.path) for _ in range(64)]
    extra = Raw(server.path, greet=False)
    assert "too many" in extra.message()["error"]["desc"]
    clients[-1].negotiate()


# -- check_arguments ---------------------------------------------------------------------


def test_check_arguments() -> None:
    check_arguments({"name": "a", "size": 4}, {"name": str}, {"size": int, "ro": bool})
    check_arguments({"ratio": 1}, optional={"ratio": float})
    check_arguments({"v": None}, optional={"v": (str, type(None))})
    with pytest.raises(CommandError, match="Parameter 'name' is missing"):
        check_arguments({}, {"name": str})
    with pytest.raises(CommandError, match="Parameter 'extra' is unexpected"):
        check_arguments({"extra": 1})
    with pytest.raises(CommandError,
                       match=r"Invalid parameter type for 'size', expected: integer$"):
        check_arguments({"size": True}, optional={"size": int})
    with pytest.raises(CommandError, match="expected: string or integer"):
        check_arguments({"x": 1.5}, optional={"x": (str, int)})


# -- the socket file ---------------------------------------------------------------------


def test_socket_mode_is_0600_whatever_the_umask(tmp_path: Path,
                                                make_server: Callable[..., ControlServer]
                                                ) -> None:
    old = os.umask(0)
    try:
        server = make_server()
    finally:
        os.umask(old)
    info = os.lstat(server.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert os.listdir(tmp_path) == ["ctl.sock"]  # no temporary directory left


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       make_server: Callable[..., ControlServer]) -> None:
    monkeypatch.chdir(tmp_path)
    server = make_server(Path("rel.sock"))
    assert negotiated(server).request({"execute": "echo"}) == {"return": {}}
    assert os.listdir(tmp_path) == ["rel.sock"]


def test_a_stale_socket_is_replaced(tmp_path: Path,
                                    make_server: Callable[..., ControlServer]) -> None:
    path = tmp_path / "ctl.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens
    server = make_server(path)
    assert negotiated(server).request({"execute": "echo"}) == {"return": {}}


def test_a_live_socket_is_not_taken_over(tmp_path: Path,
                                         make_server: Callable[..., ControlServer]) -> None:
    first = make_server()
    second = ControlServer(first.path, {}, version="1")
    with pytest.raises(PyvduseError,
                       match=f"control socket {first.path} is in use by another process"):
        second.start()
    second.close()
    assert negotiated(first).request({"execute": "echo"}) == {"return": {}}
    assert os.listdir(tmp_path) == ["ctl.sock"]


def test_a_listener_with_a_full_backlog_counts_as_live(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    waiting = []
    try:
        for _ in range(3):  # fill the backlog: nobody accepts
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                pass
            waiting.append(client)
        with pytest.raises(PyvduseError, match="in use by another process"):
            ControlServer(str(path), {}, version="1").start()
    finally:
        for client in waiting:
            client.close()
        listener.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ctl.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere")
    server = ControlServer(str(path), {}, version="1")
    with pytest.raises(PyvduseError, match=f"control socket {path} exists and is not a socket"):
        server.start()
    if kind == "file":
        assert path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["ctl.sock"]


def test_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(PyvduseError, match="longer than 107 bytes"):
        ControlServer(str(tmp_path / ("x" * 200)), {}, version="1").start()
    with pytest.raises(PyvduseError, match="cannot create a temporary directory"):
        ControlServer(str(tmp_path / "missing" / "s"), {}, version="1").start()


def test_close_removes_the_socket_and_is_idempotent(server: ControlServer) -> None:
    client = negotiated(server)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1
    assert not os.path.exists(server.path)
    assert client.at_eof()
    server.close()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        Raw(server.path)
    with pytest.raises(RuntimeError):
        server.start()


def test_close_is_bounded_while_a_command_hangs(server: ControlServer, slow: Slow) -> None:
    client = negotiated(server)
    client.send(b'{"execute": "slow"}\n{"execute": "echo"}\n')
    assert slow.started.wait(TIMEOUT)
    started = time.monotonic()
    server.close(timeout=0.3)
    assert time.monotonic() - started < 2
    assert not os.path.exists(server.path)
    assert client.at_eof()
    slow.release.set()  # its reply goes nowhere


def test_close_delivers_the_reply_of_a_running_command(
        make_server: Callable[..., ControlServer]) -> None:
    asked = threading.Event()

    def quit_(arguments: dict[str, Any]) -> Any:
        asked.set()
        time.sleep(0.2)  # the main thread is closing meanwhile
        return {}

    server = make_server(commands={"quit": quit_})
    client = negotiated(server)
    client.send(b'{"execute": "quit", "id": "q"}\n{"execute": "echo", "id": "late"}\n')
    assert asked.wait(TIMEOUT)
    server.close()
    assert client.reply() == {"return": {}, "id": "q"}
    assert client.at_eof()  # the request queued behind it is dropped unanswered


def test_close_from_a_command(make_server: Callable[..., ControlServer]) -> None:
    holder: list[ControlServer] = []

    def stop(arguments: dict[str, Any]) -> Any:
        holder[0].close()
        return {}

    server = make_server(commands={"stop": stop})
    holder.append(server)
    client = negotiated(server)
    client.send(b'{"execute": "stop"}\n')
    assert client.at_eof()
    assert not os.path.exists(server.path)
    server.close()


def test_close_leaves_a_successors_socket_alone(server: ControlServer) -> None:
    os.unlink(server.path)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(server.path)
    try:
        server.close()
        assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    finally:
        successor.close()


def test_close_before_start_and_context_manager(tmp_path: Path) -> None:
    ControlServer(str(tmp_path / "a"), {}, version="1").close()
    with ControlServer(str(tmp_path / "b"), {"echo": lambda a: a}, version="1") as server:
        assert negotiated(server).request({"execute": "echo"}) == {"return": {}}
    assert not (tmp_path / "b").exists()
