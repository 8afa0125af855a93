"""Driver-visible memory: IOVA to mapped-memory translation.

The virtio driver hands the device I/O virtual addresses (IOVAs). VDUSE lets
userspace map them through ``VDUSE_IOTLB_GET_FD``: each IOTLB entry names a
file, an offset in it, an inclusive IOVA range and access rights. This module
caches those mappings as :class:`Region` objects and turns ``(iova, length)``
into memoryviews, refusing anything outside a mapping or against its rights.

Contract for callers: only touch the bytes a descriptor describes. Parts of a
VDUSE mapping that the kernel has not backed raise SIGBUS when touched, so this
module never prefaults and never reads beyond a requested range.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvduse.errors import MemoryAccessError
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_WO

_IOVA_END = 1 << 64


@dataclass(frozen=True)
class IotlbEntry:
    """One answer of ``VDUSE_IOTLB_GET_FD``: ``fd`` maps IOVAs ``start..last`` from ``offset``.

    The receiver owns ``fd`` and must close it.
    """

    fd: int
    start: int
    last: int
    offset: int
    perm: int


IotlbResolver = Callable[[int], IotlbEntry]
"""Returns the IOTLB entry that covers an IOVA; raises :class:`MemoryAccessError` if none does."""

HotRegion = tuple[int, int, int, memoryview]
"""``(start, read_end, write_end, view)``: one mapping, in the form the data path checks fastest.

