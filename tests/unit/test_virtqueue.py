"""SplitQueue (device side of a split ring) against the mock driver's rings."""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pyvduse.virtqueue as vq
from pyvduse.errors import RingError
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_RW
from pyvduse.uapi.virtio import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from pyvduse.virtqueue import (
    MAX_QUEUE_SIZE,
    Chain,
    ChainError,
    SplitQueue,
    is_valid_queue_size,
    vring_need_event,
)

PAGE = 4096
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


class Rig:
    """A driver memory, one mock ring and the SplitQueue serving it."""

    def __init__(self, size: int = 8, *, event_idx: bool = True, indirect: bool = True,
                 mem_size: int = 1 << 20, start: int = 0, granule: int | None = None) -> None:
        self.dmem = DriverMemory(size=mem_size)
        self.ring = MockSplitRing(self.dmem, size)
        if granule:
            # the rings keep one mapping; every buffer after them is split into granules
            base, end = self.dmem.base, self.dmem.alloc(0, PAGE)
            self.dmem.split_entries(granule)
            self.dmem.set_entries([(base, end - 1, 0, VDUSE_ACCESS_RW)]
                                  + [e for e in self.dmem.entries if e[0] >= end])
        self.gmem = self.dmem.guest_memory()
        self.ring.avail_idx = start
        self.ring.used_seen = start
        self.ring.set_used_event(start)  # the driver wants to hear of the first completion
        self.queue = SplitQueue(self.gmem, size, self.ring.desc_addr, self.ring.avail_addr,
                                self.ring.used_addr, event_idx=event_idx, indirect=indirect,
                                last_avail_idx=start, used_idx=start)

    def close(self) -> None:
        self.queue.release()
        self.gmem.invalidate()
        self.dmem.close()

    def rbuf(self, data: bytes) -> Buffer:
        return self.dmem.buffer(data)

    def wbuf(self, length: int) -> Buffer:
        return self.dmem.buffer(length, writable=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@contextmanager
def bounded_walk(limit: int = 100_000) -> Iterator[None]:
    """Fail (instead of hanging) if one test reads more than ``limit`` descriptors."""
    real = vq._unpack_desc
    count = 0

    def counting(buf: Any, offset: int) -> tuple[Any, ...]:
        nonlocal count
        count += 1
        if count > limit:
            raise AssertionError("descriptor walk does not terminate")
        return real(buf, offset)

    with mock.patch.object(vq, "_unpack_desc", counting):
        yield


def pop_bounded(queue: SplitQueue) -> Chain:
    with bounded_walk():
        return queue.pop()


def joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(view) for view in views)


def fill_writable(chain: Chain, seed: int) -> bytes:
    written = bytearray()
    for view in chain.writable:
        data = bytes((seed + len(written) + i) & 0xFF for i in range(len(view)))
        view[:] = data
        written += data
    return bytes(written)


# -- normal chains ----------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_pop_direct_and_indirect_chain(rig: Rig, indirect: bool) -> None:
    out = rig.wbuf(10)
    head = rig.ring.add_chain([rig.rbuf(b"hello "), rig.rbuf(b"world"), out], indirect=indirect)
    assert rig.queue.pending() == 1
    chain = rig.queue.pop()
    assert chain.head == head
    assert joined(chain.readable) == b"hello world"
    assert [len(view) for view in chain.writable] == [10]
    chain.writable[0][:] = b"0123456789"
    assert rig.dmem.read(out.addr, 10) == b"0123456789"
    assert rig.queue.pending() == 0
    assert rig.queue.last_avail_idx == 1


def test_pop_chain_of_many_segments_split_at_mapping_borders() -> None:
    r = Rig(size=64, granule=256)
    try:
        blobs = [bytes([i]) * (100 + 37 * i) for i in range(30)]
        outs = [r.wbuf(300) for _ in range(20)]
        head = r.ring.add_chain([*map(r.rbuf, blobs), *outs])
        chain = r.queue.pop()
        assert chain.head == head
        assert joined(chain.readable) == b"".join(blobs)
        assert len(chain.readable) > 30  # some buffers straddle a 256-byte entry
        assert sum(map(len, chain.writable)) == 20 * 300
        data = fill_writable(chain, 5)
        assert b"".join(r.dmem.read(o.addr, o.length) for o in outs) == data
    finally:
        r.close()


def test_chain_as_long_as_the_queue_is_accepted(rig: Rig) -> None:
    bufs = [rig.rbuf(bytes([i])) for i in range(rig.queue.size)]
    rig.ring.add_chain(bufs)
    assert joined(rig.queue.pop().readable) == bytes(range(rig.queue.size))


