"""A RAM disk in a bytearray: the smallest complete writable backend.

Serve it with::

    pyvduse serve python script=examples/ramdisk.py size=64M

Options: ``size=`` (required; ``512``, ``4k``, ``64M``, ``1G`` ...), a
positive multiple of 512. The disk starts zeroed and its contents vanish
with the daemon.

It defines ``write``, ``discard`` and ``flush``, so the device is writable
and offers discard and flush; write-zeroes comes from the base class, which
writes zero buffers through ``write``.
"""

from __future__ import annotations

from typing import Self

from pyvduse.backends import Backend, BackendOptions
from pyvduse.backends.options import check_disk_size


class RamDisk(Backend):
    """``size`` zeroed bytes of memory.

    Thread-safe without a lock: each request copies between its own slice
    of the bytearray and the request's buffers, the bytearray never changes
    size, and concurrent requests from several queues touch their own ranges.
    """

    def __init__(self, size: int) -> None:
        check_disk_size("ramdisk", size)
        self._data = bytearray(size)
        self._view = memoryview(self._data)  # slices of a view copy nothing

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``size=``; unknown options are refused (as by built-in backends)."""
        size = options.size("size")
        options.finish()
        return cls(size)

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._view[offset : offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self._view[offset : offset + len(buf)] = buf

    def discard(self, offset: int, length: int) -> None:
        # Discarded data may read as anything; zeroes are the friendliest choice.
        self._view[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        # Memory is as durable as this disk gets, so there is nothing to do; a
        # backend with a write-back cache would write it out here.
        pass

    def close(self) -> None:
        self._view.release()
