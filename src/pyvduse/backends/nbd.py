"""The ``nbd`` backend: a disk served by an NBD server, through a pure-Python client.

Options (``pyvduse serve nbd key=value ...``):

``uri=`` (required; ``url=`` is accepted too)
    ``nbd://HOST[:PORT]/EXPORT`` (TCP, port 10809 by default) or
    ``nbd+unix:///EXPORT?socket=PATH`` (a Unix domain socket). An empty
    export (``nbd://HOST/``, ``nbd+unix:///?socket=PATH``) is the server's
    default export. TLS (``nbds://``) is not supported.
``connections=N`` (default 1)
    Connections to open. More than one is only used when the server
    advertises ``NBD_FLAG_CAN_MULTI_CONN`` (its caches are shared by all
    connections, so a flush on one covers the writes of all); otherwise one
    connection is used and a warning says so.
``reconnect-delay=SECONDS`` (default 1)
    Wait before the first reconnection attempt; doubled after every failed
    attempt, up to 30 seconds.
``retry-timeout=SECONDS`` (default 60)
    How long requests wait for a lost server to come back before they fail
    with ``EIO``; 0 fails them as soon as one reconnection attempt failed.
    Requests get at least one attempt: when the first attempt only starts at
    the retry timeout (``reconnect-delay`` not shorter), they wait for it.
``timeout=SECONDS`` (default 10)
    Limit for one connection attempt as a whole: connecting and the entire
    handshake (a server that keeps the handshake going is cut off). An
    attempt that starts before the retry timeout is also cut off at it.

The handshake is fixed newstyle with ``NBD_OPT_GO`` (falling back to
``NBD_OPT_EXPORT_NAME`` for servers without it) and asks for structured
replies and the export's block size constraints; at most
:data:`MAX_OPTION_REPLIES` replies to one option are accepted, and the whole
attempt is bounded by ``timeout``. The disk's size is the export's;
:attr:`NbdBackend.preferred_block_size` is the server's minimum block size
when that is a power of two above 512 (the device then sends no smaller
request). What the device offers follows the transmission flags: a
read-only export makes a read-only disk, ``NBD_FLAG_SEND_TRIM`` enables
discard, ``NBD_FLAG_SEND_WRITE_ZEROES`` makes write-zeroes native
(``NBD_CMD_FLAG_NO_HOLE`` unless the driver allows unmapping), and without
it zeroes are written as data. A flush is sent as ``NBD_CMD_FLUSH`` when the
server takes it, and succeeds at once otherwise.

Every request is asynchronous (:attr:`NbdBackend.submit_min_bytes` is 0):
it is sent at once, any number are in flight per connection, and a reader
thread per connection matches replies to requests by handle, receives read
data straight into the request's buffers and reports completion. Requests
longer than the server's maximum payload (32 MiB at most) are split. Simple
and structured replies are both understood: data chunks at any offset of the
request, holes (zero-filled), error chunks. The bytes of a read that its
chunks covered are tracked exactly, so a read completes only when every byte
was filled once: a reply that leaves a gap fails the read with ``EIO``, and
a chunk outside the read or overlapping another is a protocol violation
(below). A server error fails the request with the matching
:class:`OSError` (``EPERM``, ``EIO``, ``ENOMEM``, ``EINVAL``, ``ENOSPC``,
``EOVERFLOW``, ``ENOTSUP``; anything else is ``EIO``), which the device
reports as an I/O error; the connection goes on.

Reconnection: when a connection breaks (the server exits, the connection is
reset, or the server violates the protocol, e.g. answers an unknown handle),
its requests in flight are kept and sent again once a connection is back
(reads, writes, trims, zeroing and flushes may all be repeated), except a
read whose reply had a chunk outside it or overlapping another: that read
fails with ``EIO``. New requests queue meanwhile. One thread reconnects
with exponential backoff; when the server has been gone for
``retry-timeout`` seconds, the waiting requests fail with ``EIO`` (an
attempt under way then is cut off), and from then on each new request gets
one more connection attempt (at most one per ``reconnect-delay``) before it
fails, so the device stays usable and recovers as soon as the server is
back. A server answering ``ESHUTDOWN`` is disconnected from politely and
treated the same way. The reconnected export must have the same size.
Losses, failed attempts and recoveries are logged (rate-limited, with
:class:`~pyvduse.ratelimit.RateLimitedLog`, as are failing completions) on
the ``pyvduse.backends.nbd`` logger.

Events (:meth:`~pyvduse.backends.base.Backend.emit_event`, which the daemon
sends to its control socket's clients): ``BACKEND_CONNECTION_LOST`` (data
``uri``, ``reason``) when the last live connection to the server is lost,
and ``BACKEND_CONNECTION_RESTORED`` (``uri``, ``down-for``: seconds without
a connection) when a connection is back after that; each once per
transition, in that order, whatever the number of connections and of failed
reconnection attempts in between. Losing one of several connections while
another stays up, and closing the backend, are no such transition.

On the compiled data path (``--datapath auto`` where it is built), when the
server advertises ``NBD_FLAG_CAN_MULTI_CONN``, each queue opens a connection of its
own (simple replies, at most :data:`NATIVE_CONNECT_TIMEOUT` seconds to open) and
its reads, writes and flushes are sent and completed in C, with no Python call per
request (see :meth:`NbdBackend.native_target` and :mod:`pyvduse.native`). The
connections described above stay: a request the server fails, and every request in
flight on a queue's connection when it breaks, is served again through them, with
the reconnection and error reporting above; a queue whose connection broke sends
its requests through them until it has a new one (tried at most once a second,
while the backend is connected). Without ``NBD_FLAG_CAN_MULTI_CONN`` every request
goes through the Python client: a write completed on one connection could be
invisible on another.

Not supported: TLS, FUA (flush is used instead), block status, resizing,
oldstyle negotiation. There is no timeout on a request that a connected
server never answers (TCP keepalive detects dead peers on TCP).
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from pyvduse.backends.base import (
    ZERO_CHUNK,
    AsynchronousBackend,
    Done,
    DoneGroup,
    deferred_interrupts,
)
from pyvduse.backends.options import BackendOptions
from pyvduse.backends.socket_io import (
    ReceiveBuffer,
    send_all,
    slice_views,
)
from pyvduse.errors import BackendError, ConfigError
from pyvduse.native import NativeTarget, NbdConnector
from pyvduse.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

__all__ = ["AttemptTimedOut", "ExportInfo", "NbdAddress", "NbdBackend", "NbdError", "connect",
           "nbd_errno", "negotiate", "parse_nbd_url"]

DEFAULT_PORT = 10809
MAX_CONNECTIONS = 16
#: Longest wait between reconnection attempts, in seconds.
MAX_RECONNECT_DELAY = 30.0
#: Largest read or write payload sent in one command (servers must accept 32 MiB).
MAX_PAYLOAD = 32 << 20
#: Limit for opening one queue's connection for the native data path (seconds; the
#: ``timeout`` option when shorter): it blocks that queue's thread meanwhile.
NATIVE_CONNECT_TIMEOUT = 2.0
#: Largest trim or write-zeroes length sent in one command (the field is 32 bits).
MAX_EFFECT = 1 << 30
#: At most one message per interval for each kind of connection trouble.
LOG_INTERVAL = 5.0

# -- protocol constants (the NBD protocol, doc/proto.md of the reference implementation) ----

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# option replies
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1
REP_ERR_POLICY = REP_ERROR_BIT | 2
REP_ERR_INVALID = REP_ERROR_BIT | 3
REP_ERR_PLATFORM = REP_ERROR_BIT | 4
REP_ERR_TLS_REQD = REP_ERROR_BIT | 5
REP_ERR_UNKNOWN = REP_ERROR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERROR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_NO_HOLE = 1 << 1

# structured replies
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

#: Error values on the wire and the errno each becomes (anything else is EIO).
NBD_ERRNOS: dict[int, int] = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.ENOTSUP,
    108: errno.ESHUTDOWN,
}
_NBD_ESHUTDOWN = 108

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REST = struct.Struct(">IQ")  # error, handle (after the magic)
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, handle, length (after the magic)
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_MAGIC = struct.Struct(">I")
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR_HEAD = struct.Struct(">IH")

_COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush",
                  CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write-zeroes", CMD_DISC: "disconnect"}
#: Longest option reply or error chunk payload accepted (messages are at most 4 KiB).
_MAX_MESSAGE = 1 << 16
#: Most replies accepted to one option (NBD_OPT_GO gets a few NBD_REP_INFO, then an ACK).
MAX_OPTION_REPLIES = 32
_ZEROES = memoryview(ZERO_CHUNK)


class NbdError(BackendError):
    """The server could not be used: a failed handshake or a violation of the protocol.

    Carries ``EIO``; the message is one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class _ProtocolError(Exception):
    """The server sent something the protocol does not allow: drop the connection.

    ``blame`` is the handle of the request whose reply was wrong in a way
    that could leave it half done (a chunk outside it, or overlapping
    another): that request fails with ``EIO`` instead of being sent again.
    """

    def __init__(self, message: str, blame: int | None = None) -> None:
        super().__init__(message)
        self.blame = blame


