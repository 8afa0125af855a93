"""The daemon's control socket: a QMP-shaped JSON protocol on a UNIX stream socket.

Each message is one JSON object on one line (UTF-8, ending in ``\\n``); see
``docs/control.md`` for the protocol as a client sees it. In short::

    S: {"QMP": {"version": {"pyvduse": "0.1.0"}, "capabilities": []}}
    C: {"execute": "qmp_capabilities"}
    S: {"return": {}}
    C: {"execute": "query-exports", "id": 1}
    S: {"return": [...], "id": 1}
    S: {"event": "EXPORT_DELETED", "data": {...}, "timestamp": {...}}

:class:`ControlServer` serves the socket on one I/O thread (``selectors``,
non-blocking sockets) and runs the commands of each client on a worker thread
of that client, started when a request arrives and ended when the client's
queue is empty: a slow command holds up the later commands of its own client
only, and every client's replies come in the order of its requests.

Nothing a client sends can stop the daemon: malformed input gets an error
reply, and every per-client resource is bounded (see :class:`ControlServer`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pyvduse.errors import PyvduseError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]
"""A command: called with the request's ``arguments`` object (``{}`` when absent) on a
worker thread; returns the reply's ``return`` value (JSON-serialisable; ``None`` stands
for ``{}``). It fails by raising :class:`CommandError` (the reply carries its class and
text), any other :class:`PyvduseError` (a ``GenericError`` with its text, logged as a
warning) or any other exception (a ``GenericError`` with its text, logged with the
traceback as the bug it is)."""

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

CAPABILITIES_COMMANDS = ("qmp_capabilities", "capabilities")
QUERY_COMMANDS = "query-commands"
RESERVED_COMMANDS = (*CAPABILITIES_COMMANDS, QUERY_COMMANDS)

DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_MAX_QUEUED_REQUESTS = 16
DEFAULT_CLOSE_TIMEOUT = 2.0

_REQUEST_KEYS = ("execute", "arguments", "id")
_RECV_BYTES = 64 * 1024
_SEND_BYTES = 256 * 1024
_LISTEN_BACKLOG = 16
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class CommandError(PyvduseError):
    """A command failed: the client gets ``{"error": {"class": error_class, "desc": desc}}``.

    Command handlers raise it for every failure the client should see as such
    (bad arguments, no such export, ...); the client side
    (:class:`pyvduse.ctl.ControlClient`) raises it for an error reply.
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        self.desc = desc
        self.error_class = error_class
        super().__init__(desc)


_TYPE_NAMES: dict[type, str] = {
    bool: "boolean", int: "integer", float: "number", str: "string",
    list: "array", dict: "object",
}


