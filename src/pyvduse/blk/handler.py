"""The virtio-blk request handler, shared by every transport.

:meth:`BlkHandler.handle` takes one descriptor chain, parses and validates the
request it carries, runs it against the backend and writes the status byte.
It never raises for anything the driver sent: a bad request gets
``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP`` as QEMU would answer it.

A request goes to the backend's synchronous methods and is answered before
:meth:`~BlkHandler.handle` returns, unless the backend takes it
asynchronously (:attr:`pyvduse.backends.base.Backend.submit_min_bytes`): then
``handle`` returns :data:`~pyvduse.queue_worker.PENDING` and the status byte
is written and the chain completed when the backend calls ``done``.

Failures are logged rate-limited (:class:`~pyvduse.ratelimit.RateLimitedLog`),
since a driver or a backend can cause one per request: failed and rejected
requests at most once per :attr:`BlkHandler.ERROR_LOG_INTERVAL` for each of
the two kinds, malformed chains a few times per interval; the next line let
through says how many were left out.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pyvduse.backends.base import Backend
from pyvduse.blk.config import MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, BlkConfig
from pyvduse.blk.segments import fill, split_back, split_front, total_length
from pyvduse.errors import BackendError
from pyvduse.metrics import (
    DISCARD,
    FLUSH,
    GET_ID,
    OTHER,
    READ,
    WRITE,
    WRITE_ZEROES,
    RequestCounters,
)
from pyvduse.native import NativePlan
from pyvduse.queue_worker import PENDING, Completer
from pyvduse.ratelimit import RateLimitedLog
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import Chain

log = logging.getLogger(__name__)

_HEADER_SIZE = v.virtio_blk_outhdr.size
_unpack_header = v.virtio_blk_outhdr.unpack
_unpack_type = struct.Struct("<I").unpack_from  # a header's first field
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

#: The metrics' type index of each virtio-blk request type (others: OTHER).
_KINDS = {_T_IN: READ, _T_OUT: WRITE, _T_FLUSH: FLUSH, v.VIRTIO_BLK_T_DISCARD: DISCARD,
          v.VIRTIO_BLK_T_WRITE_ZEROES: WRITE_ZEROES, v.VIRTIO_BLK_T_GET_ID: GET_ID}
_now_ns = time.monotonic_ns

#: Malformed chains logged per interval before the rest are only counted.
MALFORMED_LOG_BURST = 10
# Log keys: what a driver sent wrong, and what the backend failed (or got wrong).
_MALFORMED = "malformed chain"
_REJECTED = "rejected request"
_BACKEND = "backend failure"


def _monotonic() -> float:
    return time.monotonic()  # looked up at each call: tests replace this module's ``time``


class RequestRejected(Exception):
    """A request fails validation; ``status`` is what the driver is told."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


class _Pending:
    """The ``done`` callback of one request an asynchronous backend took.

    Writes the status byte and completes the chain; a second call is a backend
    bug, logged and otherwise ignored.
    """

    __slots__ = ("complete", "finished", "handler", "head", "nbytes", "req_type", "sector",
                 "started", "status_view", "written")

    def __init__(self, handler: BlkHandler, head: int, status_view: memoryview,
                 complete: Completer, req_type: int, sector: int, written: int,
                 nbytes: int) -> None:
        self.handler = handler
        self.head = head
        self.status_view = status_view
        self.complete = complete
        self.req_type = req_type
        self.sector = sector
        self.written = written
        self.nbytes = nbytes  # the data bytes it moves (metrics)
        self.started = _now_ns() if handler.counters is not None else 0
        self.finished = False

    def __call__(self, error: BaseException | None) -> None:
        if self.finished:
            self.handler._note_error(
                _BACKEND, "virtio-blk: backend completed request type %d at sector %d more "
                "than once", self.req_type, self.sector, bug=RuntimeError("done called again"))
            return
        self.finished = True
        status = S_OK if error is None else S_IOERR
        self.status_view[0] = status
        if error is not None:
            self.handler._note_backend_failure(self.req_type, self.sector, error)
        counters = self.handler.counters
        if counters is not None:
            counters.record(_KINDS.get(self.req_type, OTHER), status, self.nbytes, self.started)
        self.complete(self.head, self.written if error is None else 1)


