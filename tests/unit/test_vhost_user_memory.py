"""VhostUserMemory (the front-end's memory table, mapped) and the inflight buffer."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from pyvduse.errors import MemoryAccessError
from pyvduse.inflight import QueueLog
from pyvduse.memory import NO_HOT_REGION, GuestMemory
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.vhost_user import inflight
from pyvduse.vhost_user.memory import VhostUserMemory
from pyvduse.vhost_user.protocol import MemoryRegion, ProtocolError
from pyvduse.virtqueue import SplitQueue

PAGE = 4096
MIB = 1 << 20
GUEST = 0x10_0000  # guest-physical base of the test memory
USER = 0x7F00_0000_0000  # where the "front-end" has it mapped
SPLIT = 0x8_0000  # region A is the first 512 KiB of the memfd, region B the rest


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _kept(mappings: int) -> int:
    """Fds the mappings hold: Python's mmap keeps a duplicate before 3.13."""
    return 0 if sys.version_info >= (3, 13) else mappings


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, MIB)
    yield fd
    os.close(fd)


# Two adjacent regions in guest space; their user addresses are far apart.
REGION_A = MemoryRegion(GUEST, SPLIT, USER, 0)
REGION_B = MemoryRegion(GUEST + SPLIT, MIB - SPLIT, USER + 0x1000_0000, SPLIT)


@pytest.fixture
def vmem(memfd: int) -> Iterator[VhostUserMemory]:
    memory = VhostUserMemory([REGION_A, REGION_B], [os.dup(memfd), os.dup(memfd)])
    yield memory
    memory.close()


def test_satisfies_the_guest_memory_protocol(vmem: VhostUserMemory) -> None:
    memory: GuestMemory = vmem
    assert memory.hot is NO_HOT_REGION
    assert vmem.regions == (REGION_A, REGION_B)


def test_table_fds_are_closed(memfd: int) -> None:
    before = _open_fds()
    memory = VhostUserMemory([REGION_B, REGION_A], [os.dup(memfd), os.dup(memfd)])
    assert _open_fds() == before + _kept(2)
    assert memory.regions == (REGION_A, REGION_B)  # sorted by guest address
    memory.close()
    assert _open_fds() == before
    memory.close()  # idempotent


def test_reads_and_writes_reach_the_file(memfd: int, vmem: VhostUserMemory) -> None:
    os.pwrite(memfd, _pattern(300), 0x1234)
    view = vmem.contiguous(GUEST + 0x1234, 300, False)
    assert bytes(view) == _pattern(300)
    (seg,) = vmem.segments(GUEST + SPLIT + 100, 8, True)
    seg[:] = b"ABCDEFGH"
    assert os.pread(memfd, 8, SPLIT + 100) == b"ABCDEFGH"


def test_region_borders(memfd: int, vmem: VhostUserMemory) -> None:
    os.pwrite(memfd, b"\xaa", SPLIT - 1)
    os.pwrite(memfd, b"\xbb", SPLIT)
    assert bytes(vmem.contiguous(GUEST + SPLIT - 1, 1, False)) == b"\xaa"
    assert vmem.hot[:3] == (GUEST, GUEST + SPLIT, GUEST + SPLIT)
    assert bytes(vmem.contiguous(GUEST + SPLIT, 1, False)) == b"\xbb"
    assert vmem.hot[:3] == (GUEST + SPLIT, GUEST + MIB, GUEST + MIB)
    assert bytes(vmem.contiguous(GUEST, 1, False)) == b"\0"
    assert bytes(vmem.contiguous(GUEST + MIB - 1, 1, True)) == b"\0"
    with pytest.raises(MemoryAccessError, match="crosses the end"):
        vmem.contiguous(GUEST + SPLIT - 1, 2, False)


