"""A client of the daemon's control socket, and the ``pyvduse ctl`` command.

:class:`ControlClient` speaks the protocol of :mod:`pyvduse.control` (see
``docs/control.md``)::

    with ControlClient("/run/pyvduse.sock") as client:
        exports = client.execute("query-exports")

``pyvduse ctl SOCKET COMMAND [key=value ...]`` runs one command and prints its
result; ``pyvduse ctl --events SOCKET`` prints events as they come.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from pyvduse.control import CommandError
from pyvduse.errors import PyvduseError

DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


class ControlError(PyvduseError):
    """The control connection failed: no daemon, timeout, closed, or a message that
    breaks the protocol. (A command's error reply is a :class:`CommandError`.)"""


class ControlClient:
    """One connection to a control socket.

    ``timeout`` (seconds, ``None`` for no limit) bounds the connection and each
    wait for a reply. :meth:`connect` (or ``with``) connects, reads the greeting
    and, unless told otherwise, negotiates capabilities. Events that arrive while
    :meth:`execute` waits for its reply are kept in :attr:`events` for
    :meth:`next_event`.
    """

    def __init__(self, path: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque()
        self._sock: socket.socket | None = None
        self._inbuf = bytearray()
        self._next_id = 0

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self, *, negotiate: bool = True) -> dict[str, Any]:
        """Connect, read the greeting (returned, and kept in :attr:`greeting`) and,
        if ``negotiate``, send ``qmp_capabilities``. Raises :class:`ControlError`."""
        if self._sock is not None:
            raise ControlError(f"{self.path}: already connected")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except TimeoutError:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: timed out after "
                               f"{self.timeout:g} s") from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: connection refused "
                               "(is the daemon running?)") from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: "
                               f"{exc.strerror or exc}") from None
        self._sock = sock
        try:
            greeting = self._read_message(self._deadline())
            if "error" in greeting:
                raise ControlError(f"{self.path}: the daemon refused the connection: "
                                   f"{_error_text(greeting)}")
            if not isinstance(greeting.get("QMP"), dict):
                raise ControlError(f"{self.path}: no greeting from the daemon (not a "
                                   "pyvduse control socket?)")
            self.greeting = greeting
            if negotiate:
                self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return greeting

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._inbuf.clear()

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, /,
                **kwargs: Any) -> Any:
        """Run command ``name``; return its reply's ``return`` value.

        The arguments are ``arguments`` updated with ``kwargs`` (use the mapping for
        names that are no Python identifiers, like ``read-only``). Raises
        :class:`CommandError` for an error reply, :class:`ControlError` if the
        connection fails or the reply does not come within the timeout.
        """
        merged = {**(arguments or {}), **kwargs}
        self._next_id += 1
        request: dict[str, Any] = {"execute": name, "id": self._next_id}
        if merged:
            request["arguments"] = merged
        reply = self.request(request)
        if "error" in reply:
            error = reply["error"]
            if not isinstance(error, dict):
                raise ControlError(f"{self.path}: malformed error reply: {reply}")
            raise CommandError(str(error.get("desc", "")),
                               str(error.get("class", "GenericError")))
        return reply["return"]

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request object as it is and return the whole reply object
        (``return`` or ``error``), keeping the events that come before it.
        Raises :class:`ControlError`."""
        self.send_line(json.dumps(message, separators=(",", ":")).encode())
        deadline = self._deadline()
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "return" not in reply and "error" not in reply:
                raise ControlError(f"{self.path}: unexpected message from the daemon: {reply}")
            if reply.get("id") != message.get("id"):
                raise ControlError(f"{self.path}: reply to another request: {reply}")
            return reply

    def send_line(self, data: bytes) -> None:
        """Send ``data`` and a ``\\n`` as they are (no check). Raises :class:`ControlError`."""
        sock = self._connected()
        try:
            sock.sendall(data + b"\n")
        except TimeoutError:
            raise ControlError(f"{self.path}: timed out sending to the daemon") from None
        except OSError as exc:
            self.close()
            raise ControlError(f"{self.path}: connection lost: {exc.strerror or exc}") from None

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event (already received or arriving within ``timeout`` seconds,
        ``None``: no limit), or ``None`` if none came. Raises :class:`ControlError`
        (the daemon closed the connection, or sent something else than an event)."""
        if self.events:
            return self.events.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            message = self._read_message(deadline)
        except _Timeout:
            return None
        if "event" not in message:
            raise ControlError(f"{self.path}: unexpected message from the daemon: {message}")
        return message

    # -- receiving -------------------------------------------------------------------

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise ControlError(f"{self.path}: not connected")
        return self._sock

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _read_message(self, deadline: float | None) -> dict[str, Any]:
        """The next message (a JSON object on a line) arriving before ``deadline``
        (``time.monotonic()`` value, ``None``: no limit); :class:`_Timeout` after it."""
        sock = self._connected()
        while True:
            end = self._inbuf.find(b"\n")
            if end >= 0:
                line = bytes(self._inbuf[:end])
                del self._inbuf[:end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line.decode("utf-8"))
                except ValueError:
                    raise ControlError(f"{self.path}: the daemon sent something else "
                                       f"than JSON: {line[:200]!r}") from None
                if not isinstance(message, dict):
                    raise ControlError(f"{self.path}: the daemon sent a JSON value that "
                                       f"is not an object: {line[:200]!r}")
                return message
            if len(self._inbuf) > MAX_MESSAGE_BYTES:
                raise ControlError(f"{self.path}: a message from the daemon is longer "
                                   f"than {MAX_MESSAGE_BYTES} bytes")
            if deadline is None:
                sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout(f"{self.path}: timed out after {self.timeout:g} s "
                                   "waiting for the daemon")
                sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue  # the deadline check above raises
            except OSError as exc:
                self.close()
                raise ControlError(f"{self.path}: connection lost: "
                                   f"{exc.strerror or exc}") from None
            if not data:
                self.close()
                raise ControlError(f"{self.path}: the daemon closed the connection")
            self._inbuf += data


