"""The ``file`` backend: a regular file or a block device, through positional vectored I/O.

Options: ``path=`` (required), ``readonly=on|off`` (default off),
``direct=on|off`` (default off: go through the page cache).

Data moves with ``os.preadv``/``os.pwritev`` straight between the request's
memoryviews and the file; both release the GIL, so queues really run in
parallel, and partial transfers are resumed until the request is done.

Discard and write-zeroes use what the storage offers: ``fallocate`` on a
regular file (``PUNCH_HOLE``, ``ZERO_RANGE``), ``BLKDISCARD``/``BLKZEROOUT``
on a block device. A method the storage refuses as unsupported is remembered
per backend and not tried again: write-zeroes falls back to the next method
and finally to writing zero buffers; discard, which is advisory (discarded
data is undefined), then simply succeeds without doing anything.

Resizing (:meth:`FileBackend.resize`) changes a regular file's length with
``ftruncate``: growing leaves a hole (sparse, reading as zeroes); shrinking
is refused while ``lseek(SEEK_DATA)`` finds data at or beyond the new end,
unless the caller allows dropping it. A block device's size, and a
read-only file's, are not the backend's to change.

``direct=on`` opens with ``O_DIRECT``, which needs block-aligned offsets and
lengths (the device guarantees these for its logical block size, which
:attr:`FileBackend.preferred_block_size` reports) and suitably aligned
memory, which guest buffers need not be. A request the kernel refuses with
``EINVAL`` is therefore retried through a page-aligned per-thread bounce
buffer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Self

from pyvduse.backends.base import Backend, check_new_size, shrink_refused
from pyvduse.backends.options import BackendOptions
from pyvduse.backends.socket_io import advance
from pyvduse.errors import BackendError, ConfigError
from pyvduse.native import NativeTarget

log = logging.getLogger(__name__)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

# <linux/stat.h>, <linux/fcntl.h>
STATX_DIOALIGN = 0x2000
AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 0x100
_STATX_DIO_OFFSET_ALIGN = 0x9C

#: errnos meaning "this storage cannot do that": drop the method, use the fallback.
UNSUPPORTED_ERRNOS = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY}
)

#: Size of the per-thread O_DIRECT bounce buffer and of the shared zero buffer.
BOUNCE_SIZE = 1 << 20

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


# -- system calls the os module lacks ---------------------------------------------------


@functools.cache
def _libc_fallocate() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    func: Callable[..., int] = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]  # type: ignore[attr-defined]
    func.restype = ctypes.c_int  # type: ignore[attr-defined]
    return func


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call Linux ``fallocate(2)`` (with ``mode`` flags); raise :class:`OSError` on failure.

    The call releases the GIL. Tests replace this function to simulate file
    systems without hole punching.
    """
    if _libc_fallocate()(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def dio_offset_alignment(fd: int) -> int | None:
    """Return the file offset alignment ``O_DIRECT`` needs on ``fd`` (``statx`` DIOALIGN).

    ``None`` when the kernel (before 6.1), the C library or the file system
    cannot say.
    """
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except AttributeError:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(ctypes.c_int(fd), b"", ctypes.c_int(AT_EMPTY_PATH),
             ctypes.c_uint(STATX_DIOALIGN), buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf, 0)
    (align,) = struct.unpack_from("=I", buf, _STATX_DIO_OFFSET_ALIGN)
    if not mask & STATX_DIOALIGN or align <= 0:
        return None
    return int(align)


def _ioctl_u64(fd: int, request: int) -> int:
    (value,) = struct.unpack("=Q", fcntl.ioctl(fd, request, bytes(8)))
    return int(value)


def _ioctl_int(fd: int, request: int) -> int:
    (value,) = struct.unpack("=i", fcntl.ioctl(fd, request, bytes(4)))
    return int(value)


def _ioctl_range(fd: int, request: int, offset: int, length: int) -> None:
    """Issue ``BLKDISCARD``/``BLKZEROOUT``, whose argument is ``u64 range[2] = {start, len}``."""
    fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length))


# -- whole transfers --------------------------------------------------------------------

_Vectored = Callable[[int, list[memoryview], int], int]