def test_segments_split_across_adjacent_regions(memfd: int, vmem: VhostUserMemory) -> None:
    data = _pattern(5000, 3)
    os.pwrite(memfd, data, SPLIT - 1000)
    views = vmem.segments(GUEST + SPLIT - 1000, len(data), False)
    assert [len(v) for v in views] == [1000, 4000]
    assert b"".join(bytes(v) for v in views) == data
    assert vmem.segments(GUEST + 5, 0, False) == []


def test_hot_region_is_read_write(vmem: VhostUserMemory) -> None:
    vmem.segments(GUEST + 10, 10, False)
    start, read_end, write_end, view = vmem.hot
    assert (start, read_end, write_end) == (GUEST, GUEST + SPLIT, GUEST + SPLIT)
    assert len(view) == SPLIT


@pytest.mark.parametrize(("addr", "length"), [
    (GUEST - 1, 1),  # below the first region
    (GUEST - 1, 2),  # straddles the start
    (GUEST + MIB, 1),  # just beyond the end
    (GUEST + MIB - 4, 8),  # straddles the end
    (0, 1),
    (-1, 1),
    (GUEST, -1),
    ((1 << 64) - 1, 2),  # wraps
])
def test_out_of_range(vmem: VhostUserMemory, addr: int, length: int) -> None:
    with pytest.raises(MemoryAccessError):
        vmem.segments(addr, length, False)
    with pytest.raises(MemoryAccessError):
        vmem.contiguous(addr, length, True)


def test_gap_between_regions(memfd: int) -> None:
    a = MemoryRegion(0, PAGE, USER, 0)
    b = MemoryRegion(2 * PAGE, PAGE, USER + 2 * PAGE, 2 * PAGE)
    memory = VhostUserMemory([a, b], [os.dup(memfd), os.dup(memfd)])
    try:
        with pytest.raises(MemoryAccessError, match=f"{PAGE:#x} is in no memory region"):
            memory.segments(PAGE - 8, 16, False)
        assert len(memory.segments(2 * PAGE, 16, False)) == 1
    finally:
        memory.close()


def test_user_to_guest(vmem: VhostUserMemory) -> None:
    assert vmem.user_to_guest(USER, 16) == GUEST
    assert vmem.user_to_guest(USER + SPLIT - 16, 16) == GUEST + SPLIT - 16
    assert vmem.user_to_guest(USER + 0x1000_0000 + 0x40, 4) == GUEST + SPLIT + 0x40
    assert vmem.user_to_guest(USER + 0x1000_0000 + MIB - SPLIT - 1, 1) == GUEST + MIB - 1
    # not fully inside one region's user range
    for uaddr, length in ((USER + SPLIT - 8, 16), (USER - 1, 1), (USER + SPLIT, 1),
                          (USER + 0x1000_0000 + MIB - SPLIT, 1), (-1, 1), (USER, -1)):
        with pytest.raises(MemoryAccessError):
            vmem.user_to_guest(uaddr, length)


def test_unaligned_mmap_offset(memfd: int) -> None:
    os.pwrite(memfd, _pattern(64, 9), 3 * PAGE + 0x10)
    region = MemoryRegion(0x4000_0000, PAGE, 0x1000, 3 * PAGE + 0x10)
    memory = VhostUserMemory([region], [os.dup(memfd)])
    try:
        assert bytes(memory.contiguous(0x4000_0000, 64, False)) == _pattern(64, 9)
    finally:
        memory.close()


