"""The front-end's memory table, mapped: guest-physical addresses to memoryviews.

The front-end shares guest RAM as a few regions, each a file descriptor
(``SET_MEM_TABLE``, or one by one with ``ADD_MEM_REG`` / ``REM_MEM_REG``)
with three bases: the guest-physical address (what descriptors hold), the
front-end's own virtual address (what ``SET_VRING_ADDR`` holds) and the
offset in the file. :class:`VhostUserMemory` maps every region once, read
and write, and is a :class:`pyvduse.memory.GuestMemory` over guest-physical
addresses, with the same :attr:`~VhostUserMemory.hot` fast path as
:class:`pyvduse.memory.IotlbMemory`. :meth:`~VhostUserMemory.user_to_guest`
turns a ring address into a guest-physical one.

Nothing is touched beyond what is asked for: a mapping is never prefaulted.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import os
import stat
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pyvduse.errors import MemoryAccessError
from pyvduse.memory import NO_HOT_REGION, HotRegion
from pyvduse.vhost_user.protocol import MAX_MEM_SLOTS, MemoryRegion

_ADDRESS_END = 1 << 64
_MAX_ALIGNMENT = 1 << 30
# Before 3.13 an mmap object keeps a duplicate of its fd until it is closed;
# since then it can be told not to.
MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def describe(region: MemoryRegion) -> str:
    """``"guest 0x0-0x7fffffff (user 0x7f..., offset 0x0)"`` for messages."""
    last = region.guest_addr + region.size - 1
    return (f"guest {region.guest_addr:#x}-{last:#x} (user {region.user_addr:#x}, "
            f"offset {region.mmap_offset:#x})")


def _alignment(fd: int) -> int:
    """The offset alignment for mmap: the page, or the file's huge page (hugetlbfs)."""
    align = mmap.ALLOCATIONGRANULARITY
    try:
        block = os.fstat(fd).st_blksize
    except OSError:
        return align
    if align < block <= _MAX_ALIGNMENT and block & (block - 1) == 0:
        return block
    return align


def _protect(fd: int, region: MemoryRegion) -> None:
    """Refuse a region beyond the end of its file, and keep the file from shrinking.

    Touching a mapping past the end of its file raises SIGBUS, which kills the
    daemon: a region must lie inside its file when it is shared, and the
    front-end must not truncate it afterwards. The second is enforced where
    the file allows it (a memfd created with sealing allowed and not sealed
    yet: ``F_SEAL_SHRINK``); QEMU seals its memfds itself.
    """
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise MemoryAccessError(f"memory region {describe(region)}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        return  # e.g. a device: no size to check
    if info.st_size < region.mmap_offset + region.size:
        raise MemoryAccessError(
            f"memory region {describe(region)} ends beyond its file of {info.st_size} bytes")
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)


