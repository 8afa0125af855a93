"""A vhost-user-blk / vhost-vdpa client for tests and benchmarks: libblkio through ctypes.

libblkio (https://libblkio.gitlab.io/libblkio/) is the user-space virtio-blk
driver that QEMU's ``blkio`` block driver and fio's ``libblkio`` engine use. It
talks to a vhost-user-blk server over a UNIX socket (driver
``virtio-blk-vhost-user``) or to a vDPA device such as a VDUSE device bound to
``vhost_vdpa`` (driver ``virtio-blk-vhost-vdpa``, path ``/dev/vhost-vdpa-N``).
:class:`BlkioClient` wraps it so that a test can play a VM's virtio-blk driver
without a VM::

    with BlkioClient("virtio-blk-vhost-user", "/tmp/vhost.sock") as client:
        client.write(0, b"x" * 4096)
        assert client.read(0, 4096) == b"x" * 4096

The library is not a dependency of pyvduse: ``scripts/setup-blkio`` unpacks
Debian's ``libblkio1`` into ``build/blkio/root`` of the source tree, where
:func:`library_path` looks for it unless ``PYVDUSE_LIBBLKIO`` names the
``libblkio.so.1`` to load.

Contracts common to the whole module:

* A client is used from one thread at a time (libblkio's queues are not
  thread-safe; nothing here locks).
* Request buffers live in memory regions mapped into the device (a vhost-user
  server maps them from the memfds libblkio sends, so ordinary Python memory
  cannot be used): :meth:`BlkioClient.buffer` hands out such memory. The
  memory belongs to Python ``mmap`` objects, so a memoryview never dangles,
  not even after :meth:`BlkioClient.close`.
* Offsets and lengths of reads, writes, discards and write-zeroes must be
  multiples of the device's ``request-alignment`` (512 for virtio-blk); the
  client does not check, so tests can send what a driver should not.
* A request fails with a negative errno in its completion; the synchronous
  helpers raise :class:`BlkioError` for it, carrying libblkio's message.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

ENV_LIBRARY: Final = "PYVDUSE_LIBBLKIO"
"""Environment variable: the path of the ``libblkio.so.1`` to load."""

DRIVER_VHOST_USER: Final = "virtio-blk-vhost-user"
DRIVER_VHOST_VDPA: Final = "virtio-blk-vhost-vdpa"

REQ_FUA: Final = 1 << 0
"""``BLKIO_REQ_FUA``: the write is durable when it completes."""
REQ_NO_UNMAP: Final = 1 << 1
"""``BLKIO_REQ_NO_UNMAP``: write-zeroes must not deallocate."""
REQ_NO_FALLBACK: Final = 1 << 2
"""``BLKIO_REQ_NO_FALLBACK``: write-zeroes fails rather than writing zero buffers."""

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds a synchronous helper waits for its request before raising :class:`BlkioTimeout`."""

_SCRATCH_MIN: Final = 1 << 20
_PAGE: Final = mmap.PAGESIZE


class BlkioError(OSError):
    """A libblkio call or a request failed: ``errno`` and libblkio's message."""

    def __init__(self, err: int, what: str, message: str | None = None) -> None:
        text = f"{what}: {message or os.strerror(err)}"
        super().__init__(err, text)
        self.what = what
        self.message = message


class BlkioTimeout(BlkioError, TimeoutError):
    """:meth:`BlkioClient.wait` (or a synchronous helper) timed out (``ETIME``)."""


class BlkioLibraryMissing(RuntimeError):
    """libblkio is not where :func:`library_path` looks: run ``scripts/setup-blkio``."""


# -- the library --------------------------------------------------------------------------


