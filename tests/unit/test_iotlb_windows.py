"""IotlbMemory windows: adjacent IOTLB entries of different files as one hot region.

A vhost-vdpa client such as libblkio maps its own memory region (virtqueues,
request headers, status bytes) and the caller's data buffers as separate
files at adjacent IOVAs, so each request uses two IOTLB entries. Without a
window the split ring's fast path never applies to such requests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pyvduse.errors import MemoryAccessError
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_RW
from pyvduse.virtqueue import Chain, SplitQueue

PAGE = 4096
OWN = 0x10000  # the client's own region (rings, headers, status bytes): 64 KiB
OWN_SIZE = 64 << 10
DATA = OWN + OWN_SIZE  # the caller's buffers, right after it: 128 KiB of another file
DATA_SIZE = 128 << 10


class TwoFiles:
    """A libblkio-like IOVA space: ``own`` (a DriverMemory) and a data memfd after it."""

    def __init__(self, data_at: int = DATA, data_offset: int = 0,
                 data_perm: int = VDUSE_ACCESS_RW, same_file: bool = False) -> None:
        self.own = DriverMemory(size=OWN_SIZE + (DATA_SIZE if same_file else 0), base=OWN)
        self.data_fd = self.own.fd if same_file else os.memfd_create("data", os.MFD_CLOEXEC)
        if not same_file:
            os.ftruncate(self.data_fd, data_offset + DATA_SIZE)
        self.data_at = data_at
        self.data_offset = OWN_SIZE if same_file else data_offset
        self.data_perm = data_perm
        self.same_file = same_file
        self.faults = 0
        self.memory = IotlbMemory(self.resolve)

    def resolve(self, iova: int) -> IotlbEntry:
        self.faults += 1
        if OWN <= iova < OWN + OWN_SIZE:
            return IotlbEntry(os.dup(self.own.fd), OWN, OWN + OWN_SIZE - 1, 0, VDUSE_ACCESS_RW)
        if self.data_at <= iova < self.data_at + DATA_SIZE:
            return IotlbEntry(os.dup(self.data_fd), self.data_at, self.data_at + DATA_SIZE - 1,
                              self.data_offset, self.data_perm)
        raise MemoryAccessError(f"no IOTLB mapping for IOVA {iova:#x}")

    def write_data(self, iova: int, data: bytes) -> None:
        os.pwrite(self.data_fd, data, iova - self.data_at + self.data_offset)

    def read_data(self, iova: int, length: int) -> bytes:
        return os.pread(self.data_fd, length, iova - self.data_at + self.data_offset)

    def close(self) -> None:
        self.memory.invalidate()
        if not self.same_file:
            os.close(self.data_fd)
        self.own.close()


@pytest.fixture
def files() -> Iterator[TwoFiles]:
    space = TwoFiles()
    yield space
    space.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return len(maps.read().splitlines())


def test_adjacent_entries_of_two_files_make_one_hot_region(files: TwoFiles) -> None:
    files.own.write(OWN + 100, b"header!!")
    files.write_data(DATA + 5000, b"payload")
    memory = files.memory
    assert bytes(memory.segments(OWN + 100, 8, False)[0]) == b"header!!"
    assert memory.hot[:3] == (OWN, OWN + OWN_SIZE, OWN + OWN_SIZE)  # one entry mapped so far
    memory.segments(DATA + 5000, 7, False)
    start, read_end, write_end, view = memory.hot
    assert (start, read_end, write_end) == (OWN, DATA + DATA_SIZE, DATA + DATA_SIZE)
    assert len(view) == OWN_SIZE + DATA_SIZE
    # the window is the two files side by side, both ways
    assert bytes(view[100:108]) == b"header!!"
    assert bytes(view[DATA - OWN + 5000:DATA - OWN + 5007]) == b"payload"
    view[DATA - OWN + 9000:DATA - OWN + 9004] = b"back"
    assert files.read_data(DATA + 9000, 4) == b"back"
    view[200:203] = b"own"
    assert files.own.read(OWN + 200, 3) == b"own"
    # a lookup through either entry makes the window hot
    memory.segments(OWN + 8, 8, True)
    assert memory.hot[0] == OWN and memory.hot[1] == DATA + DATA_SIZE
    # segments and contiguous still follow the entries
    assert [len(v) for v in memory.segments(DATA - 8, 16, False)] == [8, 8]
    with pytest.raises(MemoryAccessError, match="crosses"):
        memory.contiguous(DATA - 8, 16, False)


def test_window_made_whichever_entry_comes_first(files: TwoFiles) -> None:
    files.memory.segments(DATA + 10, 4, True)
    assert files.memory.hot[1] == DATA + DATA_SIZE and files.memory.hot[0] == DATA
    files.memory.segments(OWN, 4, True)
    assert files.memory.hot[:3] == (OWN, DATA + DATA_SIZE, DATA + DATA_SIZE)


def _request_ring(files: TwoFiles) -> tuple[MockSplitRing, SplitQueue]:
    ring = MockSplitRing(files.own, 8)
    queue = SplitQueue(files.memory, 8, ring.desc_addr, ring.avail_addr, ring.used_addr,
                       event_idx=True, indirect=True)
    return ring, queue


def _no_walk(head: int) -> Chain:
    raise AssertionError(f"chain {head} took the general walk")


def test_a_request_across_the_two_files_takes_the_fast_path(files: TwoFiles) -> None:
    """libblkio's layout: header and status in its own region, data in the caller's."""
    ring, queue = _request_ring(files)
    header = files.own.buffer(struct.pack("<IIQ", 0, 0, 8))  # VIRTIO_BLK_T_IN, sector 8
    status = files.own.buffer(1, writable=True)
    files.write_data(DATA + 3 * PAGE, b"\xee" * PAGE)
    data = Buffer(DATA + 3 * PAGE, PAGE, True)
    try:
        ring.add_chain([header, data, status])
        first = queue.pop()  # maps the data entry through the general walk: the window forms
        ring.add_chain([header, data, status])
        queue._walk = _no_walk  # type: ignore[method-assign]
        chain = queue.pop()
    finally:
        queue.__dict__.pop("_walk", None)
    for got in (first, chain):
        assert [bytes(v) for v in got.readable] == [struct.pack("<IIQ", 0, 0, 8)]
        assert [len(v) for v in got.writable] == [PAGE, 1]
        assert bytes(got.writable[0]) == b"\xee" * PAGE
    chain.writable[0][:4] = b"read"
    chain.writable[1][0] = 0
    assert files.read_data(DATA + 3 * PAGE, 4) == b"read"
    assert files.own.read(status.addr, 1) == b"\0"
    queue.release()


def test_request_buffers_outlive_an_iotlb_update(files: TwoFiles) -> None:
    """A request in flight keeps its window views across invalidate (an IOTLB update)."""
    ring, queue = _request_ring(files)
    header = files.own.buffer(struct.pack("<IIQ", 0, 0, 0))
    status = files.own.buffer(1, writable=True)
    data = Buffer(DATA, PAGE, True)
    ring.add_chain([header, data, status])
    queue.pop()
    ring.add_chain([header, data, status])
    chain = queue.pop()
    queue.release()
    files.memory.invalidate()
    chain.writable[0][:5] = b"late!"  # completes after the remap: the mapping is still there
    assert files.read_data(DATA, 5) == b"late!"


@pytest.mark.parametrize("layout", ["one file", "a gap", "unaligned border", "other rights"])
def test_no_window_where_entries_do_not_join(layout: str) -> None:
    space = {
        "one file": lambda: TwoFiles(same_file=True),
        "a gap": lambda: TwoFiles(data_at=DATA + PAGE),
        "unaligned border": lambda: TwoFiles(data_offset=512),
        "other rights": lambda: TwoFiles(data_perm=VDUSE_ACCESS_RO),
    }[layout]()
    try:
        space.memory.segments(OWN, 8, False)
        space.memory.segments(space.data_at, 8, False)
        start, read_end, _write_end, _view = space.memory.hot
        assert (start, read_end) == (space.data_at, space.data_at + DATA_SIZE)
        assert space.faults == 2  # no entry resolved again for a window
    finally:
        space.close()


def test_window_mappings_and_fds_are_released(files: TwoFiles) -> None:
    before = _open_fds()
    maps_before = _mappings()
    files.memory.segments(OWN, 8, False)
    files.memory.segments(DATA, 8, False)
    assert files.faults == 4  # the two entries, then both again for the window
    assert _open_fds() - before <= 2  # one per Region mapping (mmap keeps a dup); none kept
    files.memory.invalidate()
    assert _open_fds() == before
    assert _mappings() <= maps_before