class _Timeout(ControlError):
    """No message within the time allowed."""


def _error_text(reply: Mapping[str, Any]) -> str:
    error = reply.get("error")
    if isinstance(error, dict):
        return f"{error.get('class', 'GenericError')}: {error.get('desc', '')}"
    return str(error)


# -- the command line ----------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``key=value`` value as sent: ``true``/``false`` as booleans, a decimal
    integer (no leading zeros, optional ``-``) as an integer, anything else as the string."""
    if text == "true":
        return True
    if text == "false":
        return False
    if _INTEGER.fullmatch(text):
        return int(text)
    return text


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, parse_value(value)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--json: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--json: not a JSON object")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def build_arguments(json_arguments: Mapping[str, Any] | None,
                    pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The ``arguments`` object: ``json_arguments`` updated with the ``key=value``
    pairs (a pair wins over the same key in ``--json``). ``ValueError`` if a key is
    given twice as a pair."""
    arguments = dict(json_arguments or {})
    seen: set[str] = set()
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"argument {key!r} given twice")
        seen.add(key)
        arguments[key] = value
    return arguments


def add_ctl_parser(subparsers: Any) -> None:
    """Add the ``ctl`` subcommand to ``subparsers`` (what ``add_subparsers()`` returned).

    The parsed namespace gets ``run=run_ctl`` and ``log_level="warning"`` as
    defaults, for a ``main`` that dispatches on ``args.run`` and sets up logging
    from ``args.log_level``.
    """
    ctl = subparsers.add_parser(
        "ctl", help="run a command on a daemon's control socket",
        description="Run COMMAND on the control socket SOCKET of a running 'pyvduse serve' "
        "and print its result as JSON; or, with --events, print the daemon's events.",
        epilog="Values of key=value are sent as JSON booleans (true, false), integers "
        "(decimal) or else strings; --json gives the arguments as one JSON object (key=value "
        "pairs override its keys). Examples: 'pyvduse ctl /run/pyvduse.sock query-exports', "
        "'pyvduse ctl /run/pyvduse.sock export-del id=vduse1', "
        "'pyvduse ctl --events /run/pyvduse.sock'. Exit status: 0 success, 1 error reply or "
        "connection failure, 2 usage.")
    ctl.add_argument("--human", action="store_true",
                     help="print the result for people: lists of objects as tables, "
                     "objects as 'key: value' lines")
    ctl.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help="give up on connecting or on a reply after SECONDS (default: "
                     "%(default)g; 0: wait as long as it takes)")
    ctl.add_argument("--json", type=_json_object, metavar="ARGS_JSON", dest="json_arguments",
                     help="the command's arguments as a JSON object")
    ctl.add_argument("--events", action="store_true",
                     help="instead of a command, print events (one JSON object a line) "
                     "until the daemon goes away or SIGINT")
    ctl.add_argument("socket", metavar="SOCKET", help="the daemon's control socket")
    ctl.add_argument("ctl_command", metavar="COMMAND", nargs="?", help="command name")
    ctl.add_argument("pairs", metavar="key=value", nargs="*", type=_key_value,
                     help="command arguments")
    ctl.set_defaults(run=run_ctl, log_level="warning")