def test_indirect_table_as_long_as_the_queue(rig: Rig) -> None:
    bufs = [rig.rbuf(bytes([i])) for i in range(rig.queue.size)]
    rig.ring.add_chain(bufs, indirect=True)
    assert joined(rig.queue.pop().readable) == bytes(range(rig.queue.size))


def test_indirect_table_longer_than_the_queue_is_refused(rig: Rig) -> None:
    bufs = [rig.rbuf(bytes([i])) for i in range(rig.queue.size + 1)]
    head = rig.ring.add_chain(bufs, indirect=True)
    with pytest.raises(ChainError, match="exceeds the queue size") as refused:
        rig.queue.pop()
    assert refused.value.head == head


def test_indirect_table_up_to_the_offered_queue_size_fits_a_smaller_ring(rig: Rig) -> None:
    # A vhost-user front-end may pick a ring smaller than the queue size the device
    # offered; the driver still sizes indirect tables by the offered seg_max.
    queue = SplitQueue(rig.gmem, rig.queue.size, rig.ring.desc_addr, rig.ring.avail_addr,
                       rig.ring.used_addr, event_idx=True, indirect=True,
                       max_chain=2 * rig.queue.size)
    for count in (rig.queue.size + 1, 2 * rig.queue.size):
        bufs = [rig.rbuf(bytes([i])) for i in range(count)]
        rig.ring.add_chain(bufs, indirect=True)
        assert joined(queue.pop().readable) == bytes(range(count))
    rig.ring.add_chain([rig.rbuf(b"x")] * (2 * rig.queue.size + 1), indirect=True)
    with pytest.raises(ChainError, match=f"exceeds the queue size {2 * rig.queue.size}"):
        queue.pop()
    queue.release()


@pytest.mark.parametrize("indirect", [False, True])
def test_zero_length_buffers_are_skipped(rig: Rig, indirect: bool) -> None:
    rig.ring.add_chain([rig.rbuf(b""), rig.rbuf(b"abc"), rig.rbuf(b""), rig.wbuf(0),
                        rig.wbuf(4), rig.wbuf(0)], indirect=indirect)
    chain = rig.queue.pop()
    assert [bytes(view) for view in chain.readable] == [b"abc"]
    assert [len(view) for view in chain.writable] == [4]


def test_chain_of_only_empty_buffers(rig: Rig) -> None:
    head = rig.ring.add_chain([rig.rbuf(b"")])
    assert rig.queue.pop() == Chain(head, [], [])


def test_indirect_write_flag_on_the_table_descriptor_is_ignored(rig: Rig) -> None:
    table = rig.dmem.alloc(32)
    data = rig.rbuf(b"data")
    rig.ring.write_desc(0, data.addr, 4, NEXT, 1, table=table)
    rig.ring.write_desc(1, rig.wbuf(1).addr, 1, WRITE, 0, table=table)
    rig.ring.write_desc(3, table, 32, INDIRECT | WRITE)
    rig.ring.publish([3])
    chain = rig.queue.pop()
    assert (chain.head, joined(chain.readable), len(chain.writable)) == (3, b"data", 1)


# -- malformed chains -------------------------------------------------------------------------


def expect_chain_error(queue: SplitQueue, head: int, reason: str) -> ChainError:
    assert queue.pending() >= 1
    with pytest.raises(ChainError, match=reason) as info:
        pop_bounded(queue)
    assert info.value.head == head
    assert not queue.broken
    return info.value


def test_readable_after_writable(rig: Rig) -> None:
    head = rig.ring.add_chain([rig.rbuf(b"hdr"), rig.wbuf(4), rig.rbuf(b"late")])
    expect_chain_error(rig.queue, head, "readable descriptor after a writable")


def test_readable_after_writable_inside_indirect(rig: Rig) -> None:
    head = rig.ring.add_chain([rig.wbuf(4), rig.rbuf(b"late")], indirect=True)
    expect_chain_error(rig.queue, head, "readable descriptor after a writable")


def test_queue_continues_after_a_chain_error(rig: Rig) -> None:
    bad = rig.ring.add_chain([rig.wbuf(1), rig.rbuf(b"x")])
    good = rig.ring.add_chain([rig.rbuf(b"ok"), rig.wbuf(1)])
    assert rig.queue.pending() == 2
    expect_chain_error(rig.queue, bad, "after a writable")
    chain = rig.queue.pop()
    assert (chain.head, joined(chain.readable)) == (good, b"ok")
    rig.queue.push(bad, 0)
    rig.queue.push(good, 1)
    rig.queue.publish()
    assert rig.ring.take_used() == [(bad, 0), (good, 1)]


