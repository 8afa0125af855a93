"""The virtio-blk request handler, shared by every transport.

:meth:`BlkHandler.handle` takes one descriptor chain, parses and validates the
request it carries, runs it against the backend and writes the status byte.
It never raises for anything the driver sent: a bad request gets
``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP`` as QEMU would answer it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pyvduse.backends.base import Backend
from pyvduse.blk.config import MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, BlkConfig
from pyvduse.blk.segments import fill, split_back, split_front, total_length
from pyvduse.errors import BackendError
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import Chain

log = logging.getLogger(__name__)

_HEADER_SIZE = v.virtio_blk_outhdr.size
_unpack_header = v.virtio_blk_outhdr.unpack
_unpack_range = v.virtio_blk_discard_write_zeroes.unpack_from
_RANGE_SIZE = v.virtio_blk_discard_write_zeroes.size
_SECTOR_SHIFT = v.VIRTIO_BLK_SECTOR_SHIFT
_T_IN = v.VIRTIO_BLK_T_IN
_T_OUT = v.VIRTIO_BLK_T_OUT
_T_FLUSH = v.VIRTIO_BLK_T_FLUSH

S_OK = v.VIRTIO_BLK_S_OK
S_IOERR = v.VIRTIO_BLK_S_IOERR
S_UNSUPP = v.VIRTIO_BLK_S_UNSUPP

_OK_BYTE = bytes([S_OK])


class RequestRejected(Exception):
    """A request fails validation; ``status`` is what the driver is told."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


