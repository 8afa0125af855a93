"""The storage backend interface: what a block device's storage must provide.

A backend is a plain class that knows nothing of virtio. Subclass
:class:`Backend`, implement :meth:`~Backend.size` and :meth:`~Backend.read`,
and add whichever of :meth:`~Backend.write`, :meth:`~Backend.flush`,
:meth:`~Backend.discard` and :meth:`~Backend.write_zeroes` the storage can
do. What a backend can do is inferred from which methods it overrides, and the
device offers the driver exactly that (nbdkit plugins work the same way).

Error contract: a method fails one request by raising :class:`OSError` or
:class:`pyvduse.errors.BackendError` (both carry an errno); the request then
completes with ``VIRTIO_BLK_S_IOERR``. Any other exception is a bug in the
backend: it fails the request the same way and is logged with its traceback.

Threading contract: with several queues, methods are called concurrently from
one thread per queue, so a backend must be thread-safe (``os.preadv`` and
friends on one fd are). Offsets and lengths reaching a backend have already
been checked against :meth:`size` and the logical block size.
"""

from __future__ import annotations

from collections.abc import Sequence

ZERO_CHUNK = bytes(1 << 20)


class Backend:
    """Base class of storage backends. Offsets and lengths are in bytes."""

    #: Name used on the command line (``pyvduse serve NAME key=value ...``).
    name: str = ""

    def size(self) -> int:
        """Current size of the storage in bytes."""
        raise NotImplementedError

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

    def write(self, offset: int, buf: memoryview) -> None:
        """Store all of ``buf`` at ``offset`` (implement to make the device writable)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable (implement if writes can be volatile)."""

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset`` (their content is then undefined)."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes.

        ``may_unmap`` allows deallocating them. The default writes zero buffers
        through :meth:`write`, so every writable backend supports it.
        """
        end = offset + length
        while offset < end:
            step = min(len(ZERO_CHUNK), end - offset)
            self.write(offset, memoryview(ZERO_CHUNK)[:step])
            offset += step

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from ``offset`` (override for a vectored fast path)."""
        for buf in bufs:
            self.read(offset, buf)
            offset += len(buf)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Store ``bufs`` in order at ``offset`` (override for a vectored fast path)."""
        for buf in bufs:
            self.write(offset, buf)
            offset += len(buf)

    def close(self) -> None:
        """Release resources; called once, after the last request."""

    # -- capabilities, inferred from what the subclass defines -------------------

    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Backend, method)

    @property
    def can_write(self) -> bool:
        """True if the backend defines ``write`` or ``writev``."""
        return self._overrides("write") or self._overrides("writev")

    @property
    def can_flush(self) -> bool:
        """True if the backend defines ``flush``."""
        return self._overrides("flush")

    @property
    def can_discard(self) -> bool:
        """True if the backend defines ``discard``."""
        return self._overrides("discard")

    @property
    def can_write_zeroes(self) -> bool:
        """True if the backend can write zeroes (natively or through ``write``)."""
        return self.can_write or self._overrides("write_zeroes")

    @property
    def preferred_block_size(self) -> int:
        """Smallest I/O unit the storage handles well (e.g. a disk's logical block size)."""
        return 512