def test_descriptor_loop(rig: Rig) -> None:
    b = rig.rbuf(b"loop")
    rig.ring.write_desc(2, b.addr, 4, NEXT, 5)
    rig.ring.write_desc(5, b.addr, 4, NEXT, 2)
    rig.ring.publish([2])
    expect_chain_error(rig.queue, 2, "loops")


def test_descriptor_self_loop_of_empty_buffers(rig: Rig) -> None:
    rig.ring.write_desc(0, 0, 0, NEXT, 0)  # no memory access at all: only the budget stops it
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "loops")


def test_descriptor_loop_inside_indirect_table(rig: Rig) -> None:
    b = rig.rbuf(b"loop")
    table = rig.dmem.alloc(3 * 16)
    rig.ring.write_desc(0, b.addr, 4, NEXT, 1, table=table)
    rig.ring.write_desc(1, b.addr, 4, NEXT, 2, table=table)
    rig.ring.write_desc(2, b.addr, 4, NEXT, 0, table=table)
    rig.ring.write_desc(4, table, 3 * 16, INDIRECT)
    rig.ring.publish([4])
    expect_chain_error(rig.queue, 4, "loops")


def test_direct_descriptors_then_indirect_then_loop(rig: Rig) -> None:
    b = rig.rbuf(b"x")
    table = rig.dmem.alloc(16)
    rig.ring.write_desc(0, b.addr, 1, NEXT, 0, table=table)
    rig.ring.write_desc(6, b.addr, 1, NEXT, 7)
    rig.ring.write_desc(7, table, 16, INDIRECT)
    rig.ring.publish([6])
    expect_chain_error(rig.queue, 6, "loops")


def test_next_index_out_of_range(rig: Rig) -> None:
    b = rig.rbuf(b"x")
    rig.ring.write_desc(1, b.addr, 1, NEXT, rig.queue.size)
    rig.ring.publish([1])
    expect_chain_error(rig.queue, 1, "next index 8 beyond")


def test_next_index_out_of_range_inside_indirect(rig: Rig) -> None:
    b = rig.rbuf(b"x")
    table = rig.dmem.alloc(32)
    rig.ring.write_desc(0, b.addr, 1, NEXT, 1, table=table)
    rig.ring.write_desc(1, b.addr, 1, NEXT, 2, table=table)  # table has 2 entries
    rig.ring.write_desc(0, table, 32, INDIRECT)
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "next index 2 beyond the table of 2")


def test_head_out_of_range_is_a_ring_error_and_the_queue_continues(rig: Rig) -> None:
    rig.ring.publish([rig.queue.size + 3])
    good = rig.ring.add_chain([rig.rbuf(b"next")])
    rig.ring.publish([0xFFFF])
    assert rig.queue.pending() == 3
    with pytest.raises(RingError, match="beyond the queue size"):
        rig.queue.pop()
    assert not rig.queue.broken
    assert rig.queue.last_avail_idx == 1  # consumed
    chain = rig.queue.pop()
    assert (chain.head, joined(chain.readable)) == (good, b"next")
    with pytest.raises(RingError):
        rig.queue.pop()
    assert rig.queue.pending() == 0


def test_nested_indirect(rig: Rig) -> None:
    inner = rig.dmem.alloc(16)
    rig.ring.write_desc(0, rig.rbuf(b"x").addr, 1, 0, 0, table=inner)
    outer = rig.dmem.alloc(16)
    rig.ring.write_desc(0, inner, 16, INDIRECT, 0, table=outer)
    rig.ring.write_desc(3, outer, 16, INDIRECT)
    rig.ring.publish([3])
    expect_chain_error(rig.queue, 3, "nested indirect")


def test_indirect_with_next_flag(rig: Rig) -> None:
    table = rig.dmem.alloc(16)
    rig.ring.write_desc(0, rig.rbuf(b"x").addr, 1, 0, 0, table=table)
    rig.ring.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    rig.ring.write_desc(1, rig.wbuf(1).addr, 1, WRITE)
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "NEXT flag")


