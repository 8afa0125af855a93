"""The ``null`` backend: a disk that reads as zeroes and forgets every write.

Useful to measure the daemon's own overhead. Options: ``size=`` (default 1G).
It can be resized to any size: there is no data to lose.
"""

from __future__ import annotations

from typing import Self

from pyvduse.backends.base import ZERO_CHUNK, Backend, check_new_size
from pyvduse.backends.options import BackendOptions, check_disk_size
from pyvduse.native import NativeTarget

_ZEROES = memoryview(ZERO_CHUNK)
_CHUNK = len(ZERO_CHUNK)
DEFAULT_SIZE = 1 << 30


class NullBackend(Backend):
    """``size`` bytes that read as zeroes; write, discard and write-zeroes do nothing.

    Stateless but for its size (which :meth:`resize` replaces in one
    store), so trivially thread-safe.
    """

    name = "null"

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._size = check_disk_size(self.name, size)

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``size=`` (default 1G); unknown options are a :class:`ConfigError`."""
        size = options.size("size", DEFAULT_SIZE)
        options.finish()
        return cls(size)

    def size(self) -> int:
        """The configured size in bytes."""
        return self._size

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Take ``size`` (a positive multiple of 512) as the new size; every shrink is
        allowed, since nothing is stored."""
        self._size = check_new_size(self.name, size)

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with zeroes, copying from a shared zero buffer without allocating."""
        length = len(buf)
        if length <= _CHUNK:
            buf[:] = _ZEROES[:length]
            return
        chunk = _CHUNK
        for start in range(0, length, chunk):
            step = min(chunk, length - start)
            buf[start : start + step] = _ZEROES[:step]

    def write(self, offset: int, buf: memoryview) -> None:
        """Discard ``buf``."""

    def native_target(self) -> NativeTarget | None:
        """Reads zero-fill and writes vanish in the native path too."""
        return NativeTarget.null() if self._own_data_methods(NullBackend) else None

    def discard(self, offset: int, length: int) -> None:
        """Do nothing: the content already reads as zeroes."""

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Do nothing: the content already reads as zeroes."""