def _type_matches(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    for kind in types:
        if kind is int and isinstance(value, bool):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return True
        if isinstance(value, kind):
            return True
    return False


def check_arguments(arguments: Mapping[str, Any],
                    required: Mapping[str, type | tuple[type, ...]] | None = None,
                    optional: Mapping[str, type | tuple[type, ...]] | None = None) -> None:
    """Check a command's arguments against the names and JSON types it takes.

    ``required`` and ``optional`` map each argument name to the Python type(s)
    of its value: ``int`` (a JSON integer, not a boolean), ``float`` (any JSON
    number), ``str``, ``bool``, ``list``, ``dict``. Raises :class:`CommandError`
    (``GenericError``) naming the first missing, unexpected or mistyped argument.
    """
    required = required or {}
    optional = optional or {}
    for name in required:
        if name not in arguments:
            raise CommandError(f"Parameter '{name}' is missing")
    for name, value in arguments.items():
        expected = required.get(name, optional.get(name))
        if expected is None:
            raise CommandError(f"Parameter '{name}' is unexpected")
        if not _type_matches(value, expected):
            kinds = expected if isinstance(expected, tuple) else (expected,)
            names = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
            raise CommandError(f"Invalid parameter type for '{name}', expected: {names}")


def _encode(message: Mapping[str, Any]) -> bytes:
    """One protocol line: compact ASCII JSON and ``\\n``; ``ValueError``/``TypeError`` if
    ``message`` is not JSON (NaN and infinities are not)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _error(desc: str, error_class: str = GENERIC_ERROR) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_OVERLONG = object()
"""Queued in place of a request line longer than the limit."""


class _Client:
    """One connection; every field but those of the I/O thread is guarded by the server lock."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        # I/O thread only
        self.inbuf = bytearray()
        self.discarding = False  # skipping the rest of an over-long line
        self.eof = False
        self.registered = 0  # selector events
        # server lock
        self.outbuf = bytearray()
        self.queue: deque[object] = deque()
        self.worker: threading.Thread | None = None
        self.negotiated = False
        self.dropped = ""  # why the I/O thread must close it
        self.closed = False

    def __repr__(self) -> str:
        return f"control client {self.number}"


class ControlServer:
    """Serves ``commands`` on a UNIX stream socket at ``path``.

    ``commands`` maps command names to handlers (see :data:`Handler`); the
    server itself implements ``qmp_capabilities`` (alias ``capabilities``) and
    ``query-commands``, which ``commands`` must not contain. Handlers run on
    worker threads, one command at a time per client, several clients at once.

    Limits, each per client unless said otherwise:

    * ``max_clients`` connections in all (default 64); one more is sent an error
      object (``{"error": {"class": "GenericError", "desc": ...}}``, no greeting)
      and closed.
    * ``max_line_bytes`` per request line (default 64 KiB, without the ``\\n``): a
      longer line is answered with a ``GenericError`` and skipped up to its ``\\n``;
      the connection stays open.
    * ``max_queued_requests`` requests waiting for their turn (default 16): beyond
      that the server stops reading the client until its commands catch up.
    * ``max_output_bytes`` of replies and events not yet taken by the client
      (default 1 MiB): a client whose backlog would grow past it is disconnected
      (one message larger than the limit is still sent to a client that has taken
      everything before it).

    A client that closes its sending side still gets the replies to the requests
    it sent; a request line cut short by the end of the stream is ignored.
    """

    def __init__(self, path: str, commands: Mapping[str, Handler], *, version: str,
                 max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS) -> None:
        reserved = sorted(set(commands) & set(RESERVED_COMMANDS))
        if reserved:
            raise ValueError(f"commands implemented by the server itself: {reserved}")
        if min(max_clients, max_line_bytes, max_output_bytes, max_queued_requests) < 1:
            raise ValueError("every limit must be positive")
        self.path = path
        self.version = version
        self.max_clients = max_clients
        self.max_line_bytes = max_line_bytes
        self.max_output_bytes = max_output_bytes
        self.max_queued_requests = max_queued_requests
        self._commands = dict(commands)
        self._lock = threading.Lock()
        self._clients: list[_Client] = []
        self._numbers = 0
        self._state = "new"  # new, running, closing, closed
        self._close_deadline = 0.0
        self._closer: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """How many connections are open (including ones still being answered after
        the client stopped sending)."""
        with self._lock:
            return len(self._clients)

    @property
    def command_names(self) -> list[str]:
        """The names ``query-commands`` lists, sorted (the built-in ones included)."""
        return sorted({*self._commands, *RESERVED_COMMANDS})

    def start(self) -> None:
        """Create the socket at :attr:`path` and serve it on a new thread.

        The socket file has mode 0600 from its first moment at ``path``: it is
        bound in a fresh mode-0700 directory next to ``path``, made 0600 and
        renamed into place (the process umask is not touched). A stale socket at
        ``path`` (nobody accepts connections on it) is replaced. Raises
        :class:`PyvduseError` if another process listens at ``path``, if ``path``
        exists and is not a socket, or if the socket cannot be created.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"control server is {self._state}, it cannot start")
            self._state = "starting"
        try:
            self._check_path()
            listener = self._bind()
            self._listener = listener
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector.register(listener, selectors.EVENT_READ)
            self._selector.register(self._wake_r, selectors.EVENT_READ)
        except BaseException:
            self._release()
            with self._lock:
                self._state = "closed"
            raise
        thread = threading.Thread(target=self._run, name="pyvduse-control", daemon=True)
        with self._lock:
            closed_meanwhile = self._state != "starting"
            if not closed_meanwhile:
                self._state = "running"
                self._thread = thread
        if closed_meanwhile:
            self._release()
            raise PyvduseError(f"control socket {self.path}: closed while starting")
        thread.start()
        log.debug("control socket %s ready", self.path)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Stop serving, close every connection and remove the socket file.

        New connections are refused at once. For up to ``timeout`` seconds the
        server lets commands already running finish and sends what it owes its
        clients (a ``quit`` handler should therefore only tell the main thread
        to stop: the main thread's ``close()`` then delivers ``quit``'s reply);
        requests still queued are dropped unanswered. A command still running
        after that has its reply discarded. Returns within about ``timeout``
        seconds; safe to call more than once, from any thread, also from a
        command handler (that command's own reply is lost).
        """
        with self._lock:
            state = self._state
            if state in ("new", "starting"):
                self._state = "closed"
                return
            if state == "running":
                self._state = "closing"
                self._close_deadline = time.monotonic() + max(0.0, timeout)
                self._closer = threading.current_thread()
        if state == "running":
            self._unlink()
            self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, self._close_deadline - time.monotonic()) + 1.0)
            if thread.is_alive():  # not expected: the I/O thread watches the deadline
                log.warning("control socket %s: the I/O thread did not stop", self.path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- events ----------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every client that completed capabilities negotiation.

        Callable from any thread; never waits for a client (the message is queued
        for the I/O thread; a client over its output limit is disconnected).
        ``data`` that is not JSON-serialisable is logged as an error and the event
        dropped. Does nothing unless the server is running.
        """
        now = time.time()
        seconds = int(now)
        message = {"event": event, "data": dict(data or {}),
                   "timestamp": {"seconds": seconds,
                                 "microseconds": int((now - seconds) * 1_000_000)}}
        try:
            line = _encode(message)
        except (TypeError, ValueError) as exc:
            log.error("control event %s dropped: its data is not JSON: %s", event, exc)
            return
        with self._lock:
            if self._state != "running":
                return
            for client in self._clients:
                if client.negotiated:
                    self._queue_output(client, line)
        self._wake()

    # -- socket file -----------------------------------------------------------------

    def _check_path(self) -> None:
        """Refuse a ``path`` in use or not a socket; remove nothing yet."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PyvduseError(f"control socket {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise PyvduseError(f"control socket {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.setblocking(False)
            probe.connect(self.path)
        except ConnectionRefusedError:
            return  # stale: replaced by the rename in _bind
        except FileNotFoundError:
            return
        except BlockingIOError:
            pass  # a listener with a full backlog
        except OSError as exc:
            raise PyvduseError(f"control socket {self.path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise PyvduseError(f"control socket {self.path} is in use by another process")

    def _bind(self) -> socket.socket:
        """A listening socket at :attr:`path`, mode 0600, bound privately and renamed there."""
        if len(os.fsencode(self.path)) > _UNIX_PATH_MAX:
            raise PyvduseError(f"control socket {self.path}: path longer than "
                               f"{_UNIX_PATH_MAX} bytes")
        private = self._private_directory()
        temp = os.path.join(private, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if len(os.fsencode(temp)) > _UNIX_PATH_MAX:
                raise PyvduseError(f"control socket {self.path}: its directory's path is "
                                   "too long to bind a socket in it; choose a shorter path")
            listener.bind(temp)
            os.chmod(temp, 0o600)
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
            os.rename(temp, self.path)
            info = os.lstat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        except OSError as exc:
            listener.close()
            raise PyvduseError(f"control socket {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            listener.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return listener

    def _private_directory(self) -> str:
        """A new mode-0700 directory next to :attr:`path` (same file system, for the rename)."""
        parent = os.path.dirname(self.path) or "."
        for _ in range(100):
            private = os.path.join(parent, "." + os.urandom(4).hex())
            try:
                os.mkdir(private, 0o700)
                os.chmod(private, 0o700)  # whatever the umask
            except FileExistsError:
                continue
            except OSError as exc:
                raise PyvduseError(f"control socket {self.path}: cannot create a temporary "
                                   f"directory in {parent}: {exc.strerror}") from None
            return private
        raise PyvduseError(f"control socket {self.path}: cannot create a temporary "
                           f"directory in {parent}")

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (not a successor's)."""
        with self._lock:
            identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == identity:
                os.unlink(self.path)
        except OSError:
            pass

    # -- the I/O thread --------------------------------------------------------------

    def _wake(self) -> None:
        """Wake the I/O thread up (any thread; the lock keeps the pipe from closing meanwhile)."""
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # a full pipe wakes the thread all the same
                    os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        assert self._selector is not None and self._listener is not None
        selector = self._selector
        try:
            while True:
                with self._lock:
                    closing = self._state == "closing"
                if closing and self._listener is not None:
                    selector.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
                if closing and self._done_closing():
                    break
                for key, events in selector.select(0.05 if closing else None):
                    try:
                        self._dispatch(key, events)
                    except Exception:
                        log.exception("control socket %s: unexpected error", self.path)
                for client in list(self._clients):
                    try:
                        self._service(client, closing)
                    except Exception as exc:
                        log.exception("control socket %s: unexpected error", self.path)
                        self._close_client(client, f"internal error: {exc}")
        except Exception:
            log.exception("control socket %s: the server stopped on an error", self.path)
        finally:
            with self._lock:
                self._state = "closed"
                clients, self._clients = self._clients, []
            for client in clients:
                self._close_client(client, "")
            self._release()

    def _done_closing(self) -> bool:
        """Whether closing can finish: nothing running (but the closer) and nothing owed."""
        if time.monotonic() >= self._close_deadline:
            return True
        with self._lock:
            for client in self._clients:
                if client.dropped:
                    continue
                if client.worker is not None and client.worker is not self._closer:
                    return False
                if client.outbuf:
                    return False
        return True

    def _release(self) -> None:
        """Close the listening socket, the selector and the wakeup pipe."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._wake_r = self._wake_w = -1

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj == self._wake_r:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass
        else:
            client: _Client = key.data
            if events & selectors.EVENT_READ and not client.closed:
                self._receive(client)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next accept may succeed
                log.warning("control socket %s: accept failed: %s", self.path, exc.strerror)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)  # do not spin while the listener stays readable
                return
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                log.warning("control socket %s: too many clients (%d), one refused",
                            self.path, self.max_clients)
                with contextlib.suppress(OSError):
                    sock.send(_encode(_error(
                        f"too many control clients (at most {self.max_clients})")),
                        socket.MSG_NOSIGNAL)
                sock.close()
                continue
            self._numbers += 1
            client = _Client(sock, self._numbers)
            greeting = {"QMP": {"version": {"pyvduse": self.version}, "capabilities": []}}
            with self._lock:
                client.outbuf += _encode(greeting)
                self._clients.append(client)
            log.debug("%r connected", client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:  # it closed without reading all we sent: a way to leave
            self._close_client(client, "")
            return
        except OSError as exc:
            self._close_client(client, f"receive failed: {exc.strerror}")
            return
        if not data:
            client.eof = True
            client.inbuf.clear()  # a request cut short by the end of the stream
            client.discarding = False
            return
        client.inbuf += data

    def _split_lines(self, client: _Client) -> None:
        """Queue the complete lines of ``client.inbuf`` while its queue has room."""
        inbuf = client.inbuf
        while inbuf and len(client.queue) < self.max_queued_requests:
            end = inbuf.find(b"\n")
            if client.discarding:
                if end < 0:
                    inbuf.clear()
                    return
                del inbuf[:end + 1]
                client.discarding = False
                continue
            if end < 0:
                if len(inbuf) > self.max_line_bytes:
                    inbuf.clear()
                    client.discarding = True
                    self._submit(client, _OVERLONG)
                return
            line = bytes(inbuf[:end])
            del inbuf[:end + 1]
            if len(line) > self.max_line_bytes:
                self._submit(client, _OVERLONG)
            elif line.strip():
                self._submit(client, line)

    def _service(self, client: _Client, closing: bool) -> None:
        """Advance one client: read its lines, send its output, close or re-register it."""
        if client.closed:
            return
        if client.dropped:
            self._close_client(client, client.dropped)
            return
        if not closing:
            self._split_lines(client)
        with self._lock:
            if client.outbuf:
                try:
                    sent = client.sock.send(client.outbuf[:_SEND_BYTES], socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    client.dropped = f"send failed: {exc.strerror}"
                    sent = 0
                del client.outbuf[:sent]
            idle = not client.queue and client.worker is None and not client.outbuf
            wants_write = bool(client.outbuf)
            wants_read = (not closing and not client.eof
                          and len(client.queue) < self.max_queued_requests)
        if client.dropped:
            self._close_client(client, client.dropped)
            return
        if client.eof and idle:
            self._close_client(client, "")
            return
        events = ((selectors.EVENT_READ if wants_read else 0)
                  | (selectors.EVENT_WRITE if wants_write else 0))
        if events == client.registered:
            return
        assert self._selector is not None
        if client.registered == 0:
            self._selector.register(client.sock, events, client)
        elif events == 0:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, events, client)
        client.registered = events

    def _close_client(self, client: _Client, reason: str) -> None:
        """Close ``client`` (I/O thread only); ``reason`` is logged unless empty."""
        with self._lock:
            if client.closed:
                return
            client.closed = True
            client.queue.clear()
            client.outbuf.clear()
            with contextlib.suppress(ValueError):
                self._clients.remove(client)
        if client.registered and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
            client.registered = 0
        client.sock.close()
        if reason:
            log.warning("%r disconnected: %s", client, reason)
        else:
            log.debug("%r closed", client)

    def _queue_output(self, client: _Client, line: bytes) -> None:
        """Append ``line`` to a client's output (server lock held); drop a client over its limit."""
        if client.closed or client.dropped:
            return
        if client.outbuf and len(client.outbuf) + len(line) > self.max_output_bytes:
            client.dropped = (f"more than {self.max_output_bytes} bytes of output "
                              "not taken by the client")
            client.outbuf.clear()
            return
        client.outbuf += line

    # -- the workers -----------------------------------------------------------------

    def _submit(self, client: _Client, item: object) -> None:
        """Queue a request line (or :data:`_OVERLONG`); start the client's worker if idle."""
        with self._lock:
            client.queue.append(item)
            if client.worker is not None:
                return
            worker = threading.Thread(target=self._work, args=(client,),
                                      name=f"pyvduse-control-{client.number}", daemon=True)
            client.worker = worker
        worker.start()

    def _work(self, client: _Client) -> None:
        """Answer the client's queued requests in order until the queue is empty."""
        while True:
            with self._lock:
                if not client.queue or client.closed or self._state != "running":
                    client.worker = None
                    if self._state != "running":
                        client.queue.clear()  # closing: queued requests go unanswered
                    break
                item = client.queue.popleft()
            try:
                reply, negotiated = self._answer(client, item)
            except Exception as exc:  # a bug here: answer rather than leave the client waiting
                log.exception("control socket %s: unexpected error", self.path)
                reply, negotiated = _encode(_error(f"internal error: {exc}")), False
            with self._lock:
                self._queue_output(client, reply)
                if negotiated:
                    client.negotiated = True
            self._wake()
        self._wake()  # an idle worker may let the I/O thread close the client

    def _answer(self, client: _Client, item: object) -> tuple[bytes, bool]:
        """The reply line to one request, and whether it completed negotiation."""
        request: Any = None
        reply: dict[str, Any]
        negotiated = False
        if item is _OVERLONG:
            reply = _error(f"request line longer than {self.max_line_bytes} bytes; "
                           "the line was skipped")
        else:
            assert isinstance(item, bytes)
            try:
                request = json.loads(item.decode("utf-8"), parse_constant=_reject_constant)
            except UnicodeDecodeError:
                reply = _error("JSON parse error, the request is not valid UTF-8")
            except (ValueError, RecursionError) as exc:
                reply = _error(f"JSON parse error, {exc}")
            else:
                reply, negotiated = self._execute(client, request)
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        try:
            return _encode(reply), negotiated
        except (TypeError, ValueError) as exc:
            name = request.get("execute") if isinstance(request, dict) else None
            log.error("control command %s returned a value that is not JSON: %s", name, exc)
            error = _error(f"command {name} returned a value that is not JSON: {exc}")
            if isinstance(request, dict) and "id" in request:
                error["id"] = request["id"]
            return _encode(error), False

    def _execute(self, client: _Client, request: Any) -> tuple[dict[str, Any], bool]:
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object"), False
        for key in request:
            if key not in _REQUEST_KEYS:
                return _error(f"QMP input member '{key}' is unexpected"), False
        if "execute" not in request:
            return _error("QMP input lacks member 'execute'"), False
        name = request["execute"]
        if not isinstance(name, str):
            return _error("QMP input member 'execute' must be a string"), False
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            return _error("QMP input member 'arguments' must be an object"), False
        if name in CAPABILITIES_COMMANDS:
            if client.negotiated:
                return _error("Capabilities negotiation is already complete, command ignored",
                              COMMAND_NOT_FOUND), False
            try:
                check_arguments(arguments, optional={"enable": list})
                for capability in arguments.get("enable", []):
                    raise CommandError(f"Capability {json.dumps(capability)} is not available")
            except CommandError as exc:
                return _error(exc.desc, exc.error_class), False
            return {"return": {}}, True
        if not client.negotiated:
            return _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                          COMMAND_NOT_FOUND), False
        if name == QUERY_COMMANDS:
            return {"return": [{"name": command} for command in self.command_names]}, False
        handler = self._commands.get(name)
        if handler is None:
            return _error(f"The command {name} has not been found", COMMAND_NOT_FOUND), False
        try:
            value = handler(arguments)
        except CommandError as exc:
            log.debug("control command %s failed: %s", name, exc.desc)
            return _error(exc.desc, exc.error_class), False
        except PyvduseError as exc:  # a refusal the library words for users
            log.warning("control command %s failed: %s", name, exc)
            return _error(str(exc) or type(exc).__name__), False
        except BaseException as exc:  # a handler's bug must not cost the daemon a thread
            log.error("control command %s failed", name, exc_info=True)
            return _error(str(exc) or type(exc).__name__), False
        return {"return": {} if value is None else value}, False
