"""The storage backend interface: what a block device's storage must provide.

A backend is a plain class that knows nothing of virtio. Subclass
:class:`Backend`, implement :meth:`~Backend.size` and :meth:`~Backend.read`
(or :meth:`~Backend.readv`), and add whichever of :meth:`~Backend.write`,
:meth:`~Backend.flush`, :meth:`~Backend.discard` and
:meth:`~Backend.write_zeroes` the storage can do. What a backend can do is
inferred from which methods its class overrides (the ``can_*`` properties),
and the device offers the driver exactly that, as nbdkit plugins work:

* no ``write``/``writev``: the device is read-only (``VIRTIO_BLK_F_RO``);
* ``discard``: the device offers ``VIRTIO_BLK_F_DISCARD``;
* ``write_zeroes``, or any way to write: ``VIRTIO_BLK_F_WRITE_ZEROES``
  (without a native ``write_zeroes`` zero buffers are written);
* ``flush`` is offered on every writable device; the default does nothing,
  which is right for storage whose writes are durable (or volatile anyway)
  when ``write`` returns;
* ``resize``: the daemon may change the disk's size on request
  (:attr:`Backend.can_resize`).

Requests reaching a backend have been validated by the device: offsets and
total lengths are multiples of the device's logical block size (at least
512, see :attr:`Backend.preferred_block_size`), lie within
:meth:`~Backend.size`, and are never zero (the single buffers of a vectored
request may have any length). The memory behind a request's ``memoryview``
objects is the driver's (guest memory): it is any alignment, a ``write``
source may be a read-only view, and a backend must not keep a view after its
method returns.

Error contract: a method fails one request by raising :class:`OSError` or
:class:`pyvduse.errors.BackendError` (both carry an errno); the request then
completes with ``VIRTIO_BLK_S_IOERR``, the failure is logged (rate-limited)
and the device keeps serving. Any other :class:`Exception` is taken for a bug
in the backend: it fails the request the same way and its traceback is
logged (at most once per interval). No exception a backend raises stops the
device (``SystemExit`` and ``KeyboardInterrupt`` are not exceptions in this
sense: do not raise them). Errors while *building* a backend should be
:class:`pyvduse.errors.ConfigError`, which the command line prints as one line.

Asynchronous requests: by default the device calls the methods above on
the queue's own thread, one request at a time per queue. A backend that can
have many requests in flight (a network client, a thread pool, io_uring) sets
:attr:`Backend.submit_min_bytes` and implements the ``submit_*`` methods:
each starts one request and returns at once, and the backend calls the
``done`` callable it was given exactly once, from any thread, when the
request is over: ``done(None)`` on success, ``done(exc)`` with the
exception on failure (the error contract above applies to ``exc``). If a
``submit_*`` method raises instead, the request fails with that exception and
``done`` must not be called. Until ``done`` is called the request's
memoryviews stay valid and belong to the backend; afterwards it must not use
them. The default ``submit_*`` methods run the synchronous method and call
``done``. :class:`pyvduse.backends.threads.ThreadPoolBackend` gives any
synchronous backend this interface with a pool of threads. A thread that
finishes several requests in a row (a network reader with many replies in
hand) calls their ``done`` inside ``with deferred_interrupts() as signal:``
(from this module), and ``signal()`` before it blocks: the driver is then
interrupted once for all of them instead of once per request.

Batches: a queue thread submits the requests it finds in the ring as one
batch, between :meth:`Backend.plug` and :meth:`Backend.unplug` on that
thread. A backend may hold the requests submitted while plugged and start
them all at once when unplugged (one system call for many requests, as the
nbd backend sends them); by default both do nothing and every request starts
when it is submitted. Plugging is per thread: a request submitted on a thread
that did not plug must start at once.

Events: a backend may tell the daemon what happens to its storage (a lost
connection, one that is back) with :meth:`Backend.emit_event`, from any
thread. The daemon's export registry sets :attr:`Backend.event_sink` and
sends each event to the control socket's clients, with the export's id
added to its data (see ``docs/control.md``). Without a sink (a backend used
on its own, in tests) events go nowhere; a sink that fails is logged and
never raises into the backend.

Threading contract: with ``--num-queues N`` the request methods are called
concurrently from N threads, one per queue, so a backend must be
thread-safe. The device does not serialize requests: two in flight at once
may touch the same bytes (the outcome is then as undefined as on a real
disk), so a backend must only keep its own state consistent (caches,
connections, counters). Calls that release the GIL (``os.preadv``, socket
I/O) let queues really run in parallel. :meth:`~Backend.size`,
:attr:`~Backend.preferred_block_size` and the ``can_*`` properties are read
when the device is configured, before the first request; a later change of
size reaches the driver only through :attr:`~Backend.resizable` or
:meth:`~Backend.resize`. :meth:`~Backend.resize` is called on another thread
than the queues', while they serve: requests may be in flight meanwhile. The
device keeps them within the smaller of the old and the new size (it stops
sending requests beyond a new, smaller end before it calls ``resize``, and
sends requests into grown space only once ``resize`` returned), but a
backend must keep its own state consistent across the change (a mapping
that moves, a cached size). :meth:`~Backend.close` is called once, after
the last request.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pyvduse.errors import BackendError
from pyvduse.native import NativeTarget
from pyvduse.queue_worker import deferred_interrupts
from pyvduse.ratelimit import RateLimitedLog

__all__ = ["ZERO_CHUNK", "AsynchronousBackend", "Backend", "Done", "DoneGroup", "EventSink",
           "check_new_size", "deferred_interrupts", "run_and_report", "shrink_refused"]

log = logging.getLogger(__name__)

ZERO_CHUNK = bytes(1 << 20)

Done = Callable[[BaseException | None], None]
"""Called once when a submitted request ends: ``None`` on success, else the exception."""

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives a backend's events: ``sink(name, data)`` (see :attr:`Backend.event_sink`)."""