def transfer_all(op: _Vectored, fd: int, bufs: Sequence[memoryview], offset: int) -> None:
    """Run ``op`` (``os.preadv`` or ``os.pwritev``) until every byte of ``bufs`` moved.

    Resumes after partial transfers and splits requests longer than
    ``IOV_MAX`` segments. A call that moves nothing means the file ended
    under us (it shrank) and fails with ``EIO``; errors from ``op`` propagate.
    """
    pending = [buf for buf in bufs if len(buf)]
    while pending:
        done = op(fd, pending[:_IOV_MAX], offset)
        if done <= 0:
            raise BackendError(
                errno.EIO, f"no progress at offset {offset} (did the file shrink?)")
        offset += done
        pending = advance(pending, done)


def _chunks(bufs: Sequence[memoryview], limit: int) -> Iterator[list[memoryview]]:
    """Split ``bufs`` into consecutive lists of views each totalling at most ``limit`` bytes."""
    batch: list[memoryview] = []
    room = limit
    for buf in bufs:
        while len(buf):
            take = min(room, len(buf))
            batch.append(buf[:take])
            buf = buf[take:]
            room -= take
            if not room:
                yield batch
                batch, room = [], limit
    if batch:
        yield batch


_bounce_local = threading.local()


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned bounce buffer (an anonymous mapping, made on first use)."""
    view: memoryview | None = getattr(_bounce_local, "view", None)
    if view is None:
        view = memoryview(mmap.mmap(-1, BOUNCE_SIZE, flags=mmap.MAP_PRIVATE))
        _bounce_local.view = view
    return view


@functools.cache
def _zero_buffer() -> memoryview:
    """A shared, read-only, page-aligned megabyte of zeroes (backed by the kernel's zero page)."""
    return memoryview(mmap.mmap(-1, BOUNCE_SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))


# -- native discard / zeroing methods ---------------------------------------------------


class _NativeMethod:
    """One optional storage operation, dropped for good after an "unsupported" failure.

    Flag updates are single attribute stores, so concurrent callers at worst
    both try a method once more.
    """

    def __init__(self, what: str, call: Callable[[int, int], None]) -> None:
        self.what = what
        self.supported = True
        self._call = call

    def attempt(self, offset: int, length: int) -> bool:
        """Run the operation; False if it is (now known to be) unsupported."""
        if not self.supported:
            return False
        try:
            self._call(offset, length)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self.supported = False
            log.info("file backend: %s not supported (%s), using the fallback",
                     self.what, os.strerror(exc.errno))
            return False
        return True


# -- the backend ------------------------------------------------------------------------


def _open(path: str, readonly: bool, direct: bool) -> int:
    """Open ``path``, turning the usual failures into one-line :class:`ConfigError`."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"file backend: no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"file backend: is a directory: {path}") from None
    except PermissionError:
        hint = "" if readonly else " (readonly=on needs only read permission)"
        raise ConfigError(f"file backend: permission denied: {path}{hint}") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ConfigError(
                f"file backend: {path} is on a read-only file system (use readonly=on)"
            ) from None
        if direct and exc.errno == errno.EINVAL:
            raise ConfigError(
                f"file backend: direct=on is not supported on the file system of {path}"
            ) from None
        raise ConfigError(f"file backend: cannot open {path}: {exc.strerror}") from None


class FileBackend(Backend):
    """A regular file or a block device at ``path``.

    ``readonly=True`` opens ``O_RDONLY``. Capabilities are normally inferred
    from the methods a class overrides, but whether this one may write is
    only known per instance, so it overrides the ``can_*`` properties: a
    read-only instance reports no write, flush, discard or write-zeroes
    capability, and cannot be resized (its writing methods and
    :meth:`resize` raise ``EROFS`` if called anyway). A block device cannot
    be resized either (``EOPNOTSUPP``).
    One class with an explicit, documented override was preferred over a
    parallel read-only class hierarchy that would duplicate the read path.

    ``direct=True`` opens ``O_DIRECT`` (see the module docstring). It fails
    with :class:`ConfigError` if the file system refuses ``O_DIRECT``.

    Thread-safe: positional I/O on one descriptor needs no lock.
    """

    name = "file"

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False,
                 direct: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.direct = direct
        self._fd = _open(self.path, readonly, direct)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"file backend: is a directory: {self.path}")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(
                    f"file backend: not a regular file or block device: {self.path}")
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self._block_size = self._find_block_size(st.st_blksize)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(
                f"file backend: cannot query {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False
        self._punch = _NativeMethod("hole punching", self._fallocate_call(
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        self._zero_range = _NativeMethod("FALLOC_FL_ZERO_RANGE", self._fallocate_call(
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        self._blkdiscard = _NativeMethod("BLKDISCARD", self._ioctl_call(BLKDISCARD))
        self._blkzeroout = _NativeMethod("BLKZEROOUT", self._ioctl_call(BLKZEROOUT))

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``path=``, ``readonly=`` and ``direct=``; unknown options are an error."""
        path = options.string("path")
        readonly = options.boolean("readonly", False)
        direct = options.boolean("direct", False)
        options.finish()
        return cls(path, readonly=readonly, direct=direct)

    # -- geometry -----------------------------------------------------------------------

    def size(self) -> int:
        """Current size: ``st_size`` of a file, ``BLKGETSIZE64`` of a device (re-read each call)."""
        if self.is_block_device:
            return _ioctl_u64(self._fd, BLKGETSIZE64)
        return os.fstat(self._fd).st_size

    @property
    def preferred_block_size(self) -> int:
        """A device's logical block size; for a file 512, or its O_DIRECT alignment if direct."""
        return self._block_size

    def _find_block_size(self, st_blksize: int) -> int:
        if self.is_block_device:
            return max(512, _ioctl_int(self._fd, BLKSSZGET))
        if not self.direct:
            return 512
        # Without statx DIOALIGN, the file system block size is a safe multiple.
        align = dio_offset_alignment(self._fd) or st_blksize
        return max(512, align)

    # -- capabilities -------------------------------------------------------------------

    @property
    def can_write(self) -> bool:
        """False for a read-only backend."""
        return not self.readonly and super().can_write

    @property
    def can_flush(self) -> bool:
        """False for a read-only backend (nothing to flush)."""
        return not self.readonly and super().can_flush

    @property
    def can_discard(self) -> bool:
        """False for a read-only backend."""
        return not self.readonly and super().can_discard

    @property
    def can_write_zeroes(self) -> bool:
        """False for a read-only backend."""
        return not self.readonly and super().can_write_zeroes

    @property
    def can_resize(self) -> bool:
        """True for a regular file open read-write."""
        return not (self.readonly or self.is_block_device) and super().can_resize

    # -- resizing -----------------------------------------------------------------------

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Set the file's length to ``size`` with ``ftruncate``; growing leaves a hole.

        Shrinking is refused (``EINVAL``, nothing changes) unless ``shrink``
        when ``lseek(SEEK_DATA)`` finds data at or beyond ``size``, or
        cannot tell (a file system without ``SEEK_DATA``). A block device
        refuses with ``EOPNOTSUPP``, a read-only backend with ``EROFS``.
        :meth:`size` reads the length again, so it reports ``size`` at once.
        """
        what = f"file backend: {self.path}"
        if self.is_block_device:
            raise BackendError(errno.EOPNOTSUPP, f"{what} is a block device: the size of a "
                                                 "block device is not pyvduse's to change")
        self._check_writable()
        check_new_size("file backend", size)
        current = self.size()
        if size < current and not shrink:
            data_at = self._data_at_or_beyond(size)
            if data_at is not None:
                raise shrink_refused(what, size, data_at)
        if size != current:
            os.ftruncate(self._fd, size)

    def _data_at_or_beyond(self, offset: int) -> str | None:
        """Why a shrink to ``offset`` would drop data, or None if nothing lies there."""
        try:
            found = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None  # only a hole up to the end of the file
            return (f"the file system cannot tell where data lies: SEEK_DATA: "
                    f"{exc.strerror or exc}")
        return f"data lies at offset {found}"

    # -- data ---------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``: one ``preadv`` (the device calls this for one buffer)."""
        try:
            done = os.preadv(self._fd, [buf], offset)
            if done != len(buf):
                transfer_all(os.preadv, self._fd, [buf[done:]], offset + done)
        except OSError as exc:
            self._bounce_if_refused(exc, self._bounced_read, offset, [buf])

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from ``offset`` with ``preadv``."""
        try:
            transfer_all(os.preadv, self._fd, bufs, offset)
        except OSError as exc:
            self._bounce_if_refused(exc, self._bounced_read, offset, bufs)

    def write(self, offset: int, buf: memoryview) -> None:
        """Store ``buf`` at ``offset``: one ``pwritev`` (the device calls this for one buffer)."""
        self._check_writable()
        try:
            done = os.pwritev(self._fd, [buf], offset)
            if done != len(buf):
                transfer_all(os.pwritev, self._fd, [buf[done:]], offset + done)
        except OSError as exc:
            self._bounce_if_refused(exc, self._bounced_write, offset, [buf])

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Store ``bufs`` in order at ``offset`` with ``pwritev``."""
        self._check_writable()
        try:
            transfer_all(os.pwritev, self._fd, bufs, offset)
        except OSError as exc:
            self._bounce_if_refused(exc, self._bounced_write, offset, bufs)

    def _bounce_if_refused(self, exc: OSError,
                           bounced: Callable[[int, Sequence[memoryview]], None],
                           offset: int, bufs: Sequence[memoryview]) -> None:
        """Redo the transfer through ``bounced`` (an aligned bounce buffer) if O_DIRECT
        refused ``bufs`` (EINVAL); re-raise any other failure."""
        if not (self.direct and exc.errno == errno.EINVAL):
            raise exc
        bounced(offset, bufs)

    def flush(self) -> None:
        """``fdatasync`` the file or device."""
        os.fdatasync(self._fd)

    def native_target(self) -> NativeTarget | None:
        """The file's descriptor: the native path does what :meth:`readv`, :meth:`writev`
        and :meth:`flush` do (an ``O_DIRECT`` transfer it cannot make, it leaves to them)."""
        return NativeTarget.file(self._fd) if self._own_data_methods(FileBackend) else None

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (file) or ``BLKDISCARD`` (device); a no-op where unsupported."""
        self._check_writable()
        method = self._blkdiscard if self.is_block_device else self._punch
        method.attempt(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zero the range natively if the storage can, else by writing zero buffers.

        File: hole punching (only if ``may_unmap``), then ``ZERO_RANGE``.
        Device: ``BLKZEROOUT``.
        """
        self._check_writable()
        if self.is_block_device:
            if self._blkzeroout.attempt(offset, length):
                return
        else:
            if may_unmap and self._punch.attempt(offset, length):
                return
            if self._zero_range.attempt(offset, length):
                return
        self._write_zero_buffers(offset, length)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    # -- helpers ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise BackendError(errno.EROFS, f"file backend: {self.path} is open read-only")

    def _fallocate_call(self, mode: int) -> Callable[[int, int], None]:
        # Looks ``fallocate`` up at call time so tests can replace it.
        return lambda offset, length: fallocate(self._fd, mode, offset, length)

    def _ioctl_call(self, request: int) -> Callable[[int, int], None]:
        return lambda offset, length: _ioctl_range(self._fd, request, offset, length)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeroes = _zero_buffer()
        whole, rest = divmod(length, len(zeroes))
        bufs = [zeroes] * whole
        if rest:
            bufs.append(zeroes[:rest])
        self.writev(offset, bufs)

    def _bounced_read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        bounce = _bounce_buffer()
        for pieces in _chunks(bufs, len(bounce)):
            total = sum(len(piece) for piece in pieces)
            area = bounce[:total]
            transfer_all(os.preadv, self._fd, [area], offset)
            pos = 0
            for piece in pieces:
                piece[:] = area[pos : pos + len(piece)]
                pos += len(piece)
            offset += total

    def _bounced_write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        bounce = _bounce_buffer()
        for pieces in _chunks(bufs, len(bounce)):
            pos = 0
            for piece in pieces:
                bounce[pos : pos + len(piece)] = piece
                pos += len(piece)
            transfer_all(os.pwritev, self._fd, [bounce[:pos]], offset)
            offset += pos
