"""Stream socket helpers for network backends: scatter/gather transfers and a
buffered receiver.

:class:`ReceiveBuffer` lets a reader thread take many small replies (headers
of a few bytes followed by payloads) with one ``recv`` call per batch instead
of one call per field: headers are unpacked from the buffer, payloads are
copied from it, and whatever of a payload has not arrived yet is received
straight into its destination.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def recv_into_all(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill every view in order from ``sock`` (scatter reads); ``EOFError`` on end of stream."""
    pending = [view for view in views if len(view)]
    while pending:
        got = sock.recvmsg_into(pending[:IOV_MAX])[0]
        if got <= 0:
            raise EOFError("the server closed the connection")
        pending = advance(pending, got)


def recv_exact(sock: socket.socket, length: int) -> bytes:
    """Receive exactly ``length`` bytes; ``EOFError`` if the peer closes first."""
    buf = bytearray(length)
    recv_into_all(sock, [memoryview(buf)])
    return bytes(buf)


def send_all(sock: socket.socket, views: Sequence[bytes | memoryview]) -> None:
    """Send every buffer in order (gather writes), resuming after partial sends."""
    if len(views) == 1:
        sock.sendall(views[0])
        return
    pending = [memoryview(view) for view in views if len(view)]
    while pending:
        sent = sock.sendmsg(pending[:IOV_MAX])
        pending = advance(pending, sent)


def advance(views: list[memoryview], done: int) -> list[memoryview]:
    """What remains of ``views`` after ``done`` bytes moved (no empty views); for any
    partial scatter/gather transfer (sockets, preadv/pwritev)."""
    index = 0
    while index < len(views) and done >= len(views[index]):
        done -= len(views[index])
        index += 1
    rest = views[index:]
    if done:
        rest[0] = rest[0][done:]
    return rest


def slice_views(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes ``[start, start + length)`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    for view in views:
        size = len(view)
        if start >= size:
            start -= size
            continue
        take = min(size - start, length)
        out.append(view[start:start + take])
        length -= take
        start = 0
        if not length:
            break
    return out


class ReceiveBuffer:
    """Buffered reads of a stream socket, for one reader thread.

    ``unpack`` and ``take`` need at most ``size`` bytes at once (header
    sizes); ``read_into`` takes payloads of any length. End of stream raises
    ``EOFError``; socket errors propagate. ``before_receive`` is called before
    each receive into the buffer, that is whenever what was received so far
    has been read (a reader signals the work that data finished then).
    """

    __slots__ = ("_before_receive", "_buf", "_end", "_sock", "_start", "_view")

    def __init__(self, sock: socket.socket, size: int = 256 * 1024,
                 before_receive: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self._before_receive = before_receive
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0  # first unread byte
        self._end = 0  # end of the received bytes

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._end - self._start

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes readable from ``_start``."""
        if need > len(self._buf):
            raise ValueError(f"{need} bytes do not fit a {len(self._buf)}-byte buffer")
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._start < need:  # move the remainder to the front
            have = self._end - self._start
            self._buf[:have] = self._view[self._start:self._end]
            self._start, self._end = 0, have
        if self._before_receive is not None:
            self._before_receive()
        while self._end - self._start < need:
            got = self._sock.recv_into(self._view[self._end:])
            if not got:
                raise EOFError("the server closed the connection")
            self._end += got

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """The next ``layout.size`` bytes, unpacked."""
        if self._end - self._start < layout.size:
            self._fill(layout.size)
        values = layout.unpack_from(self._buf, self._start)
        self._start += layout.size
        return values

    def take(self, length: int) -> bytes:
        """The next ``length`` bytes (at most the buffer's size), as a copy."""
        if self._end - self._start < length:
            self._fill(length)
        data = bytes(self._view[self._start:self._start + length])
        self._start += length
        return data

    def read_into(self, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order: from the buffer first, then straight from the socket."""
        pending: list[memoryview] = []
        for view in views:
            have = self._end - self._start
            size = len(view)
            if pending or not have:
                if size:
                    pending.append(view)
                continue
            step = min(have, size)
            view[:step] = self._view[self._start:self._start + step]
            self._start += step
            if step < size:
                pending.append(view[step:])
        if not pending:
            return
        if sum(len(view) for view in pending) < len(self._buf) // 4:
            for view in pending:  # small rest: one buffered receive may bring the next reply
                self._fill(len(view))
                view[:] = self._view[self._start:self._start + len(view)]
                self._start += len(view)
            return
        recv_into_all(self._sock, pending)
