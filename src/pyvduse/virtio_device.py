"""A virtio device as any transport drives it: features, queues, reset.

:class:`VirtioDevice` is the half of a device that knows nothing of how the
driver reaches it. A transport (VDUSE in :mod:`pyvduse.device`, vhost-user
in :mod:`pyvduse.vhost_user.server`) learns from its driver where each ring
lives, where its device side stands, how the driver kicks and how to
interrupt it, and hands that over as plain data: a :class:`QueueState`, a
:class:`~pyvduse.memory.GuestMemory` to translate addresses through, a kick
eventfd and an interrupt callable. This class builds the rings, serves them
on its queue threads, keeps the crash-recovery inflight record per queue
(:mod:`pyvduse.inflight`), and stops, remaps and resets them.

Queue ``i`` is served by thread ``i % queue_threads``; starting or stopping
one queue restarts only its thread. Nothing here waits for a backend unless
asked to: stopping with ``inflight_timeout=0`` gives up the requests in
flight (their completions are dropped), which is what a reset needs.

The transport owns the kick fds and the memory: this class never closes them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvduse.errors import PyvduseError, RingError
from pyvduse.inflight import InflightLog, QueueLog
from pyvduse.memory import GuestMemory
from pyvduse.queue_worker import Completer, QueueThread, QueueWorker
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import Chain, SplitQueue

log = logging.getLogger(__name__)


class DeviceModel(Protocol):
    """A virtio device type (e.g. virtio-blk), independent of the transport."""

    device_id: int
    num_queues: int
    queue_size: int
    #: False if :meth:`plug` and :meth:`unplug` do nothing: the queues then skip the calls.
    batches: bool

    @property
    def features(self) -> int:
        """Device and ring feature bits offered to the driver (no transport bits)."""
        ...

    def config_space(self) -> bytes:
        """The device-specific configuration space."""
        ...

    def handle(self, chain: Chain, complete: Completer) -> int:
        """Serve one request: a :data:`~pyvduse.queue_worker.RequestHandler`. Never raises."""
        ...

    def plug(self) -> None:
        """A batch of :meth:`handle` calls begins on this thread. Never raises."""
        ...

    def unplug(self) -> None:
        """The batch ends: requests it left pending must be started now. Never raises."""
        ...


@dataclass(frozen=True)
class QueueState:
    """Where a split ring lives and where the device stands in it: plain data.

    Addresses are in the address space of the :class:`GuestMemory` the queue
    is started with. ``last_avail_idx`` is the next avail entry to take;
    ``used_idx`` the device's used index (None: read it from the ring).
    """

    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    last_avail_idx: int = 0
    used_idx: int | None = None


class VirtioDevice:
    """The queues of one device serving ``model``; see the module docstring.

    ``inflight_log`` (if any) must have the model's queue count and size;
    queue ``i`` keeps its record in ``inflight_log.queues[i]``.
    """

    def __init__(self, name: str, model: DeviceModel, *, queue_threads: int = 1,
                 poll_max_ns: int = 0, inflight_log: InflightLog | None = None) -> None:
        if queue_threads < 1:
            raise PyvduseError(f"{name}: at least one queue thread is needed, not {queue_threads}")
        if poll_max_ns < 0:
            raise PyvduseError(f"{name}: the polling window cannot be negative")
        self.name = name
        self.model = model
        self.queue_threads = min(queue_threads, model.num_queues)
        #: Queue threads poll their rings up to this long before sleeping (see QueueThread).
        self.poll_max_ns = poll_max_ns
        #: The features the driver accepted (0 until it did, and after a reset).
        self.driver_features = 0
        self.workers: dict[int, QueueWorker] = {}
        #: Requests served per queue since creation (updated when a queue stops).
        self.served: dict[int, int] = {}
        self._threads: dict[int, QueueThread] = {}  # by thread number
        self._lock = threading.RLock()  # serialises queue start/stop
        self._inflight_log: InflightLog | None = None
        self.inflight_log = inflight_log

    @property
    def inflight_log(self) -> InflightLog | None:
        """Where the queues' requests in flight are recorded (None: nowhere)."""
        return self._inflight_log

    @inflight_log.setter
    def inflight_log(self, log_: InflightLog | None) -> None:
        model = self.model
        if log_ is not None and (log_.num_queues != model.num_queues
                                 or log_.queue_size != model.queue_size):
            raise PyvduseError(f"{self.name}: the inflight log is for {log_.num_queues} "
                               f"queue(s) of {log_.queue_size}")
        self._inflight_log = log_

    # -- features -----------------------------------------------------------------------

    def refused_features(self, features: int, offered: int, mandatory: int) -> str | None:
        """Why the driver may not accept ``features`` (None: it may).

        ``offered`` is what the transport offered (the model's bits and its
        own), ``mandatory`` the bits the transport cannot work without.
        """
        if features & ~offered:
            return f"driver features {features:#x} include bits never offered ({offered:#x})"
        missing = mandatory & ~features
        if missing:
            return f"driver features {features:#x} lack the required bits {missing:#x}"
        return None

    def accept_features(self, features: int) -> None:
        """Record the features the driver accepted (in the inflight log too)."""
        self.driver_features = features
        if self._inflight_log is not None:
            self._inflight_log.driver_features = features

    # -- queues -------------------------------------------------------------------------

    def build_queue(self, index: int, state: QueueState, memory: GuestMemory) -> SplitQueue:
        """Map queue ``index`` from ``state``; :class:`PyvduseError` if the ring is unusable."""
        if not 0 <= index < self.model.num_queues:
            raise PyvduseError(f"queue {index} does not exist ({self.model.num_queues} queue(s))")
        if state.num > self.model.queue_size:
            raise PyvduseError(f"queue {index} has {state.num} entries, more than the queue "
                               f"size {self.model.queue_size}")
        features = self.driver_features
        try:
            return SplitQueue(memory, state.num, state.desc_addr, state.driver_addr,
                              state.device_addr,
                              event_idx=bool(features & (1 << v.VIRTIO_RING_F_EVENT_IDX)),
                              indirect=bool(features & (1 << v.VIRTIO_RING_F_INDIRECT_DESC)),
                              last_avail_idx=state.last_avail_idx, used_idx=state.used_idx,
                              max_chain=self.model.queue_size)
        except RingError as exc:
            raise PyvduseError(f"queue {index}: {exc}") from exc

    def start_queue(self, index: int, state: QueueState, memory: GuestMemory, kick_fd: int,
                    notify: Callable[[], None], *, recover: bool = False,
                    serve: bool = True, queue_log: QueueLog | None = None) -> int:
        """Start serving queue ``index``; return the requests resubmitted.

        A fresh start takes requests from ``state.last_avail_idx`` on and
        clears the queue's inflight record. ``recover`` instead takes the
        next avail entry and the requests to resubmit from the record (or,
        without a log, trusts the used index) and resubmits them. ``serve``
        False leaves the thread to a later :meth:`serve` (to start many
        queues with one thread start each). ``queue_log`` is where the queue
        keeps its inflight record (default: its area of :attr:`inflight_log`,
        if any; a transport may keep them elsewhere, e.g. vhost-user's
        inflight buffer). Raises :class:`PyvduseError` (the queue is not
        started) if the ring is unusable, :class:`InflightLogError` if
        ``recover`` finds a record that cannot describe the ring.
        """
        with self._lock:
            if index in self.workers:
                raise PyvduseError(f"{self.name}: queue {index} is already running")
            queue = self.build_queue(index, state, memory)
            log_ = self._inflight_log
            if queue_log is None and log_ is not None:
                queue_log = log_.queues[index]
            heads: list[int] = []
            if recover:
                heads = self._recover_positions(index, queue, queue_log)
            elif queue_log is not None:
                queue_log.clear()
            model = self.model
            metrics = getattr(model, "metrics", None)
            worker = QueueWorker(
                f"{self.name}-vq{index}", queue, model.handle, kick_fd, notify,
                plug=model.plug if model.batches else None,
                unplug=model.unplug if model.batches else None, log=queue_log,
                native=getattr(model, "native", None),
                cells=metrics.queue_cells(index) if metrics is not None else None)
            self.workers[index] = worker
            if heads:
                worker.resubmit(heads)
            elif recover:
                worker.publish()
                notify()  # a completion may have missed its interrupt
            if serve:
                self._restart_thread(index % self.queue_threads)
            return len(heads)

    def _recover_positions(self, index: int, queue: SplitQueue,
                           queue_log: QueueLog | None) -> list[int]:
        """Set ``queue``'s next avail entry after a crash; return the heads to resubmit."""
        used = queue.used_idx
        if queue_log is None:
            queue.last_avail_idx = used
            return []
        window = queue_log.unlogged_window(used)
        start = queue_log.header[0]
        found = queue_log.recover(used, queue.avail_idx(),
                                  [queue.used_head(start + i) for i in range(window)])
        queue.last_avail_idx = found.last_avail_idx
        log.info("%s: queue %d: used index %d, next request at avail entry %d, %d request(s) "
                 "to resubmit%s", self.name, index, used, found.last_avail_idx,
                 len(found.heads), f", {found.cleared} completed" if found.cleared else "")
        return found.heads

    def dead_threads(self) -> list[str]:
        """The names of queue threads that ended without being stopped (none is
        expected: a thread's error fails the device)."""
        with self._lock:
            return [thread.name for thread in self._threads.values() if thread.dead]

    def serve(self) -> None:
        """(Re)start the thread of every queue started with ``serve=False`` or paused."""
        with self._lock:
            for number in sorted({i % self.queue_threads for i in self.workers}):
                self._restart_thread(number)

    def _restart_thread(self, number: int) -> None:
        """Serve the running queues of thread ``number`` on a new thread (lock held)."""
        old = self._threads.pop(number, None)
        if old is not None:
            old.stop(inflight_timeout=0)
        served = [i for i in sorted(self.workers)
                  if i % self.queue_threads == number and not self.workers[i].broken]
        for i in served:
            self.workers[i].stopping = False
        if served:
            thread = QueueThread(f"{self.name}-vq{','.join(map(str, served))}",
                                 [self.workers[i] for i in served], self.poll_max_ns)
            self._threads[number] = thread
            thread.start()

    def pause(self) -> None:
        """Stop the queue threads, leaving requests in flight and the queues as they are.

        Follow with :meth:`remap` for the queues whose memory changed, then :meth:`serve`.
        """
        with self._lock:
            threads, self._threads = self._threads, {}
            for thread in threads.values():
                thread.stop(inflight_timeout=0)

    def remap(self, index: int, state: QueueState, memory: GuestMemory) -> bool:
        """Serve paused queue ``index`` through new mappings; False (queue stops) if unusable.

        Its positions are kept; requests in flight complete into the new ring.
        """
        with self._lock:
            worker = self.workers[index]
            old = worker.queue
            moved = QueueState(state.num, state.desc_addr, state.driver_addr, state.device_addr,
                               old.last_avail_idx, old.used_idx)
            try:
                queue = self.build_queue(index, moved, memory)
            except PyvduseError as exc:
                log.error("%s: %s; the queue stops until reset", self.name, exc)
                worker.broken = True
                return False
            worker.remap(queue)
            return True

    def stop_queue(self, index: int, inflight_timeout: float | None) -> int | None:
        """Stop queue ``index``; return its next avail entry (None if it was not running).

        Requests in flight get ``inflight_timeout`` seconds (None: as long
        as they take) to complete into the ring; the rest are given up. The
        other queues of its thread go on, while it waits too.
        """
        with self._lock:
            worker = self.workers.get(index)
            if worker is None:
                return None
            number = index % self.queue_threads
            thread = self._threads.pop(number, None)
            if thread is not None:
                thread.stop(inflight_timeout=0)
            del self.workers[index]
            position = worker.queue.last_avail_idx
            self._restart_thread(number)  # before the wait: the others must not stall
            self._finish(index, worker, inflight_timeout)
            return position

    def _finish(self, index: int, worker: QueueWorker, inflight_timeout: float | None) -> None:
        """Wait for ``worker``'s requests up to ``inflight_timeout``, then give it up."""
        if worker.in_backend and inflight_timeout != 0:
            waiter = QueueThread(f"{worker.name}-stop", [worker])
            waiter.stop(inflight_timeout)  # never started: only waits and publishes
        self.served[index] = self.served.get(index, 0) + worker.requests
        worker.detach()

    def last_avail(self, index: int) -> int | None:
        """The next avail entry of running queue ``index`` (None if it is not running)."""
        worker = self.workers.get(index)
        return worker.next_avail if worker is not None else None

    def stop_all(self, inflight_timeout: float | None) -> dict[int, int]:
        """Stop every queue (see :meth:`stop_queue`); return each one's next avail entry.

        ``inflight_timeout`` bounds the wait for all queues' requests together.
        """
        with self._lock:
            threads, self._threads = self._threads, {}
            for thread in threads.values():
                thread.stop(inflight_timeout=0)
            workers, self.workers = self.workers, {}
            # One wait for them all, not one per thread; queues no thread serves (paused,
            # broken by a failed remap) included.
            pending = [w for w in workers.values() if w.in_backend]
            if pending and inflight_timeout != 0:
                QueueThread(f"{self.name}-stop", pending).stop(inflight_timeout)  # waits only
            positions = {}
            for index, worker in workers.items():
                positions[index] = worker.queue.last_avail_idx
                self._finish(index, worker, 0)
            return positions

    def reset(self) -> None:
        """The driver reset the device: give up every queue and forget its features.

        Never waits for a backend; the inflight record is cleared.
        """
        self.stop_all(inflight_timeout=0)
        self.driver_features = 0
        if self._inflight_log is not None:
            self._inflight_log.reset()

    @property
    def running(self) -> bool:
        """Whether any queue is started."""
        return bool(self.workers)


class Transport:
    """The base of a transport (VDUSE, vhost-user): the :class:`VirtioDevice` it
    drives, and the device's queues as an export's owner sees them."""

    virtio: VirtioDevice

    @property
    def workers(self) -> dict[int, QueueWorker]:
        """The running queues."""
        return self.virtio.workers

    @property
    def served(self) -> dict[int, int]:
        """Requests served per queue by queues stopped since creation (the running
        ones count theirs in :attr:`workers`)."""
        return self.virtio.served