class _MemRegion(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
        ("iova", ctypes.c_uint64),
        ("fd_offset", ctypes.c_int64),
        ("fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
    )


class _Completion(ctypes.Structure):
    _fields_ = (
        ("user_data", ctypes.c_void_p),
        ("error_msg", ctypes.c_char_p),
        ("ret", ctypes.c_int),
        ("reserved_", ctypes.c_uint8 * 12),
    )


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


def repo_root() -> Path:
    """The source tree this module was imported from (``src/pyvduse/testing/..``)."""
    return Path(__file__).resolve().parents[3]


def library_path() -> Path:
    """Where libblkio is: ``$PYVDUSE_LIBBLKIO``, else the tree's ``build/blkio/root``.

    Raises :class:`BlkioLibraryMissing`, naming ``scripts/setup-blkio``, when
    the file does not exist.
    """
    configured = os.environ.get(ENV_LIBRARY)
    if configured:
        path = Path(configured)
        where = f"${ENV_LIBRARY}"
    else:
        path = repo_root() / "build/blkio/root/usr/lib/x86_64-linux-gnu/libblkio.so.1"
        where = "the default location"
    if not path.is_file():
        raise BlkioLibraryMissing(
            f"libblkio not found at {path} ({where}): run scripts/setup-blkio in the "
            f"pyvduse source tree, or point {ENV_LIBRARY} at a libblkio.so.1")
    return path


_LIBRARY: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """Load libblkio once (see :func:`library_path`) with every prototype declared."""
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    lib = ctypes.CDLL(str(library_path()))
    vp, u64, i32, u32, sz = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint32,
                             ctypes.c_size_t)
    cstr = ctypes.c_char_p
    protos: dict[str, tuple[type | None, list[type]]] = {
        "blkio_get_error_msg": (cstr, []),
        "blkio_create": (i32, [cstr, ctypes.POINTER(vp)]),
        "blkio_connect": (i32, [vp]),
        "blkio_start": (i32, [vp]),
        "blkio_destroy": (None, [ctypes.POINTER(vp)]),
        "blkio_get_bool": (i32, [vp, cstr, ctypes.POINTER(ctypes.c_bool)]),
        "blkio_get_int": (i32, [vp, cstr, ctypes.POINTER(i32)]),
        "blkio_get_uint64": (i32, [vp, cstr, ctypes.POINTER(u64)]),
        "blkio_get_str": (i32, [vp, cstr, ctypes.POINTER(vp)]),
        "blkio_set_bool": (i32, [vp, cstr, ctypes.c_bool]),
        "blkio_set_int": (i32, [vp, cstr, i32]),
        "blkio_set_uint64": (i32, [vp, cstr, u64]),
        "blkio_set_str": (i32, [vp, cstr, cstr]),
        "blkio_map_mem_region": (i32, [vp, ctypes.POINTER(_MemRegion)]),
        "blkio_unmap_mem_region": (None, [vp, ctypes.POINTER(_MemRegion)]),
        "blkio_get_queue": (vp, [vp, i32]),
        "blkioq_read": (None, [vp, u64, vp, sz, vp, u32]),
        "blkioq_write": (None, [vp, u64, vp, sz, vp, u32]),
        "blkioq_readv": (None, [vp, u64, ctypes.POINTER(_Iovec), i32, vp, u32]),
        "blkioq_writev": (None, [vp, u64, ctypes.POINTER(_Iovec), i32, vp, u32]),
        "blkioq_write_zeroes": (None, [vp, u64, u64, vp, u32]),
        "blkioq_discard": (None, [vp, u64, u64, vp, u32]),
        "blkioq_flush": (None, [vp, vp, u32]),
        "blkioq_do_io": (i32, [vp, ctypes.POINTER(_Completion), i32, i32,
                               ctypes.POINTER(_Timespec)]),
    }
    for name, (restype, argtypes) in protos.items():
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes
    _LIBRARY = lib
    return lib


def _libc_free(pointer: ctypes.c_void_p) -> None:
    """``free(3)``, for the strings ``blkio_get_str`` allocates."""
    libc = ctypes.CDLL(None)
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(pointer)


def _error_message(lib: ctypes.CDLL) -> str | None:
    raw: bytes | None = lib.blkio_get_error_msg()
    return raw.decode(errors="replace") if raw else None


# -- the client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """A finished request: its tag, ``ret`` (0 or a negative errno) and libblkio's message."""

    tag: int
    ret: int
    error: str | None = None

    def __iter__(self) -> Iterator[int]:
        """Unpack as ``tag, ret``."""
        yield self.tag
        yield self.ret


