"""virtio-blk: BlkHandler.handle on real chains from the mock driver, and BlkConfig."""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

import pyvduse.blk.handler as handler_module
from pyvduse.backends.base import Backend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.blk import BlkConfig, BlkDevice, BlkHandler
from pyvduse.blk.config import MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS
from pyvduse.errors import BackendError, ConfigError
from pyvduse.queue_worker import PENDING
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v
from pyvduse.uapi.vduse import VDUSE_ACCESS_RW
from pyvduse.virtqueue import SplitQueue

OK, IOERR, UNSUPP = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR, v.VIRTIO_BLK_S_UNSUPP
T_IN, T_OUT, T_FLUSH, T_GET_ID = (v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH,
                                  v.VIRTIO_BLK_T_GET_ID)
T_DISCARD, T_WZ = v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES
UNMAP = v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
MiB = 1 << 20
UNTOUCHED = 0xEE  # what the driver pre-fills its writable buffers with


# -- backends ---------------------------------------------------------------------------------


class ReadOnlyRam(Backend):
    """Only size() and read(): a read-only device."""

    def __init__(self, size: int = MiB, declared: int | None = None) -> None:
        self.data = bytearray(size)
        self.declared = size if declared is None else declared
        self.calls: list[tuple[object, ...]] = []
        self.fail_with: BaseException | None = None

    def size(self) -> int:
        return self.declared

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def read(self, offset: int, buf: memoryview) -> None:
        self._maybe_fail()
        self.calls.append(("read", offset, len(buf)))
        buf[:] = self.data[offset:offset + len(buf)]


class PlainRam(ReadOnlyRam):
    """Writable, no discard: write_zeroes falls back to Backend's write loop."""

    def write(self, offset: int, buf: memoryview) -> None:
        self._maybe_fail()
        self.calls.append(("write", offset, len(buf)))
        self.data[offset:offset + len(buf)] = buf


class Ram(PlainRam):
    """Writable with flush, discard and a native write_zeroes, all recorded."""

    def flush(self) -> None:
        self._maybe_fail()
        self.calls.append(("flush",))

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fail()
        self.calls.append(("discard", offset, length))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._maybe_fail()
        self.calls.append(("write_zeroes", offset, length, may_unmap))
        self.data[offset:offset + length] = bytes(length)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


# -- the mock driver side ---------------------------------------------------------------------


