"""IotlbMemory (the production IOVA translation) over the test DriverMemory."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from pyvduse.errors import MemoryAccessError
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.testing import DriverMemory
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO

PAGE = 4096


@pytest.fixture
def dmem() -> Iterator[DriverMemory]:
    memory = DriverMemory(size=1 << 20)
    yield memory
    memory.close()


@pytest.fixture
def gmem(dmem: DriverMemory) -> Iterator[IotlbMemory]:
    memory = dmem.guest_memory()
    yield memory
    memory.invalidate()


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- translation ------------------------------------------------------------------------------


def test_segments_read_the_driver_bytes(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    data = _pattern(3000)
    addr = dmem.base + 0x1234
    dmem.write(addr, data)
    views = gmem.segments(addr, len(data), False)
    assert len(views) == 1
    assert bytes(views[0]) == data
    assert dmem.faults == 1


def test_contiguous_reads_and_writes_the_driver_bytes(dmem: DriverMemory,
                                                      gmem: IotlbMemory) -> None:
    addr = dmem.base + 5 * PAGE + 3
    view = gmem.contiguous(addr, 100, True)
    assert len(view) == 100
    view[:] = _pattern(100, 1)
    assert dmem.read(addr, 100) == _pattern(100, 1)
    assert dmem.read(addr - 1, 1) == b"\0" and dmem.read(addr + 100, 1) == b"\0"


def test_segments_write_lands_in_driver_memory(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    addr = dmem.base + 10
    (view,) = gmem.segments(addr, 8, True)
    view[:] = b"ABCDEFGH"
    assert dmem.read(addr, 8) == b"ABCDEFGH"


def test_zero_length_needs_no_mapping(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    assert gmem.segments(0xDEAD0000, 0, False) == []
    assert dmem.faults == 0


def test_mapping_is_cached(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    for offset in (0, 100, 5000, 1 << 19):
        gmem.segments(dmem.base + offset, 16, False)
    assert dmem.faults == 1


# -- mapping borders --------------------------------------------------------------------------


def test_segments_split_at_entry_borders(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    dmem.split_entries(PAGE)
    addr = dmem.base + PAGE - 100
    data = _pattern(100 + PAGE + 50, 3)
    dmem.write(addr, data)
    views = gmem.segments(addr, len(data), False)
    assert [len(view) for view in views] == [100, PAGE, 50]
    assert b"".join(bytes(view) for view in views) == data
    assert dmem.faults == 3


def test_segments_exactly_on_borders(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    dmem.split_entries(PAGE)
    views = gmem.segments(dmem.base + PAGE, 2 * PAGE, True)
    assert [len(view) for view in views] == [PAGE, PAGE]


def test_contiguous_refuses_spanning_entries(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    dmem.split_entries(PAGE)
    with pytest.raises(MemoryAccessError, match="crosses"):
        gmem.contiguous(dmem.base + PAGE - 8, 16, False)
    # up to the last byte of the entry is fine
    assert len(gmem.contiguous(dmem.base + PAGE - 8, 8, False)) == 8


def test_contiguous_refuses_running_off_a_single_mapping(dmem: DriverMemory,
                                                         gmem: IotlbMemory) -> None:
    with pytest.raises(MemoryAccessError):
        gmem.contiguous(dmem.base + dmem.size - 4, 8, False)


# -- unmapped addresses and bad ranges --------------------------------------------------------


@pytest.mark.parametrize("where", ["below", "after"])
def test_unmapped_iova(dmem: DriverMemory, gmem: IotlbMemory, where: str) -> None:
    addr = dmem.base - 16 if where == "below" else dmem.base + dmem.size
    with pytest.raises(MemoryAccessError, match="no IOTLB mapping"):
        gmem.segments(addr, 16, False)
    with pytest.raises(MemoryAccessError):
        gmem.contiguous(addr, 16, False)


def test_segments_running_into_a_hole(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    dmem.set_entries([(base, base + PAGE - 1, 0, VDUSE_ACCESS_RW),
                      (base + 2 * PAGE, base + 3 * PAGE - 1, 2 * PAGE, VDUSE_ACCESS_RW)])
    with pytest.raises(MemoryAccessError):
        gmem.segments(base + PAGE - 8, 16, False)


@pytest.mark.parametrize(
    ("addr", "length"),
    [(-1, 16), (0x10000, -1), ((1 << 64) - 8, 16), ((1 << 64), 1), (0x10000, 1 << 64)],
)
def test_invalid_ranges_are_refused_before_any_lookup(dmem: DriverMemory, gmem: IotlbMemory,
                                                      addr: int, length: int) -> None:
    with pytest.raises(MemoryAccessError, match="invalid IOVA range"):
        gmem.segments(addr, length, False)
    with pytest.raises(MemoryAccessError, match="invalid IOVA range"):
        gmem.contiguous(addr, length, False)
    assert dmem.faults == 0


def test_range_ending_at_the_top_of_the_iova_space(dmem: DriverMemory,
                                                   gmem: IotlbMemory) -> None:
    top = 1 << 64
    dmem.set_entries([(top - PAGE, top - 1, PAGE, VDUSE_ACCESS_RW)])
    dmem.write(dmem.base + 2 * PAGE - 16, b"0123456789abcdef")
    (view,) = gmem.segments(top - 16, 16, False)
    assert bytes(view) == b"0123456789abcdef"
    assert bytes(gmem.contiguous(top - 16, 16, False)) == b"0123456789abcdef"


# -- permissions ------------------------------------------------------------------------------


def test_read_only_entry_refuses_writes(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    dmem.set_entries([(base, base + dmem.size - 1, 0, VDUSE_ACCESS_RO)])
    dmem.write(base, b"ro")
    assert bytes(gmem.segments(base, 2, False)[0]) == b"ro"
    with pytest.raises(MemoryAccessError, match="not writable"):
        gmem.segments(base, 2, True)
    with pytest.raises(MemoryAccessError, match="not writable"):
        gmem.contiguous(base, 2, True)
    # and the view it hands out for reading cannot be written either
    view = gmem.contiguous(base, 2, False)
    assert view.readonly


def test_write_only_entry_refuses_reads(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    dmem.set_entries([(base, base + dmem.size - 1, 0, VDUSE_ACCESS_WO)])
    (view,) = gmem.segments(base, 4, True)
    view[:] = b"wo!!"
    assert dmem.read(base, 4) == b"wo!!"
    with pytest.raises(MemoryAccessError, match="not readable"):
        gmem.segments(base, 4, False)
    with pytest.raises(MemoryAccessError, match="not readable"):
        gmem.contiguous(base, 4, False)


def test_permissions_checked_per_entry(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    dmem.set_entries([(base, base + PAGE - 1, 0, VDUSE_ACCESS_RW),
                      (base + PAGE, base + 2 * PAGE - 1, PAGE, VDUSE_ACCESS_RO)])
    assert len(gmem.segments(base + PAGE - 8, 16, False)) == 2
    with pytest.raises(MemoryAccessError, match="not writable"):
        gmem.segments(base + PAGE - 8, 16, True)


def test_entry_without_rights_is_refused(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    dmem.set_entries([(base, base + PAGE - 1, 0, 0)])
    with pytest.raises(MemoryAccessError, match="no access rights"):
        gmem.segments(base, 1, False)


# -- file offsets -----------------------------------------------------------------------------


def test_entry_with_unaligned_file_offset(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    iova = 0x4000_0000
    dmem.set_entries([(iova, iova + 2 * PAGE - 1, 100, VDUSE_ACCESS_RW)])
    data = _pattern(2 * PAGE, 9)
    os.pwrite(dmem.fd, data, 100)
    assert bytes(gmem.contiguous(iova, 2 * PAGE, False)) == data
    assert bytes(gmem.contiguous(iova + PAGE + 1, 10, False)) == data[PAGE + 1:PAGE + 11]
    gmem.contiguous(iova + 5, 3, True)[:] = b"xyz"
    assert os.pread(dmem.fd, 3, 105) == b"xyz"


def test_entry_with_page_aligned_file_offset(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    iova = 0x100000
    dmem.set_entries([(iova, iova + PAGE - 1, 3 * PAGE, VDUSE_ACCESS_RW)])
    os.pwrite(dmem.fd, b"page3", 3 * PAGE)
    assert bytes(gmem.contiguous(iova, 5, False)) == b"page3"


# -- invalidation -----------------------------------------------------------------------------


def test_invalidate_drops_mappings_and_refaults(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    gmem.segments(base, 16, False)
    gmem.segments(base + 100, 16, False)
    assert dmem.faults == 1
    gmem.invalidate()
    gmem.segments(base, 16, False)
    assert dmem.faults == 2


def test_invalidate_picks_up_a_changed_iotlb(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    base = dmem.base
    os.pwrite(dmem.fd, b"old!", 0)
    os.pwrite(dmem.fd, b"new!", PAGE)
    assert bytes(gmem.contiguous(base, 4, False)) == b"old!"
    dmem.set_entries([(base, base + PAGE - 1, PAGE, VDUSE_ACCESS_RO)])
    # still cached: the stale mapping answers until invalidated
    assert bytes(gmem.contiguous(base, 4, False)) == b"old!"
    gmem.invalidate()
    assert bytes(gmem.contiguous(base, 4, False)) == b"new!"
    with pytest.raises(MemoryAccessError, match="not writable"):
        gmem.contiguous(base, 4, True)
    with pytest.raises(MemoryAccessError):
        gmem.contiguous(base + PAGE, 4, False)  # no longer mapped


def test_invalidate_with_views_still_held(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    view = gmem.contiguous(dmem.base, 4, True)
    gmem.invalidate()  # must not raise even though a view pins the mapping
    view[:] = b"held"
    assert dmem.read(dmem.base, 4) == b"held"


# -- resolver contract ------------------------------------------------------------------------


def test_entry_fds_are_closed_and_mappings_released(dmem: DriverMemory,
                                                   gmem: IotlbMemory) -> None:
    # CPython 3.11's mmap keeps a dup of the fd it maps, so each live mapping holds exactly
    # one fd; the resolver's fd itself must be closed (else two per mapping).
    dmem.split_entries(PAGE)
    before = _open_fds()
    for page in range(64):
        gmem.segments(dmem.base + page * PAGE, 8, False)
    assert dmem.faults == 64
    assert _open_fds() - before <= 64
    gmem.invalidate()
    assert _open_fds() == before


def test_resolver_answer_not_covering_the_address(dmem: DriverMemory) -> None:
    dup_fds: list[int] = []

    def resolve(iova: int) -> IotlbEntry:
        fd = os.dup(dmem.fd)
        dup_fds.append(fd)
        return IotlbEntry(fd, 0x1000, 0x1FFF, 0, VDUSE_ACCESS_RW)

    memory = IotlbMemory(resolve)
    with pytest.raises(MemoryAccessError, match="does not cover"):
        memory.segments(0x5000, 8, False)
    with pytest.raises(OSError):
        os.fstat(dup_fds[0])  # closed despite the failure


def test_unmappable_entry_is_a_memory_error(dmem: DriverMemory) -> None:
    def resolve(iova: int) -> IotlbEntry:
        return IotlbEntry(os.dup(dmem.fd), 0x1000, 0x0FFF, 0, VDUSE_ACCESS_RW)  # last < start

    with pytest.raises(MemoryAccessError):
        IotlbMemory(resolve).segments(0x1000, 1, False)


def test_concurrent_faults(dmem: DriverMemory, gmem: IotlbMemory) -> None:
    dmem.split_entries(PAGE)
    for page in range(32):
        dmem.write(dmem.base + page * PAGE, bytes([page]) * 8)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(start: int) -> None:
        try:
            barrier.wait(5)
            for page in range(32):
                page = (page + start) % 32
                (view,) = gmem.segments(dmem.base + page * PAGE, 8, False)
                assert bytes(view) == bytes([page]) * 8
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i * 4,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert 32 <= dmem.faults <= 32 * 8
    # every page is now cached
    faults = dmem.faults
    for page in range(32):
        gmem.segments(dmem.base + page * PAGE, 8, False)
    assert dmem.faults == faults