def test_indirect_without_the_feature() -> None:
    r = Rig(indirect=False)
    try:
        head = r.ring.add_chain([r.rbuf(b"x"), r.wbuf(1)], indirect=True)
        expect_chain_error(r.queue, head, "indirect descriptor.*INDIRECT_DESC")
        # direct chains still work
        head = r.ring.add_chain([r.rbuf(b"y"), r.wbuf(1)])
        assert r.queue.pop().head == head
    finally:
        r.close()


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_length_not_a_multiple_of_16(rig: Rig, length: int) -> None:
    table = rig.dmem.alloc(64)
    rig.ring.write_desc(0, rig.rbuf(b"x").addr, 1, 0, 0, table=table)
    rig.ring.write_desc(2, table, length, INDIRECT)
    rig.ring.publish([2])
    expect_chain_error(rig.queue, 2, f"indirect table length {length}")


def test_indirect_table_at_unmapped_address(rig: Rig) -> None:
    rig.ring.write_desc(0, 0xDEAD_0000, 32, INDIRECT)
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "indirect table")


def test_indirect_table_spanning_two_mappings() -> None:
    r = Rig(granule=PAGE)
    try:
        table = r.dmem.alloc(PAGE + 32, PAGE) + PAGE - 16  # 2 entries, one in each page
        r.ring.write_desc(0, table, 32, INDIRECT)
        r.ring.publish([0])
        expect_chain_error(r.queue, 0, "indirect table")
    finally:
        r.close()


@pytest.mark.parametrize("flags", [0, WRITE])
@pytest.mark.parametrize("addr", [0xDEAD_0000, 0x10000 - 2, (1 << 64) - 4])
def test_buffer_at_unmapped_address(rig: Rig, flags: int, addr: int) -> None:
    rig.ring.write_desc(1, addr, 8, flags)
    rig.ring.publish([1])
    expect_chain_error(rig.queue, 1, "IOVA|mapping")


def test_buffer_beyond_the_top_of_the_iova_space(rig: Rig) -> None:
    rig.ring.write_desc(1, (1 << 64) - 4, 8, 0)
    rig.ring.publish([1])
    expect_chain_error(rig.queue, 1, "invalid IOVA range")


def test_writable_buffer_in_a_read_only_mapping(rig: Rig) -> None:
    base = rig.dmem.base
    ro = 0x7000_0000
    rig.dmem.set_entries([(base, base + rig.dmem.size - 1, 0, VDUSE_ACCESS_RW),
                          (ro, ro + PAGE - 1, 0, VDUSE_ACCESS_RO)])
    rig.ring.write_desc(0, rig.rbuf(b"hdr").addr, 3, NEXT, 1)
    rig.ring.write_desc(1, ro, 1, WRITE)
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "not writable")


def test_chain_describing_more_than_4_gib() -> None:
    r = Rig(mem_size=8 << 30)  # a sparse memfd: the huge buffers are sliced, never touched
    try:
        far = r.dmem.base + (1 << 30)
        r.ring.write_desc(0, far, 0xFFFF_FFFF, NEXT, 1)
        r.ring.write_desc(1, far, 1, 0)
        r.ring.write_desc(2, far, 0xFFFF_FFFF, WRITE, 0)
        r.ring.write_desc(3, far, 0x8000_0000, NEXT, 4)
        r.ring.write_desc(4, far, 0x8000_0000, WRITE, 0)
        r.ring.publish([0, 2, 3])
        expect_chain_error(r.queue, 0, "more than 4 GiB")
        chain = r.queue.pop()  # exactly 2**32 - 1 bytes is the limit and is fine
        assert sum(map(len, chain.writable)) == 0xFFFF_FFFF
        expect_chain_error(r.queue, 3, "more than 4 GiB")
    finally:
        r.close()


def test_huge_lengths_without_memory_behind_them(rig: Rig) -> None:
    b = rig.rbuf(b"x")
    rig.ring.write_desc(0, b.addr, 0xFFFF_FFFF, 0)
    rig.ring.publish([0])
    expect_chain_error(rig.queue, 0, "no IOTLB mapping for IOVA 0x110000")


# -- the avail index --------------------------------------------------------------------------


def test_avail_index_jumping_beyond_the_size_breaks_the_queue(rig: Rig) -> None:
    rig.ring.publish([], avail_idx=rig.queue.size + 1)
    with pytest.raises(RingError, match="more than the queue size"):
        rig.queue.pending()
    assert rig.queue.broken


def test_avail_index_moving_backwards_breaks_the_queue(rig: Rig) -> None:
    rig.ring.publish([], avail_idx=0xFFFF)
    with pytest.raises(RingError):
        rig.queue.pending()
    assert rig.queue.broken


