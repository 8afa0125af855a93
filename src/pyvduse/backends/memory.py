"""The ``memory`` backend: a RAM disk in an anonymous shared-memory file (memfd).

The disk is sparse: pages cost memory only once written, so ``size=1G`` is free
until the guest fills it, and discarding whole pages gives their memory back.
Contents vanish when the daemon exits. Options: ``size=`` (required). The disk
can be resized while it serves (the file is truncated and the mapping moved:
nothing is copied). The file's descriptor is the native data path's target
(:mod:`pyvduse.native`): its reads and writes are ``preadv``/``pwritev`` on it,
one copy in the kernel, with no Python call per request.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Self

from pyvduse.backends.base import ZERO_CHUNK, Backend, check_new_size, shrink_refused
from pyvduse.backends.options import BackendOptions, check_disk_size
from pyvduse.errors import BackendError, ConfigError
from pyvduse.native import NativeTarget

_PAGE = mmap.PAGESIZE
_ZEROES = memoryview(ZERO_CHUNK)
#: Ranges at least this long are zeroed by dropping their whole pages.
MADVISE_THRESHOLD = 64 * 1024


class MemoryBackend(Backend):
    """``size`` bytes of anonymous shared memory (a memfd, mapped once).

    Reads and writes are slice copies between the request's memoryviews and
    the mapping. Thread-safe: requests from different queues touch disjoint
    slices (the driver never has overlapping requests in flight), and one
    lock keeps them off the mapping while :meth:`resize` moves it (the
    copies hold the GIL anyway, so the lock costs no parallelism). The native
    data path's requests go to the memory file, not the mapping, and need no
    lock. There is nothing to flush, so :meth:`flush` is deliberately not defined.
    """

    name = "memory"

    def __init__(self, size: int) -> None:
        self._size = check_disk_size(self.name, size)
        self._fd = os.memfd_create("pyvduse-memory", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
        except (OSError, OverflowError) as exc:
            os.close(self._fd)
            raise ConfigError(f"backend 'memory': cannot map {size} bytes: {exc}") from None
        self._view = memoryview(self._map)
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``size=`` (required); unknown options are a :class:`ConfigError`."""
        size = options.size("size")
        options.finish()
        return cls(size)

    def size(self) -> int:
        """The configured size in bytes."""
        return self._size

    def read(self, offset: int, buf: memoryview) -> None:
        """Copy ``len(buf)`` bytes at ``offset`` into ``buf``."""
        with self._lock:
            buf[:] = self._view[offset : offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        """Copy ``buf`` to ``offset``."""
        with self._lock:
            self._view[offset : offset + len(buf)] = buf

    def discard(self, offset: int, length: int) -> None:
        """Zero the range (giving whole pages back); discarded data reads as zeroes."""
        with self._lock:
            self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zero the range; pages are given back whatever ``may_unmap`` says (reads are zeroes)."""
        with self._lock:
            self._zero(offset, length)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow or shrink the mapping to ``size`` bytes (a positive multiple of 512).

        Growing adds zero pages that cost nothing until written. Shrinking
        is refused (``EINVAL``, nothing changes) while a byte at or beyond
        ``size`` is not zero, unless ``shrink`` (finding out reads the range,
        untouched pages included); the memory beyond ``size`` is given back.
        Requests wait while this runs.
        """
        check_new_size(self.name, size)
        with self._lock:
            old = self._size
            if size == old:
                return
            if size < old:
                if not shrink:
                    data_at = self._first_data(size, old)
                    if data_at is not None:
                        raise shrink_refused(f"backend {self.name!r}", size,
                                             f"data lies at offset {data_at}")
                # The tail of the last page stays mapped: zero it so that growing again
                # later brings back zeroes, not the old bytes.
                _fill_zero(self._view, size, min(old, -(-size // _PAGE) * _PAGE))
            self._view.release()
            try:
                self._map.resize(size)
            except (OSError, OverflowError) as exc:
                raise BackendError(getattr(exc, "errno", None) or errno.ENOMEM,
                                   f"backend {self.name!r}: cannot map {size} bytes: {exc}"
                                   ) from None
            finally:
                self._view = memoryview(self._map)
            self._size = len(self._view)

    def native_target(self) -> NativeTarget | None:
        """The memory file's descriptor: ``preadv``/``pwritev`` there are what
        :meth:`read` and :meth:`write` do through the mapping."""
        return NativeTarget.file(self._fd) if self._own_data_methods(MemoryBackend) else None

    def close(self) -> None:
        """Unmap the memory; the backend is unusable afterwards."""
        with self._lock:
            self._view.release()
            self._map.close()
            os.close(self._fd)

    def _first_data(self, start: int, end: int) -> int | None:
        """The offset of the first non-zero byte in ``[start, end)``, or None."""
        step = len(ZERO_CHUNK)
        for pos in range(start, end, step):
            chunk = self._map[pos : min(pos + step, end)]
            if chunk != ZERO_CHUNK[: len(chunk)]:
                return pos + len(chunk) - len(chunk.lstrip(b"\0"))
        return None

    def _zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` zero.

        Long ranges drop their whole pages with ``MADV_REMOVE`` (a hole is punched
        in the memory file: the pages read as zero and no longer cost memory);
        the partial pages at either end, and short ranges, are zeroed by
        slice assignment.
        """
        end = offset + length
        first_page = -(-offset // _PAGE) * _PAGE
        last_page = end // _PAGE * _PAGE
        if length < MADVISE_THRESHOLD or last_page <= first_page:
            _fill_zero(self._view, offset, end)
            return
        _fill_zero(self._view, offset, first_page)
        self._map.madvise(mmap.MADV_REMOVE, first_page, last_page - first_page)
        _fill_zero(self._view, last_page, end)


def _fill_zero(view: memoryview, start: int, end: int) -> None:
    """Zero ``view[start:end]`` by slice assignment from the shared zero buffer."""
    while start < end:
        n = min(len(_ZEROES), end - start)
        view[start : start + n] = _ZEROES[:n]
        start += n