class _Mapping:
    """One mapped region."""

    __slots__ = ("_map", "end", "hot", "region", "start", "user_end", "user_start", "view")

    def __init__(self, region: MemoryRegion, fd: int) -> None:
        _protect(fd, region)
        align = _alignment(fd)
        aligned = region.mmap_offset - region.mmap_offset % align
        skew = region.mmap_offset - aligned
        try:
            self._map = mmap.mmap(fd, skew + region.size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned,
                                  **MMAP_OPTIONS)
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryAccessError(f"cannot map memory region {describe(region)}: {exc}") from exc
        self.region = region
        self.start = region.guest_addr
        self.end = region.guest_addr + region.size
        self.user_start = region.user_addr
        self.user_end = region.user_addr + region.size
        self.view = memoryview(self._map)[skew:]
        # vhost-user memory is always read-write: both ends are the region's end
        self.hot: HotRegion = (self.start, self.end, self.end, self.view)

    def release(self) -> None:
        """Unmap now unless views handed out still hold it (then it goes with the last)."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass


_EMPTY: tuple[list[int], list[_Mapping]] = ([], [])


class VhostUserMemory:
    """The mapped memory table: a :class:`~pyvduse.memory.GuestMemory` over guest addresses.

    ``VhostUserMemory(regions, fds)`` maps ``regions[i]`` from ``fds[i]``
    (``SET_MEM_TABLE``). It takes the descriptors: every one is closed,
    whether mapping succeeds or not (a mapping does not need its fd; before
    Python 3.13 each mapping holds a private duplicate until it is unmapped).

    Thread-safe: queues translate concurrently and without a lock; regions
    are added and removed (serialised by a lock) from the control thread.
    :attr:`hot` is the region of the last successful lookup (see
    :data:`pyvduse.memory.HotRegion`; both ends are the region's end, since
    vhost-user memory is read-write) and is reset whenever a region goes.
    """

    def __init__(self, regions: Sequence[MemoryRegion] = (), fds: Sequence[int] = (), *,
                 max_regions: int = MAX_MEM_SLOTS) -> None:
        self.max_regions = max_regions
        self._lock = threading.Lock()
        # (sorted guest starts, mappings): swapped as one object so lock-free readers see a pair
        self._table = _EMPTY
        self.hot: HotRegion = NO_HOT_REGION
        #: Bumped whenever a region goes: the native data path forgets what it mapped.
        self.generation = 0
        taken = 0
        try:
            if len(regions) != len(fds):
                raise MemoryAccessError(
                    f"{len(regions)} memory regions but {len(fds)} file descriptors")
            for region, fd in zip(regions, fds, strict=True):
                taken += 1
                self.add_region(region, fd)
        except BaseException:
            for fd in fds[taken:]:
                os.close(fd)
            self.close()
            raise

    # -- the table ------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions mapped now, by guest address."""
        return tuple(m.region for m in self._table[1])

    def mappings(self) -> list[HotRegion]:
        """Every region mapped now, as a :data:`HotRegion` (the native data path learns
        them all: a front-end's request often spans two, e.g. libblkio's headers in one
        region and the caller's buffers in another)."""
        return [mapping.hot for mapping in self._table[1]]

    def add_region(self, region: MemoryRegion, fd: int) -> None:
        """Map ``region`` from ``fd`` (``ADD_MEM_REG``); ``fd`` is closed in every case.

        Raises :class:`MemoryAccessError` for an empty region, one whose
        addresses or offset overflow 64 bits, one overlapping a mapped region
        in guest addresses, one too many, or a failed mmap.
        """
        try:
            with self._lock:
                starts, mappings = self._table
                self._check_new(region, mappings)
                mapping = _Mapping(region, fd)
                index = bisect.bisect_right(starts, mapping.start)
                self._table = ([*starts[:index], mapping.start, *starts[index:]],
                               [*mappings[:index], mapping, *mappings[index:]])
        finally:
            os.close(fd)

    def _check_new(self, region: MemoryRegion, mappings: list[_Mapping]) -> None:
        if region.size <= 0:
            raise MemoryAccessError(f"memory region {describe(region)} is empty")
        for what, base in (("guest", region.guest_addr), ("user", region.user_addr),
                           ("mmap offset", region.mmap_offset)):
            if base < 0 or base + region.size > _ADDRESS_END:
                raise MemoryAccessError(
                    f"memory region {describe(region)}: its {what} range overflows 64 bits")
        if len(mappings) >= self.max_regions:
            raise MemoryAccessError(f"memory region {describe(region)}: already "
                                    f"{len(mappings)} regions, at most {self.max_regions}")
        end = region.guest_addr + region.size
        for old in mappings:
            if old.start < end and region.guest_addr < old.end:
                raise MemoryAccessError(f"memory region {describe(region)} overlaps "
                                        f"{describe(old.region)}")

    def remove_region(self, region: MemoryRegion) -> None:
        """Unmap the region with ``region``'s guest address, user address and size.

        ``REM_MEM_REG`` (the mmap offset is ignored, as the spec says). The
        mapping lives on while views into it are held (requests in flight).
        Raises :class:`MemoryAccessError` if no such region is mapped.
        """
        with self._lock:
            starts, mappings = self._table
            key = (region.guest_addr, region.user_addr, region.size)
            found = [i for i, m in enumerate(mappings)
                     if (m.region.guest_addr, m.region.user_addr, m.region.size) == key]
            if not found:
                raise MemoryAccessError(f"no memory region {describe(region)} to remove")
            index = found[0]
            self._table = (starts[:index] + starts[index + 1:],
                           mappings[:index] + mappings[index + 1:])
            self.hot = NO_HOT_REGION
            self.generation += 1
        # Not released: a queue thread may hold this region's hot tuple for a moment;
        # the mapping goes when the last view into it does.

    def close(self) -> None:
        """Release every mapping (views handed out keep theirs alive); idempotent."""
        with self._lock:
            mappings = self._table[1]
            self._table = _EMPTY
            self.hot = NO_HOT_REGION
            self.generation += 1
        for mapping in mappings:
            mapping.release()

    # -- translation ----------------------------------------------------------------------

    def _lookup(self, addr: int) -> _Mapping:
        table = self._table
        starts, mappings = table
        index = bisect.bisect_right(starts, addr) - 1
        if index < 0 or addr >= mappings[index].end:
            raise MemoryAccessError(f"guest address {addr:#x} is in no memory region")
        mapping = mappings[index]
        self.hot = mapping.hot
        if self._table is not table:
            # A region went meanwhile (and reset ``hot`` perhaps before our store).
            self.hot = NO_HOT_REGION
        return mapping

    @staticmethod
    def _check(addr: int, length: int) -> None:
        if length < 0 or addr < 0 or addr + length > _ADDRESS_END:
            raise MemoryAccessError(f"invalid guest address range {addr:#x}+{length:#x}")

    def segments(self, addr: int, length: int, write: bool) -> list[memoryview]:
        """Views of ``[addr, addr+length)``, one per region it crosses (read-write memory)."""
        self._check(addr, length)
        out: list[memoryview] = []
        while length > 0:
            mapping = self._lookup(addr)
            begin = addr - mapping.start
            take = min(length, mapping.end - addr)
            out.append(mapping.view[begin:begin + take])
            addr += take
            length -= take
        return out

    def contiguous(self, addr: int, length: int, write: bool) -> memoryview:
        """One view of ``[addr, addr+length)``; raises if it is not inside one region."""
        self._check(addr, length)
        mapping = self._lookup(addr)
        if addr + length > mapping.end:
            raise MemoryAccessError(
                f"guest address range {addr:#x}+{length:#x} crosses the end of its region")
        begin = addr - mapping.start
        return mapping.view[begin:begin + length]

    def user_to_guest(self, uaddr: int, length: int) -> int:
        """The guest address of the front-end address ``uaddr`` (``SET_VRING_ADDR``).

        ``[uaddr, uaddr+length)`` must lie inside one region's user range;
        otherwise raises :class:`MemoryAccessError`.
        """
        if length < 0 or uaddr < 0 or uaddr + length > _ADDRESS_END:
            raise MemoryAccessError(f"invalid user address range {uaddr:#x}+{length:#x}")
        for mapping in self._table[1]:
            if mapping.user_start <= uaddr and uaddr + max(length, 1) <= mapping.user_end:
                return mapping.start + (uaddr - mapping.user_start)
        raise MemoryAccessError(
            f"user address range {uaddr:#x}+{length:#x} is not inside one memory region")