@dataclass
class _Region:
    mapping: mmap.mmap
    fd: int
    addr: int
    size: int
    struct: _MemRegion
    view: memoryview


class BlkioClient:
    """One libblkio instance connected to a device and started, with its queues.

    ``driver`` is :data:`DRIVER_VHOST_USER` (``path``: the server's socket) or
    :data:`DRIVER_VHOST_VDPA` (``path``: ``/dev/vhost-vdpa-N``). The
    constructor connects, sets ``num-queues`` (and ``queue-size`` when given)
    and starts; it raises :class:`BlkioError` with libblkio's message when any
    step fails (no server, too many queues, ...), leaving nothing open.

    Requests are submitted with the ``submit_*`` methods, which return an int
    tag (unique per client, never 0) and do not block; :meth:`wait` reaps
    completions. ``queue`` selects the queue (0 .. ``num_queues - 1``). The
    synchronous helpers (:meth:`read`, :meth:`write`, ...) submit one request,
    wait for it alone (keeping other completions for :meth:`wait`) and raise on
    failure.
    """

    def __init__(self, driver: str, path: str, *, num_queues: int = 1,
                 queue_size: int | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._lib = load_library()
        self.driver = driver
        self.path = path
        self.timeout = timeout
        """Seconds the synchronous helpers wait per request (None: for ever). After a
        :class:`BlkioTimeout` the request is still in flight: close the client."""
        self._handle = ctypes.c_void_p()
        self._regions: list[_Region] = []
        self._scratch: _Region | None = None
        self._next_tag = 1
        self._in_flight: list[set[int]] = []
        self._kept: list[list[Completion]] = []
        self._iovecs: dict[int, ctypes.Array[_Iovec]] = {}
        self._check(self._lib.blkio_create(driver.encode(), ctypes.byref(self._handle)),
                    f"blkio_create({driver})")
        try:
            self._check(self._lib.blkio_set_str(self._handle, b"path", os.fsencode(path)),
                        "set path")
            self._check(self._lib.blkio_connect(self._handle), f"connect to {path}")
            self._check(self._lib.blkio_set_int(self._handle, b"num-queues", num_queues),
                        f"set num-queues={num_queues}")
            if queue_size is not None:
                self._check(self._lib.blkio_set_int(self._handle, b"queue-size", queue_size),
                            f"set queue-size={queue_size}")
            self._check(self._lib.blkio_start(self._handle), f"start {path}")
            self._queues = []
            for index in range(num_queues):
                q = self._lib.blkio_get_queue(self._handle, index)
                if not q:
                    raise BlkioError(errno.ENOENT, f"blkio_get_queue({index})",
                                     _error_message(self._lib))
                self._queues.append(q)
                self._in_flight.append(set())
                self._kept.append([])
            self.capacity = self.get_uint64("capacity")
            """The device's size in bytes."""
            self.num_queues = num_queues
            self.queue_size = self.get_int("queue-size")
            """Entries per virtqueue: at most this many requests in flight per queue."""
            self.request_alignment = self.get_int("request-alignment")
            self.mem_region_alignment = self.get_uint64("mem-region-alignment")
        except BaseException:
            self.close()
            raise

    # -- plumbing

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            message = _error_message(self._lib)
            cls = BlkioTimeout if -ret == errno.ETIME else BlkioError
            raise cls(-ret, what, message)
        return ret

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the constructor failed)."""
        return not self._handle.value

    def _require_open(self) -> None:
        if self.closed:
            raise ValueError("BlkioClient is closed")

    def close(self) -> None:
        """Disconnect (``blkio_destroy``): requests in flight are abandoned, not awaited.

        Idempotent. Buffers from :meth:`buffer` stay readable (they are
        Python-owned) but no longer belong to any device.
        """
        if self._handle.value:
            self._lib.blkio_destroy(ctypes.byref(self._handle))
            self._handle = ctypes.c_void_p()
        for region in self._regions:
            try:
                os.close(region.fd)
            except OSError:
                pass
        self._regions.clear()
        self._scratch = None
        self._iovecs.clear()
        for pending in self._in_flight:
            pending.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None and self._handle.value:
            self.close()

    # -- properties

    def get_uint64(self, name: str) -> int:
        """A uint64 property of the instance, e.g. ``capacity``, ``max-discard-len``."""
        self._require_open()
        value = ctypes.c_uint64()
        self._check(self._lib.blkio_get_uint64(self._handle, name.encode(), ctypes.byref(value)),
                    f"get {name}")
        return value.value

    def get_int(self, name: str) -> int:
        """An int property, e.g. ``queue-size``, ``max-queues``, ``request-alignment``."""
        self._require_open()
        value = ctypes.c_int()
        self._check(self._lib.blkio_get_int(self._handle, name.encode(), ctypes.byref(value)),
                    f"get {name}")
        return value.value

    def get_bool(self, name: str) -> bool:
        """A bool property, e.g. ``read-only``, ``needs-mem-regions``, ``flush-needed``."""
        self._require_open()
        value = ctypes.c_bool()
        self._check(self._lib.blkio_get_bool(self._handle, name.encode(), ctypes.byref(value)),
                    f"get {name}")
        return value.value

    def get_str(self, name: str) -> str:
        """Any property as libblkio's string form (every type converts)."""
        self._require_open()
        value = ctypes.c_void_p()
        self._check(self._lib.blkio_get_str(self._handle, name.encode(), ctypes.byref(value)),
                    f"get {name}")
        try:
            return ctypes.string_at(value.value).decode() if value.value else ""
        finally:
            _libc_free(value)

    # -- memory

    def buffer(self, size: int) -> memoryview:
        """``size`` bytes of zeroed, page-aligned memory mapped into the device.

        Each call maps one new memory region (libblkio sends the server a new
        memory table); the device accepts at most ``max-mem-regions`` of them,
        so allocate a few large buffers and slice them. Slices of the returned
        view can be passed to the ``submit_*`` methods.
        """
        self._require_open()
        if size <= 0:
            raise ValueError(f"buffer size must be positive, not {size}")
        return self._map_region(size).view[:size]

    def _map_region(self, size: int) -> _Region:
        align = max(_PAGE, self.mem_region_alignment)
        length = -(-size // align) * align
        fd = os.memfd_create("pyvduse-blkio", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, length)
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            struct = _MemRegion(addr=addr, len=length, iova=0, fd_offset=0, fd=fd, flags=0)
            self._check(self._lib.blkio_map_mem_region(self._handle, ctypes.byref(struct)),
                        f"map a memory region of {length} bytes")
        except BaseException:
            os.close(fd)
            raise
        region = _Region(mapping, fd, addr, length, struct, memoryview(mapping))
        self._regions.append(region)
        return region

    def _unmap_region(self, region: _Region) -> None:
        self._lib.blkio_unmap_mem_region(self._handle, ctypes.byref(region.struct))
        self._regions.remove(region)
        os.close(region.fd)

    def _address(self, buf: memoryview) -> int:
        """The address of ``buf``, which must lie inside one of this client's regions."""
        if not buf.contiguous:
            raise ValueError("request buffers must be contiguous")
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if view.readonly:
            raise ValueError("request buffers come from BlkioClient.buffer() (writable)")
        length = view.nbytes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view)) if length else 0
        for region in self._regions:
            if region.addr <= addr and addr + length <= region.addr + region.size:
                return addr
        raise ValueError("request buffers must come from this client's buffer() "
                         "(memory mapped into the device)")

    def _scratch_view(self, size: int) -> memoryview:
        """A reusable region of at least ``size`` bytes for the synchronous helpers."""
        if self._scratch is None or self._scratch.size < size:
            want = _SCRATCH_MIN
            while want < size:
                want *= 2
            old = self._scratch
            self._scratch = self._map_region(want)
            if old is not None:
                self._unmap_region(old)
        return self._scratch.view

    # -- submitting

    def _tag(self, queue: int) -> tuple[ctypes.c_void_p, int]:
        self._require_open()
        if not 0 <= queue < len(self._queues):
            raise ValueError(f"queue {queue} does not exist (num_queues={len(self._queues)})")
        tag = self._next_tag
        self._next_tag += 1
        self._in_flight[queue].add(tag)
        return self._queues[queue], tag

    def submit_read(self, offset: int, buf: memoryview, *, queue: int = 0,
                    flags: int = 0) -> int:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (from :meth:`buffer`); the tag."""
        addr = self._address(buf)
        q, tag = self._tag(queue)
        self._lib.blkioq_read(q, offset, addr, buf.nbytes, tag, flags)
        return tag

    def submit_write(self, offset: int, buf: memoryview, *, queue: int = 0,
                     flags: int = 0) -> int:
        """Write ``buf`` (from :meth:`buffer`) at ``offset``; the tag. Flags: :data:`REQ_FUA`."""
        addr = self._address(buf)
        q, tag = self._tag(queue)
        self._lib.blkioq_write(q, offset, addr, buf.nbytes, tag, flags)
        return tag

    def _iovec(self, bufs: Sequence[memoryview]) -> ctypes.Array[_Iovec]:
        array = (_Iovec * len(bufs))()
        for i, buf in enumerate(bufs):
            array[i].iov_base = self._address(buf)
            array[i].iov_len = buf.nbytes
        return array

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], *, queue: int = 0,
                     flags: int = 0) -> int:
        """Read into several buffers (one descriptor each) from ``offset`` on; the tag."""
        array = self._iovec(bufs)
        q, tag = self._tag(queue)
        self._iovecs[tag] = array
        self._lib.blkioq_readv(q, offset, array, len(bufs), tag, flags)
        return tag

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], *, queue: int = 0,
                      flags: int = 0) -> int:
        """Write several buffers (one descriptor each) from ``offset`` on; the tag."""
        array = self._iovec(bufs)
        q, tag = self._tag(queue)
        self._iovecs[tag] = array
        self._lib.blkioq_writev(q, offset, array, len(bufs), tag, flags)
        return tag

    def submit_flush(self, *, queue: int = 0) -> int:
        """Flush completed writes to stable storage; the tag."""
        q, tag = self._tag(queue)
        self._lib.blkioq_flush(q, tag, 0)
        return tag

    def submit_discard(self, offset: int, length: int, *, queue: int = 0) -> int:
        """Discard ``length`` bytes at ``offset`` (later reads: old data or zeros); the tag."""
        q, tag = self._tag(queue)
        self._lib.blkioq_discard(q, offset, length, tag, 0)
        return tag

    def submit_write_zeroes(self, offset: int, length: int, *, queue: int = 0,
                            flags: int = 0) -> int:
        """Zero ``length`` bytes at ``offset``; the tag. ``flags``: :data:`REQ_NO_UNMAP`, ..."""
        q, tag = self._tag(queue)
        self._lib.blkioq_write_zeroes(q, offset, length, tag, flags)
        return tag

    # -- completing

    def in_flight(self, queue: int = 0) -> int:
        """Requests submitted on ``queue`` whose completion nobody has reaped yet."""
        return len(self._in_flight[queue]) - len(self._kept[queue])

    def wait(self, min_completions: int = 1, timeout: float | None = None, *,
             queue: int = 0, max_completions: int | None = None) -> list[Completion]:
        """Submit what is queued and reap completions of ``queue``: at least ``min_completions``.

        Returns between ``min_completions`` and ``max_completions`` (default:
        all in flight) :class:`Completion` objects, which unpack as ``(tag,
        ret)``. ``min_completions=0`` only polls. ``timeout`` in seconds
        (None: block for ever) raises :class:`BlkioTimeout` if fewer than
        ``min_completions`` arrived; the requests stay in flight. Asking for
        more than are in flight raises ``ValueError``.
        """
        self._require_open()
        total = len(self._in_flight[queue])
        if min_completions > total:
            raise ValueError(f"waiting for {min_completions} completions with "
                             f"{total} request(s) in flight on queue {queue}")
        limit = max_completions if max_completions is not None else total
        if limit < min_completions:
            raise ValueError(f"max_completions {limit} < min_completions {min_completions}")
        kept = self._kept[queue]
        result = kept[:limit]
        del kept[:limit]
        if len(result) < limit and (len(result) < min_completions or not result):
            result += self._do_io(queue, max(0, min_completions - len(result)),
                                  limit - len(result), timeout)
        for completion in result:
            self._in_flight[queue].discard(completion.tag)
            self._iovecs.pop(completion.tag, None)
        return result

    def _do_io(self, queue: int, minimum: int, maximum: int,
               timeout: float | None) -> list[Completion]:
        maximum = max(maximum, minimum, 1)
        array = (_Completion * maximum)()
        spec = None
        if timeout is not None:
            seconds = max(0.0, timeout)
            spec = _Timespec(int(seconds), int((seconds % 1) * 1e9))
        got = self._check(self._lib.blkioq_do_io(
            self._queues[queue], array, minimum, maximum,
            ctypes.byref(spec) if spec is not None else None),
            f"wait for {minimum} completion(s) on queue {queue}")
        result = []
        for i in range(got):
            c = array[i]
            message = c.error_msg.decode(errors="replace") if c.error_msg else None
            result.append(Completion(int(c.user_data or 0), int(c.ret), message))
        return result

    def _complete(self, tag: int, queue: int, what: str) -> None:
        """Wait for ``tag`` alone; keep other completions for :meth:`wait`; raise on error."""
        kept = self._kept[queue]
        while True:
            for i, completion in enumerate(kept):
                if completion.tag == tag:
                    del kept[i]
                    self._in_flight[queue].discard(tag)
                    self._iovecs.pop(tag, None)
                    if completion.ret < 0:
                        raise BlkioError(-completion.ret, what, completion.error)
                    return
            pending = len(self._in_flight[queue]) - len(kept)
            kept += self._do_io(queue, 1, pending, self.timeout)

    # -- synchronous helpers

    def read(self, offset: int, length: int, *, queue: int = 0) -> bytes:
        """The ``length`` bytes at ``offset``; :class:`BlkioError` if the request fails."""
        view = self._scratch_view(length)[:length]
        tag = self.submit_read(offset, view, queue=queue)
        self._complete(tag, queue, f"read {length} bytes at {offset}")
        return bytes(view)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, queue: int = 0,
              flags: int = 0) -> None:
        """Write ``data`` at ``offset``; :class:`BlkioError` if the request fails."""
        length = len(memoryview(data).cast("B"))
        view = self._scratch_view(length)[:length]
        view[:] = memoryview(data).cast("B")
        tag = self.submit_write(offset, view, queue=queue, flags=flags)
        self._complete(tag, queue, f"write {length} bytes at {offset}")

    def flush(self, *, queue: int = 0) -> None:
        """Flush; :class:`BlkioError` if the request fails."""
        self._complete(self.submit_flush(queue=queue), queue, "flush")

    def discard(self, offset: int, length: int, *, queue: int = 0) -> None:
        """Discard a range; :class:`BlkioError` if the request fails."""
        self._complete(self.submit_discard(offset, length, queue=queue), queue,
                       f"discard {length} bytes at {offset}")

    def write_zeroes(self, offset: int, length: int, *, queue: int = 0, flags: int = 0) -> None:
        """Zero a range; :class:`BlkioError` if the request fails."""
        self._complete(self.submit_write_zeroes(offset, length, queue=queue, flags=flags), queue,
                       f"write zeroes to {length} bytes at {offset}")


def wait_all(client: BlkioClient, tags: Iterable[int], *, queue: int = 0,
             timeout: float | None = DEFAULT_TIMEOUT) -> dict[int, int]:
    """Reap completions on ``queue`` until every tag in ``tags`` is done: ``{tag: ret}``.

    Completions of other requests are returned too. ``timeout`` applies to
    each wait for the next completion.
    """
    wanted = set(tags)
    results: dict[int, int] = {}
    while not wanted <= results.keys():
        for completion in client.wait(1, timeout, queue=queue):
            results[completion.tag] = completion.ret
    return results