#: Failing event sinks are reported at most once per interval and event name.
_sink_log = RateLimitedLog(log, 5.0, burst=1)


class Backend:
    """Base class of storage backends. Offsets and lengths are in bytes.

    Required: :meth:`size`, and :meth:`read` or :meth:`readv`. Optional, each
    enabling the matching device feature: :meth:`write` (or :meth:`writev`),
    :meth:`flush`, :meth:`discard`, :meth:`write_zeroes`; and :meth:`resize`,
    which lets the daemon change the disk's size. See the module docstring
    for the request, error and threading contracts.

    Constructors take keyword options: ``pyvduse serve python
    script=FILE key=value ...`` passes the ``key=value`` pairs as strings
    to the class, or to its ``from_options(options: BackendOptions)``
    classmethod if it defines one (see :mod:`pyvduse.backends.python`).

    Events: :meth:`emit_event` reports something that happened to the
    storage (``BACKEND_CONNECTION_LOST``, ...) to :attr:`event_sink`, which
    the daemon sets; see the module docstring.
    """

    #: Name used on the command line (``pyvduse serve NAME key=value ...``)
    #: by built-in backends; user backends need not set it.
    name: str = ""

    #: Which requests go through the ``submit_*`` methods: ``None`` (the
    #: default) for none, else every flush, discard and write-zeroes and the
    #: reads and writes of at least this many bytes (0: all of them; smaller
    #: ones use :meth:`readv`/:meth:`writev` on the queue's thread).
    submit_min_bytes: int | None = None

    #: True if :meth:`size` can change *by itself* while the device serves
    #: (an image resized elsewhere, in its cluster): the daemon then calls
    #: :meth:`size` again every few seconds and tells the driver of a new
    #: size (config interrupt). Keep ``size()`` cheap then. False (the
    #: default): the size is read once, and changes only through
    #: :meth:`resize`. The two are independent: ``resizable`` says that
    #: someone else may change the size, :attr:`can_resize` that pyvduse can.
    resizable: bool = False

    #: Where :meth:`emit_event` sends events: ``sink(name, data)``, or ``None``
    #: (the default: events go nowhere). The daemon's export registry sets it
    #: once the backend is built, to a function that adds the export's ``id`` to
    #: ``data`` and sends the event to the control socket's clients. A sink is
    #: called on the backend's own threads: it must be quick, must not block, and
    #: must not call back into the backend. Backends call :meth:`emit_event`,
    #: never the sink itself.
    event_sink: EventSink | None = None

    def emit_event(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Report ``event`` (an upper-case name such as ``BACKEND_CONNECTION_LOST``) with
        ``data`` (JSON-friendly: strings, numbers, booleans, lists, dicts) to
        :attr:`event_sink`; nothing happens without a sink.

        Callable from any thread; the sink runs on the calling thread, so call it
        without holding locks that requests wait for. Never raises: a sink that
        fails is logged (rate-limited) and the event is lost. Report each change
        once (a connection lost, then restored), not a state at every request.
        """
        sink = self.event_sink
        if sink is None:
            return
        try:
            sink(event, dict(data or {}))
        except Exception as exc:
            _sink_log.error(event, "backend %s: delivering event %s failed",
                            self.name or type(self).__name__, event, exc_info=exc)

    def size(self) -> int:
        """Size of the storage in bytes (required).

        Read when the device is configured; the device exports it rounded
        down to whole logical blocks, so it must hold at least one block.
        """
        raise NotImplementedError

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the ``len(buf)`` bytes at ``offset``.

        ``buf`` is a writable, one-dimensional byte view (``buf[:] = data``
        copies into it). Fill it completely or raise: there is no short read.
        Define this or :meth:`readv`; the default calls :meth:`readv` if the
        class defines it.
        """
        if self._overrides("readv"):
            self.readv(offset, [buf])
            return
        raise NotImplementedError(f"{type(self).__name__} defines neither read nor readv")

    def write(self, offset: int, buf: memoryview) -> None:
        """Store all of ``buf`` at ``offset``; define it (or :meth:`writev`) to be writable.

        ``buf`` may be a read-only view. When this returns the data must be
        readable by later requests; it need only be durable after
        :meth:`flush`. The default calls :meth:`writev` if the class defines it.
        """
        if self._overrides("writev"):
            self.writev(offset, [buf])
            return
        raise NotImplementedError(f"{type(self).__name__} defines neither write nor writev")

    def flush(self) -> None:
        """Make every completed write durable (define it if writes can be volatile).

        Called for the driver's flush requests on a writable device. The
        default does nothing and succeeds.
        """

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset``; define it to offer discard.

        Discard is advisory: afterwards the range may read as zeroes, as the
        old data or as anything else, until it is written again. Doing
        nothing is a valid implementation (only define it if forgetting
        frees something).
        """
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes.

        ``may_unmap`` allows deallocating the range (as :meth:`discard` does)
        provided it then reads as zeroes; it is only ever True when the
        backend also defines :meth:`discard`. The default writes zero buffers
        (up to 1 MiB each) through :meth:`writev`, so every writable backend
        supports write-zeroes; define it when the storage can do better.
        """
        end = offset + length
        zeroes = memoryview(ZERO_CHUNK)
        while offset < end:
            step = min(len(ZERO_CHUNK), end - offset)
            self.writev(offset, [zeroes[:step]])
            offset += step

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order with consecutive bytes from ``offset``.

        The device calls this for read requests, with the request's data
        buffers as it found them in guest memory: only their total length is
        block-aligned, single views may have any length (a request of one
        buffer goes to :meth:`read` instead if the class defines both). The
        default calls :meth:`read` once per view; define it when one
        vectored call (``os.preadv``, one network round trip) is cheaper.
        """
        for buf in bufs:
            self.read(offset, buf)
            offset += len(buf)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Store ``bufs`` in order at consecutive offsets from ``offset``.

        The write counterpart of :meth:`readv`: the device calls this for
        write requests (one of one buffer goes to :meth:`write` if the class
        defines both); the default calls :meth:`write` once per view.
        """
        for buf in bufs:
            self.write(offset, buf)
            offset += len(buf)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Make the storage exactly ``size`` bytes; define it to let the daemon resize the disk.

        Called for the daemon's ``export-resize`` command, which then tells
        the driver of the new capacity. ``size`` is positive; the daemon
        passes a multiple of the device's logical block size (a backend may
        refuse other sizes with ``EINVAL``, see :func:`check_new_size`).
        The same size as now succeeds and changes nothing. The contract:

        * growing keeps every byte below the old size, and the new space
          reads as zeroes;
        * shrinking that would drop data (any byte at or beyond ``size`` the
          backend cannot prove to be unwritten or zero) is refused unless
          ``shrink`` is True: raise :class:`~pyvduse.errors.BackendError` or
          :class:`OSError` (:func:`shrink_refused` makes the error), and
          change nothing. A backend that cannot tell where its data lies
          refuses every shrink without ``shrink``. With ``shrink`` the bytes
          beyond ``size`` are gone: growing again later brings zeroes back,
          never the old data;
        * after it returns, :meth:`size` returns ``size``;
        * any failure raises (``OSError`` or ``BackendError``: ``EROFS``
          for read-only storage, ``EOPNOTSUPP`` for storage whose size is
          not the backend's to change, ``ENOSPC``, ...), and the size is
          then either the old one or the new one, which :meth:`size` tells.

        It runs on another thread than the queues', while requests may be in
        flight (see the threading contract in the module docstring). Define
        it only if the storage can change size; override :attr:`can_resize`
        when that is only known per instance (a read-only file, a block
        device). Unrelated to :attr:`resizable`, which is about sizes that
        change without pyvduse.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; called once, after the last request. The default does nothing."""

    def reconnections(self) -> int:
        """How many times the backend connected to its server(s) again after losing a
        connection (the metrics' ``backend_reconnects``); 0, the default, for a
        backend without connections. Called from any thread; must be cheap."""
        return 0

    #: Whether building the backend contacts a server (nbd, rbd): the daemon then
    #: checks that it can create the device first.
    contacts_servers: bool = False

    #: Why :meth:`native_target` returned None, when the backend knows ('' otherwise):
    #: the export's start line gives it.
    native_refusal: str = ""

    def native_target(self) -> NativeTarget | None:
        """Where the compiled data path may do this backend's reads, writes and flushes
        itself (see :mod:`pyvduse.native`), or None (the default): every request goes
        through this object's methods. A backend that returns a target promises that
        those methods do exactly what the target describes."""
        return None

    def _own_data_methods(self, cls: type[Backend], *more: str) -> bool:
        """Whether ``read``, ``readv``, ``write``, ``writev``, ``flush`` and the methods
        named in ``more`` are ``cls``'s (a subclass that overrides one of them loses the
        native target)."""
        mine = type(self)
        return all(getattr(mine, name) is getattr(cls, name)
                   for name in ("read", "readv", "write", "writev", "flush", *more))

    # -- asynchronous requests (see the module docstring) -------------------------------

    def plug(self) -> None:
        """A batch of submissions begins on this thread: they may be held until :meth:`unplug`."""

    def unplug(self) -> None:
        """The batch of this thread ends: start every request held since :meth:`plug`."""

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """Start :meth:`readv`; call ``done`` when ``bufs`` are filled or the read failed."""
        run_and_report(done, self.readv, offset, bufs)

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """Start :meth:`writev`; call ``done`` when the data is stored or the write failed."""
        run_and_report(done, self.writev, offset, bufs)

    def submit_flush(self, done: Done) -> None:
        """Start :meth:`flush`: call ``done`` once every write completed before it is durable."""
        run_and_report(done, self.flush)

    def submit_discard(self, offset: int, length: int, done: Done) -> None:
        """Start :meth:`discard`; call ``done`` when it is over."""
        run_and_report(done, self.discard, offset, length)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            done: Done) -> None:
        """Start :meth:`write_zeroes`; call ``done`` when the range reads as zeroes."""
        run_and_report(done, self.write_zeroes, offset, length, may_unmap)

    # -- capabilities, inferred from what the subclass defines -------------------
    #
    # A subclass may override these properties when what it can do is only known
    # per instance (FileBackend opened read-only reports no write capability).

    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Backend, method)

    @property
    def can_write(self) -> bool:
        """True if the backend defines ``write`` or ``writev``; else the device is read-only."""
        return self._overrides("write") or self._overrides("writev")

    @property
    def can_flush(self) -> bool:
        """True if the backend defines ``flush`` (informational: flush is always offered)."""
        return self._overrides("flush")

    @property
    def can_discard(self) -> bool:
        """True if the backend defines ``discard``: the device offers discard when writable."""
        return self._overrides("discard")

    @property
    def can_write_zeroes(self) -> bool:
        """True if the backend can write zeroes (natively or through ``write``)."""
        return self.can_write or self._overrides("write_zeroes")

    @property
    def can_resize(self) -> bool:
        """True if the backend defines ``resize``: the daemon may then change the disk's size."""
        return self._overrides("resize")

    @property
    def preferred_block_size(self) -> int:
        """Smallest I/O unit the storage handles well, a power of two >= 512 (default 512).

        The command line uses it as the default logical block size, so every
        request is a multiple of it (e.g. a disk's sector size, or the
        alignment ``O_DIRECT`` needs).
        """
        return 512


class DoneGroup:
    """The ``done`` of a request split into ``parts`` operations.

    Give :meth:`part_done` to every part: once all parts ended, ``done`` is
    called once, with the first error any part reported (or None).
    """

    __slots__ = ("_done", "_error", "_left", "_lock")

    def __init__(self, done: Done, parts: int) -> None:
        self._done = done
        self._left = parts
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def part_done(self, error: BaseException | None) -> None:
        """One part ended (``error`` if it failed)."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            if self._left:
                return
        self._done(self._error)


class AsynchronousBackend(Backend):
    """Base class of backends that work through the ``submit_*`` methods.

    Every request goes through them (:attr:`submit_min_bytes` is 0); the
    synchronous methods submit and wait for ``done``, raising what the
    request failed with. What the backend can do is inferred from which
    ``submit_*`` methods the subclass defines (override the ``can_*``
    properties when it is only known per instance, as for a remote export).
    """

    submit_min_bytes: int | None = 0

    @staticmethod
    def _wait(start: Callable[[Done], None]) -> None:
        """Run ``start(done)`` and wait for its ``done``; raise the error it reports."""
        finished = threading.Event()
        outcome: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        start(done)
        finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def read(self, offset: int, buf: memoryview) -> None:
        """Submit a read of ``buf`` and wait for it."""
        self._wait(lambda done: self.submit_readv(offset, [buf], done))

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Submit a read into ``bufs`` and wait for it."""
        self._wait(lambda done: self.submit_readv(offset, bufs, done))

    def write(self, offset: int, buf: memoryview) -> None:
        """Submit a write of ``buf`` and wait for it."""
        self._wait(lambda done: self.submit_writev(offset, [buf], done))

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Submit a write of ``bufs`` and wait for it."""
        self._wait(lambda done: self.submit_writev(offset, bufs, done))

    def flush(self) -> None:
        """Submit a flush and wait for it."""
        self._wait(self.submit_flush)

    def discard(self, offset: int, length: int) -> None:
        """Submit a discard and wait for it."""
        self._wait(lambda done: self.submit_discard(offset, length, done))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Submit a write-zeroes and wait for it."""
        self._wait(lambda done: self.submit_write_zeroes(offset, length, may_unmap, done))

    def _submits(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Backend, method)

    @property
    def can_write(self) -> bool:
        """True if the class defines ``submit_writev``."""
        return self._submits("submit_writev")

    @property
    def can_flush(self) -> bool:
        """True if the class defines ``submit_flush``."""
        return self._submits("submit_flush")

    @property
    def can_discard(self) -> bool:
        """True if the class defines ``submit_discard``."""
        return self._submits("submit_discard")

    @property
    def can_write_zeroes(self) -> bool:
        """True if writable or the class defines ``submit_write_zeroes``."""
        return self.can_write or self._submits("submit_write_zeroes")


def check_new_size(what: str, size: int) -> int:
    """Return ``size`` if it is a positive multiple of 512 bytes, else raise ``EINVAL``.

    For :meth:`Backend.resize` implementations; ``what`` names the backend
    in the :class:`~pyvduse.errors.BackendError` message.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
        raise BackendError(errno.EINVAL,
                           f"{what}: cannot resize to {size!r} bytes: the size must be a "
                           "positive multiple of 512")
    return size


def shrink_refused(what: str, size: int, reason: str) -> BackendError:
    """The error of a :meth:`Backend.resize` that would drop data without ``shrink``.

    ``what`` names the backend, ``reason`` says what would be lost (``"data
    lies at offset 12345"``). The errno is ``EINVAL``, as librbd's for a
    shrink it was not allowed to do.
    """
    return BackendError(errno.EINVAL,
                        f"{what}: shrinking to {size} bytes would drop data ({reason}); "
                        "resize with shrink=true to allow it")


def run_and_report(done: Done, method: Callable[..., None], *args: object) -> None:
    """Run a synchronous request and report its outcome to ``done``."""
    try:
        method(*args)
    except Exception as exc:
        done(exc)
        return
    done(None)