def nbd_errno(value: int) -> int:
    """The Python errno for an NBD error value (unknown values are ``EIO``)."""
    return NBD_ERRNOS.get(value, errno.EIO)


# -- URLs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a TCP ``(host, port)`` or a Unix socket ``path``, and its name."""

    url: str
    export: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""

    @property
    def is_unix(self) -> bool:
        """True for a Unix domain socket."""
        return bool(self.path)


def parse_nbd_url(url: str) -> NbdAddress:
    """Parse an ``nbd://`` or ``nbd+unix://`` URL; raise :class:`ConfigError` if it is bad.

    ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``; the
    export is the percent-decoded path without its first ``/`` (empty: the
    default export).
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"backend 'nbd': bad url {url!r}: {why}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise bad("TLS (nbds) is not supported")
    if scheme not in ("nbd", "nbd+unix"):
        raise bad("use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    if parts.fragment or parts.username is not None or parts.password is not None:
        raise bad("user names and fragments are not supported")
    if parts.path and not parts.path.startswith("/"):
        raise bad("the export name must follow a /")
    export = unquote(parts.path[1:], errors="strict") if parts.path else ""
    if len(export.encode()) > 4096:
        raise bad("the export name is longer than 4096 bytes")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise bad(f"bad query: {exc}") from None
    if scheme == "nbd":
        if query:
            raise bad(f"unknown query parameter {next(iter(query))!r}")
        if not parts.hostname:
            raise bad("no host (use nbd+unix:///EXPORT?socket=PATH for a Unix socket)")
        return NbdAddress(url=url, export=export, host=parts.hostname,
                          port=DEFAULT_PORT if port is None else port)
    if parts.netloc:
        raise bad("nbd+unix takes no host: use nbd+unix:///EXPORT?socket=PATH")
    unknown = [key for key in query if key != "socket"]
    if unknown:
        raise bad(f"unknown query parameter {unknown[0]!r}")
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise bad("nbd+unix needs exactly one ?socket=PATH")
    return NbdAddress(url=url, export=export, path=sockets[0])


# -- handshake --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake told about the export."""

    size: int
    flags: int
    structured: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD

    def has(self, flag: int) -> bool:
        """True if transmission flag ``flag`` is set."""
        return bool(self.flags & flag)


class _Handshake:
    """A socket during the handshake, whose every receive and send ends by ``deadline``.

    ``deadline`` is a :func:`time.monotonic` time; past it a receive or send
    raises :class:`TimeoutError`. An infinite deadline leaves the socket's
    own timeout alone (it then bounds each call, not the whole). ``received``
    counts the bytes received, to tell a silent server from a slow one.
    """

    def __init__(self, sock: socket.socket, deadline: float = math.inf) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = 0

    def _bound(self) -> None:
        if self.deadline < math.inf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handshake's time is up")
            self.sock.settimeout(left)

    def recv(self, length: int) -> bytes:
        """Exactly ``length`` bytes; :class:`EOFError` if the server closes first."""
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            self._bound()
            n = self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("the server closed the connection")
            got += n
            self.received += n
        return bytes(buf)

    def send(self, data: bytes) -> None:
        """All of ``data``."""
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            self._bound()
            sent += self.sock.send(view[sent:])

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def recv_option_reply(self, option: int) -> tuple[int, bytes]:
        """Receive one option reply to ``option``: ``(reply type, data)``."""
        magic, got_option, reply, length = _OPTION_REPLY.unpack(self.recv(_OPTION_REPLY.size))
        if magic != OPT_REPLY_MAGIC:
            raise NbdError(f"bad option reply magic {magic:#x}")
        if got_option != option:
            raise NbdError(f"the server answered option {got_option} to option {option}")
        if length > _MAX_MESSAGE:
            raise NbdError(f"option reply of {length} bytes is too long")
        return reply, self.recv(length)


def _option_error(reply: int, data: bytes, export: str) -> NbdError:
    """The one-line error for an error reply to NBD_OPT_GO."""
    message = data.decode(errors="replace").strip()
    what = {
        REP_ERR_UNKNOWN: f"no export named {export!r}",
        REP_ERR_POLICY: "the server's policy refuses the export",
        REP_ERR_TLS_REQD: "the server requires TLS, which is not supported",
        REP_ERR_SHUTDOWN: "the server is shutting down",
        REP_ERR_INVALID: "the server found the request invalid",
        REP_ERR_PLATFORM: "not supported on the server's platform",
        REP_ERR_BLOCK_SIZE_REQD: "the server insists on block size negotiation",
    }.get(reply, f"the server refused the export (reply {reply:#x})")
    return NbdError(f"{what}: {message}" if message else what)