def test_a_full_ring_is_fine(rig: Rig) -> None:
    for _ in range(rig.queue.size):
        rig.ring.add_chain([rig.rbuf(b"z")])
    assert rig.queue.pending() == rig.queue.size
    assert not rig.queue.broken


@pytest.mark.parametrize("start", [65530, 65535, 65528])
def test_index_wrap_around(start: int) -> None:
    r = Rig(size=8, start=start)
    try:
        done: list[tuple[int, int]] = []
        for round_ in range(3):
            heads = [r.ring.add_chain([r.rbuf(bytes([round_, i])), r.wbuf(2)])
                     for i in range(3)]
            assert r.queue.pending() == 3
            for i, head in enumerate(heads):
                chain = r.queue.pop()
                assert chain.head == head
                assert joined(chain.readable) == bytes([round_, i])
                r.queue.push(chain.head, 2 + i)
            r.queue.publish()
            done = r.ring.take_used()
            assert done == [(h, 2 + i) for i, h in enumerate(heads)]
        end = (start + 9) & 0xFFFF
        assert r.queue.last_avail_idx == end
        assert r.queue.used_idx == end
        assert r.ring.used_idx() == end
        assert r.queue.avail_idx() == end
    finally:
        r.close()


# -- completions ------------------------------------------------------------------------------


def test_push_writes_the_used_element_and_publish_the_index(rig: Rig) -> None:
    used = rig.ring.used_addr
    rig.queue.push(5, 0x01020304)
    assert rig.ring.used_idx() == 0  # not visible before publish
    assert rig.dmem.read(used + 4, 8) == struct.pack("<II", 5, 0x01020304)
    rig.queue.publish()
    assert rig.ring.used_idx() == 1
    rig.queue.push(6, 7)
    rig.queue.publish()
    assert rig.dmem.read(used + 12, 8) == struct.pack("<II", 6, 7)
    assert rig.ring.take_used() == [(5, 0x01020304), (6, 7)]


def test_used_idx_defaults_to_the_ring_value() -> None:
    dmem = DriverMemory(size=1 << 20)
    try:
        ring = MockSplitRing(dmem, 8)
        dmem.write(ring.used_addr + 2, struct.pack("<H", 77))
        gmem = dmem.guest_memory()
        queue = SplitQueue(gmem, 8, ring.desc_addr, ring.avail_addr, ring.used_addr,
                           event_idx=False, indirect=False, last_avail_idx=0x1_0005)
        assert (queue.used_idx, queue.last_avail_idx) == (77, 5)
        queue.release()
        gmem.invalidate()
    finally:
        dmem.close()


# -- interrupt suppression --------------------------------------------------------------------

NEED_EVENT_TABLE = [
    # event, new, old, expected
    (0, 1, 0, True),
    (1, 1, 0, False),
    (0, 2, 1, False),
    (1, 2, 1, True),
    (5, 10, 0, True),
    (9, 10, 0, True),
    (10, 10, 0, False),
    (3, 3, 3, False),
    (0xFFFF, 2, 0xFFFE, True),  # wrap: event just before the wrap
    (0, 2, 0xFFFE, True),
    (1, 2, 0xFFFE, True),
    (2, 2, 0xFFFE, False),
    (0xFFFD, 2, 0xFFFE, False),  # event before old
    (0xFFFE, 0xFFFF, 0xFFFE, True),
    (0xFFFF, 0, 0xFFFF, True),
    (0, 0, 0xFFFF, False),
]