@pytest.mark.parametrize(("regions", "why"), [
    ([MemoryRegion(0, 0, 0, 0)], "is empty"),
    ([MemoryRegion((1 << 64) - PAGE, 2 * PAGE, 0, 0)], "guest range overflows"),
    ([MemoryRegion(0, PAGE, (1 << 64) - 1, 0)], "user range overflows"),
    ([MemoryRegion(0, PAGE, 0, (1 << 64) - 1)], "mmap offset range overflows"),
    ([MemoryRegion(0, 2 * PAGE, 0, 0), MemoryRegion(PAGE, 2 * PAGE, 0x10_0000, 0)], "overlaps"),
    ([MemoryRegion(PAGE, PAGE, 0, 0), MemoryRegion(0, 2 * PAGE, 0x10_0000, 0)], "overlaps"),
    ([MemoryRegion(0, 2 * MIB, 0, 0)], "memory region guest 0x0-0x1fffff .* ends beyond its file"),
    ([MemoryRegion(0, PAGE, 0, MIB)], "ends beyond its file"),  # beyond the file's end
])
def test_bad_tables_are_refused_and_leak_nothing(memfd: int, regions: list[MemoryRegion],
                                                 why: str) -> None:
    fds = [os.dup(memfd) for _ in regions] + [os.dup(memfd)]  # one spare, after the bad one
    regions = [*regions, MemoryRegion(0x4000_0000, PAGE, 0x4000_0000, 0)]
    before = _open_fds() - len(fds)
    with pytest.raises(MemoryAccessError, match=why):
        VhostUserMemory(regions, fds)
    assert _open_fds() == before


def test_mismatched_fd_count(memfd: int) -> None:
    before = _open_fds()
    with pytest.raises(MemoryAccessError, match="2 memory regions but 1 file descriptors"):
        VhostUserMemory([REGION_A, REGION_B], [os.dup(memfd)])
    assert _open_fds() == before


def test_add_and_remove_regions(memfd: int) -> None:
    memory = VhostUserMemory()
    try:
        with pytest.raises(MemoryAccessError):
            memory.segments(GUEST, 1, False)
        before = _open_fds()
        memory.add_region(REGION_B, os.dup(memfd))
        memory.add_region(REGION_A, os.dup(memfd))
        before += _kept(2)
        assert _open_fds() == before
        assert memory.regions == (REGION_A, REGION_B)
        assert len(memory.segments(GUEST + SPLIT - 4, 8, False)) == 2
        fd = os.dup(memfd)
        with pytest.raises(MemoryAccessError, match="overlaps"):
            memory.add_region(MemoryRegion(GUEST + SPLIT - PAGE, 2 * PAGE, 0, 0), fd)
        assert _open_fds() == before  # closed on failure too
        os.pwrite(memfd, b"kept", SPLIT)
        held = memory.contiguous(GUEST + SPLIT, 4, False)
        assert memory.hot[0] == GUEST + SPLIT
        # identified by guest address, user address and size; the offset is ignored
        memory.remove_region(MemoryRegion(GUEST + SPLIT, MIB - SPLIT, USER + 0x1000_0000, 123))
        assert memory.hot is NO_HOT_REGION
        assert list(memory.regions) == [REGION_A]
        with pytest.raises(MemoryAccessError):
            memory.contiguous(GUEST + SPLIT, 4, False)
        assert bytes(held) == b"kept"  # a view handed out still works
        with pytest.raises(MemoryAccessError, match="no memory region"):
            memory.remove_region(REGION_B)
    finally:
        memory.close()


def test_region_limit(memfd: int) -> None:
    memory = VhostUserMemory(max_regions=2)
    try:
        memory.add_region(MemoryRegion(0, PAGE, 0, 0), os.dup(memfd))
        memory.add_region(MemoryRegion(PAGE, PAGE, PAGE, PAGE), os.dup(memfd))
        with pytest.raises(MemoryAccessError, match="at most 2"):
            memory.add_region(MemoryRegion(2 * PAGE, PAGE, 0, 0), os.dup(memfd))
    finally:
        memory.close()


def test_views_outlive_close(memfd: int) -> None:
    memory = VhostUserMemory([REGION_A], [os.dup(memfd)])
    view = memory.contiguous(GUEST + 8, 8, True)
    memory.close()
    assert memory.hot is NO_HOT_REGION and memory.regions == ()
    view[:] = b"12345678"
    assert os.pread(memfd, 8, 8) == b"12345678"
    with pytest.raises(MemoryAccessError):
        memory.contiguous(GUEST + 8, 8, True)
    view.release()


