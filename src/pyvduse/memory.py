"""Driver-visible memory: IOVA to mapped-memory translation.

The virtio driver hands the device I/O virtual addresses (IOVAs). VDUSE lets
userspace map them through ``VDUSE_IOTLB_GET_FD``: each IOTLB entry names a
file, an offset in it, an inclusive IOVA range and access rights. This module
caches those mappings as :class:`Region` objects and turns ``(iova, length)``
into memoryviews, refusing anything outside a mapping or against its rights.

Contract for callers: only touch the bytes a descriptor describes. Parts of a
VDUSE mapping that the kernel has not backed raise SIGBUS when touched, so this
module never prefaults and never reads beyond a requested range.

Windows: a user-space driver on ``vhost_vdpa`` (libblkio, a VMM) hands the
device several memory regions, each its own file, at adjacent IOVAs, and a
request uses more than one of them: libblkio keeps request headers and status
bytes in a region of its own next to the caller's data buffers. Each region is
an IOTLB entry of its own, so no single mapping holds a whole request and the
split ring's fast path (one hot region, see :data:`HotRegion`) never applied:
every request went through the general chain walk and a lookup per buffer.
:class:`IotlbMemory` therefore also maps each run of such adjacent entries
side by side into one reserved address range (:class:`Window`) and offers that
as the hot region of each of them. It is only a second view of the same
shared pages: :meth:`IotlbMemory.segments` and :meth:`IotlbMemory.contiguous`
still split at entry borders, and entries of one file (the kernel's own
bounce domain on ``virtio_vdpa``, whose requests lie in one entry) are left
as they were.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvduse.errors import MemoryAccessError
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_WO

log = logging.getLogger(__name__)

_IOVA_END = 1 << 64
_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # <sys/mman.h> on Linux (every architecture CPython runs on)
_MAP_NORESERVE = 0x4000  # x86, arm, riscv, s390; only a reservation of address space


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

    __slots__ = ("_map", "file", "hot", "last", "offset", "own_hot", "perm", "start", "view",
                 "window")

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
        self.offset = entry.offset
        self.perm = entry.perm
        stat = os.fstat(entry.fd)
        #: The file the entry maps: entries of different files may share a :class:`Window`.
        self.file = (stat.st_dev, stat.st_ino)
        self.view = memoryview(self._map)[skew:]
        end = entry.last + 1
        #: This entry alone, as a hot region.
        self.own_hot: HotRegion = (entry.start, end if entry.perm & VDUSE_ACCESS_RO else 0,
                                   end if entry.perm & VDUSE_ACCESS_WO else 0, self.view)
        #: What a lookup through this entry makes hot: :attr:`own_hot`, or its window's.
        self.hot = self.own_hot
        self.window: Window | None = None

    def release(self) -> None:
        """Drop the mapping; views handed out earlier keep it alive until released."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it


def joins(left: Region, right: Region) -> bool:
    """Whether ``right`` can follow ``left`` in a :class:`Window`.

    It must start right after ``left`` ends, on a page border, at a page-aligned
    file offset (so each entry maps at its place), with the same access
    rights, and from another file (adjacent entries of one file are the
    kernel's own split of one area, whose requests do not straddle entries).
    ``left`` must sit in its page as in its file, should it open the window.
    """
    return (right.start == left.last + 1 and not right.start % _PAGE
            and not right.offset % _PAGE and left.start % _PAGE == left.offset % _PAGE
            and right.perm == left.perm and right.file != left.file)


_libc_mmap: Callable[..., int | None] | None = None


def _mmap_fixed() -> Callable[..., int | None]:
    """libc's ``mmap``, for placing a mapping at a chosen address."""
    global _libc_mmap
    if _libc_mmap is None:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.mmap
        function.restype = ctypes.c_void_p
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        _libc_mmap = function
    return _libc_mmap


