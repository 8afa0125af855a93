"""Framing vhost-user messages and their file descriptors on a Unix stream socket.

:class:`Connection` reads one message at a time: the 12-byte header, then
the payload, collecting every ``SCM_RIGHTS`` descriptor that arrives with
either (the front-end sends them with the header, in one ``sendmsg``). It
checks only the framing (version, a sane size, at most 8 fds); whether a
message fits its request is :func:`validate`'s job, so that a well-framed
but unknown or malformed request still reaches the caller as a
:class:`Message`, which can answer it with an error.

Errors: :meth:`Connection.receive` raises :class:`ProtocolError` when the
stream cannot be trusted any more (the connection should be closed) and
lets :class:`OSError` through; :func:`validate` raises :class:`ProtocolError`
for one bad message. Both close every descriptor of the message first, so
nothing leaks on an error path.

Threads: one thread reads (``receive`` is not reentrant); ``send`` and
the replies may come from any thread (they are serialised by a lock). The
socket must be blocking: a message is read whole, short reads and signals
(EINTR) included.
"""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pyvduse.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    VERSION_MASK,
    ProtocolError,
    Request,
    check_request,
    encode_u64,
    request_name,
)

_FD_SIZE = array.array("i").itemsize
_CONTROL_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(eq=False, slots=True)
class Message:
    """One received message. Its :attr:`fds` belong to it until taken.

    Whoever holds a message must close the descriptors it does not take:
    :meth:`close_fds`, or ``with message:``.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        """The sender set ``NEED_REPLY`` (``REPLY_ACK``)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def take_fd(self) -> int:
        """Remove the first descriptor and hand it (and the duty to close it) to the caller."""
        if not self.fds:
            raise ProtocolError(f"{self.name}: no file descriptor came with it")
        return self.fds.pop(0)

    def take_fds(self) -> list[int]:
        """Remove every descriptor, in order, and hand them to the caller."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        """Close the descriptors not taken; idempotent."""
        _close_all(self.take_fds())

    def __enter__(self) -> Message:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close_fds()


def validate(message: Message) -> None:
    """Check ``message`` against its request's rules (:func:`protocol.check_request`).

    On failure closes the message's descriptors and raises :class:`ProtocolError`
    (an unknown request included). A stray descriptor on ``REM_MEM_REG``,
    which the spec allows but tells the back-end to close unused, is closed here.
    """
    try:
        check_request(message.request, message.payload, len(message.fds))
    except ProtocolError:
        message.close_fds()
        raise
    if message.request == Request.REM_MEM_REG:
        message.close_fds()


class Connection:
    """A vhost-user connection over a connected ``AF_UNIX``/``SOCK_STREAM`` socket.

    The connection owns the socket (:meth:`close` closes it). Received
    descriptors are close-on-exec.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("vhost-user needs a connected AF_UNIX SOCK_STREAM socket")
        self.sock = sock
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- receiving ----------------------------------------------------------------------

    def receive(self) -> Message | None:
        """Read the next message; ``None`` when the peer closed between messages.

        Raises :class:`ProtocolError` for a header with a wrong version, a
        payload larger than :data:`MAX_PAYLOAD`, more than :data:`MAX_FDS`
        descriptors, or the peer closing in the middle of a message; after
        that the byte stream is out of step and the connection must be closed.
        """
        fds: list[int] = []
        try:
            header = self._read(HEADER.size, fds, eof_ok=True)
            if header is None:
                return None
            request, flags, size = HEADER.unpack(header)
            name = request_name(request)
            if flags & VERSION_MASK != VERSION:
                raise ProtocolError(f"{name}: version {flags & VERSION_MASK} "
                                    f"(flags {flags:#x}), this back-end speaks {VERSION}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"{name}: payload of {size} bytes, at most {MAX_PAYLOAD}")
            payload = self._read(size, fds, eof_ok=False) if size else b""
            assert payload is not None
            return Message(request, flags, payload, fds)
        except BaseException:
            _close_all(fds)
            raise

    def _read(self, length: int, fds: list[int], eof_ok: bool) -> bytes | None:
        """Read exactly ``length`` bytes, adding the descriptors that come to ``fds``."""
        buf = bytearray()
        while len(buf) < length:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(
                    length - len(buf), _CONTROL_SPACE, socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:  # pragma: no cover - Python retries EINTR itself
                continue
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    fds.extend(array.array("i", cdata[:usable]))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{len(fds)} file descriptors in one message, "
                                    f"at most {MAX_FDS}")
            if not data:
                if eof_ok and not buf and not fds:
                    return None
                raise ProtocolError(f"the peer closed the connection after {len(buf)} of "
                                    f"{length} bytes of a message")
            buf += data
        return bytes(buf)

    # -- sending ------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             flags: int = 0) -> None:
        """Send one message (header, payload and ``fds`` in one ``sendmsg``).

        ``flags`` adds to the version, e.g. :data:`FLAG_NEED_REPLY` on the
        back-end channel. The descriptors stay the caller's.
        """
        if len(payload) > MAX_PAYLOAD or len(fds) > MAX_FDS:
            raise ProtocolError(f"{request_name(request)}: cannot send {len(payload)} bytes "
                                f"and {len(fds)} fds")
        data = HEADER.pack(request, VERSION | flags, len(payload)) + bytes(payload)
        control = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                   if fds else [])
        with self._send_lock:
            sent = self.sock.sendmsg([data], control)
            if sent < len(data):
                self.sock.sendall(data[sent:])

    def reply(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Answer ``request``: the flags are exactly version | REPLY, as QEMU checks."""
        self.send(request, payload, fds, flags=FLAG_REPLY)

    def reply_ack(self, request: int, ok: bool) -> None:
        """The ``REPLY_ACK`` answer: u64 0 on success, 1 on failure."""
        self.reply(request, encode_u64(0 if ok else 1))