# -- a split ring over the memory table --------------------------------------------------------


def test_split_queue_runs_over_vhost_user_memory() -> None:
    dmem = DriverMemory(size=MIB, base=GUEST)
    ring = MockSplitRing(dmem, 8)
    header = dmem.buffer(_pattern(16, 1))
    data = dmem.buffer(2 * PAGE, writable=True)
    status = dmem.buffer(1, writable=True)
    border = data.addr + PAGE - 100  # the data buffer straddles the two regions
    a = MemoryRegion(GUEST, border - GUEST, USER, 0)
    b = MemoryRegion(border, GUEST + MIB - border, USER + 0x1000_0000, border - GUEST)
    memory = VhostUserMemory([a, b], [os.dup(dmem.fd), os.dup(dmem.fd)])
    try:
        # the front-end names the rings by its own addresses
        desc = memory.user_to_guest(USER + ring.desc_addr - GUEST, 16 * 8)
        avail = memory.user_to_guest(USER + ring.avail_addr - GUEST, 6 + 2 * 8)
        used = memory.user_to_guest(USER + ring.used_addr - GUEST, 6 + 8 * 8)
        assert (desc, avail, used) == (ring.desc_addr, ring.avail_addr, ring.used_addr)
        queue = SplitQueue(memory, 8, desc, avail, used, event_idx=False, indirect=True)
        head = ring.add_chain([header, data, status])
        assert queue.pending() == 1
        chain = queue.pop()
        assert chain.head == head
        assert [bytes(v) for v in chain.readable] == [_pattern(16, 1)]
        assert [len(v) for v in chain.writable] == [PAGE - 100, PAGE + 100, 1]
        payload = _pattern(2 * PAGE, 5)
        chain.writable[0][:] = payload[:PAGE - 100]
        chain.writable[1][:] = payload[PAGE - 100:]
        chain.writable[2][0] = 0
        queue.push(chain.head, 2 * PAGE + 1)
        queue.publish()
        assert queue.needs_interrupt()
        assert ring.take_used() == [(head, 2 * PAGE + 1)]
        assert dmem.read(data.addr, 2 * PAGE) == payload
        # an indirect chain in one region takes the hot fast path
        small = dmem.buffer(_pattern(32, 2))
        out = dmem.buffer(512, writable=True)
        head = ring.add_chain([small, out], indirect=True)
        chain = queue.pop()
        assert chain.head == head
        assert [bytes(v) for v in chain.readable] == [_pattern(32, 2)]
        assert [len(v) for v in chain.writable] == [512]
        queue.release()
    finally:
        memory.close()
        dmem.close()


# -- the inflight buffer -----------------------------------------------------------------------


def test_inflight_allocate_and_map() -> None:
    fd, size = inflight.allocate(2, 128)
    try:
        assert size == inflight.buffer_size(2, 128) == 64 + 2 * (16 + 8 * 128)
        assert os.fstat(fd).st_size == size
        region = inflight.InflightRegion.map(fd, size, 0, 2, 128)
        assert [len(a) for a in region.areas] == [16 + 8 * 128] * 2
        log = region.queue_log(1)
        log.slots[5] = 42
        log.header[0] = 7
        log.release()
        region.close()
        # a restarted back-end maps the same buffer and finds what was there
        again = inflight.InflightRegion.map(fd, size, 0, 2, 128)
        log = QueueLog(again.areas[1], 128)
        assert (log.slots[5], log.header[0]) == (42, 7)
        assert QueueLog(again.areas[0], 128).slots[5] == 0
        log.release()
        again.close()
    finally:
        os.close(fd)


def test_inflight_buffer_is_sealed() -> None:
    fd, size = inflight.allocate(1, 8)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 * size)
    finally:
        os.close(fd)


