"""The compiled data path: whether it exists, which queues it serves, and its glue.

pyvduse has two data paths that give the same answers:

* ``python``: :class:`~pyvduse.virtqueue.SplitQueue` and
  :class:`~pyvduse.blk.handler.BlkHandler`, the reference, always there;
* ``native``: the extension module ``pyvduse._fastpath`` (C, built by
  ``pip install`` when a C compiler and Python's headers are present). Inside
  each batch of :meth:`pyvduse.queue_worker.QueueWorker.drain` it serves, with
  the interpreter lock released, every request shaped as the Python fast paths
  expect whose backend it can reach directly (a file descriptor, or the null
  disk): ring walk and checks, virtio-blk header, range checks, inflight-log
  mark, the I/O, the status byte and the used element. At the first request it
  does not take (any other request type or layout, any malformed chain, any
  buffer in memory it was not shown, an I/O error) it stops without consuming
  it; the Python path serves that one with all its checks and logs, then the
  native path goes on. So a user's backend, a malformed ring and every error
  reply behave exactly as in Python. When the backend has a thread pool
  (``--io-threads``), a file's large requests and its flushes go to an io_uring
  of the queue's own instead, submitted once per batch and completed by
  :meth:`~pyvduse.queue_worker.QueueWorker.reap`; one that fails is served again
  by the Python path from its chain, which reports the error.

``--datapath auto`` (the default) takes the native path when the module is built
and the backend offers a :class:`NativeTarget`; ``native`` insists on it (a clear
error otherwise); ``python`` never uses it. The export's start line says which.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyvduse.errors import ConfigError

if TYPE_CHECKING:
    from pyvduse.memory import GuestMemory, HotRegion
    from pyvduse.virtqueue import SplitQueue

log = logging.getLogger(__name__)

try:
    from pyvduse import _fastpath  # type: ignore[attr-defined]
except ImportError as exc:  # no compiler when it was installed, or a foreign build
    _fastpath = None
    _MISSING = str(exc)
else:
    _MISSING = ""

DATAPATHS = ("auto", "native", "python")
"""The values of ``--datapath``."""

TARGET_NULL = 0
TARGET_FD = 1
TARGET_NBD = 2
TARGET_RBD = 3

NBD_RETRY_INTERVAL = 1.0
"""Seconds between attempts to give a queue whose NBD connection broke a new one."""

# Why FastPath.loop() returned (fastpath_loop.h).
LOOP_PYTHON = 0  #: the next request is the Python path's
LOOP_RETURNED = 1  #: io_uring requests failed: reap() hands them back
LOOP_WOKEN = 2  #: the wake fd (a Python completion, an owed interrupt) or the stop fd
LOOP_STOPPED = 3  #: the queue was given up
LOOP_BROKEN = 4  #: the driver moved the avail index by more than the queue size


def available() -> bool:
    """Whether the compiled module ``pyvduse._fastpath`` could be imported."""
    return _fastpath is not None


def native_module() -> Any:
    """The compiled module ``pyvduse._fastpath``, or None (for backends that open
    what their target needs with its functions, e.g. ``rbd_open``)."""
    return _fastpath


def why_unavailable() -> str:
    """Why the compiled module is missing ('' when it is there)."""
    if _fastpath is not None:
        return ""
    return (f"the compiled data path is not built ({_MISSING}); reinstall pyvduse with a C "
            f"compiler and Python's headers (Debian: gcc python3-dev)")


@dataclass(frozen=True)
class NbdConnector:
    """How each queue of an NBD target gets a connection of its own.

    ``connect()`` returns a new socket, negotiated with simple replies only (no
    structured replies), for the same export; it may block for a bounded time and
    raises on failure. ``usable()`` says whether trying is worth it now (the
    backend's own connection is up), so that a queue does not block on a server
    that is known to be gone. ``max_payload``: the largest read or write one
    command may carry; ``flush``: the server takes ``NBD_CMD_FLUSH``.
    """

    connect: Callable[[], socket.socket]
    usable: Callable[[], bool]
    max_payload: int
    flush: bool
    #: Told each time a queue's broken connection was replaced (metrics).
    reconnected: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class NativeTarget:
    """Where the native path does a backend's I/O: a file descriptor, an NBD server
    (a connection per queue), an RBD image (a handle of the native path's own), or
    nowhere (null).

    ``fd`` stays the backend's: the native path never closes it, and the
    backend keeps it open while any queue serves (until :meth:`Backend.close`).
    """

    kind: int
    fd: int = -1
    nbd: NbdConnector | None = None
    image: object | None = None

    @classmethod
    def null(cls) -> NativeTarget:
        """Reads give zeroes, writes and flushes do nothing."""
        return cls(TARGET_NULL)

    @classmethod
    def file(cls, fd: int) -> NativeTarget:
        """``preadv``/``pwritev`` at the device offset, ``fdatasync`` for a flush."""
        return cls(TARGET_FD, fd)

    @classmethod
    def nbd_server(cls, connector: NbdConnector) -> NativeTarget:
        """``NBD_CMD_READ``/``WRITE``/``FLUSH`` on a connection of each queue's own,
        sent and completed in C; a request that fails (and every request in flight on
        a connection that breaks) is served again by the backend's Python methods.
        Only for a server whose connections share one cache
        (``NBD_FLAG_CAN_MULTI_CONN``): a request may go to any of them."""
        return cls(TARGET_NBD, nbd=connector)

    @classmethod
    def rbd_image(cls, image: object) -> NativeTarget:
        """``rbd_aio_readv``/``writev``/``flush`` on ``image`` (what
        ``pyvduse._fastpath.rbd_open()`` returned; the queues share it, and it closes
        when the last of them and the backend let go of it), completed in C; a request
        that fails is served again by the backend's Python methods."""
        return cls(TARGET_RBD, image=image)


@dataclass(frozen=True)
class NativeIrq:
    """How the native serving loop interrupts a queue's driver without Python:
    ``ioctl(fd, request, &arg)`` with a u32 ``arg`` (VDUSE: ``VDUSE_VQ_INJECT_IRQ``
    and the queue index), or, with ``request`` 0, an eventfd write of 1 to ``fd``.

    A queue's ``notify`` callable that has a ``native_irq`` attribute of this type
    may be served by the native loop; ``fd`` must stay open while the queue runs.
    """

    fd: int
    request: int = 0
    arg: int = 0


@dataclass(frozen=True)
class NativePlan:
    """What the native path needs to know of a virtio-blk device to serve it.

    ``capacity`` is a one-cell ``"Q"`` memoryview holding the bytes the device
    serves; a live resize stores the new value there and every queue sees it.
    ``asynchronous``: the backend serves its flushes and its requests of
    ``submit_min`` data bytes or more asynchronously (a thread pool); the
    native path then does those of a file target through an io_uring of its
    own, or leaves them to Python if it has none. Otherwise every request is
    served synchronously (null: in place, whatever its size).
    """

    target: NativeTarget
    capacity: memoryview
    block_size: int
    accepts_writes: bool
    flush_offered: bool
    submit_min: int
    asynchronous: bool = False


class FastPath(Protocol):
    """The compiled object's interface (``pyvduse._fastpath.FastPath``)."""

    served: int
    looped: int
    position: int
    staged: int
    batches_small: bool
    fallbacks: int
    mappings: int
    closed: bool

    def learn(self, start: int, read_end: int, write_end: int, view: memoryview) -> bool: ...

    def run(self, count: int, last_avail: int, used_idx: int,
            sequence: int) -> tuple[int, int, int, int]: ...

    def retire(self, position: int, used_idx: int) -> None: ...

    pending: int
    returned: int
    asynchronous: bool
    engine_error: str
    engine_broken: str

    event_fd: int

    def attach(self, fd: int) -> None: ...

    def reap(self, used_idx: int) -> tuple[int, tuple[int, ...]]: ...

    def loop(self, kick_fd: int, wake_fd: int, stop_fd: int, irq_fd: int, irq_request: int,
             irq_arg: int, event_idx: bool, poll_max_ns: int, poll_ns: int,
             python_inflight: bool, log_header: memoryview, last_avail: int, used_idx: int,
             signalled: int, log_used: int, sequence: int, dry: bool,
             ) -> tuple[int, int, int, int, int, int, int, bool, int, int, int, int]: ...

    def wait(self, timeout: float) -> bool: ...

    def forget(self) -> None: ...

    def close(self) -> None: ...


def choose(datapath: str, target: NativeTarget | None, name: str, why_not: str = "") -> str:
    """Resolve ``--datapath`` for export ``name`` whose backend offers ``target``
    (``why_not``: the backend's reason when it offers none, if it gave one).

    Returns ``"native"``, or ``"python"`` with the reason in parentheses when
    ``auto`` could not have the native path (for the export's start line).
    Raises :class:`ConfigError` if ``native`` was asked for and cannot be had.
    """
    if datapath not in DATAPATHS:
        raise ConfigError(f"unknown data path {datapath!r} (choose from {', '.join(DATAPATHS)})")
    if datapath == "python":
        return "python"
    why = why_unavailable()
    if not why and target is None:
        why = (f"its backend has no native target ({why_not})" if why_not else
               "its backend has no native target (file, memory, null and rbd have, and "
               "nbd with a server that allows several connections)")
    if not why:
        return "native"
    if datapath == "native":
        raise ConfigError(f"{name}: --datapath native: {why}")
    return f"python ({why})"


class NativeRing:
    """A queue's compiled fast path, with the memory it knows kept current.

    Built per :class:`SplitQueue` (rebuilt when the ring is remapped). Call
    :meth:`refresh` before each run (cheap), and :meth:`teach` after the
    Python path served a request, so that a mapping it made is known to the
    native path too.
    """

    __slots__ = ("_generation", "_memory", "_name", "_nbd", "_nbd_retry", "_served_before",
                 "_taught", "fast")

    def __init__(self, queue: SplitQueue, plan: NativePlan, slots: memoryview,
                 previous: NativeRing | None = None, name: str = "queue",
                 cells: memoryview | None = None) -> None:
        assert _fastpath is not None, "NativeRing without the compiled module"
        #: Requests served by the rings this one replaces (a remapped queue).
        self._served_before = previous.served_total if previous is not None else 0
        self._name = name
        self._nbd = plan.target.nbd
        self._nbd_retry = 0.0  # when a broken NBD connection may be replaced next
        ring = queue.ring_buffers()
        args = (ring[0], ring[1], ring[2], queue.size, queue.indirect, queue.max_indirect,
                slots, plan.capacity, plan.target.kind)
        flags = (plan.block_size, plan.accepts_writes, plan.flush_offered, plan.submit_min,
                 plan.asynchronous)
        counted = {"stats": cells} if cells is not None else {}
        if plan.target.kind == TARGET_RBD:
            self.fast: FastPath = _fastpath.FastPath(*args, -1, *flags,
                                                     rbd_image=plan.target.image, **counted)
            if self.fast.engine_error:
                raise ValueError(self.fast.engine_error)
        elif self._nbd is None:
            self.fast = _fastpath.FastPath(*args, plan.target.fd, *flags, **counted)
        else:
            try:
                sock = self._nbd.connect()
            except Exception as exc:
                raise ValueError(f"cannot open its NBD connection: {exc}") from None
            with sock:  # the fast path keeps a duplicate
                self.fast = _fastpath.FastPath(*args, sock.fileno(), *flags,
                                               nbd_max_payload=self._nbd.max_payload,
                                               nbd_flush=self._nbd.flush, **counted)
            if self.fast.engine_error:
                raise ValueError(self.fast.engine_error)
        self._memory: GuestMemory = queue.memory
        self._generation = generation(self._memory)
        #: The ids of the regions last taught (teach() is a no-op while they stay).
        self._taught: tuple[int, ...] = ()
        self.teach()

    @property
    def looped_total(self) -> int:
        """Requests the compiled loop took on this ring (live, while it runs)."""
        return self.fast.looped

    @property
    def served_total(self) -> int:
        """Requests the native path served for this queue, across remaps."""
        return self._served_before + self.fast.served

    def refresh(self) -> None:
        """Forget what was learned if the driver's memory changed since; give a broken
        NBD connection a new one when the server is back."""
        now = generation(self._memory)
        if now != self._generation:
            self._generation = now
            self.fast.forget()
            self._taught = ()
            self.teach()
        if self._nbd is not None and not self.fast.pending:
            broken = self.fast.engine_broken
            if broken:
                self._reconnect(broken)

    def _reconnect(self, why: str) -> None:
        """Replace the broken NBD connection, at most once per NBD_RETRY_INTERVAL and
        only while the backend's own connection is up. Meanwhile (and if this fails)
        the queue's requests go through the backend's Python client."""
        assert self._nbd is not None
        now = time.monotonic()
        if now < self._nbd_retry:
            return
        if not self._nbd_retry:
            log.warning("%s: its native NBD connection is gone (%s); the Python client "
                        "serves its requests until it is back", self._name, why)
        self._nbd_retry = now + NBD_RETRY_INTERVAL
        if not self._nbd.usable():
            return
        try:
            with self._nbd.connect() as sock:
                self.fast.attach(sock.fileno())
        except Exception as exc:
            log.debug("%s: no new native NBD connection yet: %s", self._name, exc)
            return
        self._nbd_retry = 0.0
        self._nbd.reconnected()
        log.info("%s: its native NBD connection is back", self._name)

    def teach(self) -> None:
        """Make the memory's mappings known to the native path: all of them if the
        memory lists them (``mappings()``), else its current hot region."""
        listed = getattr(self._memory, "mappings", None)
        regions: list[HotRegion] = listed() if listed is not None else [self._memory.hot]
        key = tuple(map(id, regions))
        if key == self._taught:
            return
        self._taught = key
        assert _fastpath is not None
        for start, read_end, write_end, view in regions[-_fastpath.MAX_MAPPINGS:]:
            if max(read_end, write_end) > start:
                self.fast.learn(start, read_end, write_end, view)

    def close(self) -> None:
        """Let go of the rings and mappings (deferred if a run is in progress)."""
        self.fast.close()


def generation(memory: Any) -> int:
    """``memory.generation`` (bumped whenever mappings go away), or 0 for a fixed memory."""
    return int(getattr(memory, "generation", 0))