def run_ctl(args: argparse.Namespace, *, stdout: TextIO | None = None,
            stderr: TextIO | None = None) -> int:
    """Run ``pyvduse ctl`` with the namespace :func:`add_ctl_parser`'s parser made;
    return the exit status (0, 1 error reply or connection failure, 2 usage)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def fail(message: str, status: int = EXIT_FAILURE) -> int:
        print(f"pyvduse ctl: error: {message}", file=err)
        return status

    if args.events and (args.ctl_command is not None or args.pairs or args.json_arguments):
        return fail("--events takes no COMMAND nor arguments", EXIT_USAGE)
    if not args.events and args.ctl_command is None:
        return fail("a COMMAND (or --events) is required", EXIT_USAGE)
    try:
        arguments = build_arguments(args.json_arguments, args.pairs)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    client = ControlClient(args.socket, timeout=args.timeout or None)
    try:
        client.connect()
        if args.events:
            return _stream_events(client, args.human, out)
        value = client.execute(args.ctl_command, arguments)
    except CommandError as exc:
        return fail(f"{exc.error_class}: {exc.desc}")
    except ControlError as exc:
        return fail(str(exc))
    finally:
        client.close()
    text = render_human(value) if args.human else json.dumps(value, indent=2)
    if text:
        print(text, file=out)
    return EXIT_OK


def _stream_events(client: ControlClient, human: bool, out: TextIO) -> int:
    """Print events until the connection ends (an error) or SIGINT (success)."""
    try:
        while True:
            event = client.next_event()
            if event is None:
                continue
            print(render_event(event) if human else json.dumps(event), file=out, flush=True)
    except KeyboardInterrupt:
        return EXIT_OK


# -- human rendering -----------------------------------------------------------------


def _cell(value: Any) -> str:
    """A value in running text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def render_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned table: one column per key (in order of first appearance),
    a header line of the keys, ``-`` where a row lacks a key."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    cells = [columns] + [[_cell(row[key]) if key in row else "-" for key in columns]
                         for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths,
                                                                        strict=True)).rstrip()
                     for line in cells)


def render_human(value: Any) -> str:
    """``value`` for people: a list of objects as a table (:func:`render_table`), any
    other list one item a line, an object as ``key: value`` lines, a scalar as it is
    (strings unquoted); nested values as compact JSON; an empty list as ``(none)``,
    an empty object (what commands without a result return) as nothing."""
    if isinstance(value, list):
        if not value:
            return "(none)"
        if all(isinstance(item, dict) for item in value):
            return render_table(value)
        return "\n".join(_cell(item) for item in value)
    if isinstance(value, dict):
        return "\n".join(f"{key}: {_cell(item)}" for key, item in value.items())
    return _cell(value)


def render_event(event: Mapping[str, Any]) -> str:
    """An event on one line: local time, name, then ``key=value`` for each data item."""
    stamp = event.get("timestamp")
    when = ""
    if isinstance(stamp, dict):
        try:
            seconds = float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
            when = datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="milliseconds")
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            when = ""
    data = event.get("data")
    items = [f"{key}={_cell(item)}" for key, item in data.items()] \
        if isinstance(data, dict) else []
    return " ".join(part for part in (when, str(event.get("event")), *items) if part)