def test_inflight_at_an_offset() -> None:
    fd, size = inflight.allocate(1, 16)
    copy = os.memfd_create("test-inflight-copy", os.MFD_CLOEXEC)
    try:
        os.pwrite(copy, os.pread(fd, size, 0), 5000)  # as a front-end might store it
        region = inflight.InflightRegion.map(copy, size, 5000, 1, 16)
        assert len(region.areas) == 1
        region.close()
    finally:
        os.close(fd)
        os.close(copy)


@pytest.mark.parametrize(("size_delta", "offset", "queues", "qsize", "why"), [
    (-1, 0, 2, 128, "expected"),
    (1, 0, 2, 128, "expected"),
    (0, 0, 1, 128, "expected"),  # size of another geometry
    (0, 8, 2, 128, "the file holds"),
    (0, -8, 2, 128, "negative offset"),
    (0, 0, 0, 128, "0 queues"),
    (0, 0, 2, 100, "not a power of two"),
    (0, 0, 2, 65536, "not a power of two"),
])
def test_inflight_map_refuses(size_delta: int, offset: int, queues: int, qsize: int,
                              why: str) -> None:
    fd, size = inflight.allocate(2, 128)
    try:
        before = _open_fds()
        with pytest.raises(ProtocolError, match=why):
            inflight.InflightRegion.map(fd, size + size_delta, offset, queues, qsize)
        assert _open_fds() == before
    finally:
        os.close(fd)


def test_inflight_map_refuses_foreign_or_other_geometry() -> None:
    foreign = os.memfd_create("test-foreign", os.MFD_CLOEXEC)
    os.ftruncate(foreign, inflight.buffer_size(1, 64))
    fd, size = inflight.allocate(2, 32)
    try:
        with pytest.raises(ProtocolError, match="not one this back-end made"):
            inflight.InflightRegion.map(foreign, inflight.buffer_size(1, 64), 0, 1, 64)
        # rewrite the geometry in the header: the size fits 1 x 64, the header says 2 x 32
        other = inflight.buffer_size(1, 64)
        assert other != size
        copy = os.memfd_create("test-inflight-copy", os.MFD_CLOEXEC)
        try:
            os.ftruncate(copy, other)
            os.pwrite(copy, os.pread(fd, 64, 0), 0)
            with pytest.raises(ProtocolError, match="for 2 queues of 32"):
                inflight.InflightRegion.map(copy, other, 0, 1, 64)
        finally:
            os.close(copy)
    finally:
        os.close(fd)
        os.close(foreign)


def test_inflight_allocate_refuses_bad_geometry() -> None:
    with pytest.raises(ProtocolError):
        inflight.allocate(0, 128)
    with pytest.raises(ProtocolError):
        inflight.allocate(1, 3)


def test_a_region_beyond_the_end_of_its_file_is_refused(memfd: int) -> None:
    # Touching it would raise SIGBUS and kill the daemon.
    with pytest.raises(MemoryAccessError, match="beyond its file"):
        VhostUserMemory([MemoryRegion(GUEST, 2 * MIB, USER, 0)], [os.dup(memfd)])
    with pytest.raises(MemoryAccessError, match="beyond its file"):
        VhostUserMemory([MemoryRegion(GUEST, MIB, USER, 4096)], [os.dup(memfd)])


def test_a_shared_memfd_can_no_longer_shrink() -> None:
    # A front-end truncating its memory under a running ring would kill the daemon with
    # SIGBUS; where the memfd allows sealing, sharing it seals it against shrinking.
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, MIB)
        memory = VhostUserMemory([MemoryRegion(GUEST, MIB, USER, 0)], [os.dup(fd)])
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            os.ftruncate(fd, 2 * MIB)  # growing is still allowed
            assert memory.contiguous(GUEST + MIB - 1, 1, write=True)[0] == 0
        finally:
            memory.close()
    finally:
        os.close(fd)