@pytest.mark.parametrize(("event", "new", "old", "expected"), NEED_EVENT_TABLE)
def test_vring_need_event_table(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_means_event_in_old_to_new(event: int, new: int, old: int) -> None:
    window = (new - old) & 0xFFFF
    assert vring_need_event(event, new, old) == ((event - old) & 0xFFFF < window)


def complete(r: Rig, count: int) -> None:
    for _ in range(count):
        r.queue.push(0, 0)
    r.queue.publish()


def test_needs_interrupt_honours_used_event(rig: Rig) -> None:
    q, ring = rig.queue, rig.ring
    assert not q.needs_interrupt()  # nothing published
    ring.set_used_event(0)
    complete(rig, 1)
    assert q.needs_interrupt()  # 0 -> 1 passes event 0
    assert not q.needs_interrupt()  # already told
    complete(rig, 1)
    assert not q.needs_interrupt()  # 1 -> 2 does not pass 0 again
    ring.set_used_event(5)
    complete(rig, 2)
    assert not q.needs_interrupt()  # 2 -> 4
    complete(rig, 2)
    assert q.needs_interrupt()  # 4 -> 6 passes 5
    ring.set_used_event(6)
    complete(rig, 1)
    assert q.needs_interrupt()  # 6 -> 7 passes 6
    ring.set_used_event(0)
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    complete(rig, 1)
    assert not q.needs_interrupt()


def test_needs_interrupt_across_the_wrap() -> None:
    r = Rig(start=0xFFFE)
    try:
        r.ring.set_used_event(0xFFFF)
        complete(r, 3)  # used 0xFFFE -> 1
        assert r.queue.used_idx == 1
        assert r.queue.needs_interrupt()
        r.ring.set_used_event(3)
        complete(r, 2)  # 1 -> 3
        assert not r.queue.needs_interrupt()
        complete(r, 1)  # 3 -> 4
        assert r.queue.needs_interrupt()
    finally:
        r.close()


def test_needs_interrupt_without_event_idx_honours_no_interrupt() -> None:
    r = Rig(event_idx=False)
    try:
        q = r.queue
        r.ring.set_used_event(100)  # ignored without EVENT_IDX
        complete(r, 1)
        assert q.needs_interrupt()
        assert not q.needs_interrupt()
        r.ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        complete(r, 1)
        assert not q.needs_interrupt()
        r.ring.set_avail_flags(0)
        assert not q.needs_interrupt()  # nothing new since the last decision
        complete(r, 1)
        assert q.needs_interrupt()
    finally:
        r.close()


# -- kick suppression -------------------------------------------------------------------------


def test_enable_kicks_with_event_idx(rig: Rig) -> None:
    q, ring = rig.queue, rig.ring
    for _ in range(2):
        ring.add_chain([rig.rbuf(b"k")])
    q.disable_kicks()
    assert ring.used_flags() == 0  # EVENT_IDX uses avail_event, never NO_NOTIFY
    q.pop()
    assert q.enable_kicks()  # one more is waiting
    assert ring.avail_event() == 1
    q.pop()
    assert not q.enable_kicks()
    assert ring.avail_event() == 2
    ring.add_chain([rig.rbuf(b"k")])
    assert q.enable_kicks()  # work arrived meanwhile
    assert ring.avail_event() == 2
    assert ring.used_flags() == 0


def test_enable_kicks_without_event_idx() -> None:
    r = Rig(event_idx=False)
    try:
        q, ring = r.queue, r.ring
        q.disable_kicks()
        assert ring.used_flags() == VRING_USED_F_NO_NOTIFY
        assert not q.enable_kicks()
        assert ring.used_flags() == 0
        assert ring.avail_event() == 0
        q.disable_kicks()
        ring.add_chain([r.rbuf(b"k")])
        assert q.enable_kicks()
        assert ring.used_flags() == 0
    finally:
        r.close()


def test_enable_kicks_across_the_wrap() -> None:
    r = Rig(start=0xFFFF)
    try:
        r.ring.add_chain([r.rbuf(b"w")])
        r.queue.pop()
        assert not r.queue.enable_kicks()
        assert r.ring.avail_event() == 0
    finally:
        r.close()


# -- ring validation --------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "valid"), [
    (0, False), (1, True), (2, True), (3, False), (6, False), (100, False), (256, True),
    (MAX_QUEUE_SIZE, True), (MAX_QUEUE_SIZE + 1, False), (2 * MAX_QUEUE_SIZE, False), (-4, False),
])
def test_is_valid_queue_size(size: int, valid: bool) -> None:
    assert is_valid_queue_size(size) is valid


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536])
def test_queue_size_rejected(size: int) -> None:
    dmem = DriverMemory(size=4 << 20)
    try:
        ring = MockSplitRing(dmem, 8)
        with pytest.raises(RingError, match="power of two"):
            SplitQueue(dmem.guest_memory(), size, ring.desc_addr, ring.avail_addr,
                       ring.used_addr, event_idx=True, indirect=True)
    finally:
        dmem.close()


def test_largest_queue_size_accepted() -> None:
    r = Rig(size=MAX_QUEUE_SIZE, mem_size=4 << 20)
    try:
        head = r.ring.add_chain([r.rbuf(b"big")])
        assert r.queue.pop().head == head
    finally:
        r.close()


