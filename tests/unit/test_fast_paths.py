"""The data path's fast paths against the general paths they shortcut.

``SplitQueue.pop`` and ``BlkHandler.handle`` each recognise the common layout and
hand everything else to a general path that makes every check in order. These
tests build chains close to the common layouts with random defects and require
the fast path to give exactly what the general path gives: the same chain (the
same bytes of driver memory, split the same way) or the same error; the same
status byte, used length, backend calls and data.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvduse.backends.base import Backend
from pyvduse.blk import BlkConfig, BlkHandler
from pyvduse.errors import MemoryAccessError, RingError
from pyvduse.memory import NO_HOT_REGION
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO
from pyvduse.virtqueue import Chain, ChainError, SplitQueue

NEXT, WRITE, INDIRECT = v.VRING_DESC_F_NEXT, v.VRING_DESC_F_WRITE, v.VRING_DESC_F_INDIRECT
PAGE = 4096
MEM = 256 << 10
BASE = 0x10000
QSIZE = 8


def outcome(call: Any) -> tuple[Any, ...]:
    """What a pop gives, comparable across paths: chain contents or the error."""
    try:
        chain = call()
    except ChainError as exc:
        return ("ChainError", exc.head, exc.reason)
    except RingError as exc:
        return ("RingError", str(exc))
    # Lengths, and the bytes at both ends of each view (random data tells places apart;
    # never the whole view, which may be gigabytes of untouched sparse memory).
    return ("chain", chain.head, [(len(view), bytes(view[:64]), bytes(view[-64:]))
                                  for view in chain.readable],
            [(len(view), bytes(view[:64]), bytes(view[-64:]), view.readonly)
             for view in chain.writable])


class Rig:
    """A ring in random-filled driver memory, mapped as one IOTLB entry or one per page.

    The last page is read-only for the device, the one before it write-only.
    """

    def __init__(self, split: bool = False, indirect: bool = True) -> None:
        self.dmem = DriverMemory(size=MEM, base=BASE)
        self.ring = MockSplitRing(self.dmem, QSIZE)
        self.data_start = self.dmem.alloc(0, PAGE)
        self.tables = self.data_start + PAGE + 16  # indirect tables: in the data area
        self.wo_page = BASE + MEM - 2 * PAGE
        self.ro_page = BASE + MEM - PAGE
        self.data_end = self.wo_page
        self.dmem.write(self.data_start, os.urandom(MEM - (self.data_start - BASE)))
        entries = [(BASE, self.data_start - 1, 0, VDUSE_ACCESS_RW)]
        if split:
            entries += [(a, a + PAGE - 1, a - BASE, VDUSE_ACCESS_RW)
                        for a in range(self.data_start, self.data_end, PAGE)]
        else:
            entries.append((self.data_start, self.data_end - 1, self.data_start - BASE,
                            VDUSE_ACCESS_RW))
        entries += [(self.wo_page, self.wo_page + PAGE - 1, self.wo_page - BASE, VDUSE_ACCESS_WO),
                    (self.ro_page, self.ro_page + PAGE - 1, self.ro_page - BASE, VDUSE_ACCESS_RO)]
        self.dmem.set_entries(entries)
        self.gmem = self.dmem.guest_memory()
        self.queue = SplitQueue(self.gmem, QSIZE, self.ring.desc_addr, self.ring.avail_addr,
                                self.ring.used_addr, event_idx=True, indirect=indirect)

    def close(self) -> None:
        self.queue.release()
        self.gmem.invalidate()
        self.dmem.close()

    def area(self, where: str) -> tuple[int, int]:
        """IOVA range of a placement."""
        return {"data": (self.data_start, self.data_end),
                "WO page": (self.wo_page, self.ro_page),
                "RO page": (self.ro_page, self.ro_page + PAGE)}[where]


TABLE_AREA = 16 * (QSIZE + 2)

# Chains as drivers write them (header / data / status, next = i + 1, in one indirect
# table or in consecutive ring slots), all in the data area or all in the write-only or
# the read-only page, with at most one defect. Each defect has a few variants.
DEFECTS: dict[str, list[Any]] = {
    "none": [None],
    "order": [None],  # WRITE toggled
    "zero length": [None],
    "long": [2 * PAGE + 1, 1 << 31, 0xFFFF_FFFF],
    "crosses": ["data page", "data end", "RO page start"],
    "in WO page": [0, PAGE - 1024],
    "in RO page": [0, PAGE - 1024],
    "unmapped": [0, BASE - 8, 0xDEAD_0000, (1 << 64) - 8],
    "next beyond": ["len", "len + 1", 0xFFFF],
    "next back": [0, 1, 2, 3],
    "unknown flag": [8, 0x10, 0x8000],
    "indirect inside": [None],
    "head NEXT": [None],
    "head unknown flag": [None],
    "table length": [0, 8, -16, 8, 16, 16 * QSIZE],  # relative to 16 * count, except 0 and 8
    "table placement": ["crosses", "unmapped", "WO page", "RO page"],
}


def build_spec(rig: Rig, *, indirect: bool, count: int, shape: str, where: str,
               lengths: list[int], offsets: list[int], head_write: bool, defect: str,
               position: int, variant: int) -> dict[str, Any]:
    low, high = rig.area(where)
    table = []
    for i in range(count):
        writable = (shape == "read" and i > 0) or i == count - 1
        flags = (WRITE if writable else 0) | (NEXT if i < count - 1 else 0)
        length = lengths[i % len(lengths)]
        addr = low + (offsets[i % len(offsets)] % (high - low - length + 1))
        table.append([addr, length, flags, i + 1])
    spec: dict[str, Any] = {"table": table, "indirect": indirect, "table_len": 16 * count,
                            "table_at": where, "defect": defect,
                            "head_flags": INDIRECT | (WRITE if head_write else 0)}
    option = DEFECTS[defect][variant % len(DEFECTS[defect])]
    desc = table[position % count]
    table_len = count if indirect else QSIZE
    if defect == "order":
        desc[2] ^= WRITE
    elif defect == "zero length":
        desc[1] = 0
    elif defect == "long":
        desc[1] = option
    elif defect == "crosses":  # a page border (an IOTLB entry's end if split), data_end, ...
        border = {"data page": rig.data_start + PAGE, "data end": rig.data_end,
                  "RO page start": rig.ro_page}[option]
        desc[0] = border - max(1, desc[1] // 2)
        desc[1] = max(desc[1], 2)
    elif defect in ("in WO page", "in RO page"):
        page = rig.wo_page if defect == "in WO page" else rig.ro_page
        desc[0] = page + min(option, PAGE - desc[1])
    elif defect == "unmapped":
        desc[0] = option
    elif defect == "next beyond":  # raw ring / table indexes
        desc[3] = ("raw", {"len": table_len, "len + 1": table_len + 1}.get(option, option))
    elif defect == "next back":
        desc[3] = option % count
    elif defect == "unknown flag":
        desc[2] |= option
    elif defect == "indirect inside":
        desc[2] |= INDIRECT
    elif defect == "head NEXT":
        spec["head_flags"] |= NEXT
    elif defect == "head unknown flag":
        spec["head_flags"] |= 8
    elif defect == "table length":
        spec["table_len"] = option if option in (0, 8) else 16 * count + option
    elif defect == "table placement":
        spec["table_at"] = option
    return spec


def lay_out(rig: Rig, spec: dict[str, Any], head: int) -> int:
    """Write the chain into the ring; return the address of its table or first buffer."""
    ring = rig.ring
    if spec["indirect"]:
        where = {"data": rig.tables,
                 "crosses": rig.data_start + PAGE - 32,
                 "unmapped": 0xDEAD_0000,
                 "WO page": rig.wo_page + PAGE - TABLE_AREA,
                 "RO page": rig.ro_page + PAGE - TABLE_AREA}[spec["table_at"]]
        if spec["table_at"] != "unmapped":
            rig.dmem.write(where, bytes(TABLE_AREA))
            for i, (addr, length, flags, nxt) in enumerate(spec["table"]):
                nxt = nxt[1] if isinstance(nxt, tuple) else nxt
                ring.write_desc(i, addr, length, flags, nxt, table=where)
        ring.write_desc(head, where, spec["table_len"], spec["head_flags"], 1)
        return int(where)
    slots = [(head + i) % QSIZE for i in range(len(spec["table"]))]
    for slot, (addr, length, flags, nxt) in zip(slots, spec["table"], strict=True):
        if isinstance(nxt, tuple):
            nxt = nxt[1]
        elif nxt < len(slots):
            nxt = slots[nxt]
        ring.write_desc(slot, addr, length, flags, nxt)
    return int(spec["table"][0][0])


def compare_pop(rig: Rig, spec: dict[str, Any], head: int, setup: str) -> tuple[Any, bool]:
    """Pop the chain both ways; assert the same outcome; return it and whether pop was fast."""
    first = lay_out(rig, spec, head)
    rig.ring.publish([head])
    try:  # the hot region: the first buffer's (or table's) mapping, another one, or none
        if setup == "other mapping hot":
            rig.gmem.segments(rig.ro_page if first < rig.wo_page else rig.data_start, 1, False)
        elif setup == "cold":
            rig.gmem.hot = NO_HOT_REGION
        else:
            rig.gmem.segments(first, 1, rig.wo_page <= first < rig.ro_page)
    except MemoryAccessError:
        pass
    assert rig.queue.pending() == 1
    walks = []
    real_walk = rig.queue._walk

    def counting_walk(head: int) -> Chain:
        walks.append(head)
        return real_walk(head)

    rig.queue._walk = counting_walk  # type: ignore[method-assign]
    try:
        fast = outcome(rig.queue.pop)
    finally:
        del rig.queue._walk
    general = outcome(lambda: rig.queue._walk(head))
    assert fast == general, spec
    return fast, not walks


SETUPS = ["hot"] * 6 + ["split", "not negotiated", "other mapping hot", "cold"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), setup=st.sampled_from(SETUPS))
def test_pop_fast_path_matches_the_general_walk(data: st.DataObject, setup: str) -> None:
    rig = Rig(split=setup == "split", indirect=setup != "not negotiated")
    try:
        indirect = data.draw(st.booleans())
        count = data.draw(st.integers(1, 4))
        defect = data.draw(st.sampled_from(sorted(DEFECTS)))
        spec = build_spec(
            rig, indirect=indirect, count=count,
            shape=data.draw(st.sampled_from(["read", "write"])),
            where=data.draw(st.sampled_from(["data"] * 4 + ["WO page", "RO page"])),
            lengths=data.draw(st.lists(st.one_of(st.sampled_from([1, 16, 512, 1024]),
                                                 st.integers(1, 64)), min_size=4, max_size=4)),
            offsets=data.draw(st.lists(st.integers(0, 1 << 20), min_size=4, max_size=4)),
            head_write=data.draw(st.booleans()), defect=defect,
            position=data.draw(st.integers(0, 3)), variant=data.draw(st.integers(0, 5)))
        fast, fast_path = compare_pop(rig, spec, data.draw(st.integers(0, QSIZE - 1)), setup)
        event(f"{defect}: {fast[0]}")
        event(f"{'indirect' if indirect else 'direct'}, "
              f"{'fast path' if fast_path else 'general path'}")
    finally:
        rig.close()


def test_pop_fast_path_every_single_defect() -> None:
    """Each defect variant at each position of each layout, in hot memory: same outcome."""
    rigs = {negotiated: Rig(indirect=negotiated) for negotiated in (True, False)}
    seen = {True: 0, False: 0}
    try:
        head = 0
        for (negotiated, indirect, count, shape, where, defect) in itertools.product(
                (True, False), (True, False), (1, 2, 3, 4), ("read", "write"),
                ("data", "WO page", "RO page"), DEFECTS):
            if not negotiated and not indirect:
                continue  # the same as negotiated
            for position in range(count):
                for variant in range(len(DEFECTS[defect])):
                    rig = rigs[negotiated]
                    spec = build_spec(rig, indirect=indirect, count=count, shape=shape,
                                      where=where, lengths=[16, 1024, 1, 512],
                                      offsets=[7, 5000, 12345, 600], head_write=False,
                                      defect=defect, position=position, variant=variant)
                    head = (head + 3) % QSIZE
                    seen[compare_pop(rig, spec, head, "hot")[1]] += 1
        assert seen[True] > 300 and seen[False] > 300  # both paths were exercised
    finally:
        for rig in rigs.values():
            rig.close()


def test_pop_fast_path_is_taken_for_the_common_layouts() -> None:
    """The layouts drivers use (and the benchmark measures) never reach the general walk."""
    rig = Rig()
    try:
        dmem, ring = rig.dmem, rig.ring
        header = dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 0))
        data_in = dmem.buffer(PAGE, writable=True)
        data_out = dmem.buffer(b"x" * PAGE)
        status = dmem.buffer(1, writable=True)
        layouts = [[header, data_in, status], [header, data_out, status], [header, status],
                   [header, data_in, data_in, status], [header, data_out, data_in, status]]
        # warm up: the first buffer in a new mapping goes the general way, which makes it hot
        ring.add_chain([header, status])
        rig.queue.pop()
        for indirect in (False, True):
            for layout in layouts:
                head = ring.add_chain(layout, indirect=indirect)
                walks: list[int] = []
                real_walk = rig.queue._walk
                rig.queue._walk = walks.append  # type: ignore[assignment]
                try:
                    chain = rig.queue.pop()
                finally:
                    rig.queue._walk = real_walk  # type: ignore[method-assign]
                assert walks == []
                assert chain.head == head
                assert [len(view) for view in chain.readable + chain.writable] == [
                    b.length for b in layout]
                rig.queue.push(head, 0)
                rig.queue.publish()
                ring.take_used()
    finally:
        rig.close()


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("lengths", [(0xFFFF_FFFF, 1), (0xFFFF_FFFF, 1, 1), (16, 0xFFFF_FFFF, 1),
                                     (1 << 31, 1 << 31, 1), (1 << 31, (1 << 31) - 2, 1)])
def test_pop_fast_path_4_gib_limit(indirect: bool, lengths: tuple[int, ...]) -> None:
    """Chains of huge buffers inside one (sparse) mapping: the limit is 2**32 - 1 bytes."""
    dmem = DriverMemory(size=5 << 30)  # never touched beyond the rings: the memfd stays sparse
    try:
        ring = MockSplitRing(dmem, QSIZE)
        gmem = dmem.guest_memory()
        queue = SplitQueue(gmem, QSIZE, ring.desc_addr, ring.avail_addr, ring.used_addr,
                           event_idx=True, indirect=True)
        far = dmem.base + (1 << 20)
        gmem.segments(far, 1, False)  # the one mapping is hot
        flags = [NEXT] * (len(lengths) - 1) + [WRITE]
        if len(lengths) == 3:
            flags[1] |= WRITE
        buffers = [(far, n, f, i + 1) for i, (n, f) in enumerate(zip(lengths, flags, strict=True))]
        if indirect:
            table = dmem.alloc(16 * len(buffers))
            for i, desc in enumerate(buffers):
                ring.write_desc(i, *desc, table=table)
            ring.write_desc(0, table, 16 * len(buffers), INDIRECT)
        else:
            for i, desc in enumerate(buffers):
                ring.write_desc(i, *desc)
        ring.publish([0])
        fast = outcome(queue.pop)
        assert fast == outcome(lambda: queue._walk(0))
        assert fast[0] == ("ChainError" if sum(lengths) > 0xFFFF_FFFF else "chain")
        queue.release()
        gmem.invalidate()
    finally:
        dmem.close()


# -- BlkHandler.handle against its general path ---------------------------------------------


def never_later(head: int, written: int) -> None:
    raise AssertionError("a synchronous backend's request completed later")



class Recorder(Backend):
    """A RAM disk recording every call."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(bytes(range(251)) * (size // 251 + 1))[:size]
        self.calls: list[tuple[Any, ...]] = []

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, buf: memoryview) -> None:
        self.calls.append(("read", offset, len(buf)))
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self.calls.append(("write", offset, len(buf)))
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        self.calls.append(("flush",))

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))


