"""The shared inflight buffer of ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``.

With this feature the front-end asks the back-end for a buffer
(``GET_INFLIGHT_FD``: the back-end allocates it, a memfd, and returns it with
its size and offset), keeps it, and hands it back with ``SET_INFLIGHT_FD``
when a restarted back-end connects, so the new process finds what the old
one had taken from the rings. The front-end treats the contents as opaque:
the layout is the back-end's.

Ours: a 64-byte header (magic, version, number of queues, queue size; the
rest reserved, zero), then per queue the area of a
:class:`pyvduse.inflight.QueueLog` (a 16-byte queue header and one u64 slot
per descriptor head), so the same log code serves VDUSE and vhost-user.
The memfd is sealed against shrinking and growing, so the front-end cannot
truncate it under our mapping.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct

from pyvduse.inflight import QUEUE_HEADER_SIZE, QueueLog
from pyvduse.vhost_user.memory import MMAP_OPTIONS
from pyvduse.vhost_user.protocol import ProtocolError

MAGIC = b"PYVDUSEQ"
VERSION = 1
HEADER_SIZE = 64
_header = struct.Struct("<8sIHH")  # magic, version, num queues, queue size
MAX_QUEUE_SIZE = 32768


def queue_area_size(queue_size: int) -> int:
    """Bytes of one queue's area (what :class:`~pyvduse.inflight.QueueLog` uses)."""
    return QUEUE_HEADER_SIZE + 8 * queue_size


def buffer_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole buffer for ``num_queues`` queues of ``queue_size`` entries."""
    return HEADER_SIZE + num_queues * queue_area_size(queue_size)


def _check_geometry(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= 0xFFFF:
        raise ProtocolError(f"inflight buffer: {num_queues} queues, expected 1..65535")
    if not (0 < queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
        raise ProtocolError(f"inflight buffer: queue size {queue_size} is not a power of two "
                            f"in 1..{MAX_QUEUE_SIZE}")


def allocate(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A new buffer for ``GET_INFLIGHT_FD``: ``(fd, size)``, mmap offset 0.

    The caller owns ``fd``: it maps it (:meth:`InflightRegion.map`), sends it
    in the reply, and closes it. Raises :class:`ProtocolError` for a geometry
    the front-end should not have asked for, :class:`OSError` if the memfd fails.
    """
    _check_geometry(num_queues, queue_size)
    size = buffer_size(num_queues, queue_size)
    fd = os.memfd_create("pyvduse-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, _header.pack(MAGIC, VERSION, num_queues, queue_size), 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class InflightRegion:
    """A mapped inflight buffer: :attr:`areas` holds one queue area per queue.

    Build one with :meth:`map`; :meth:`queue_log` puts a
    :class:`~pyvduse.inflight.QueueLog` on a queue's area.
    """

    def __init__(self, mapping: mmap.mmap, view: memoryview, num_queues: int,
                 queue_size: int) -> None:
        self._map = mapping
        self._view = view
        self.num_queues = num_queues
        self.queue_size = queue_size
        area = queue_area_size(queue_size)
        self.areas: tuple[memoryview, ...] = tuple(
            view[HEADER_SIZE + index * area:HEADER_SIZE + (index + 1) * area]
            for index in range(num_queues))

    @classmethod
    def map(cls, fd: int, size: int, offset: int, num_queues: int,
            queue_size: int) -> InflightRegion:
        """Map the buffer ``[offset, offset+size)`` of ``fd`` (``fd`` stays the caller's).

        ``size`` must be exactly :func:`buffer_size` of the geometry, the file
        must hold the whole buffer, and the buffer must carry our header with
        that geometry (it is one :func:`allocate` made, or a copy of one).
        Raises :class:`ProtocolError` otherwise.
        """
        _check_geometry(num_queues, queue_size)
        expected = buffer_size(num_queues, queue_size)
        if size != expected:
            raise ProtocolError(f"inflight buffer of {size} bytes, expected {expected} for "
                                f"{num_queues} queues of {queue_size}")
        if offset < 0:
            raise ProtocolError(f"inflight buffer at negative offset {offset}")
        try:
            file_size = os.fstat(fd).st_size
        except OSError as exc:
            raise ProtocolError(f"inflight buffer: {exc}") from None
        if file_size < offset + size:
            raise ProtocolError(f"inflight buffer: the file holds {file_size} bytes, the "
                                f"buffer needs {offset + size}")
        page = mmap.ALLOCATIONGRANULARITY
        aligned = offset - offset % page
        skew = offset - aligned
        try:
            mapping = mmap.mmap(fd, skew + size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned,
                                **MMAP_OPTIONS)
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot map the inflight buffer: {exc}") from None
        view = memoryview(mapping)[skew:]
        magic, version, queues, qsize = _header.unpack_from(view)
        if (magic, version, queues, qsize) != (MAGIC, VERSION, num_queues, queue_size):
            view.release()
            mapping.close()
            if magic != MAGIC or version != VERSION:
                raise ProtocolError("the inflight buffer is not one this back-end made")
            raise ProtocolError(f"the inflight buffer is for {queues} queues of {qsize}, "
                                f"not {num_queues} of {queue_size}")
        return cls(mapping, view, num_queues, queue_size)

    def queue_log(self, index: int) -> QueueLog:
        """A :class:`~pyvduse.inflight.QueueLog` on queue ``index``'s area."""
        return QueueLog(self.areas[index], self.queue_size)

    def close(self) -> None:
        """Unmap (views still held, e.g. by a QueueLog, keep it mapped); idempotent."""
        for area in self.areas:
            area.release()
        self.areas = ()
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()