def negotiate(sock: socket.socket, export: str, deadline: float = math.inf) -> ExportInfo:
    """Run the newstyle handshake for ``export`` on a connected socket.

    Asks for structured replies and block size information, enters
    transmission with ``NBD_OPT_GO`` (``NBD_OPT_EXPORT_NAME`` when the
    server lacks it). Raises :class:`NbdError` for anything the server
    refuses or gets wrong (more than :data:`MAX_OPTION_REPLIES` replies to
    one option included), :class:`OSError`/:class:`EOFError` for a broken
    connection. ``deadline`` (a :func:`time.monotonic` time) bounds the
    whole handshake: :class:`TimeoutError` once it passed. Without one,
    only the socket's own timeout applies, to each receive and send.
    """
    return _negotiate(_Handshake(sock, deadline), export)


def _negotiate(hs: _Handshake, export: str, ask_structured: bool = True) -> ExportInfo:
    magic, opt_magic, hflags = struct.unpack(">QQH", hs.recv(18))
    if magic != NBDMAGIC:
        raise NbdError("not an NBD server (no NBDMAGIC)")
    if opt_magic == CLISERV_MAGIC:
        raise NbdError("the server uses oldstyle negotiation, which is not supported")
    if opt_magic != IHAVEOPT:
        raise NbdError(f"unknown handshake magic {opt_magic:#x}")
    fixed = bool(hflags & FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    cflags = (FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (FLAG_C_NO_ZEROES if no_zeroes else 0)
    hs.send(struct.pack(">I", cflags))
    name = export.encode()
    structured = False
    if fixed:
        if ask_structured:
            hs.send_option(OPT_STRUCTURED_REPLY)
            reply, _ = hs.recv_option_reply(OPT_STRUCTURED_REPLY)
            if reply == REP_ERR_SHUTDOWN:
                raise NbdError("the server is shutting down")
            structured = reply == REP_ACK
        info = _go(hs, name, export, structured)
        if info is not None:
            return info
    # No NBD_OPT_GO: the old way, which cannot report errors (the server just hangs up).
    hs.send_option(OPT_EXPORT_NAME, name)
    size, flags = struct.unpack(">QH", hs.recv(10))
    if not no_zeroes:
        hs.recv(124)
    return ExportInfo(size=size, flags=_transmission_flags(flags), structured=structured)


def _transmission_flags(flags: int) -> int:
    return flags if flags & FLAG_HAS_FLAGS else 0


def _go(hs: _Handshake, name: bytes, export: str, structured: bool) -> ExportInfo | None:
    """``NBD_OPT_GO``; None if the server does not know the option."""
    hs.send_option(OPT_GO, struct.pack(">I", len(name)) + name
                   + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    export_info: tuple[int, int] | None = None
    sizes: tuple[int, int, int] | None = None
    for _ in range(MAX_OPTION_REPLIES):
        reply, data = hs.recv_option_reply(OPT_GO)
        if reply == REP_INFO:
            if len(data) < 2:
                raise NbdError("empty NBD_REP_INFO")
            (kind,) = struct.unpack_from(">H", data)
            if kind == INFO_EXPORT:
                if len(data) != 12:
                    raise NbdError(f"NBD_INFO_EXPORT of {len(data)} bytes")
                size, flags = struct.unpack_from(">QH", data, 2)
                export_info = (size, _transmission_flags(flags))
            elif kind == INFO_BLOCK_SIZE:
                if len(data) != 14:
                    raise NbdError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
                sizes = struct.unpack_from(">III", data, 2)
            continue  # other information is not needed
        if reply == REP_ACK:
            break
        if reply == REP_ERR_UNSUP:
            return None
        if reply & REP_ERROR_BIT:
            raise _option_error(reply, data, export)
        raise NbdError(f"unexpected reply {reply} to NBD_OPT_GO")
    else:
        raise NbdError(f"more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO")
    if export_info is None:
        raise NbdError("the server sent no NBD_INFO_EXPORT")
    size, flags = export_info
    info = ExportInfo(size=size, flags=flags, structured=structured)
    if sizes is not None:
        minimum, preferred, maximum = sizes
        if minimum < 1 or minimum > 65536 or minimum & (minimum - 1):
            raise NbdError(f"bad minimum block size {minimum}")
        info = ExportInfo(size=size, flags=flags, structured=structured, min_block=minimum,
                          preferred_block=max(preferred, minimum),
                          max_block=max(maximum, minimum))
    return info


class AttemptTimedOut(NbdError):
    """A connection attempt ran out of time: ``timeout`` or its ``deadline`` passed."""


def connect(address: NbdAddress, timeout: float,
            started: Callable[[socket.socket], None] | None = None,
            deadline: float = math.inf,
            structured: bool = True) -> tuple[socket.socket, ExportInfo]:
    """Connect to ``address`` and negotiate its export; return the socket, in blocking mode.

    ``structured=False`` does not ask for structured replies (the server then
    answers every command with a simple reply: what the native data path reads).

    ``timeout`` bounds the whole attempt: connecting (to every address a
    host name resolves to, tried in turn) and the handshake together; a
    ``deadline`` (a :func:`time.monotonic` time) ends it sooner if it comes
    first. Resolving the host name is not bounded. ``started`` is called
    with each socket once it exists (so that another thread can shut it
    down to abort a slow attempt; it may raise to stop). Raises
    :class:`NbdError` (:class:`AttemptTimedOut` when the time is up) or
    :class:`OSError` with a one-line message.
    """
    begin = time.monotonic()
    end = min(begin + timeout, deadline)
    budget = f"{max(end - begin, 0.0):.3g}"
    if address.is_unix:
        targets: list[tuple[int, int, int, str | tuple[str, int]]] = [
            (socket.AF_UNIX, socket.SOCK_STREAM, 0, address.path)]
    else:
        targets = [(family, kind, proto, (str(target[0]), int(target[1])))
                   for family, kind, proto, _, target
                   in socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)]
    failure: OSError | NbdError = OSError(errno.EHOSTUNREACH, f"cannot resolve {address.host}")
    connected: socket.socket | None = None
    for family, kind, proto, target in targets:
        left = end - time.monotonic()
        if left <= 0:
            failure = AttemptTimedOut(f"no connection within {budget} s")
            break
        sock = socket.socket(family, kind, proto)
        try:
            if started is not None:
                started(sock)
            sock.settimeout(left)
            sock.connect(target)
        except TimeoutError:
            sock.close()
            failure = AttemptTimedOut(f"no connection within {budget} s")
            continue
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        connected = sock
        break
    if connected is None:
        raise failure
    sock = connected
    hs = _Handshake(sock, end)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            info = _negotiate(hs, address.export, structured)
        except EOFError:
            raise NbdError("the server closed the connection during the handshake") from None
        except TimeoutError:
            if hs.received:
                raise AttemptTimedOut(f"the handshake did not finish within {budget} s") from None
            raise AttemptTimedOut(f"no answer to the handshake within {budget} s") from None
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, info


# -- requests ---------------------------------------------------------------------------


class _Command:
    """One NBD command: sent, maybe sent again after a reconnect, completed once."""

    __slots__ = ("bufs", "covered", "done", "error", "flags", "kind", "length", "offset",
                 "retry_since", "spans")

    def __init__(self, kind: int, offset: int, length: int, bufs: Sequence[memoryview],
                 done: Done, flags: int = 0) -> None:
        self.kind = kind
        self.flags = flags
        self.offset = offset
        self.length = length
        self.bufs = bufs  # read: where data goes; write: the payload
        self.done = done
        self.error: OSError | None = None  # first error chunk of a structured reply
        self.covered = 0  # bytes of a structured read covered by data and hole chunks
        # The ranges they covered, relative to offset: [start, end, start, end, ...],
        # sorted, neither overlapping nor touching (touching ranges are merged).
        self.spans: list[int] | None = None
        self.retry_since: float | None = None  # when a lost connection first took it

    def reset(self) -> None:
        """Forget a partial reply before the command is sent again."""
        self.error = None
        self.covered = 0
        self.spans = None

    def cover(self, start: int, end: int) -> bool:
        """Note that a chunk filled bytes ``start:end`` of a read; False if some of them
        were filled already (nothing is noted then)."""
        spans = self.spans
        if spans is None:  # the first chunk: usually the only one
            self.spans = [start, end]
        else:
            pos = bisect.bisect_right(spans, start)
            if pos & 1 or (pos < len(spans) and spans[pos] < end):
                return False  # start is inside a range, or the next range begins before end
            joins_before = pos > 0 and spans[pos - 1] == start
            joins_after = pos < len(spans) and spans[pos] == end
            if joins_before and joins_after:
                del spans[pos - 1:pos + 1]
            elif joins_before:
                spans[pos - 1] = end
            elif joins_after:
                spans[pos] = start
            else:
                spans[pos:pos] = [start, end]
        self.covered += end - start
        return True

    def describe(self) -> str:
        return f"{_COMMAND_NAMES.get(self.kind, self.kind)} {self.offset}+{self.length}"


def _closed_error() -> OSError:
    return OSError(errno.EIO, "nbd backend closed")


#: A failing completion may fail for every request: its traceback a few times per interval.
_done_log = RateLimitedLog(log, LOG_INTERVAL, burst=3)


def _call_done(done: Done, error: BaseException | None) -> None:
    try:
        done(error)
    except Exception as exc:  # the completion itself failed: nobody else can report it
        _done_log.error("done", "nbd: a request's completion failed", exc_info=exc)


# -- connections ------------------------------------------------------------------------


class _Connection:
    """One negotiated connection: a send lock for writers and a reader thread for replies.

    Thread-safety: ``pending`` and ``broken`` change only under the
    backend's lock; ``broken`` is set while the send lock is held too, so a
    sender that checks it under the send lock never writes to a connection
    whose requests were already handed elsewhere. Only the reader thread
    completes or hands over this connection's pending commands, so a
    command's buffers are used by one reader at a time.
    """

    def __init__(self, backend: NbdBackend, sock: socket.socket, info: ExportInfo,
                 number: int) -> None:
        self.backend = backend
        self.sock = sock
        self.info = info
        self.number = number
        self.send_lock = threading.Lock()
        self.pending: dict[int, _Command] = {}
        self.broken = False
        self.next_handle = 1
        self.thread = threading.Thread(target=self._read_loop, name=f"nbd-conn-{number}",
                                       daemon=True)

    # -- sending --------------------------------------------------------------------------

    def send(self, commands: Sequence[tuple[int, _Command]]) -> None:
        """Send registered commands (handle, command) in one go; a failure breaks the
        connection (the reader re-queues them)."""
        if len(commands) == 1:
            handle, cmd = commands[0]
            header = _REQUEST.pack(REQUEST_MAGIC, cmd.flags, cmd.kind, handle, cmd.offset,
                                   cmd.length)
            buffers: list[bytes | memoryview] = ([header, *cmd.bufs] if cmd.kind == CMD_WRITE
                                                 else [header])
        else:
            buffers = []
            for handle, cmd in commands:
                buffers.append(_REQUEST.pack(REQUEST_MAGIC, cmd.flags, cmd.kind, handle,
                                             cmd.offset, cmd.length))
                if cmd.kind == CMD_WRITE:
                    buffers += cmd.bufs
        with self.send_lock:
            if self.broken:  # the reader already handed the commands on
                return
            try:
                send_all(self.sock, buffers)
            except OSError:
                self.shut()  # the reader sees the end of the stream and takes over

    def shut(self) -> None:
        """Shut the socket down both ways: wakes the reader and any blocked sender."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def disconnect(self) -> None:
        """Send ``NBD_CMD_DISC`` (best effort) and shut the socket down."""
        if self.send_lock.acquire(timeout=1.0):
            try:
                if not self.broken:
                    self.sock.settimeout(1.0)
                    self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            except OSError:
                pass
            finally:
                self.send_lock.release()
        self.shut()

    # -- receiving ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "closed"
        soft = False
        blamed: _Command | None = None
        try:
            self._read_replies()
        except _ShutdownRequested as exc:
            reason, soft = str(exc), True
        except _ProtocolError as exc:
            reason = f"protocol error: {exc}"
            if exc.blame is not None:
                with self.backend._lock:
                    blamed = self.pending.pop(exc.blame, None)
        except EOFError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        except Exception as exc:  # a bug here must not leave requests hanging
            self.backend._log.error("reader", "nbd: reader of connection %d failed",
                                    self.number, exc_info=exc)
            reason = f"{type(exc).__name__}: {exc}"
        self.backend._lost(self, reason, soft, blamed)

    def _command(self, handle: int) -> _Command:
        cmd = self.pending.get(handle)
        if cmd is None:
            raise _ProtocolError(f"reply for unknown handle {handle:#x}")
        return cmd

    def _finish(self, handle: int, error: BaseException | None) -> None:
        with self.backend._lock:
            cmd = self.pending.pop(handle)
        _call_done(cmd.done, error)

    def _read_replies(self) -> None:
        # The replies of one receive complete their requests with one interrupt per queue.
        with deferred_interrupts() as signal:
            self._read_reply_stream(ReceiveBuffer(self.sock, before_receive=signal))

    def _read_reply_stream(self, stream: ReceiveBuffer) -> None:
        structured = self.info.structured
        while True:
            (magic,) = stream.unpack(_MAGIC)
            if magic == SIMPLE_REPLY_MAGIC:
                error, handle = stream.unpack(_SIMPLE_REST)
                cmd = self._command(handle)
                if error:
                    if error == _NBD_ESHUTDOWN:
                        raise _ShutdownRequested("the server is shutting down")
                    self._finish(handle, _server_error(error, "", cmd))
                    continue
                if cmd.kind == CMD_READ:
                    stream.read_into(cmd.bufs)
                self._finish(handle, None)
            elif magic == STRUCTURED_REPLY_MAGIC:
                if not structured:
                    raise _ProtocolError("structured reply without negotiation")
                flags, kind, handle, length = stream.unpack(_STRUCTURED_REST)
                cmd = self._command(handle)
                self._chunk(stream, handle, cmd, kind, length)
                if flags & REPLY_FLAG_DONE:
                    error = cmd.error
                    if error is None and cmd.kind == CMD_READ and cmd.covered != cmd.length:
                        error = OSError(errno.EIO, f"nbd server sent {cmd.covered} of "
                                                   f"{cmd.length} bytes for {cmd.describe()}")
                    if error is not None and error.errno == errno.ESHUTDOWN:
                        raise _ShutdownRequested("the server is shutting down")
                    self._finish(handle, error)
            else:
                raise _ProtocolError(f"bad reply magic {magic:#x}")

    @staticmethod
    def _chunk(stream: ReceiveBuffer, handle: int, cmd: _Command, kind: int,
               length: int) -> None:
        """Take one structured reply chunk's payload of ``length`` bytes for ``cmd``.

        A data or hole chunk outside the read, or overlapping one received
        before, is a protocol error that fails ``cmd``: its buffers are left
        as they are.
        """
        if kind == REPLY_TYPE_NONE:
            if length:
                raise _ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
        elif kind in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
            if cmd.kind != CMD_READ:
                raise _ProtocolError(f"data chunk in the reply to {cmd.describe()}")
            if kind == REPLY_TYPE_OFFSET_DATA:
                if length <= _OFFSET.size:
                    raise _ProtocolError(f"data chunk of {length} bytes")
                (offset,) = stream.unpack(_OFFSET)
                size = length - _OFFSET.size
            else:
                if length != _HOLE.size:
                    raise _ProtocolError(f"hole chunk of {length} bytes")
                offset, size = stream.unpack(_HOLE)
            start = offset - cmd.offset
            if start < 0 or size <= 0 or start + size > cmd.length:
                raise _ProtocolError(f"chunk {offset}+{size} outside {cmd.describe()}",
                                     blame=handle)
            if not cmd.cover(start, start + size):
                raise _ProtocolError(f"chunk {offset}+{size} overlaps another chunk of "
                                     f"{cmd.describe()}", blame=handle)
            views = slice_views(cmd.bufs, start, size)
            if kind == REPLY_TYPE_OFFSET_DATA:
                stream.read_into(views)
            else:
                _zero_fill(views)
        elif kind & REPLY_TYPE_ERROR_BIT:
            if length < _ERROR_HEAD.size or length > _MAX_MESSAGE:
                raise _ProtocolError(f"error chunk of {length} bytes")
            payload = stream.take(length)
            value, message_length = _ERROR_HEAD.unpack_from(payload)
            if _ERROR_HEAD.size + message_length > length:
                raise _ProtocolError("error message longer than its chunk")
            message = payload[_ERROR_HEAD.size:_ERROR_HEAD.size + message_length]
            if cmd.error is None:
                cmd.error = _server_error(value, message.decode(errors="replace"), cmd)
        else:
            raise _ProtocolError(f"unknown reply chunk type {kind}")


class _ShutdownRequested(Exception):
    """The server answered ``ESHUTDOWN``: disconnect politely and retry elsewhere."""


def _server_error(value: int, message: str, cmd: _Command) -> OSError:
    code = nbd_errno(value)
    text = message.strip() or os.strerror(code)
    return OSError(code, f"nbd server: {cmd.describe()}: {text}")


def _zero_fill(views: Sequence[memoryview]) -> None:
    for view in views:
        pos = 0
        while pos < len(view):
            step = min(len(_ZEROES), len(view) - pos)
            view[pos:pos + step] = _ZEROES[:step]
            pos += step


# -- the backend ------------------------------------------------------------------------


class NbdBackend(AsynchronousBackend):
    """A disk on an NBD server (see the module docstring for options and behaviour).

    The constructor connects (``connections`` times when the server allows
    several) and raises :class:`ConfigError` with a one-line message naming
    the URL if the server cannot be reached or refuses the export. Every
    request goes through the ``submit_*`` methods; the synchronous methods
    submit and wait. Thread-safe: any number of threads may submit.
    """

    name = "nbd"
    contacts_servers = True

    def __init__(self, url: str, *, connections: int = 1, reconnect_delay: float = 1.0,
                 retry_timeout: float = 60.0, timeout: float = 10.0) -> None:
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ConfigError(f"backend 'nbd': connections={connections} must be from 1 to "
                              f"{MAX_CONNECTIONS}")
        if not reconnect_delay > 0 or not retry_timeout >= 0 or not timeout > 0:
            raise ConfigError("backend 'nbd': reconnect-delay and timeout must be positive, "
                              "retry-timeout not negative")
        self.address = parse_nbd_url(url)
        self.url = url
        self.reconnect_delay = reconnect_delay
        self.retry_timeout = retry_timeout
        self.timeout = timeout
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._live: list[_Connection] = []
        self._readers: list[_Connection] = []  # connections whose reader still runs
        self._waiting: deque[_Command] = deque()
        self._closed = False
        self._down_since: float | None = None  # when the last connection was lost
        self._expired = False  # down for longer than retry_timeout
        self._last_failure = -math.inf  # when the last reconnection attempt failed
        self._failure = ""  # why
        self._connecting: socket.socket | None = None
        self._next_number = 0
        self._reconnections = 0  # connections replaced: by the reconnector, by native queues
        self._rr = 0
        self._batch = threading.local()  # .held: commands a plugged thread registered
        # Events: the state they last reported, and those waiting to be delivered (queued
        # under _lock, delivered in order under _event_lock, outside _lock).
        self._reported_up = True
        self._events: deque[tuple[str, dict[str, object]]] = deque()
        self._event_lock = threading.Lock()
        # One message per kind of connection trouble and interval; a server that breaks
        # the protocol at every reply must not flood the log.
        self._log = RateLimitedLog(log, LOG_INTERVAL, burst=1)

        sock, info = self._connect_or_config_error()
        self.info = info
        self._wanted = connections
        if connections > 1 and not info.has(FLAG_CAN_MULTI_CONN):
            log.warning("nbd %s: the server does not allow several connections "
                        "(no NBD_FLAG_CAN_MULTI_CONN): using 1, not %d", url, connections)
            self._wanted = 1
        self._activate(sock, info)  # cannot be refused: nothing closed the backend yet
        for opened in range(1, self._wanted):
            try:
                sock, info = connect(self.address, timeout)
            except (OSError, NbdError, EOFError) as exc:
                log.warning("nbd %s: could open only %d of %d connections (%s)",
                            url, opened, self._wanted, _reason(exc))
                self._wanted = opened
                break
            self._activate(sock, info)
        self._reconnector = threading.Thread(target=self._reconnect_loop, name="nbd-reconnect",
                                             daemon=True)
        self._reconnector.start()

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``uri=`` (or its alias ``url=``), ``connections=``,
        ``reconnect-delay=``, ``retry-timeout=``, ``timeout=``; any bad or unknown
        option is a :class:`ConfigError`."""
        uri = options.string("uri", "")
        url = options.string("url", "")
        if uri and url:
            raise ConfigError("backend 'nbd': give uri= or url=, not both")
        url = uri or url
        if not url:
            raise ConfigError("backend 'nbd': missing required option uri= "
                              "(nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
        raw = options.string("connections", "1")
        try:
            connections = int(raw)
        except ValueError:
            connections = 0
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ConfigError(f"backend 'nbd': option connections={raw}: not a whole number "
                              f"from 1 to {MAX_CONNECTIONS}")
        reconnect_delay = options.seconds("reconnect-delay", 1.0)
        retry_timeout = options.seconds("retry-timeout", 60.0, zero_ok=True)
        timeout = options.seconds("timeout", 10.0)
        options.finish()
        return cls(url, connections=connections, reconnect_delay=reconnect_delay,
                   retry_timeout=retry_timeout, timeout=timeout)

    def _connect_or_config_error(self) -> tuple[socket.socket, ExportInfo]:
        try:
            return connect(self.address, self.timeout)
        except (OSError, NbdError, EOFError) as exc:
            raise ConfigError(f"backend 'nbd': cannot use {self.url}: {_reason(exc)}") from None

    # -- geometry and capabilities ----------------------------------------------------

    def size(self) -> int:
        """The export's size in bytes, from the handshake."""
        return self.info.size

    @property
    def preferred_block_size(self) -> int:
        """The server's minimum block size if it is a power of two above 512, else 512."""
        minimum = self.info.min_block
        if 512 < minimum <= 65536 and not minimum & (minimum - 1):
            return minimum
        return 512

    @property
    def can_write(self) -> bool:
        """False for a read-only export (``NBD_FLAG_READ_ONLY``)."""
        return not self.info.has(FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        """True if the export is writable and takes ``NBD_CMD_FLUSH``."""
        return self.can_write and self.info.has(FLAG_SEND_FLUSH)

    @property
    def can_discard(self) -> bool:
        """True if the export is writable and takes ``NBD_CMD_TRIM``."""
        return self.can_write and self.info.has(FLAG_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        """True if writable: natively with ``NBD_FLAG_SEND_WRITE_ZEROES``, else as data."""
        return self.can_write

    @property
    def native_write_zeroes(self) -> bool:
        """True if write-zeroes goes to the server as ``NBD_CMD_WRITE_ZEROES``."""
        return self.info.has(FLAG_SEND_WRITE_ZEROES)

    @property
    def live_connections(self) -> int:
        """How many connections are up right now."""
        with self._lock:
            return len(self._live)

    @property
    def in_flight(self) -> int:
        """How many commands were sent and await their reply, on all connections."""
        with self._lock:
            return sum(len(conn.pending) for conn in self._live)

    @property
    def waiting(self) -> int:
        """How many commands wait for a connection to come back."""
        with self._lock:
            return len(self._waiting)

    def native_target(self) -> NativeTarget | None:
        """A connection of each queue's own, served in C (see
        :meth:`pyvduse.native.NativeTarget.nbd_server`), when the server lets
        connections share its cache (``NBD_FLAG_CAN_MULTI_CONN``: a flush on one
        covers the writes completed on all) and the data methods are this class's.
        Otherwise None: every request goes through the Python client."""
        if not self.info.has(FLAG_CAN_MULTI_CONN) or not self._own_data_methods(
                NbdBackend, "submit_readv", "submit_writev", "submit_flush"):
            return None
        return NativeTarget.nbd_server(NbdConnector(
            connect=self._native_connection, usable=lambda: self.live_connections > 0,
            max_payload=self._max_payload, flush=self.info.has(FLAG_SEND_FLUSH),
            reconnected=self._native_reconnected))

    def reconnections(self) -> int:
        """Connections opened again after a loss: the backend's own (each of
        ``connections=N``) and the native queues' (see :mod:`pyvduse.native`)."""
        with self._lock:
            return self._reconnections

    def _native_reconnected(self) -> None:
        with self._lock:
            self._reconnections += 1

    def _native_connection(self) -> socket.socket:
        """A new connection to the export for the native path: simple replies only,
        at most :data:`NATIVE_CONNECT_TIMEOUT` seconds; the export must not have
        changed size. Raises like :func:`connect`."""
        sock, info = connect(self.address, min(self.timeout, NATIVE_CONNECT_TIMEOUT),
                             structured=False)
        if info.size != self.info.size:
            sock.close()
            raise NbdError(f"the export is {info.size} bytes now, not {self.info.size}")
        return sock

    @property
    def _max_payload(self) -> int:
        """Bytes per read or write command: the server's maximum, a multiple of its minimum."""
        info = self.info
        step = max(info.min_block, self.preferred_block_size)
        limit = min(MAX_PAYLOAD, info.max_block)
        return max(step, limit - limit % step)

    # -- asynchronous requests ----------------------------------------------------------

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """Send ``NBD_CMD_READ`` (several for a long request); ``done`` when ``bufs`` are full."""
        views = [buf for buf in bufs if len(buf)]
        self._submit_data(CMD_READ, offset, views, done)

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """Send ``NBD_CMD_WRITE`` with ``bufs`` as payload; ``done`` when the server replied."""
        if not self.can_write:
            raise OSError(errno.EROFS, f"nbd {self.url}: the export is read-only")
        views = [buf for buf in bufs if len(buf)]
        self._submit_data(CMD_WRITE, offset, views, done)

    def submit_flush(self, done: Done) -> None:
        """Send ``NBD_CMD_FLUSH`` if the server takes it; else succeed at once."""
        if not self.can_flush:
            self._check_open()
            done(None)
            return
        self._submit([_Command(CMD_FLUSH, 0, 0, (), done)])

    def submit_discard(self, offset: int, length: int, done: Done) -> None:
        """Send ``NBD_CMD_TRIM`` if the server takes it; else succeed at once (advisory)."""
        if not self.can_discard or not length:
            self._check_open()
            done(None)
            return
        self._submit_ranges(CMD_TRIM, offset, length, 0, done)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            done: Done) -> None:
        """Send ``NBD_CMD_WRITE_ZEROES`` (``NO_HOLE`` unless ``may_unmap``), or zero data."""
        if not self.can_write:
            raise OSError(errno.EROFS, f"nbd {self.url}: the export is read-only")
        if not length:
            self._check_open()
            done(None)
            return
        if self.native_write_zeroes:
            flags = 0 if may_unmap else CMD_FLAG_NO_HOLE
            self._submit_ranges(CMD_WRITE_ZEROES, offset, length, flags, done)
            return
        chunk = len(_ZEROES)
        whole, rest = divmod(length, chunk)
        views = [_ZEROES] * whole + ([_ZEROES[:rest]] if rest else [])
        self._submit_data(CMD_WRITE, offset, views, done)

    def _submit_data(self, kind: int, offset: int, views: list[memoryview], done: Done) -> None:
        total = sum(len(view) for view in views)
        if not total:
            self._check_open()
            done(None)
            return
        step = self._max_payload
        if total <= step:
            self._submit([_Command(kind, offset, total, views, done)])
            return
        parts = range(0, total, step)
        group = DoneGroup(done, len(parts))
        self._submit([_Command(kind, offset + pos, min(step, total - pos),
                               slice_views(views, pos, min(step, total - pos)), group.part_done)
                      for pos in parts])

    def _submit_ranges(self, kind: int, offset: int, length: int, flags: int,
                       done: Done) -> None:
        step = MAX_EFFECT
        if length <= step:
            self._submit([_Command(kind, offset, length, (), done, flags)])
            return
        parts = range(0, length, step)
        group = DoneGroup(done, len(parts))
        self._submit([_Command(kind, offset + pos, min(step, length - pos), (), group.part_done,
                               flags) for pos in parts])

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def _submit(self, cmds: list[_Command]) -> None:
        """Start ``cmds`` (the parts of one request); raise only if none was accepted."""
        for n, cmd in enumerate(cmds):
            refused = self._start(cmd)
            if refused is not None:
                if n == 0:
                    raise refused
                _call_done(cmd.done, refused)

    def _start(self, cmd: _Command) -> OSError | None:
        """Send ``cmd`` on a live connection, or queue it until one is back.

        Returns the error to fail the command with instead: the backend is
        closed, or the server has been gone for longer than the retry
        timeout and the last attempt to reach it failed less than
        ``reconnect-delay`` ago.
        """
        with self._lock:
            if self._closed:
                return _closed_error()
            if not self._live:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                if self._expired and (time.monotonic() - self._last_failure
                                      < self.reconnect_delay):
                    return OSError(errno.EIO, f"nbd {self.url}: server unreachable "
                                              f"({self._failure})")
                self._waiting.append(cmd)
                self._wake.notify_all()
                return None
            self._rr += 1
            conn = self._live[self._rr % len(self._live)]
            handle = conn.next_handle
            conn.next_handle = handle + 1 if handle < (1 << 64) - 1 else 1
            conn.pending[handle] = cmd
        held: list[tuple[_Connection, int, _Command]] | None = getattr(self._batch, "held",
                                                                        None)
        if held is not None:
            held.append((conn, handle, cmd))
        else:
            conn.send([(handle, cmd)])
        return None

    def plug(self) -> None:
        """Hold the commands this thread submits until :meth:`unplug` (one send per batch)."""
        self._batch.held = []

    def unplug(self) -> None:
        """Send the commands held since :meth:`plug`: one ``sendmsg`` per connection."""
        held: list[tuple[_Connection, int, _Command]] | None = getattr(self._batch, "held",
                                                                        None)
        self._batch.held = None
        if not held:
            return
        conn = held[0][0]
        if all(entry[0] is conn for entry in held):
            conn.send([(handle, cmd) for _, handle, cmd in held])
            return
        by_connection: dict[_Connection, list[tuple[int, _Command]]] = {}
        for conn, handle, cmd in held:
            by_connection.setdefault(conn, []).append((handle, cmd))
        for conn, commands in by_connection.items():
            conn.send(commands)

    # -- connection management ------------------------------------------------------------

    def _activate(self, sock: socket.socket, info: ExportInfo) -> bool:
        """Put a negotiated socket in service and start its reader; False if closed."""
        with self._lock:
            if self._closed:
                accepted = False
            else:
                self._next_number += 1
                conn = _Connection(self, sock, info, self._next_number)
                self._live.append(conn)
                self._readers.append(conn)
                conn.thread.start()
                accepted = True
        if not accepted:
            sock.close()
        return accepted

    def _lost(self, conn: _Connection, reason: str, soft: bool,
              blamed: _Command | None = None) -> None:
        """Called by ``conn``'s reader when it stops: hand its requests on, and clean up.

        ``blamed``, a request the server answered wrongly (no longer pending
        on ``conn``), fails with ``EIO`` once the connection is out of service.
        """
        if soft:
            conn.disconnect()
        conn.shut()
        with conn.send_lock, self._lock:
            conn.broken = True
            cmds = list(conn.pending.values())
            conn.pending.clear()
            if conn in self._live:
                self._live.remove(conn)
            if not self._live and self._down_since is None and not self._closed:
                self._down_since = time.monotonic()
            if not self._live and not self._closed:
                self._note_connected(False, reason)
            closed = self._closed
            self._wake.notify_all()
        conn.sock.close()
        self._deliver_events()
        try:
            if blamed is not None:
                _call_done(blamed.done, _closed_error() if closed else OSError(
                    errno.EIO, f"nbd {self.url}: {blamed.describe()}: {reason}"))
            if closed:
                for cmd in cmds:
                    _call_done(cmd.done, _closed_error())
                return
            self._log.warning("lost", "nbd %s: connection %d lost (%s); %d request(s) in flight "
                              "will be sent again", self.url, conn.number, reason, len(cmds))
            now = time.monotonic()
            for cmd in cmds:
                cmd.reset()
                if cmd.retry_since is None:
                    cmd.retry_since = now
                elif now - cmd.retry_since >= self.retry_timeout:
                    # Connections keep failing under this request (a server that crashes
                    # on it, or keeps shutting down): give up on it as on an outage.
                    _call_done(cmd.done, OSError(
                        errno.EIO, f"nbd {self.url}: {cmd.describe()}: connection lost again "
                                   f"after {now - cmd.retry_since:.1f} s of retries ({reason})"))
                    continue
                refused = self._start(cmd)
                if refused is not None:
                    _call_done(cmd.done, refused)
        finally:
            with self._lock:
                if conn in self._readers:
                    self._readers.remove(conn)

    def _note_connected(self, up: bool, reason: str, down_since: float | None = None) -> None:
        """Queue the event of a change between "no connection" and "connected" (lock held).

        Nothing is queued when the state is the one the last event reported:
        each transition is reported once. :meth:`_deliver_events` sends it.
        """
        if up == self._reported_up:
            return
        self._reported_up = up
        if up:
            down_for = 0.0 if down_since is None else time.monotonic() - down_since
            self._events.append(("BACKEND_CONNECTION_RESTORED",
                                 {"uri": self.url, "down-for": round(down_for, 3)}))
        else:
            self._events.append(("BACKEND_CONNECTION_LOST",
                                 {"uri": self.url, "reason": reason}))

    def _deliver_events(self) -> None:
        """Emit the queued events in the order they were queued (without ``_lock`` held)."""
        with self._event_lock:
            while True:
                with self._lock:
                    if not self._events:
                        return
                    event, data = self._events.popleft()
                self.emit_event(event, data)

    def _next_attempt(self, last: float, delay: float) -> float:
        """When the reconnection thread should try next (called with the lock held)."""
        if self._live:
            return last + delay  # some connection is up: no hurry
        if self._expired:
            # Past the retry timeout, requests are only queued when the last attempt
            # is at least reconnect-delay old: they get a new attempt at once.
            return -math.inf if self._waiting else last + delay
        assert self._down_since is not None
        deadline = self._down_since + self.retry_timeout
        return min(last + delay, deadline)

    def _reconnect_loop(self) -> None:
        delay = self.reconnect_delay
        last = -math.inf
        while True:
            expired: list[_Command] | None = None
            with self._lock:
                while True:
                    if self._closed:
                        return
                    if len(self._live) >= self._wanted:
                        delay, last = self.reconnect_delay, -math.inf
                        self._wake.wait()
                        continue
                    if self._down_since is None and not self._live:
                        self._down_since = time.monotonic()
                    if last == -math.inf:
                        last = time.monotonic()  # a fresh loss: wait reconnect-delay first
                    now = time.monotonic()
                    limit = self._retry_limit()
                    if now >= limit and self._down_since is not None and (
                            self._last_failure >= self._down_since):
                        # Time is up and an attempt already failed: no last one.
                        expired = self._expire()
                        break
                    at = self._next_attempt(last, delay)
                    if now >= at:
                        break
                    self._wake.wait(at - now)
            if expired is not None:
                self._fail_expired(expired)
                continue
            last = now
            # An attempt that starts before waiting requests must fail ends when they
            # must; one that starts later is the attempt they get, with all its timeout.
            cut = limit if last < limit < last + self.timeout else math.inf
            try:
                sock, info = connect(self.address, self.timeout, self._set_connecting, cut)
                if info.size != self.info.size:
                    sock.close()
                    raise NbdError(f"the export's size changed from {self.info.size} to "
                                   f"{info.size} bytes")
                if info.flags != self.info.flags:
                    self._log.warning("flags", "nbd %s: the server's transmission flags "
                                      "changed from %#x to %#x", self.url, self.info.flags,
                                      info.flags)
                if self._wanted > 1 and not info.has(FLAG_CAN_MULTI_CONN):
                    with self._lock:
                        self._wanted = 1
                        extra = bool(self._live)
                    if extra:
                        sock.close()
                        continue
            except (OSError, NbdError, EOFError) as exc:
                self._attempt_failed(exc, delay, isinstance(exc, AttemptTimedOut)
                                     and cut < math.inf)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
                continue
            finally:
                self._set_connecting(None)
            with self._lock:
                down_since = self._down_since
                was_down = not self._live
            if not self._activate(sock, info):
                return
            with self._lock:
                self._reconnections += 1
                waiting = list(self._waiting)
                self._waiting.clear()
                self._down_since = None
                self._expired = False
                self._note_connected(True, "", down_since)
            self._deliver_events()
            if was_down and down_since is not None:
                self._log.warning("back", "nbd %s: reconnected after %.1f s; sending %d "
                                  "waiting request(s)", self.url, time.monotonic() - down_since,
                                  len(waiting))
            for cmd in waiting:
                refused = self._start(cmd)
                if refused is not None:
                    _call_done(cmd.done, refused)
            delay = self.reconnect_delay
            last = -math.inf

    def _retry_limit(self) -> float:
        """When the requests waiting for a lost server fail (called with the lock held).

        Infinite while a connection is up, and once the retry timeout has
        passed (requests then get one attempt each).
        """
        if self._live or self._expired or self._down_since is None:
            return math.inf
        return self._down_since + self.retry_timeout

    def _set_connecting(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._connecting = sock
            closed = self._closed
        if closed and sock is not None:
            sock.close()
            raise OSError(errno.ESHUTDOWN, "closing")

    def _attempt_failed(self, exc: BaseException, delay: float, cut: bool = False) -> None:
        """Note a failed reconnection attempt; past the retry timeout (or when the
        attempt was ``cut`` short at it), fail the waiting requests with ``EIO``."""
        expired: list[_Command] | None = None
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            self._last_failure, self._failure = now, _reason(exc)
            if not self._live and self._down_since is not None and (
                    cut or now - self._down_since >= self.retry_timeout):
                expired = self._expire()
        self._log.warning("retry", "nbd %s: reconnecting failed (%s); retrying in up to "
                          "%.3g s", self.url, _reason(exc), min(delay * 2, MAX_RECONNECT_DELAY))
        if expired is not None:
            self._fail_expired(expired)

    def _expire(self) -> list[_Command]:
        """The server is gone for good (called with the lock held): take the waiting
        requests, to fail; from now on each request gets one attempt of its own."""
        failed = list(self._waiting)
        self._waiting.clear()
        self._expired = True
        return failed

    def _fail_expired(self, failed: list[_Command]) -> None:
        """Fail requests :meth:`_expire` took with ``EIO``."""
        with self._lock:
            down_since = self._down_since
            reason = self._failure
        if not failed:
            return
        down_for = time.monotonic() - down_since if down_since is not None else 0.0
        self._log.error("failed", "nbd %s: server gone for %.1f s (retry-timeout %g s): failing "
                        "%d request(s) with EIO", self.url, down_for, self.retry_timeout,
                        len(failed))
        for cmd in failed:
            _call_done(cmd.done, OSError(errno.EIO, f"nbd {self.url}: server unreachable "
                                                    f"({reason})"))

    def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``), stop the threads; requests left get ``EIO``.

        Idempotent. When it returns no ``done`` is called any more.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
            waiting = list(self._waiting)
            self._waiting.clear()
            connecting = self._connecting
            self._wake.notify_all()
        if connecting is not None:
            try:
                connecting.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for cmd in waiting:
            _call_done(cmd.done, _closed_error())
        for conn in live:
            conn.disconnect()
        with self._lock:
            readers = list(self._readers)
        for conn in readers:
            if conn.thread is not threading.current_thread():
                conn.thread.join()
        if self._reconnector is not threading.current_thread():
            self._reconnector.join()


def _reason(exc: BaseException) -> str:
    """A one-line description of a connection failure."""
    if isinstance(exc, OSError) and not isinstance(exc, BackendError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