class Driver:
    """Builds virtio-blk chains in driver memory and runs them through a handler.

    With ``Driver.asynchronous`` (the ``submit_mode`` fixture sets it for every
    test of this module) the backend is wrapped in a one-thread
    :class:`ThreadPoolBackend` taking every request: each request then completes
    later, on the pool's thread, through the handler's ``submit_*`` path.
    """

    asynchronous = False

    def __init__(self, backend: Backend, config: BlkConfig, granule: int | None = None) -> None:
        self.backend = backend
        self.config = config
        self.pool = ThreadPoolBackend(backend, threads=1, min_bytes=0) if (
            self.asynchronous) else None
        self.handler = BlkHandler(self.pool or backend, config)
        self.completed: list[tuple[int, int]] = []
        self.completed_event = threading.Event()
        self.dmem = DriverMemory(size=8 * MiB)
        self.ring = MockSplitRing(self.dmem, 128)
        if granule:
            base, end = self.dmem.base, self.dmem.alloc(0, 4096)
            self.dmem.split_entries(granule)
            self.dmem.set_entries([(base, end - 1, 0, VDUSE_ACCESS_RW)]
                                  + [e for e in self.dmem.entries if e[0] >= end])
        self.gmem = self.dmem.guest_memory()
        self.queue = SplitQueue(self.gmem, 128, self.ring.desc_addr, self.ring.avail_addr,
                                self.ring.used_addr, event_idx=True, indirect=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.queue.release()
        self.gmem.invalidate()
        self.dmem.close()

    def complete(self, head: int, written: int) -> None:
        self.completed.append((head, written))
        self.completed_event.set()

    def out(self, data: bytes) -> Buffer:
        return self.dmem.buffer(data)

    def inb(self, length: int) -> Buffer:
        return self.dmem.buffer(bytes([UNTOUCHED]) * length, writable=True)

    def run(self, buffers: list[Buffer], indirect: bool = False) -> int:
        """Submit one chain, let the handler serve it, complete it; return the used length."""
        head = self.ring.add_chain(buffers, indirect=indirect)
        assert self.queue.pending() == 1
        chain = self.queue.pop()
        written = self.handler.handle(chain, self.complete)
        if written == PENDING:
            assert self.completed_event.wait(5), "the pending request never completed"
            self.completed_event.clear()
            [(completed_head, written)] = self.completed
            self.completed.clear()
            assert completed_head == chain.head
        else:
            assert not self.completed, "completed twice"
        self.queue.push(chain.head, written)
        self.queue.publish()
        assert self.ring.take_used() == [(head, written)]
        return written

    def request(self, req_type: int, sector: int = 0, data_out: bytes = b"", in_len: int = 0,
                *, split_header: bool = False, out_pieces: int = 1, in_pieces: int = 1,
                indirect: bool = False) -> tuple[int, bytes, int]:
        """Run one request; return (status byte, data-in bytes, used length)."""
        header = v.virtio_blk_outhdr.pack(req_type, 0, sector)
        bufs = [self.out(header[:7]), self.out(header[7:])] if split_header else [
            self.out(header)]
        bufs += [self.out(piece) for piece in split(data_out, out_pieces)]
        ins = [self.inb(len(piece)) for piece in split(bytes(in_len), in_pieces)]
        status = self.inb(1)
        written = self.run(bufs + ins + [status], indirect=indirect)
        data = b"".join(self.dmem.read(b.addr, b.length) for b in ins)
        return self.dmem.read(status.addr, 1)[0], data, written


def split(data: bytes, pieces: int) -> list[bytes]:
    """``data`` in ``pieces`` uneven, non-empty parts (fewer if it is short)."""
    if not data:
        return []
    cuts = sorted({len(data) * i // pieces + (i % 3) for i in range(1, pieces)} - {0})
    cuts = [c for c in cuts if 0 < c < len(data)]
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def range_(sector: int, num: int, flags: int = 0) -> bytes:
    return v.virtio_blk_discard_write_zeroes.pack(sector, num, flags)


@pytest.fixture(autouse=True, params=["sync", "async"])
def submit_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test twice: synchronous backend calls, and every request submitted to a pool."""
    Driver.asynchronous = request.param == "async"
    yield request.param
    Driver.asynchronous = False


@pytest.fixture
def ram() -> Ram:
    return Ram(MiB)


@pytest.fixture
def drv(ram: Ram) -> Iterator[Driver]:
    d = Driver(ram, BlkConfig.for_backend(ram, serial="serial-123"))
    yield d
    d.close()


def make(backend: Backend, granule: int | None = None, **kwargs: object) -> Driver:
    return Driver(backend, BlkConfig.for_backend(backend, **kwargs), granule)  # type: ignore[arg-type]


# -- IN / OUT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read_byte_exact(drv: Driver, ram: Ram, indirect: bool) -> None:
    data = pattern(8192, 3)
    status, _, written = drv.request(T_OUT, 16, data, split_header=True, out_pieces=5,
                                     indirect=indirect)
    assert (status, written) == (OK, 1)
    assert ram.data[16 * 512:16 * 512 + 8192] == data
    assert ram.data[:16 * 512] == bytes(16 * 512)
    assert ram.data[16 * 512 + 8192:] == bytes(len(ram.data) - 16 * 512 - 8192)
    status, got, written = drv.request(T_IN, 16, in_len=8192, split_header=True, in_pieces=7,
                                       indirect=indirect)
    assert (status, written) == (OK, 8192 + 1)
    assert got == data


def test_read_returns_backend_bytes(drv: Driver, ram: Ram) -> None:
    ram.data[:] = pattern(len(ram.data), 9)
    status, got, written = drv.request(T_IN, 3, in_len=1536, in_pieces=3)
    assert (status, written) == (OK, 1537)
    assert got == bytes(ram.data[1536:3072])
    # the default readv: one read per data-in segment, consecutive offsets
    assert len(ram.calls) == 3
    offsets = [int(c[1]) for c in ram.calls]  # type: ignore[call-overload]
    lengths = [int(c[2]) for c in ram.calls]  # type: ignore[call-overload]
    assert offsets == [1536, 1536 + lengths[0], 1536 + lengths[0] + lengths[1]]
    assert sum(lengths) == 1536


def test_data_across_mapping_borders() -> None:
    ram = Ram(MiB)
    d = make(ram, granule=512)
    try:
        ram.data[:] = pattern(MiB, 4)
        data = pattern(4096, 5)
        assert d.request(T_OUT, 100, data, split_header=True)[0] == OK
        status, got, written = d.request(T_IN, 100, in_len=4096 + 1024)
        assert (status, written) == (OK, 5121)
        assert got == data + bytes(ram.data[108 * 512:110 * 512])
    finally:
        d.close()


def test_status_byte_sharing_the_last_data_buffer(drv: Driver, ram: Ram) -> None:
    ram.data[:512] = pattern(512, 2)
    header = drv.out(v.virtio_blk_outhdr.pack(T_IN, 0, 0))
    tail = drv.inb(513)  # 512 bytes of data then the status byte
    assert drv.run([header, tail]) == 513
    assert drv.dmem.read(tail.addr, 513) == bytes(ram.data[:512]) + bytes([OK])


def test_zero_length_transfers(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_IN, 5) == (OK, b"", 1)
    assert drv.request(T_OUT, 5) == (OK, b"", 1)
    assert ram.calls == []


def test_extra_buffers_are_ignored(drv: Driver, ram: Ram) -> None:
    ram.data[:512] = pattern(512)
    # an IN request with device-readable bytes after the header: ignored
    status, got, written = drv.request(T_IN, 0, b"junk", in_len=512)
    assert (status, got, written) == (OK, bytes(ram.data[:512]), 513)
    # an OUT request with a data-in buffer: nothing is written there
    status, got, written = drv.request(T_OUT, 0, pattern(512, 8), in_len=16)
    assert (status, got, written) == (OK, bytes([UNTOUCHED]) * 16, 1)


# -- ranges -----------------------------------------------------------------------------------


def test_last_sector_and_beyond(drv: Driver, ram: Ram) -> None:
    last = MiB // 512 - 1
    ram.data[-512:] = pattern(512, 6)
    assert drv.request(T_IN, last, in_len=512)[:2] == (OK, bytes(ram.data[-512:]))
    assert drv.request(T_IN, last, in_len=1024)[0] == IOERR  # crosses the end
    assert drv.request(T_IN, last + 1, in_len=512)[0] == IOERR
    assert drv.request(T_IN, last + 1)[0] == OK  # zero bytes at the very end
    assert drv.request(T_IN, last + 2)[0] == IOERR
    assert drv.request(T_OUT, last + 1, pattern(512))[0] == IOERR
    assert ("write", MiB, 512) not in ram.calls


@pytest.mark.parametrize("sector", [2**64 - 1, 2**64 - 2, 2**63, 2**55, (2**64 - 512) >> 0])
def test_sector_near_2_64(drv: Driver, ram: Ram, sector: int) -> None:
    status, got, written = drv.request(T_IN, sector, in_len=512)
    assert (status, got, written) == (IOERR, bytes([UNTOUCHED]) * 512, 1)
    assert drv.request(T_OUT, sector, pattern(512))[0] == IOERR
    assert ram.calls == []


def test_length_not_a_multiple_of_512(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_IN, 0, in_len=100)[0] == IOERR
    assert drv.request(T_OUT, 0, pattern(513))[0] == IOERR
    assert ram.calls == []


def test_4096_byte_logical_blocks() -> None:
    ram = Ram(MiB)
    d = make(ram, logical_block_size=4096)
    try:
        ram.data[:] = pattern(MiB, 11)
        assert d.request(T_IN, 1, in_len=4096)[0] == IOERR  # unaligned sector
        assert d.request(T_IN, 8, in_len=512)[0] == IOERR  # unaligned length
        assert d.request(T_IN, 8, in_len=4096 + 512)[0] == IOERR
        assert d.request(T_OUT, 4, pattern(4096))[0] == IOERR
        assert ram.calls == []
        status, got, written = d.request(T_IN, 8, in_len=8192, in_pieces=3)
        assert (status, got, written) == (OK, bytes(ram.data[4096:12288]), 8193)
        assert d.request(T_OUT, 16, pattern(4096, 12))[0] == OK
        assert ram.data[8192:12288] == pattern(4096, 12)
        last = MiB // 512 - 8
        assert d.request(T_IN, last, in_len=4096)[0] == OK
        assert d.request(T_IN, last + 8, in_len=4096)[0] == IOERR
        # discard / write-zeroes ranges must be aligned too
        assert d.request(T_DISCARD, 0, range_(4, 8))[0] == IOERR
        assert d.request(T_DISCARD, 0, range_(8, 4))[0] == IOERR
        assert d.request(T_WZ, 0, range_(8, 12))[0] == IOERR
        assert d.request(T_DISCARD, 0, range_(8, 16))[0] == OK
        assert ram.calls[-1] == ("discard", 4096, 8192)
    finally:
        d.close()


def test_capacity_rounds_down_to_whole_blocks() -> None:
    ram = Ram(MiB, declared=3 * 4096 + 1000)
    d = make(ram, logical_block_size=4096)
    try:
        assert d.config.capacity == 3 * 4096
        assert d.request(T_IN, 16, in_len=4096)[0] == OK
        assert d.request(T_IN, 24, in_len=4096)[0] == IOERR  # the partial block is not exposed
    finally:
        d.close()


# -- read-only devices ------------------------------------------------------------------------


def test_write_to_readonly_config(ram: Ram) -> None:
    ram.data[:] = pattern(MiB, 13)
    before = bytes(ram.data)
    d = make(ram, readonly=True)
    try:
        status, _, written = d.request(T_OUT, 0, pattern(4096, 14))
        assert (status, written) == (IOERR, 1)
        assert bytes(ram.data) == before
        assert ram.calls == []
        assert d.request(T_IN, 0, in_len=512)[:2] == (OK, before[:512])  # reads still work
        assert d.request(T_FLUSH)[0] == UNSUPP
        assert d.request(T_DISCARD, 0, range_(0, 8))[0] == UNSUPP
        assert d.request(T_WZ, 0, range_(0, 8))[0] == UNSUPP
        assert bytes(ram.data) == before
    finally:
        d.close()


def test_backend_without_write_is_readonly() -> None:
    backend = ReadOnlyRam(MiB)
    d = make(backend)
    try:
        assert d.config.readonly
        assert d.request(T_OUT, 0, pattern(512))[0] == IOERR
        assert backend.calls == []
    finally:
        d.close()


# -- FLUSH / GET_ID ---------------------------------------------------------------------------


def test_flush_calls_the_backend(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_FLUSH) == (OK, b"", 1)
    assert ram.calls == [("flush",)]


def test_flush_on_a_backend_without_flush_is_ok() -> None:
    backend = PlainRam(MiB)
    d = make(backend)
    try:
        assert d.request(T_FLUSH) == (OK, b"", 1)
    finally:
        d.close()


def test_get_id_pads_with_nuls(drv: Driver) -> None:
    status, got, written = drv.request(T_GET_ID, 0, in_len=20)
    assert (status, got, written) == (OK, b"serial-123" + bytes(10), 21)


def test_get_id_across_segments_and_in_indirect(drv: Driver) -> None:
    status, got, written = drv.request(T_GET_ID, 0, in_len=20, in_pieces=3, indirect=True)
    assert (status, got, written) == (OK, b"serial-123" + bytes(10), 21)


def test_get_id_short_and_long_buffers(drv: Driver) -> None:
    assert drv.request(T_GET_ID, 0, in_len=4) == (OK, b"seri", 5)
    status, got, written = drv.request(T_GET_ID, 0, in_len=32)
    assert (status, written) == (OK, 21)
    assert got == b"serial-123" + bytes(10) + bytes([UNTOUCHED]) * 12
    assert drv.request(T_GET_ID, 0) == (OK, b"", 1)


def test_get_id_full_and_truncated_serials(ram: Ram) -> None:
    for serial, expected in [("A" * 20, b"A" * 20), ("", bytes(20)),
                             ("é" * 10, "é".encode() * 10)]:
        d = make(ram, serial=serial)
        try:
            assert d.request(T_GET_ID, 0, in_len=20) == (OK, expected, 21)
        finally:
            d.close()
    # a config built directly (not validated) with a long serial is truncated to 20 bytes
    config = replace(BlkConfig.for_backend(ram), serial="0123456789abcdefghijKLMNO")
    d = Driver(ram, config)
    try:
        assert d.request(T_GET_ID, 0, in_len=24)[1] == b"0123456789abcdefghij" + bytes(
            [UNTOUCHED]) * 4
    finally:
        d.close()


# -- DISCARD / WRITE_ZEROES -------------------------------------------------------------------


def test_discard(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_DISCARD, 0, range_(8, 16)) == (OK, b"", 1)
    assert ram.calls == [("discard", 4096, 8192)]


def test_discard_range_split_over_two_descriptors(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_DISCARD, 0, range_(2, 3), out_pieces=2, split_header=True)[0] == OK
    assert ram.calls == [("discard", 1024, 1536)]


def test_discard_of_nothing(drv: Driver, ram: Ram) -> None:
    assert drv.request(T_DISCARD, 0, range_(8, 0))[0] == OK
    assert ram.calls == []


@pytest.mark.parametrize("flags", [UNMAP, 2, 0x8000_0000])
def test_discard_with_flags_is_unsupported(drv: Driver, ram: Ram, flags: int) -> None:
    assert drv.request(T_DISCARD, 0, range_(0, 8, flags))[0] == UNSUPP
    assert ram.calls == []


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WZ])
def test_more_than_one_range_is_unsupported(drv: Driver, ram: Ram, req_type: int) -> None:
    assert drv.request(req_type, 0, range_(0, 8) + range_(16, 8))[0] == UNSUPP
    assert drv.request(req_type, 0, range_(0, 8) * 3, out_pieces=3)[0] == UNSUPP
    assert ram.calls == []


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WZ])
@pytest.mark.parametrize("size", [0, 8, 15, 17, 24])
def test_partial_range_is_an_io_error(drv: Driver, ram: Ram, req_type: int, size: int) -> None:
    assert drv.request(req_type, 0, (range_(0, 8) * 2)[:size])[0] == IOERR
    assert ram.calls == []


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WZ])
def test_range_beyond_capacity(drv: Driver, ram: Ram, req_type: int) -> None:
    sectors = MiB // 512
    assert drv.request(req_type, 0, range_(sectors - 8, 16))[0] == IOERR
    assert drv.request(req_type, 0, range_(sectors, 1))[0] == IOERR
    assert drv.request(req_type, 0, range_(2**64 - 1, 1))[0] == IOERR
    assert drv.request(req_type, 0, range_(2**64 - 8, 16))[0] == IOERR
    assert ram.calls == []
    assert drv.request(req_type, 0, range_(sectors - 8, 8))[0] == OK
    assert len(ram.calls) == 1


@pytest.mark.parametrize(("req_type", "limit"),
                         [(T_DISCARD, MAX_DISCARD_SECTORS), (T_WZ, MAX_WRITE_ZEROES_SECTORS)])
def test_num_sectors_above_the_maximum(req_type: int, limit: int) -> None:
    ram = Ram(MiB, declared=1 << 40)  # large enough that only the per-request cap applies
    d = make(ram)
    try:
        assert d.request(req_type, 0, range_(0, limit + 1))[0] == IOERR
        assert d.request(req_type, 0, range_(0, 0xFFFF_FFFF))[0] == IOERR
        assert ram.calls == []
        ram.data = bytearray(limit * 512)
        assert d.request(req_type, 0, range_(0, limit))[0] == OK
        assert ram.calls[0][1:3] == (0, limit * 512)
    finally:
        d.close()


def test_write_zeroes(drv: Driver, ram: Ram) -> None:
    ram.data[:] = b"\xff" * MiB
    assert drv.request(T_WZ, 0, range_(1, 2)) == (OK, b"", 1)
    assert ram.calls == [("write_zeroes", 512, 1024, False)]
    assert ram.data[:512] == b"\xff" * 512
    assert ram.data[512:1536] == bytes(1024)
    assert ram.data[1536:2048] == b"\xff" * 512


def test_write_zeroes_unmap_when_discard_is_offered(drv: Driver, ram: Ram) -> None:
    assert drv.config.discard
    assert drv.request(T_WZ, 0, range_(0, 8, UNMAP))[0] == OK
    assert ram.calls == [("write_zeroes", 0, 4096, True)]


def test_write_zeroes_unmap_without_discard_is_not_passed_on() -> None:
    class NoDiscard(PlainRam):
        def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
            self.calls.append(("write_zeroes", offset, length, may_unmap))

    backend = NoDiscard(MiB)
    d = make(backend)
    try:
        assert not d.config.discard and d.config.write_zeroes
        assert d.request(T_WZ, 0, range_(0, 8, UNMAP))[0] == OK
        assert backend.calls == [("write_zeroes", 0, 4096, False)]
        assert d.request(T_DISCARD, 0, range_(0, 8))[0] == UNSUPP  # not offered
        assert len(backend.calls) == 1
    finally:
        d.close()


def test_write_zeroes_through_the_default_write_loop() -> None:
    backend = PlainRam(4 * MiB)
    backend.data[:] = b"\xaa" * (4 * MiB)
    d = make(backend)
    try:
        # 1 MiB + 512: the default writes in 1 MiB chunks
        assert d.request(T_WZ, 0, range_(8, 2049))[0] == OK
        assert backend.calls == [("write", 4096, MiB), ("write", 4096 + MiB, 512)]
        assert backend.data[4096:4096 + MiB + 512] == bytes(MiB + 512)
        assert backend.data[:4096] == b"\xaa" * 4096
        assert backend.data[4096 + MiB + 512] == 0xAA
    finally:
        d.close()


@pytest.mark.parametrize("flags", [2, 3, 0x10, 0xFFFF_FFFF])
def test_write_zeroes_unknown_flags(drv: Driver, ram: Ram, flags: int) -> None:
    assert drv.request(T_WZ, 0, range_(0, 8, flags))[0] == UNSUPP
    assert ram.calls == []


# -- unknown and malformed requests -----------------------------------------------------------


@pytest.mark.parametrize("req_type", [99, v.VIRTIO_BLK_T_GET_LIFETIME,
                                      v.VIRTIO_BLK_T_SECURE_ERASE, 2, 0xFFFF_FFFF])
def test_unknown_request_type(drv: Driver, ram: Ram, req_type: int) -> None:
    status, got, written = drv.request(req_type, 0, in_len=16)
    assert (status, written) == (UNSUPP, 1)
    assert got == bytes([UNTOUCHED]) * 16
    assert ram.calls == []


def test_missing_status_byte(drv: Driver, ram: Ram, caplog: pytest.LogCaptureFixture) -> None:
    header = drv.out(v.virtio_blk_outhdr.pack(T_IN, 0, 0))
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        assert drv.run([header]) == 0
        assert drv.run([header, drv.inb(0)]) == 0  # an empty writable buffer is no status
    assert ram.calls == []
    assert sum("no status byte" in r.getMessage() for r in caplog.records) == 2
    assert drv.request(T_FLUSH)[0] == OK  # and the next request is served


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_short_header(drv: Driver, ram: Ram, length: int) -> None:
    header = v.virtio_blk_outhdr.pack(T_FLUSH, 0, 0)[:length]
    status = drv.inb(1)
    bufs = ([drv.out(header)] if length else []) + [drv.inb(512), status]
    assert drv.run(bufs) == 1
    assert drv.dmem.read(status.addr, 1)[0] == IOERR
    assert ram.calls == []


# -- backend failures -------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError(errno.EIO, "disk on fire"), BackendError(errno.ENOSPC),
                                   PermissionError(errno.EACCES, "no")])
def test_backend_error_is_an_io_error_and_the_device_keeps_serving(
        drv: Driver, ram: Ram, error: Exception) -> None:
    ram.fail_with = error
    assert drv.request(T_IN, 0, in_len=512)[::2] == (IOERR, 1)
    assert drv.request(T_OUT, 0, pattern(512))[0] == IOERR
    assert drv.request(T_FLUSH)[0] == IOERR
    assert drv.request(T_DISCARD, 0, range_(0, 8))[0] == IOERR
    assert drv.request(T_WZ, 0, range_(0, 8))[0] == IOERR
    assert drv.request(T_GET_ID, 0, in_len=20)[0] == OK  # no backend involved
    ram.fail_with = None
    assert drv.request(T_OUT, 0, pattern(512, 5))[0] == OK
    assert drv.request(T_IN, 0, in_len=512) == (OK, pattern(512, 5), 513)


def test_backend_bug_is_logged_with_its_traceback(drv: Driver, ram: Ram,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    drv.handler.ERROR_LOG_INTERVAL = 0.0  # no rate limiting for this test
    ram.fail_with = ZeroDivisionError("backend bug")
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        assert drv.request(T_IN, 8, in_len=512)[::2] == (IOERR, 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError
    assert "request type 0 at sector 8" in errors[0].getMessage()
    assert "ZeroDivisionError: backend bug" in caplog.text
    ram.fail_with = None
    assert drv.request(T_IN, 8, in_len=512)[0] == OK


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize("boot_time", [0.0, 1.0, 4.9])
def test_first_error_is_reported_on_a_freshly_booted_host(
        drv: Driver, ram: Ram, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, boot_time: float) -> None:
    # time.monotonic() counts from boot on Linux: a daemon started in a VM seconds after boot
    # must still report its first failures (regression: the limiter started at 0.0).
    monkeypatch.setattr(handler_module, "time", FakeClock(boot_time))
    ram.fail_with = OSError(errno.EIO, "bad sector")
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        assert drv.request(T_IN, 0, in_len=512)[0] == IOERR
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "bad sector" in caplog.records[0].getMessage()


def test_backend_bug_traceback_on_a_freshly_booted_host(
        drv: Driver, ram: Ram, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler_module, "time", FakeClock(0.5))
    ram.fail_with = KeyError("bug")
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        assert drv.request(T_FLUSH)[0] == IOERR
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert caplog.records[0].exc_info is not None


def test_repeated_errors_are_rate_limited(drv: Driver, ram: Ram,
                                          caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(1000.0)
    monkeypatch.setattr(handler_module, "time", clock)
    ram.fail_with = OSError(errno.EIO, "bad sector")
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        for _ in range(4):
            assert drv.request(T_IN, 0, in_len=512)[0] == IOERR
            clock.now += 1.0
        assert len(caplog.records) == 1
        clock.now += drv.handler.ERROR_LOG_INTERVAL
        assert drv.request(T_IN, 0, in_len=512)[0] == IOERR
    assert len(caplog.records) == 2
    assert "(3 more since the last report)" in caplog.records[1].getMessage()


# -- BlkConfig --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"logical_block_size": 256}, {"logical_block_size": 0}, {"logical_block_size": 513},
    {"logical_block_size": 1536}, {"logical_block_size": 131072},
    {"num_queues": 0}, {"num_queues": 65}, {"num_queues": -1},
    {"queue_size": 0}, {"queue_size": 2}, {"queue_size": 3}, {"queue_size": 6},
    {"queue_size": 100}, {"queue_size": 65536},
    {"serial": "x" * 21}, {"serial": "é" * 11},
], ids=repr)
def test_for_backend_rejects(ram: Ram, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BlkConfig.for_backend(ram, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"logical_block_size": 512}, {"logical_block_size": 65536}, {"num_queues": 1},
    {"num_queues": 64}, {"queue_size": 4}, {"queue_size": 32768}, {"serial": "x" * 20},
], ids=repr)
def test_for_backend_accepts_the_limits(kwargs: dict[str, object]) -> None:
    BlkConfig.for_backend(Ram(MiB), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "block"), [(0, 512), (511, 512), (4095, 4096)])
def test_backend_smaller_than_a_block(size: int, block: int) -> None:
    with pytest.raises(ConfigError, match="holds no"):
        BlkConfig.for_backend(Ram(16, declared=size), logical_block_size=block)


@pytest.mark.parametrize(("size", "block", "capacity"),
                         [(10000, 512, 9728), (10000, 4096, 8192), (512, 512, 512),
                          (MiB + 4095, 4096, MiB)])
def test_capacity_rounds_down(size: int, block: int, capacity: int) -> None:
    config = BlkConfig.for_backend(Ram(16, declared=size), logical_block_size=block)
    assert config.capacity == capacity
    assert v.virtio_blk_config.unpack(config.config_space())[0] == capacity // 512


def bit(n: int) -> int:
    return 1 << n


# No transport bits: VDUSE adds ACCESS_PLATFORM itself (pyvduse.device).
BASE_FEATURES = (bit(v.VIRTIO_F_VERSION_1)
                 | bit(v.VIRTIO_BLK_F_SEG_MAX) | bit(v.VIRTIO_BLK_F_BLK_SIZE)
                 | bit(v.VIRTIO_BLK_F_TOPOLOGY) | bit(v.VIRTIO_RING_F_EVENT_IDX)
                 | bit(v.VIRTIO_RING_F_INDIRECT_DESC))


def test_features_of_a_full_featured_backend() -> None:
    config = BlkConfig.for_backend(Ram(MiB))
    assert config.features == BASE_FEATURES | bit(v.VIRTIO_BLK_F_FLUSH) | bit(
        v.VIRTIO_BLK_F_DISCARD) | bit(v.VIRTIO_BLK_F_WRITE_ZEROES)
    multi = BlkConfig.for_backend(Ram(MiB), num_queues=2)
    assert multi.features == config.features | bit(v.VIRTIO_BLK_F_MQ)


def test_features_of_a_writable_backend_without_discard() -> None:
    config = BlkConfig.for_backend(PlainRam(MiB))
    assert config.features == BASE_FEATURES | bit(v.VIRTIO_BLK_F_FLUSH) | bit(
        v.VIRTIO_BLK_F_WRITE_ZEROES)


@pytest.mark.parametrize("backend", [ReadOnlyRam(MiB), Ram(MiB)], ids=["ro-backend", "ro-flag"])
def test_features_of_a_readonly_device(backend: Backend) -> None:
    config = BlkConfig.for_backend(backend, readonly=True, num_queues=3)
    assert config.features == BASE_FEATURES | bit(v.VIRTIO_BLK_F_RO) | bit(v.VIRTIO_BLK_F_MQ)
    assert (config.readonly, config.flush, config.discard, config.write_zeroes) == (
        True, False, False, False)


def test_never_offers_wce_or_packed(ram: Ram) -> None:
    for config in (BlkConfig.for_backend(ram), BlkConfig.for_backend(ReadOnlyRam(MiB))):
        assert not config.features & bit(v.VIRTIO_BLK_F_CONFIG_WCE)
        assert not config.features & bit(v.VIRTIO_F_RING_PACKED)


def test_config_space_with_discard() -> None:
    config = BlkConfig.for_backend(Ram(MiB), logical_block_size=4096, num_queues=4,
                                   queue_size=128)
    raw = config.config_space()
    assert len(raw) == 60
    fields = v.virtio_blk_config.unpack(raw)
    assert fields == (
        MiB // 512,  # capacity in sectors
        0,  # size_max
        126,  # seg_max
        0, 0, 0,  # geometry
        4096,  # blk_size
        0, 0,  # physical_block_exp, alignment_offset
        1, 0,  # min_io_size, opt_io_size
        0,  # wce
        4,  # num_queues
        MAX_DISCARD_SECTORS, 1, 8,  # max_discard_sectors, max_discard_seg, alignment (sectors)
        MAX_WRITE_ZEROES_SECTORS, 1,  # max_write_zeroes_sectors, max_write_zeroes_seg
        1,  # write_zeroes_may_unmap
    )
    assert raw[34:36] == b"\x04\x00"
    assert raw[56] == 1


def test_config_space_without_discard() -> None:
    fields = v.virtio_blk_config.unpack(BlkConfig.for_backend(PlainRam(MiB)).config_space())
    assert fields[12:] == (1, 0, 0, 0, MAX_WRITE_ZEROES_SECTORS, 1, 0)
    assert fields[2] == 256 - 2  # default queue size


def test_config_space_readonly() -> None:
    fields = v.virtio_blk_config.unpack(BlkConfig.for_backend(ReadOnlyRam(MiB)).config_space())
    assert fields[12:] == (1, 0, 0, 0, 0, 0, 0)


def test_blk_device_model(ram: Ram) -> None:
    config = BlkConfig.for_backend(ram, num_queues=2, queue_size=64)
    device = BlkDevice(ram, config)
    assert device.device_id == v.VIRTIO_ID_BLOCK == 2
    assert (device.num_queues, device.queue_size) == (2, 64)
    assert device.features == config.features
    assert device.config_space() == config.config_space()