class VectoredRecorder(Recorder):
    """A backend with its own readv/writev, which the handler must call."""

    def readv(self, offset: int, bufs: Any) -> None:
        self.calls.append(("readv", offset, [len(b) for b in bufs]))
        super().readv(offset, bufs)

    def writev(self, offset: int, bufs: Any) -> None:
        self.calls.append(("writev", offset, [len(b) for b in bufs]))
        super().writev(offset, bufs)


DISK = 1 << 20
TYPES = [v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH, v.VIRTIO_BLK_T_GET_ID,
         v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES, 99]
UNTOUCHED = 0xEE


class HandlerRig:
    """One driver memory and queue; requests are served by a fresh handler each time."""

    def __init__(self) -> None:
        self.dmem = DriverMemory(size=1 << 20)
        self.ring = MockSplitRing(self.dmem, 16)
        self.gmem = self.dmem.guest_memory()
        self.queue = SplitQueue(self.gmem, 16, self.ring.desc_addr, self.ring.avail_addr,
                                self.ring.used_addr, event_idx=True, indirect=True)
        self.area = self.dmem.alloc(3 * 8192 + 64, PAGE)

    def close(self) -> None:
        self.queue.release()
        self.gmem.invalidate()
        self.dmem.close()

    def compare(self, *, vectored: bool, readonly: bool, block: int, req_type: int,
                sector: int, data_lens: list[int], data_in: bool, header_len: int,
                status_len: int, indirect: bool) -> tuple[Any, ...]:
        """Serve one request with ``handle`` and with ``_handle_general``; assert the same
        used length, status byte, data-in bytes, backend calls and disk; return them."""
        header = struct.pack("<IIQ", req_type, 0, sector)
        addr = self.area
        bufs = [Buffer(addr, header_len)]
        addr += header_len
        data = []
        for n in data_lens:
            data.append(Buffer(addr, n, data_in))
            addr += n
        status = Buffer(addr, status_len, True)
        chain_bufs = ([bufs[0]] + [b for b in data if not b.writable]
                      + [b for b in data if b.writable] + [status])
        head = self.ring.add_chain(chain_bufs, indirect=indirect)
        chain = self.queue.pop()
        assert chain.head == head
        results = []
        for general in (False, True):
            self.dmem.write(self.area, (header + bytes(header_len))[:header_len]
                            + bytes([0xA5]) * (addr - self.area - header_len)
                            + bytes([UNTOUCHED]) * status_len)
            backend = (VectoredRecorder if vectored else Recorder)(DISK)
            handler = BlkHandler(backend, BlkConfig.for_backend(
                backend, logical_block_size=block, readonly=readonly))
            written = (handler._handle_general if general else handler.handle)(
                chain, never_later)
            results.append((written, self.dmem.read(status.addr, status_len),
                            [self.dmem.read(b.addr, b.length) for b in data], backend.calls,
                            bytes(backend.data)))
        self.queue.push(head, 0)
        self.queue.publish()
        self.ring.take_used()
        fast, slow = results
        assert fast == slow
        return fast