class BlkHandler:
    """Serves virtio-blk requests from ``backend`` under ``config``.

    Thread-safe as long as the backend is: one handler serves every queue.
    With :meth:`measure`, :meth:`handle_measured` also counts each request.
    """

    #: Seconds between reports of failed requests (of each kind: rejected, or failed by
    #: the backend); read at every report, so it may be changed at any time.
    ERROR_LOG_INTERVAL = 5.0

    def __init__(self, backend: Backend, config: BlkConfig) -> None:
        self.backend = backend
        self.config = config
        #: The capacity in bytes as one u64 cell, shared with the native path's queues.
        self._capacity_cell = memoryview(bytearray(8)).cast("Q")
        self._set_capacity_fields(config.capacity)
        self._accepts_writes = not config.readonly
        self._flush_offered = config.flush
        # Requests of at least _submit_min data bytes go to the backend's submit_* methods.
        submit_min = backend.submit_min_bytes
        self._async = submit_min is not None
        self._submit_min = 1 << 64 if submit_min is None else submit_min
        # One data buffer: a backend's own read/write takes it (so does the default
        # readv/writev, one read/write call); one defining only readv/writev gets [buf].
        cls = type(backend)
        self._read_one: Callable[[int, memoryview], None] = (
            backend.read if cls.readv is Backend.readv or cls.read is not Backend.read
            else self._read_via_readv)
        self._write_one: Callable[[int, memoryview], None] = (
            backend.write if cls.writev is Backend.writev or cls.write is not Backend.write
            else self._write_via_writev)
        self._block_mask = config.logical_block_size - 1
        self._sector_mask = config.sectors_per_block - 1
        self._serial = config.serial.encode()[: v.VIRTIO_BLK_ID_BYTES].ljust(
            v.VIRTIO_BLK_ID_BYTES, b"\0")
        # The first report of each kind is always logged, whatever the clock reads.
        self._error_log = RateLimitedLog(log, self.ERROR_LOG_INTERVAL, burst=1,
                                         clock=_monotonic,
                                         note="{count} more since the last report")
        self._malformed_log = RateLimitedLog(log, self.ERROR_LOG_INTERVAL,
                                             burst=MALFORMED_LOG_BURST, clock=_monotonic)
        #: Where :meth:`handle_measured` counts requests (None: not measured).
        self.counters: RequestCounters | None = None

    def measure(self, counters: RequestCounters) -> None:
        """Count every request from now on in ``counters``: serve through
        :meth:`handle_measured` instead of :meth:`handle` (asynchronous completions
        are counted either way once this is set)."""
        self.counters = counters

    def set_capacity(self, capacity: int) -> None:
        """Serve ``capacity`` bytes from now on (a multiple of the logical block size)."""
        self.config = replace(self.config, capacity=capacity)
        self._set_capacity_fields(capacity)

    def _set_capacity_fields(self, capacity: int) -> None:
        self._capacity_sectors = capacity >> _SECTOR_SHIFT
        self._capacity_bytes = self._capacity_sectors << _SECTOR_SHIFT
        self._capacity_cell[0] = self._capacity_bytes

    def native_plan(self) -> NativePlan | None:
        """How the native data path may serve this device, or None if its backend
        offers no :class:`~pyvduse.native.NativeTarget` (see :mod:`pyvduse.native`)."""
        target = self.backend.native_target()
        if target is None:
            return None
        return NativePlan(target=target, capacity=self._capacity_cell,
                          block_size=self.config.logical_block_size,
                          accepts_writes=self._accepts_writes,
                          flush_offered=self._flush_offered,
                          submit_min=min(self._submit_min, (1 << 64) - 1),
                          asynchronous=self._async)

    def handle(self, chain: Chain, complete: Completer) -> int:
        """Serve one request; return the number of bytes written into the chain.

        Or return :data:`~pyvduse.queue_worker.PENDING` when an asynchronous
        backend took the request: ``complete(chain.head, written)`` follows
        when it is done, from whichever thread the backend finishes on. Never
        raises for driver input or backend failures.

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
            return self._handle_general(chain, complete)
        header = readable[0]
        status_view = writable[-1]
        if len(header) != _HEADER_SIZE or len(status_view) != 1:
            return self._handle_general(chain, complete)
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
                        if length >= self._submit_min:
                            return self._submit(self.backend.submit_readv, (offset, [data]),
                                                chain.head, status_view, complete, req_type,
                                                sector, length + 1, length)
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
                        if length >= self._submit_min:
                            return self._submit(self.backend.submit_writev, (offset, [data]),
                                                chain.head, status_view, complete, req_type,
                                                sector, 1, length)
                        self._write_one(offset, data)
                        status_view[0] = S_OK
                        return 1
            elif req_type == _T_FLUSH and self._flush_offered and not self._async:
                self.backend.flush()
                status_view[0] = S_OK
                return 1
            written = self._dispatch(req_type, sector, readable[1:], writable[:-1],
                                     chain.head, status_view, complete)
        except RequestRejected as rejected:
            return self._rejected(status_view, rejected)
        except Exception as exc:  # backend failure: the request fails, the device lives
            return self._failed(status_view, req_type, sector, exc)
        if written == PENDING:
            return PENDING
        status_view[0] = S_OK
        return written + 1

    def handle_measured(self, chain: Chain, complete: Completer) -> int:
        """:meth:`handle`, counting the request in :attr:`counters` once it is answered
        (here, or by the backend's ``done`` if it is asynchronous)."""
        started = _now_ns()
        written = self.handle(chain, complete)
        if written != PENDING:
            counters = self.counters
            assert counters is not None, "handle_measured() without measure()"
            kind, status, nbytes = self._outcome(chain, written)
            counters.record(kind, status, nbytes, started)
        return written

    def _outcome(self, chain: Chain, written: int) -> tuple[int, int, int]:
        """The metrics type, status and data bytes of a request :meth:`handle` answered
        with ``written`` bytes, read back from its chain (the status byte is the last
        byte the chain can take, the header its first 16 readable bytes)."""
        writable = chain.writable
        if not written or not writable:
            return OTHER, S_IOERR, 0  # dropped: no status byte
        status = writable[-1][-1]
        readable = chain.readable
        if readable and len(readable[0]) >= _HEADER_SIZE:
            req_type = _unpack_type(readable[0])[0]
        elif total_length(readable) >= _HEADER_SIZE:
            req_type = _unpack_type(split_front(readable, _HEADER_SIZE)[0])[0]
        else:
            return OTHER, status, 0
        kind = _KINDS.get(req_type, OTHER)
        if status != S_OK:
            return kind, status, 0
        if kind in (READ, GET_ID):
            return kind, status, written - 1
        if kind == WRITE:
            return kind, status, total_length(readable) - _HEADER_SIZE
        if kind in (DISCARD, WRITE_ZEROES):
            ranges = split_front(readable, _HEADER_SIZE + _RANGE_SIZE)[0][_HEADER_SIZE:]
            return kind, status, _unpack_range(ranges)[1] << _SECTOR_SHIFT
        return kind, status, 0

    def _handle_general(self, chain: Chain, complete: Completer) -> int:
        """:meth:`handle` for any layout: the header and status may share buffers with data."""
        writable = chain.writable
        if not writable:
            self._malformed_log.interval = self.ERROR_LOG_INTERVAL
            self._malformed_log.warning(_MALFORMED, "virtio-blk: request %d has no status byte; "
                                        "dropped", chain.head)
            return 0
        status_view, data_in = split_back(writable)
        readable = chain.readable
        if total_length(readable) < _HEADER_SIZE:
            status_view[0] = S_IOERR
            self._malformed_log.interval = self.ERROR_LOG_INTERVAL
            self._malformed_log.warning(_MALFORMED, "virtio-blk: request %d: header shorter "
                                        "than %d bytes", chain.head, _HEADER_SIZE)
            return 1
        header, data_out = split_front(readable, _HEADER_SIZE)
        req_type, _ioprio, sector = _unpack_header(header)
        try:
            written = self._dispatch(req_type, sector, data_out, data_in, chain.head,
                                     status_view, complete)
        except RequestRejected as rejected:
            return self._rejected(status_view, rejected)
        except Exception as exc:  # backend failure: the request fails, the device lives
            return self._failed(status_view, req_type, sector, exc)
        if written == PENDING:
            return PENDING
        status_view[0] = S_OK
        return written + 1

    def _rejected(self, status_view: memoryview, rejected: RequestRejected) -> int:
        status_view[0] = rejected.status
        if rejected.status == S_IOERR:
            self._note_error(_REJECTED, "virtio-blk: %s", rejected)
        return 1

    def _failed(self, status_view: memoryview, req_type: int, sector: int,
                exc: BaseException) -> int:
        status_view[0] = S_IOERR
        self._note_backend_failure(req_type, sector, exc)
        return 1

    def _submit(self, start: Callable[..., None], args: Sequence[Any], head: int,
                status_view: memoryview, complete: Completer, req_type: int, sector: int,
                written: int, nbytes: int) -> int:
        """Hand a request to ``start`` (a ``submit_*`` method) with a :class:`_Pending`.

        Returns :data:`PENDING`; if ``start`` raises before calling ``done`` the
        exception propagates and the request fails at once.
        """
        pending = _Pending(self, head, status_view, complete, req_type, sector, written,
                           nbytes)
        try:
            start(*args, pending)
        except Exception as exc:
            if not pending.finished:
                pending.finished = True
                raise
            self._note_error(_BACKEND, "virtio-blk: backend raised after completing request "
                             "type %d at sector %d", req_type, sector, bug=exc)
        return PENDING

    def _read_via_readv(self, offset: int, buf: memoryview) -> None:
        self.backend.readv(offset, [buf])

    def _write_via_writev(self, offset: int, buf: memoryview) -> None:
        self.backend.writev(offset, [buf])

    # -- request types ----------------------------------------------------------------

    def _dispatch(self, req_type: int, sector: int, data_out: list[memoryview],
                  data_in: list[memoryview], head: int, status_view: memoryview,
                  complete: Completer) -> int:
        """Run a request; return the data bytes written, or PENDING if the backend took it."""
        backend = self.backend
        if req_type == v.VIRTIO_BLK_T_IN:
            length = total_length(data_in)
            offset = self._check_range(sector, length)
            if length >= self._submit_min and length:
                return self._submit(backend.submit_readv, (offset, data_in), head, status_view,
                                    complete, req_type, sector, length + 1, length)
            if length and len(data_in) == 1:
                self._read_one(offset, data_in[0])
            elif length:
                backend.readv(offset, data_in)
            return length
        if req_type == v.VIRTIO_BLK_T_OUT:
            if self.config.readonly:
                raise RequestRejected(S_IOERR, f"write to read-only device at sector {sector}")
            length = total_length(data_out)
            offset = self._check_range(sector, length)
            if length >= self._submit_min and length:
                return self._submit(backend.submit_writev, (offset, data_out), head,
                                    status_view, complete, req_type, sector, 1, length)
            if length and len(data_out) == 1:
                self._write_one(offset, data_out[0])
            elif length:
                backend.writev(offset, data_out)
            return 0
        if req_type == v.VIRTIO_BLK_T_FLUSH:
            if not self.config.flush:
                raise RequestRejected(S_UNSUPP, "flush not offered")
            if self._async:
                return self._submit(backend.submit_flush, (), head, status_view, complete,
                                    req_type, sector, 1, 0)
            backend.flush()
            return 0
        if req_type == v.VIRTIO_BLK_T_GET_ID:
            return fill(data_in, self._serial)
        if req_type == v.VIRTIO_BLK_T_DISCARD:
            if not self.config.discard:
                raise RequestRejected(S_UNSUPP, "discard not offered")
            return self._discard_or_zero(data_out, False, head, status_view, complete)
        if req_type == v.VIRTIO_BLK_T_WRITE_ZEROES:
            if not self.config.write_zeroes:
                raise RequestRejected(S_UNSUPP, "write-zeroes not offered")
            return self._discard_or_zero(data_out, True, head, status_view, complete)
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

    def _discard_or_zero(self, data_out: list[memoryview], zeroes: bool, head: int,
                         status_view: memoryview, complete: Completer) -> int:
        """Run a discard or write-zeroes request; return 0, or PENDING if the backend took it."""
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
            return 0
        req_type = v.VIRTIO_BLK_T_WRITE_ZEROES if zeroes else v.VIRTIO_BLK_T_DISCARD
        if zeroes:
            may_unmap = bool(flags & v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and self.config.discard
            if self._async:
                return self._submit(self.backend.submit_write_zeroes, (offset, length, may_unmap),
                                    head, status_view, complete, req_type, sector, 1, length)
            self.backend.write_zeroes(offset, length, may_unmap)
        elif self._async:
            return self._submit(self.backend.submit_discard, (offset, length), head, status_view,
                                complete, req_type, sector, 1, length)
        else:
            self.backend.discard(offset, length)
        return 0

    # -- error reporting ----------------------------------------------------------------

    def _note_error(self, key: str, message: str, *args: object,
                    bug: BaseException | None = None) -> None:
        """Log ``message % args`` unless ``key`` was reported less than an interval ago.

        A ``bug`` is logged at ERROR with its traceback. The message is only
        formatted when it is logged.
        """
        limited = self._error_log
        limited.interval = self.ERROR_LOG_INTERVAL
        if bug is None:
            limited.warning(key, message, *args)
        else:
            limited.error(key, message, *args, exc_info=bug)

    def _note_backend_failure(self, req_type: int, sector: int, exc: BaseException) -> None:
        if isinstance(exc, OSError | BackendError):
            self._note_error(_BACKEND, "virtio-blk: backend failed request type %d at sector "
                             "%d: %s", req_type, sector, exc)
        else:
            self._note_error(_BACKEND, "virtio-blk: backend raised on request type %d at "
                             "sector %d", req_type, sector, bug=exc)