class Window:
    """Adjacent IOTLB entries of different files, mapped side by side in one address range.

    ``entries`` (with their fds, which stay the caller's) must be sorted and
    pairwise satisfy :func:`joins`. The range is reserved as an anonymous
    Python ``mmap`` (so that views keep it alive as they keep a
    :class:`Region`'s) and each entry's file is mapped over its part with
    ``MAP_FIXED``: no gap, no page of two entries. :attr:`hot` covers them all.
    Raises ``OSError`` if a mapping fails (nothing is left mapped).
    """

    __slots__ = ("_map", "hot", "last", "start", "view")

    def __init__(self, entries: Sequence[IotlbEntry]) -> None:
        first, final = entries[0], entries[-1]
        skew = first.offset % _PAGE
        length = skew + final.last + 1 - first.start
        size = -(-length // _PAGE) * _PAGE
        perm = first.perm
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if perm & VDUSE_ACCESS_WO else 0)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            anchor = ctypes.c_char.from_buffer(self._map)
            base = ctypes.addressof(anchor)
            del anchor
            place = _mmap_fixed()
            for entry in entries:
                at = skew + entry.start - first.start
                offset = entry.offset
                if entry is first:
                    at, offset = 0, offset - skew
                span = min(size, skew + entry.last + 1 - first.start) - at
                span = -(-span // _PAGE) * _PAGE
                if place(base + at, span, prot, mmap.MAP_SHARED | _MAP_FIXED, entry.fd,
                         offset) != base + at:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mapping IOVA {entry.start:#x} into a window: "
                                  f"{os.strerror(err)}")
        except BaseException:
            self._map.close()
            raise
        self.start = first.start
        self.last = final.last
        self.view = memoryview(self._map)[skew:length]
        end = final.last + 1
        self.hot: HotRegion = (first.start, end if perm & VDUSE_ACCESS_RO else 0,
                               end if perm & VDUSE_ACCESS_WO else 0, self.view)

    def release(self) -> None:
        """Drop the range; views handed out earlier keep it alive until released."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass


class IotlbMemory:
    """A :class:`GuestMemory` filled lazily from an :data:`IotlbResolver`.

    Thread-safe: queues translate concurrently; :meth:`invalidate` may run
    from the control thread, but only while no queue is running (the device
    stops queues before it drops mappings).

    :attr:`hot` is the region of the last successful lookup, as a
    :data:`HotRegion` tuple: the split ring's fast path slices buffers that fit
    it without a call, a bisect or a lock. It is replaced (one atomic attribute
    store) on every lookup and reset before any region is released. When the
    region belongs to a run of adjacent entries of different files, it is the
    run's :class:`Window` (built when an entry of the run is first mapped,
    re-resolving the run's entries for their fds; if that fails the entries
    are served one by one, as before).
    """

    def __init__(self, resolve: IotlbResolver) -> None:
        self._resolve = resolve
        self._lock = threading.Lock()
        # (sorted starts, regions): swapped as one object so lock-free readers see a pair.
        self._table: tuple[list[int], list[Region]] = ([], [])
        self.hot: HotRegion = NO_HOT_REGION
        #: Bumped by :meth:`invalidate`: the native data path forgets what it mapped.
        self.generation = 0
        #: Every window made since the last :meth:`invalidate` (superseded ones too:
        #: another thread may still slice the hot region it read).
        self._windows: list[Window] = []

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
            for old in stale:  # its window is no view of the driver's memory any more
                if old.window is not None:
                    for member in keep:
                        if member.window is old.window:
                            member.window, member.hot = None, member.own_hot
            self._join(keep, keep.index(region))
            self._table = ([r.start for r in keep], keep)
            # Set under the lock, after the swap: a later fault that drops this
            # region resets it; a stale region is never left behind as ``hot``.
            self.hot = region.hot
        for old in stale:
            old.release()
        return region

    def _join(self, regions: list[Region], index: int) -> None:
        """Map the run of joining entries around ``regions[index]`` as one window (lock held)."""
        first = last = index
        while first and joins(regions[first - 1], regions[first]):
            first -= 1
        while last + 1 < len(regions) and joins(regions[last], regions[last + 1]):
            last += 1
        if first == last:
            return
        run = regions[first:last + 1]
        entries: list[IotlbEntry] = []
        try:
            for member in run:
                entry = self._resolve(member.start)
                entries.append(entry)
                stat = os.fstat(entry.fd)
                if ((entry.start, entry.last, entry.offset, entry.perm)
                        != (member.start, member.last, member.offset, member.perm)
                        or (stat.st_dev, stat.st_ino) != member.file):
                    return  # the IOTLB changed under us: an update will follow
            window = Window(entries)
        except (OSError, ValueError, MemoryAccessError) as exc:
            log.debug("IOVA %#x-%#x: no window over %d entries: %s", run[0].start,
                      run[-1].last, len(run), exc)
            return
        finally:
            for entry in entries:
                os.close(entry.fd)
        self._windows.append(window)
        for member in run:
            member.window, member.hot = window, window.hot

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
            windows, self._windows = self._windows, []
            self._table = ([], [])
            self.hot = NO_HOT_REGION
            self.generation += 1
        for region in regions:
            region.release()
        for window in windows:
            window.release()