@pytest.mark.parametrize(("desc", "avail", "used"), [(8, 0, 0), (0, 1, 0), (0, 0, 2), (4, 0, 0)])
def test_misaligned_rings(desc: int, avail: int, used: int) -> None:
    dmem = DriverMemory(size=1 << 20)
    try:
        ring = MockSplitRing(dmem, 8)
        with pytest.raises(RingError, match="misaligned"):
            SplitQueue(dmem.guest_memory(), 8, ring.desc_addr + desc, ring.avail_addr + avail,
                       ring.used_addr + used, event_idx=True, indirect=True)
    finally:
        dmem.close()


@pytest.mark.parametrize("which", ["desc", "avail", "used"])
def test_unmapped_rings(which: str) -> None:
    dmem = DriverMemory(size=1 << 20)
    try:
        ring = MockSplitRing(dmem, 8)
        addrs = {"desc": ring.desc_addr, "avail": ring.avail_addr, "used": ring.used_addr}
        addrs[which] = 0x4000_0000
        with pytest.raises(RingError, match="cannot map"):
            SplitQueue(dmem.guest_memory(), 8, addrs["desc"], addrs["avail"], addrs["used"],
                       event_idx=True, indirect=True)
    finally:
        dmem.close()


def test_used_ring_in_read_only_memory() -> None:
    dmem = DriverMemory(size=1 << 20)
    try:
        ring = MockSplitRing(dmem, 8)
        dmem.set_entries([(dmem.base, dmem.base + dmem.size - 1, 0, VDUSE_ACCESS_RO)])
        with pytest.raises(RingError, match="not writable"):
            SplitQueue(dmem.guest_memory(), 8, ring.desc_addr, ring.avail_addr, ring.used_addr,
                       event_idx=True, indirect=True)
    finally:
        dmem.close()


def test_ring_straddling_two_mappings() -> None:
    dmem = DriverMemory(size=1 << 20)
    try:
        dmem.split_entries(PAGE)
        ring = MockSplitRing(dmem, 512)  # the 8 KiB descriptor table spans two entries
        with pytest.raises(RingError, match="cannot map"):
            SplitQueue(dmem.guest_memory(), 512, ring.desc_addr, ring.avail_addr,
                       ring.used_addr, event_idx=True, indirect=True)
    finally:
        dmem.close()


def test_release_leaves_the_driver_memory_alone(rig: Rig) -> None:
    rig.ring.add_chain([rig.rbuf(b"x" * 16)])
    rig.queue.release()
    rig.queue.release()  # idempotent
    # a thread still holding the queue finds it empty and writes nowhere the driver looks
    assert rig.queue.pending() == 0
    rig.queue.push(0, 1)
    rig.queue.publish()
    assert rig.ring.used_idx() == 0
    rig.queue = SplitQueue(rig.gmem, 8, rig.ring.desc_addr, rig.ring.avail_addr,
                           rig.ring.used_addr, event_idx=True, indirect=True)


# -- property tests ---------------------------------------------------------------------------

buffer_lengths = st.lists(st.integers(0, 300), max_size=4)
chain_specs = st.tuples(st.booleans(), buffer_lengths, buffer_lengths).filter(
    lambda spec: len(spec[1]) + len(spec[2]) > 0)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(st.lists(chain_specs, min_size=1, max_size=6), min_size=1, max_size=3),
    start=st.integers(0, 0xFFFF),
    granule=st.sampled_from([None, 128, PAGE]),
    event_idx=st.booleans(),
)
def test_random_valid_chains_round_trip(rounds: list[list[tuple[bool, list[int], list[int]]]],
                                        start: int, granule: int | None,
                                        event_idx: bool) -> None:
    r = Rig(size=64, start=start, event_idx=event_idx, granule=granule)
    try:
        seed = 0
        for specs in rounds:
            expected = []
            for indirect, reads, writes in specs:
                payload = [bytes((seed + i + n) & 0xFF for i in range(n)) for n in reads]
                seed += 1
                ins = [r.rbuf(data) for data in payload]
                outs = [r.wbuf(n) for n in writes]
                if indirect and granule:
                    r.dmem.alloc(0, granule)  # an indirect table must sit in one mapping
                head = r.ring.add_chain([*ins, *outs], indirect=indirect)
                expected.append((head, b"".join(payload), outs))
            assert r.queue.pending() == len(specs)
            for head, data, outs in expected:
                chain = r.queue.pop()
                assert chain.head == head
                assert joined(chain.readable) == data
                assert all(len(view) for view in chain.readable + chain.writable)
                assert sum(map(len, chain.writable)) == sum(o.length for o in outs)
                written = fill_writable(chain, head)
                assert b"".join(r.dmem.read(o.addr, o.length) for o in outs) == written
                r.queue.push(head, len(written))
            r.queue.publish()
            assert r.queue.needs_interrupt()  # take_used re-armed used_event every round
            assert r.ring.take_used() == [(h, sum(o.length for o in outs))
                                          for h, _, outs in expected]
            assert r.queue.pending() == 0
        total = sum(map(len, rounds))
        assert r.queue.last_avail_idx == r.queue.used_idx == (start + total) & 0xFFFF
    finally:
        r.close()