class BlkHandler:
    """Serves virtio-blk requests from ``backend`` under ``config``.

    Thread-safe as long as the backend is: one handler serves every queue.
    ``stats`` counts requests by outcome for logs and metrics.
    """

    ERROR_LOG_INTERVAL = 5.0  # seconds between repeated error reports

    def __init__(self, backend: Backend, config: BlkConfig) -> None:
        self.backend = backend
        self.config = config
        self._capacity_sectors = config.capacity >> _SECTOR_SHIFT
        self._capacity_bytes = self._capacity_sectors << _SECTOR_SHIFT
        self._accepts_writes = not config.readonly
        self._flush_offered = config.flush
        # One data buffer: Backend's default readv/writev would make exactly one
        # read/write call, so call it directly; a backend's own readv/writev gets [buf].
        cls = type(backend)
        self._read_one: Callable[[int, memoryview], None] = (
            backend.read if cls.readv is Backend.readv else self._read_via_readv)
        self._write_one: Callable[[int, memoryview], None] = (
            backend.write if cls.writev is Backend.writev else self._write_via_writev)
        self._block_mask = config.logical_block_size - 1
        self._sector_mask = config.sectors_per_block - 1
        self._serial = config.serial.encode()[: v.VIRTIO_BLK_ID_BYTES].ljust(
            v.VIRTIO_BLK_ID_BYTES, b"\0")
        self._last_error_log = float("-inf")  # the first error is always reported
        self._errors_since_log = 0

    def handle(self, chain: Chain) -> int:
        """Serve one request; return the number of bytes written into the chain.

        Never raises for driver input or backend failures.

        Fast path: the layout every driver uses, the 16-byte header alone in the
        first device-readable buffer and the status byte alone in the last
        device-writable one, is recognised with two length checks and needs no
        splitting or copying; its header is unpacked in place. A read or write
        of one data buffer is then range-checked inline and goes straight to the
        backend, and so does a flush. Everything else, and any request that fails
        a check, goes to :meth:`_dispatch` (or, for other layouts, to
        :meth:`_handle_general`), which makes the same checks and gives the same
        answers.
        """
        readable = chain.readable
        writable = chain.writable
        if not (readable and writable):
            return self._handle_general(chain)
        header = readable[0]
        status_view = writable[-1]
        if len(header) != _HEADER_SIZE or len(status_view) != 1:
            return self._handle_general(chain)
        req_type, _ioprio, sector = _unpack_header(header)
        try:
            if req_type == _T_IN:
                if len(writable) == 2:
                    data = writable[0]
                    length = len(data)
                    offset = sector << _SECTOR_SHIFT
                    # _check_range's two checks, on bytes: the offset is block-aligned iff
                    # the sector is, and both are block multiples when the end is compared.
                    if not (offset | length) & self._block_mask and (
                            offset + length <= self._capacity_bytes):
                        self._read_one(offset, data)
                        status_view[0] = S_OK
                        return length + 1
            elif req_type == _T_OUT:
                if len(readable) == 2 and self._accepts_writes:
                    data = readable[1]
                    length = len(data)
                    offset = sector << _SECTOR_SHIFT
                    if not (offset | length) & self._block_mask and (
                            offset + length <= self._capacity_bytes):
                        self._write_one(offset, data)
                        status_view[0] = S_OK
                        return 1
            elif req_type == _T_FLUSH and self._flush_offered:
                self.backend.flush()
                status_view[0] = S_OK
                return 1
            written = self._dispatch(req_type, sector, readable[1:], writable[:-1])
        except RequestRejected as rejected:
            return self._rejected(status_view, rejected)
        except Exception as exc:  # backend failure: the request fails, the device lives
            return self._failed(status_view, req_type, sector, exc)
        status_view[0] = S_OK
        return written + 1

    def _handle_general(self, chain: Chain) -> int:
        """:meth:`handle` for any layout: the header and status may share buffers with data."""
        writable = chain.writable
        if not writable:
            log.warning("virtio-blk request %d has no status byte; dropped", chain.head)
            return 0
        status_view, data_in = split_back(writable)
        readable = chain.readable
        if total_length(readable) < _HEADER_SIZE:
            status_view[0] = S_IOERR
            self._note_error(f"request {chain.head}: header shorter than {_HEADER_SIZE} bytes")
            return 1
        header, data_out = split_front(readable, _HEADER_SIZE)
        req_type, _ioprio, sector = _unpack_header(header)
        try:
            written = self._dispatch(req_type, sector, data_out, data_in)
        except RequestRejected as rejected:
            return self._rejected(status_view, rejected)
        except Exception as exc:  # backend failure: the request fails, the device lives
            return self._failed(status_view, req_type, sector, exc)
        status_view[0] = S_OK
        return written + 1

    def _rejected(self, status_view: memoryview, rejected: RequestRejected) -> int:
        status_view[0] = rejected.status
        if rejected.status == S_IOERR:
            self._note_error(str(rejected))
        return 1

    def _failed(self, status_view: memoryview, req_type: int, sector: int,
                exc: Exception) -> int:
        status_view[0] = S_IOERR
        self._note_backend_failure(req_type, sector, exc)
        return 1

    def _read_via_readv(self, offset: int, buf: memoryview) -> None:
        self.backend.readv(offset, [buf])

    def _write_via_writev(self, offset: int, buf: memoryview) -> None:
        self.backend.writev(offset, [buf])

    # -- request types ----------------------------------------------------------------

    def _dispatch(self, req_type: int, sector: int, data_out: list[memoryview],
                  data_in: list[memoryview]) -> int:
        if req_type == v.VIRTIO_BLK_T_IN:
            length = total_length(data_in)
            offset = self._check_range(sector, length)
            if length:
                self.backend.readv(offset, data_in)
            return length
        if req_type == v.VIRTIO_BLK_T_OUT:
            if self.config.readonly:
                raise RequestRejected(S_IOERR, f"write to read-only device at sector {sector}")
            length = total_length(data_out)
            offset = self._check_range(sector, length)
            if length:
                self.backend.writev(offset, data_out)
            return 0
        if req_type == v.VIRTIO_BLK_T_FLUSH:
            if not self.config.flush:
                raise RequestRejected(S_UNSUPP, "flush not offered")
            self.backend.flush()
            return 0
        if req_type == v.VIRTIO_BLK_T_GET_ID:
            return fill(data_in, self._serial)
        if req_type == v.VIRTIO_BLK_T_DISCARD:
            if not self.config.discard:
                raise RequestRejected(S_UNSUPP, "discard not offered")
            self._discard_or_zero(data_out, zeroes=False)
            return 0
        if req_type == v.VIRTIO_BLK_T_WRITE_ZEROES:
            if not self.config.write_zeroes:
                raise RequestRejected(S_UNSUPP, "write-zeroes not offered")
            self._discard_or_zero(data_out, zeroes=True)
            return 0
        raise RequestRejected(S_UNSUPP, f"unsupported request type {req_type}")

    def _check_range(self, sector: int, length: int) -> int:
        """Validate a data transfer; return its byte offset."""
        if length & self._block_mask or sector & self._sector_mask:
            raise RequestRejected(
                S_IOERR, f"sector {sector} length {length} not aligned to the "
                f"{self.config.logical_block_size}-byte logical block")
        if sector > self._capacity_sectors or (length >> _SECTOR_SHIFT) > (
            self._capacity_sectors - sector
        ):
            raise RequestRejected(
                S_IOERR, f"sector {sector} length {length} beyond the end of the device "
                f"({self._capacity_sectors} sectors)")
        return sector << _SECTOR_SHIFT

    def _discard_or_zero(self, data_out: list[memoryview], zeroes: bool) -> None:
        what = "write-zeroes" if zeroes else "discard"
        size = total_length(data_out)
        # We offer max_discard_seg = max_write_zeroes_seg = 1, as QEMU does.
        if size != _RANGE_SIZE:
            raise RequestRejected(S_UNSUPP if size > _RANGE_SIZE and size % _RANGE_SIZE == 0
                                  else S_IOERR, f"{what}: {size} bytes of ranges, expected one")
        data, _ = split_front(data_out, _RANGE_SIZE)
        sector, num_sectors, flags = _unpack_range(data)
        if zeroes:
            if flags & ~v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise RequestRejected(S_UNSUPP, f"{what}: unknown flags {flags:#x}")
            limit = MAX_WRITE_ZEROES_SECTORS
        else:
            if flags:
                raise RequestRejected(S_UNSUPP, f"{what}: flags {flags:#x} not allowed")
            limit = MAX_DISCARD_SECTORS
        if num_sectors > limit:
            raise RequestRejected(S_IOERR, f"{what}: {num_sectors} sectors exceed {limit}")
        offset = self._check_range(sector, num_sectors << _SECTOR_SHIFT)
        length = num_sectors << _SECTOR_SHIFT
        if not length:
            return
        if zeroes:
            may_unmap = bool(flags & v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and self.config.discard
            self.backend.write_zeroes(offset, length, may_unmap)
        else:
            self.backend.discard(offset, length)

    # -- error reporting ----------------------------------------------------------------

    def _note_error(self, message: str, bug: Exception | None = None) -> None:
        """Log ``message``, at most once per interval; a ``bug`` is logged with its traceback."""
        self._errors_since_log += 1
        now = time.monotonic()
        if now - self._last_error_log < self.ERROR_LOG_INTERVAL:
            return
        suppressed = self._errors_since_log - 1
        extra = f" ({suppressed} more since the last report)" if suppressed else ""
        if bug is None:
            log.warning("virtio-blk: %s%s", message, extra)
        else:
            log.error("virtio-blk: %s%s", message, extra, exc_info=bug)
        self._last_error_log = now
        self._errors_since_log = 0

    def _note_backend_failure(self, req_type: int, sector: int, exc: Exception) -> None:
        if isinstance(exc, OSError | BackendError):
            self._note_error(f"backend failed request type {req_type} at sector {sector}: {exc}")
        else:
            self._note_error(f"backend raised on request type {req_type} at sector {sector}",
                             bug=exc)