SECTORS = [0, 8, 3, 2040, 2047, 2048, 2049, 2**63, 2**64 - 1]  # 2048 sectors: DISK


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vectored=st.booleans(),
    readonly=st.sampled_from([False, False, True]),
    block=st.sampled_from([512, 4096]),
    req_type=st.sampled_from(TYPES[:3] * 3 + TYPES),
    sector=st.one_of(st.sampled_from(SECTORS), st.integers(0, DISK // 512 + 16)),
    data_lens=st.lists(st.sampled_from([0, 1, 16, 512, 4096, 4096, 4097, 8192]), max_size=2),
    data_in=st.booleans(),
    header_len=st.sampled_from([16, 16, 16, 8, 24]),
    status_len=st.sampled_from([1, 1, 1, 2]),
    indirect=st.booleans(),
)
def test_handle_fast_path_matches_the_general_path(**request: Any) -> None:
    rig = HandlerRig()
    try:
        _, status, *_ = rig.compare(**request)
        event(f"type {request['req_type']}: status {status[-1]}")
    finally:
        rig.close()


def test_handle_fast_path_every_request_shape() -> None:
    """Reads, writes and flushes of every data layout, alignment and range, both ways."""
    rig = HandlerRig()
    try:
        statuses = []
        for (vectored, readonly, block, req_type, sector, data_lens, data_in) in itertools.product(
                (False, True), (False, True), (512, 4096), TYPES[:3], SECTORS,
                ([], [512], [4096], [4097], [100], [4096, 512], [8192]), (False, True)):
            _, status, *_ = rig.compare(
                vectored=vectored, readonly=readonly, block=block, req_type=req_type,
                sector=sector, data_lens=data_lens, data_in=data_in, header_len=16,
                status_len=1, indirect=False)
            statuses.append(status[0])
        assert statuses.count(v.VIRTIO_BLK_S_OK) > 100
        assert statuses.count(v.VIRTIO_BLK_S_IOERR) > 100
    finally:
        rig.close()