GARBAGE_MEM = 256 << 10


@st.composite
def garbage_rings(draw: Callable[..., Any]) -> dict[str, Any]:
    size = draw(st.sampled_from([1, 2, 8, 16]))
    base = 0x10000
    addr = st.one_of(
        st.integers(base, base + GARBAGE_MEM - 1),  # inside the mapping
        st.integers(base + GARBAGE_MEM // 2, base + GARBAGE_MEM - 64),
        st.sampled_from(["table0", "table1", "ring"]),  # at a descriptor table
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, (1 << 64) - 16, base - 8, base + GARBAGE_MEM - 8]),
    )
    length = st.one_of(st.integers(0, 64), st.integers(0, 64),
                       st.sampled_from([16, 32, 48, 128, 4096, 0xFFFF_FFFF]),
                       st.integers(0, 0xFFFF_FFFF))
    flags = st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE]),
                      st.sampled_from([0, NEXT, WRITE, NEXT | WRITE]),
                      st.sampled_from([INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]),
                      st.integers(0, 0xFFFF))
    index = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 20))
    desc = st.tuples(addr, length, flags, st.one_of(index, st.integers(0, 7)))
    return {
        "size": size,
        "ring": draw(st.lists(desc, min_size=size, max_size=size)),
        "table0": draw(st.lists(desc, min_size=1, max_size=8)),
        "table1": draw(st.lists(desc, min_size=1, max_size=8)),
        "heads": draw(st.lists(index, max_size=size)),
        "avail_idx": draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF))),
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.one_of(st.just(True), st.booleans())),
        "split": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(garbage_rings())
def test_garbage_descriptors_only_raise_chain_or_ring_errors(spec: dict[str, Any]) -> None:
    r = Rig(size=spec["size"], mem_size=GARBAGE_MEM, event_idx=spec["event_idx"],
            indirect=spec["indirect"], granule=PAGE if spec["split"] else None)
    try:
        tables = {"table0": r.dmem.alloc(16 * 8), "table1": r.dmem.alloc(16 * 8),
                  "ring": r.ring.desc_addr}

        def resolve(a: int | str) -> int:
            return tables[a] if isinstance(a, str) else a

        for name in ("table0", "table1"):
            for i, (a, ln, fl, nx) in enumerate(spec[name]):
                r.ring.write_desc(i, resolve(a), ln, fl, nx, table=tables[name])
        for i, (a, ln, fl, nx) in enumerate(spec["ring"]):
            r.ring.write_desc(i, resolve(a), ln, fl, nx)
        r.ring.publish(spec["heads"], avail_idx=spec["avail_idx"])
        q = r.queue
        with bounded_walk(limit=(q.size + 1 + GARBAGE_MEM // 16) * 2 * q.size + 1):
            try:
                count = q.pending()
            except RingError:
                event("ring error: avail index")
                assert q.broken
                return
            for _ in range(count):
                try:
                    chain = q.pop()
                except ChainError as exc:
                    event("chain error: " + re.sub(r"0x[0-9a-f]+|\d+", "N", exc.reason)[:40])
                    assert 0 <= exc.head < q.size
                    q.push(exc.head, 0)
                    continue
                except RingError:
                    event("ring error: bad head")
                    continue
                event("valid chain")
                assert 0 <= chain.head < q.size
                assert all(len(view) for view in chain.readable + chain.writable)
                assert sum(map(len, chain.readable + chain.writable)) <= 0xFFFF_FFFF
                assert all(not view.readonly for view in chain.writable)
                q.push(chain.head, 0)
            q.publish()
            q.needs_interrupt()
            q.enable_kicks()
        assert q.pending() == 0
    finally:
        r.close()


def test_pop_on_a_looping_ring_finishes_in_a_thread() -> None:
    """A belt-and-braces check without patching: a looping chain must not hang a thread."""
    r = Rig(size=32768 // 64)
    try:
        for i in range(r.queue.size):
            r.ring.write_desc(i, 0, 0, NEXT, (i + 1) % r.queue.size)
        r.ring.publish([0])
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                r.queue.pop()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], ChainError)
    finally:
        r.close()