``view[0]`` is IOVA ``start``. A buffer ``[addr, addr+length)`` with ``length > 0``
may be read through ``view`` iff ``start <= addr and addr + length <= read_end``,
and written iff ``start <= addr and addr + length <= write_end``: an end is the
mapping's exclusive end when it grants that access and 0 otherwise, so the two
comparisons check bounds and rights at once.
"""

NO_HOT_REGION: HotRegion = (1, 0, 0, memoryview(b""))
"""A :data:`HotRegion` that no non-empty buffer fits."""


class GuestMemory(Protocol):
    """What the virtqueue and device code need from driver memory."""

    def segments(self, addr: int, length: int, write: bool) -> list[memoryview]:
        """Return views covering ``[addr, addr+length)``, split at mapping borders.

        ``write`` asks for rights to write (device-writable buffers); otherwise
        read rights are required. Raises :class:`MemoryAccessError`.
        """
        ...

    def contiguous(self, addr: int, length: int, write: bool) -> memoryview:
        """Return one view of ``[addr, addr+length)``; raise if it spans mappings."""
        ...

    @property
    def hot(self) -> HotRegion:
        """The mapping most recently translated through (or :data:`NO_HOT_REGION`).

        A data-path hint: a buffer that fits it (see :data:`HotRegion`) may be
        sliced from its view directly; anything else goes through :meth:`segments`.
        """
        ...


class Region:
    """One mmap'ed IOTLB entry."""

    __slots__ = ("_map", "hot", "last", "perm", "start", "view")

    def __init__(self, entry: IotlbEntry) -> None:
        page = mmap.ALLOCATIONGRANULARITY
        aligned = entry.offset - entry.offset % page
        skew = entry.offset - aligned
        size = entry.last - entry.start + 1
        prot = 0
        if entry.perm & VDUSE_ACCESS_RO:
            prot |= mmap.PROT_READ
        if entry.perm & VDUSE_ACCESS_WO:
            prot |= mmap.PROT_WRITE | mmap.PROT_READ
        if not prot:
            raise MemoryAccessError(f"IOTLB entry {entry.start:#x} has no access rights")
        try:
            self._map = mmap.mmap(entry.fd, skew + size, flags=mmap.MAP_SHARED, prot=prot,
                                  offset=aligned)
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryAccessError(
                f"cannot map IOVA {entry.start:#x}-{entry.last:#x}: {exc}") from exc
        self.start = entry.start
        self.last = entry.last
        self.perm = entry.perm
        self.view = memoryview(self._map)[skew:]
        end = entry.last + 1
        self.hot: HotRegion = (entry.start, end if entry.perm & VDUSE_ACCESS_RO else 0,
                               end if entry.perm & VDUSE_ACCESS_WO else 0, self.view)

    def release(self) -> None:
        """Drop the mapping; views handed out earlier keep it alive until released."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it


class IotlbMemory:
    """A :class:`GuestMemory` filled lazily from an :data:`IotlbResolver`.

    Thread-safe: queues translate concurrently; :meth:`invalidate` may run
    from the control thread, but only while no queue is running (the device
    stops queues before it drops mappings).

    :attr:`hot` is the region of the last successful lookup, as a
    :data:`HotRegion` tuple: the split ring's fast path slices buffers that fit
    it without a call, a bisect or a lock. It is replaced (one atomic attribute
    store) on every lookup and reset before any region is released.
    """

    def __init__(self, resolve: IotlbResolver) -> None:
        self._resolve = resolve
        self._lock = threading.Lock()
        # (sorted starts, regions): swapped as one object so lock-free readers see a pair.
        self._table: tuple[list[int], list[Region]] = ([], [])
        self.hot: HotRegion = NO_HOT_REGION

    def _find(self, addr: int, table: tuple[list[int], list[Region]]) -> Region | None:
        starts, regions = table
        index = bisect.bisect_right(starts, addr) - 1
        if index >= 0 and addr <= regions[index].last:
            return regions[index]
        return None

    def _lookup(self, addr: int) -> Region:
        table = self._table
        region = self._find(addr, table)
        if region is None:
            return self._fault(addr)
        self.hot = region.hot
        if self._table is not table:
            # A concurrent fault swapped the table (and may be dropping ``region``)
            # after we read it: its reset of ``hot`` may have come before our store.
            self.hot = NO_HOT_REGION
        return region

    def _fault(self, addr: int) -> Region:
        with self._lock:
            found = self._find(addr, self._table)
            if found is not None:
                self.hot = found.hot
                return found
            entry = self._resolve(addr)
            try:
                if not entry.start <= addr <= entry.last:
                    raise MemoryAccessError(
                        f"IOTLB entry {entry.start:#x}-{entry.last:#x} does not cover {addr:#x}")
                region = Region(entry)
            finally:
                os.close(entry.fd)
            # Entries never overlap; drop any stale one that would, to stay sorted.
            keep: list[Region] = []
            stale: list[Region] = []
            for old in self._table[1]:
                (keep if old.last < region.start or old.start > region.last else stale).append(old)
            keep.append(region)
            keep.sort(key=lambda r: r.start)
            self._table = ([r.start for r in keep], keep)
            # Set under the lock, after the swap: a later fault that drops this
            # region resets it; a stale region is never left behind as ``hot``.
            self.hot = region.hot
        for old in stale:
            old.release()
        return region

    @staticmethod
    def _check(addr: int, length: int) -> None:
        if length < 0 or addr < 0 or addr + length > _IOVA_END:
            raise MemoryAccessError(f"invalid IOVA range {addr:#x}+{length:#x}")

    def segments(self, addr: int, length: int, write: bool) -> list[memoryview]:
        self._check(addr, length)
        need = VDUSE_ACCESS_WO if write else VDUSE_ACCESS_RO
        out: list[memoryview] = []
        while length > 0:
            region = self._lookup(addr)
            if not region.perm & need:
                raise MemoryAccessError(
                    f"IOVA {addr:#x} is not {'writable' if write else 'readable'}")
            begin = addr - region.start
            take = min(length, region.last - addr + 1)
            out.append(region.view[begin:begin + take])
            addr += take
            length -= take
        return out

    def contiguous(self, addr: int, length: int, write: bool) -> memoryview:
        self._check(addr, length)
        region = self._lookup(addr)
        need = VDUSE_ACCESS_WO if write else VDUSE_ACCESS_RO
        if not region.perm & need:
            raise MemoryAccessError(f"IOVA {addr:#x} is not {'writable' if write else 'readable'}")
        if addr + length - 1 > region.last:
            raise MemoryAccessError(
                f"IOVA range {addr:#x}+{length:#x} crosses the end of its mapping")
        begin = addr - region.start
        return region.view[begin:begin + length]

    def invalidate(self) -> None:
        """Forget every mapping (on ``UPDATE_IOTLB`` and on reset)."""
        with self._lock:
            regions = self._table[1]
            self._table = ([], [])
            self.hot = NO_HOT_REGION
        for region in regions:
            region.release()
