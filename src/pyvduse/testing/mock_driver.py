"""A mock virtio driver: real memory, real split rings, chains built by hand.

:class:`DriverMemory` is a memfd standing in for the IOVA space; its
:meth:`~DriverMemory.guest_memory` returns the production
:class:`~pyvduse.memory.IotlbMemory` resolving through fake IOTLB entries, so
tests exercise the real mapping code. :class:`MockSplitRing` lays out a split
ring in it and plays the driver's side: adding chains (direct or indirect),
writing arbitrary (hostile) descriptors, and reading completions.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvduse.errors import MemoryAccessError
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.uapi.vduse import VDUSE_ACCESS_RW
from pyvduse.uapi.virtio import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    vring_avail_size,
    vring_desc,
    vring_used_elem,
    vring_used_size,
)

PAGE = 4096


@dataclass(frozen=True)
class Buffer:
    """One buffer of a chain: ``writable`` means device-writable."""

    addr: int
    length: int
    writable: bool = False


class DriverMemory:
    """A memfd-backed IOVA space with a bump allocator.

    By default one IOTLB entry covers all of it; :meth:`split_entries` makes
    one entry per ``granule`` so chains can straddle mappings.
    """

    def __init__(self, size: int = 16 << 20, base: int = 0x10000) -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create("pyvduse-driver-memory", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._next = base
        self.entries: list[tuple[int, int, int, int]] = [
            (base, base + size - 1, 0, VDUSE_ACCESS_RW)]
        self.faults = 0

    def split_entries(self, granule: int) -> None:
        """Describe the space as many IOTLB entries of ``granule`` bytes."""
        self.entries = [(start, start + granule - 1, start - self.base, VDUSE_ACCESS_RW)
                        for start in range(self.base, self.base + self.size, granule)]

    def set_entries(self, entries: Sequence[tuple[int, int, int, int]]) -> None:
        """Replace the IOTLB: ``(start, last, file offset, perm)`` tuples."""
        self.entries = list(entries)

    def resolve(self, iova: int) -> IotlbEntry:
        """The fake ``VDUSE_IOTLB_GET_FD``: the entry covering ``iova`` with a new fd."""
        self.faults += 1
        for start, last, offset, perm in self.entries:
            if start <= iova <= last:
                return IotlbEntry(os.dup(self.fd), start, last, offset, perm)
        raise MemoryAccessError(f"no IOTLB mapping for IOVA {iova:#x}")

    def guest_memory(self) -> IotlbMemory:
        """The device's view of this memory (production translation code)."""
        return IotlbMemory(self.resolve)

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes; returns their IOVA."""
        addr = (self._next + align - 1) // align * align
        if addr + size > self.base + self.size:
            raise MemoryError("driver memory exhausted")
        self._next = addr + size
        return addr

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at IOVA ``addr``."""
        os.pwrite(self.fd, data, addr - self.base)

    def read(self, addr: int, length: int) -> bytes:
        """Load ``length`` bytes at IOVA ``addr``."""
        return os.pread(self.fd, length, addr - self.base)

    def buffer(self, data: bytes | int, writable: bool = False) -> Buffer:
        """Allocate a buffer holding ``data`` (or ``data`` zero bytes)."""
        payload = bytes(data) if isinstance(data, int) else data
        addr = self.alloc(max(len(payload), 1))
        self.write(addr, payload)
        return Buffer(addr, len(payload), writable)

    def close(self) -> None:
        """Release the memfd."""
        os.close(self.fd)


class MockSplitRing:
    """The driver's side of one split virtqueue in :class:`DriverMemory`."""

    def __init__(self, memory: DriverMemory, size: int) -> None:
        self.memory = memory
        self.size = size
        self.desc_addr = memory.alloc(vring_desc.size * size, PAGE)
        self.avail_addr = memory.alloc(vring_avail_size(size), PAGE)
        self.used_addr = memory.alloc(vring_used_size(size), PAGE)
        self.avail_idx = 0
        self.used_seen = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}

    # raw access, for hostile tests
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring's table (or of an indirect ``table``)."""
        base = self.desc_addr if table is None else table
        self.memory.write(base + 16 * index, vring_desc.pack(addr, length, flags, next_))

    def publish(self, heads: Sequence[int], avail_idx: int | None = None) -> None:
        """Put ``heads`` in the avail ring and move the avail index (or set it to ``avail_idx``)."""
        for head in heads:
            slot = self.avail_idx % self.size
            self.memory.write(self.avail_addr + 4 + 2 * slot, struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if avail_idx is not None:
            self.avail_idx = avail_idx & 0xFFFF
        self.memory.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        """Write the avail ring's flags (e.g. VRING_AVAIL_F_NO_INTERRUPT)."""
        self.memory.write(self.avail_addr, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` (EVENT_IDX: interrupt me when used passes this)."""
        self.memory.write(self.avail_addr + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def avail_event(self) -> int:
        """Read ``avail_event`` from the used ring."""
        offset = self.used_addr + 4 + 8 * self.size
        return int(struct.unpack("<H", self.memory.read(offset, 2))[0])

    def used_flags(self) -> int:
        """Read the used ring's flags."""
        return int(struct.unpack("<H", self.memory.read(self.used_addr, 2))[0])

    def used_idx(self) -> int:
        """Read the device's used index."""
        return int(struct.unpack("<H", self.memory.read(self.used_addr + 2, 2))[0])

    # chains
    def add_chain(self, buffers: Sequence[Buffer], indirect: bool = False,
                  publish: bool = True) -> int:
        """Lay ``buffers`` out as one chain and (by default) make it available; return its head."""
        if indirect:
            table = self.memory.alloc(16 * len(buffers), 16)
            self._link(buffers, list(range(len(buffers))), table)
            slots = self._take(1)
            head = slots[0]
            self.write_desc(head, table, 16 * len(buffers), VRING_DESC_F_INDIRECT)
        else:
            slots = self._take(len(buffers))
            self._link(buffers, slots, None)
            head = slots[0]
        self._chains[head] = slots
        if publish:
            self.publish([head])
        return head

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError("descriptor table full")
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def _link(self, buffers: Sequence[Buffer], slots: list[int], table: int | None) -> None:
        for position, (buf, slot) in enumerate(zip(buffers, slots, strict=True)):
            flags = VRING_DESC_F_WRITE if buf.writable else 0
            nxt = 0
            if position + 1 < len(buffers):
                flags |= VRING_DESC_F_NEXT
                nxt = slots[position + 1]
            self.write_desc(slot, buf.addr, buf.length, flags, nxt, table)

    def take_used(self) -> list[tuple[int, int]]:
        """Return ``(id, len)`` of the completions since the last call; recycle descriptors."""
        out = []
        current = self.used_idx()
        while self.used_seen != current:
            slot = self.used_seen % self.size
            raw = self.memory.read(self.used_addr + 4 + 8 * slot, 8)
            out.append(vring_used_elem.unpack(raw))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        for head, _ in out:
            self._free.extend(self._chains.pop(head, []))
        self.set_used_event(self.used_seen)  # as Linux does when it re-enables callbacks
        return [(int(a), int(b)) for a, b in out]
