"""A VDUSE device: its lifecycle and the control-message loop.

:class:`VduseDevice` turns a :class:`DeviceModel` (e.g. virtio-blk) into a
device the kernel can attach: it creates it, sets up its virtqueues, answers
the driver's control messages on a dedicated thread (so data-path work can
never block them), starts a :class:`QueueWorker` per queue on DRIVER_OK,
served by ``queue_threads`` threads (queue ``i`` by thread ``i % queue_threads``),
stops, drains and unmaps them on reset, and destroys the device in order.

Lifecycle::

    device = VduseDevice("vduse0", model, inflight_log=log)
    device.create()      # VDUSE_CREATE_DEV, open, VQ_SETUP, control thread
    ...                  # attach through vdpa (pyvduse.binding), serve, detach
    device.destroy()     # stop queues, close the fd, VDUSE_DESTROY_DEV

``create`` undoes its partial work if it fails; ``destroy`` is idempotent.

Crash recovery: the kernel keeps a device whose daemon died, with its
driver, its rings and the requests in them. :meth:`VduseDevice.reopen`
serves such a device again from its inflight log (:mod:`pyvduse.inflight`,
kept up to date by this module and the queue workers): it opens the device
instead of creating it, takes the driver's status and features from the log,
rebuilds each ready queue from ``VDUSE_VQ_GET_INFO`` and the log, and
resubmits the requests that were taken and never completed.

No control message waits for a backend: a reset gives up the requests in
flight (their completions are dropped), an IOTLB update remaps the rings
under them, and every wait for a queue thread is bounded.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

from pyvduse.errors import KernelError, PyvduseError, RingError
from pyvduse.inflight import InflightLog, InflightLogError, QueueLog
from pyvduse.kernel import DeviceSpec, LinuxVduse, VduseChannel, VduseKernel
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.queue_worker import Completer, QueueThread, QueueWorker
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import Chain, SplitQueue

log = logging.getLogger(__name__)

_MANDATORY_FEATURES = (1 << v.VIRTIO_F_VERSION_1) | (1 << v.VIRTIO_F_ACCESS_PLATFORM)
_RUNNING = (v.VIRTIO_CONFIG_S_ACKNOWLEDGE | v.VIRTIO_CONFIG_S_DRIVER
            | v.VIRTIO_CONFIG_S_FEATURES_OK | v.VIRTIO_CONFIG_S_DRIVER_OK)

DESTROY_INFLIGHT_TIMEOUT = 10.0
"""Seconds :meth:`VduseDevice.destroy` lets requests still in a backend finish."""
CONTROL_JOIN_TIMEOUT = 10.0
"""Seconds :meth:`VduseDevice.destroy` waits for the control thread."""


class DeviceModel(Protocol):
    """A virtio device type, independent of the transport."""

    device_id: int
    num_queues: int
    queue_size: int
    #: False if :meth:`plug` and :meth:`unplug` do nothing: the queues then skip the calls.
    batches: bool

    @property
    def features(self) -> int:
        """Feature bits offered to the driver."""
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


class VduseDevice:
    """One VDUSE device serving ``model``. See the module docstring for the lifecycle."""

    def __init__(self, name: str, model: DeviceModel, kernel: VduseKernel | None = None,
                 queue_threads: int = 1, poll_max_ns: int = 0,
                 inflight_log: InflightLog | None = None) -> None:
        if queue_threads < 1:
            raise PyvduseError(f"{name}: at least one queue thread is needed, not {queue_threads}")
        if poll_max_ns < 0:
            raise PyvduseError(f"{name}: the polling window cannot be negative")
        #: Queue threads poll their rings up to this long before sleeping (see QueueThread).
        self.poll_max_ns = poll_max_ns
        self.name = name
        self.model = model
        self.kernel: VduseKernel = kernel if kernel is not None else LinuxVduse()
        self.queue_threads = min(queue_threads, model.num_queues)
        self.status = 0
        self.driver_features = 0
        self.workers: dict[int, QueueWorker] = {}
        self._serving: list[QueueThread] = []
        self.driver_ok = threading.Event()
        #: Set when the device can no longer be served (see :attr:`failure`).
        self.failed = threading.Event()
        self.failure = ""
        #: Requests served per queue since creation (updated when a queue stops).
        self.served: dict[int, int] = {}
        self._channel: VduseChannel | None = None
        self._memory: IotlbMemory | None = None
        self._kick_fds: dict[int, int] = {}
        self._created = False
        self._stop_fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # serialises queue start/stop
        #: Where the device's state and requests in flight are recorded (None: nowhere;
        #: the device then cannot be recovered after a crash).
        self.inflight_log = inflight_log
        if inflight_log is not None and (inflight_log.num_queues != model.num_queues
                                         or inflight_log.queue_size != model.queue_size):
            raise PyvduseError(f"{name}: the inflight log is for {inflight_log.num_queues} "
                               f"queue(s) of {inflight_log.queue_size}")

    # -- lifecycle ----------------------------------------------------------------------

    def create(self) -> None:
        """Create the device, set up its queues and start answering control messages."""
        model = self.model
        spec = DeviceSpec(name=self.name, device_id=model.device_id, features=model.features,
                          vq_num=model.num_queues, config=model.config_space())
        self.kernel.create_device(spec)
        self._created = True
        try:
            self._channel = self.kernel.open_device(self.name)
            for index in range(model.num_queues):
                self._channel.vq_setup(index, model.queue_size)
            self._start_control()
        except BaseException:
            self.destroy()
            raise

    def reopen(self, *, trust_used_index: bool = False) -> int:
        """Serve this device again after its previous daemon died; return requests resubmitted.

        The device must exist. Its state comes from the inflight log (see
        the module docstring); the log must describe this device (the caller
        checks the options, see :func:`pyvduse.export`). Without a log,
        ``trust_used_index`` recovers as if every request had completed in
        order (``last_avail = used->idx``): wrong whenever they did not, which
        is what it exists to show (a test-only switch). Raises
        :class:`PyvduseError` (nothing changed) if the device cannot be
        served: another process holds it, its queues do not match, the log
        does not fit its rings.
        """
        if self.inflight_log is None and not trust_used_index:
            raise PyvduseError(f"{self.name}: recovering a device needs its inflight log")
        self._channel = self.kernel.open_device(self.name)
        try:
            self._check_queues()
            log_ = self.inflight_log
            if log_ is not None:
                status, features = log_.status, log_.driver_features
            elif self._channel.vq_get_info(0).ready:
                status, features = _RUNNING, self._channel.get_features()
            else:
                status, features = 0, 0
            if status & v.VIRTIO_CONFIG_S_FEATURES_OK:
                kernel_features = self._channel.get_features()
                if kernel_features != features:
                    raise PyvduseError(
                        f"{self.name}: the driver's features are {kernel_features:#x}, the "
                        f"inflight log says {features:#x}; the device was changed while no "
                        "daemon served it")
            self.driver_features = features
            self._memory = IotlbMemory(self._resolve)
            resubmitted = 0
            if status & v.VIRTIO_CONFIG_S_DRIVER_OK:
                resubmitted = self._start_queues(recover=True)
                self.driver_ok.set()
            self.status = status
            self._created = True
            self._start_control()
        except InflightLogError as exc:
            self.abandon()
            raise PyvduseError(f"{self.name}: cannot recover the device: {exc}") from None
        except BaseException:
            self.abandon()
            raise
        log.info("%s: re-attached to the existing device (status %#x, %d queue(s) running, "
                 "%d request(s) resubmitted)", self.name, status, len(self.workers), resubmitted)
        return resubmitted

    def abandon(self) -> None:
        """Stop serving but leave the device, its driver and its log for a later daemon.

        What a crash would leave, minus the crash: used to undo a recovery
        that failed half-way. Requests in flight stay marked in the log.
        """
        self._stop_control()
        self._stop_queues(inflight_timeout=0)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._created = False
        if self.inflight_log is not None:
            self.inflight_log.close()

    def _stop_control(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(CONTROL_JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.error("%s: the control thread did not stop within %.0f s", self.name,
                          CONTROL_JOIN_TIMEOUT)
            self._thread = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def _check_queues(self) -> None:
        """Refuse to serve a device whose queues are not the model's."""
        channel = self.channel
        count, size = self.model.num_queues, self.model.queue_size
        try:
            channel.vq_get_info(count - 1)
        except KernelError:
            raise PyvduseError(f"{self.name}: the device has fewer than {count} queue(s)"
                               ) from None
        try:
            channel.vq_get_info(count)
        except KernelError:
            pass
        else:
            raise PyvduseError(f"{self.name}: the device has more than {count} queue(s)")
        for index in range(count):
            info = channel.vq_get_info(index)
            if info.ready and info.num > size:
                raise PyvduseError(f"{self.name}: queue {index} has {info.num} entries, more "
                                   f"than the queue size {size}")

    def _start_control(self) -> None:
        self._memory = self._memory or IotlbMemory(self._resolve)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._control_loop,
                                        name=f"{self.name}-control", daemon=True)
        self._thread.start()

    def destroy(self) -> None:
        """Stop everything and destroy the device (detach it from vdpa first).

        Bounded: requests still in a backend get :data:`DESTROY_INFLIGHT_TIMEOUT`
        seconds to finish, then their completions are dropped.
        """
        self._stop_control()
        self._stop_queues(inflight_timeout=DESTROY_INFLIGHT_TIMEOUT)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._created:
            self._created = False
            self.kernel.destroy_device(self.name)
            if self.inflight_log is not None:
                self.inflight_log.remove()
            log.info("%s: destroyed; served %d requests (%s)", self.name,
                     sum(self.served.values()),
                     ", ".join(f"vq{i} {n}" for i, n in sorted(self.served.items())) or "none")

    @property
    def channel(self) -> VduseChannel:
        """The open device channel (only between :meth:`create` and :meth:`destroy`)."""
        if self._channel is None:
            raise PyvduseError(f"{self.name}: device is not created")
        return self._channel

    def update_config(self, offset: int, data: bytes) -> None:
        """Change config space bytes and tell the driver (e.g. a new capacity)."""
        self.channel.set_config(offset, data)
        if self.status & v.VIRTIO_CONFIG_S_DRIVER_OK:
            self.channel.inject_config_irq()

    # -- control messages ---------------------------------------------------------------

    def _control_loop(self) -> None:
        poller = select.poll()
        channel = self.channel
        poller.register(channel.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            if events.get(channel.fileno(), 0) & select.POLLERR:
                self._fail("the kernel marked the device broken (a control message timed "
                           "out); it must be detached and destroyed")
                return
            try:
                request = channel.read_request()
                if request is None:
                    continue
                channel.write_response(self.handle_request(request))
            except KernelError as exc:
                self._fail(f"control channel: {exc}")
                return

    def _fail(self, reason: str) -> None:
        self.failure = reason
        log.error("%s: %s", self.name, reason)
        self.failed.set()

    def handle_request(self, request: bytes) -> bytes:
        """Answer one ``vduse_dev_request`` with a ``vduse_dev_response``. Never raises."""
        req_type, request_id = u.vduse_dev_request_header.unpack_from(request)
        payload = u.VDUSE_REQUEST_PAYLOAD_OFFSET
        response = bytearray(u.VDUSE_DEV_RESPONSE_SIZE)
        result = u.VDUSE_REQ_RESULT_FAILED
        try:
            if req_type == u.VDUSE_SET_STATUS:
                (status,) = u.vduse_dev_status.unpack_from(request, payload)
                result = self._set_status(status)
            elif req_type == u.VDUSE_GET_VQ_STATE:
                (index,) = u.vduse_vq_state_index.unpack_from(request, payload)
                avail = self._vq_state(index)
                if avail is not None:
                    u.vduse_vq_state_split.pack_into(response, payload, index, avail)
                    result = u.VDUSE_REQ_RESULT_OK
            elif req_type == u.VDUSE_UPDATE_IOTLB:
                start, last = u.vduse_iova_range.unpack_from(request, payload)
                result = self._update_iotlb(start, last)
            else:
                log.warning("%s: unknown control message type %d refused", self.name, req_type)
        except Exception:
            log.exception("%s: control message type %d failed", self.name, req_type)
            result = u.VDUSE_REQ_RESULT_FAILED
        u.vduse_dev_response_header.pack_into(response, 0, request_id, result)
        return bytes(response)

    def _set_status(self, status: int) -> int:
        """SET_STATUS: idempotent (a message may come twice: the kernel queues again
        what a dead daemon read and never answered); recorded in the inflight log
        before it is acknowledged."""
        log_ = self.inflight_log
        if status == 0:
            log.info("%s: reset by the driver", self.name)
            self._stop_queues(inflight_timeout=0)  # never wait for a backend here
            self.status = 0
            self.driver_features = 0
            self.driver_ok.clear()
            if log_ is not None:
                log_.reset()
            return u.VDUSE_REQ_RESULT_OK
        new = status & ~self.status
        if new & v.VIRTIO_CONFIG_S_FEATURES_OK:
            features = self.channel.get_features()
            offered = self.model.features
            if features & ~offered or features & _MANDATORY_FEATURES != _MANDATORY_FEATURES:
                log.error("%s: driver features %#x refused (offered %#x)", self.name, features,
                          offered)
                return u.VDUSE_REQ_RESULT_FAILED
            self.driver_features = features
            if log_ is not None:
                log_.driver_features = features
        if status & v.VIRTIO_CONFIG_S_DRIVER_OK and not self.workers:
            try:
                self._start_queues(recover=False)
            except PyvduseError as exc:
                log.error("%s: cannot start the queues: %s", self.name, exc)
                self._stop_queues(inflight_timeout=0)
                return u.VDUSE_REQ_RESULT_FAILED
            log.info("%s: driver ready, features %#x, %d queue(s) running", self.name,
                     self.driver_features, len(self.workers))
            self.driver_ok.set()
        self.status = status
        if log_ is not None:
            log_.status = status
        return u.VDUSE_REQ_RESULT_OK

    def _vq_state(self, index: int) -> int | None:
        if not 0 <= index < self.model.num_queues:
            return None
        worker = self.workers.get(index)
        if worker is not None:
            return worker.queue.last_avail_idx
        return self.channel.vq_get_info(index).avail_index

    def _update_iotlb(self, start: int, last: int) -> int:
        """Drop every mapping and serve the running queues through new ones.

        Requests in flight stay in flight (their buffers keep the old
        mappings alive until they complete); nothing waits for a backend.
        """
        log.debug("%s: IOTLB update %#x-%#x", self.name, start, last)
        with self._lock:
            serving, self._serving = self._serving, []
            for thread in serving:
                thread.stop(inflight_timeout=0)
            assert self._memory is not None
            self._memory.invalidate()
            for index, worker in self.workers.items():
                old = worker.queue
                info = self.channel.vq_get_info(index)
                try:
                    queue = self._map_queue(index, info.num, info.desc_addr, info.driver_addr,
                                            info.device_addr, old.last_avail_idx, old.used_idx)
                except PyvduseError as exc:
                    log.error("%s: %s; the queue stops until reset", self.name, exc)
                    worker.broken = True
                    continue
                worker.remap(queue)
            self._serve(self.workers)
        return u.VDUSE_REQ_RESULT_OK

    # -- queues -------------------------------------------------------------------------

    def _resolve(self, iova: int) -> IotlbEntry:
        return self.channel.iotlb_get_fd(iova, iova)

    def _map_queue(self, index: int, num: int, desc: int, driver: int, device: int,
                   last_avail: int, used: int | None) -> SplitQueue:
        features = self.driver_features
        assert self._memory is not None
        try:
            return SplitQueue(self._memory, num, desc, driver, device,
                              event_idx=bool(features & (1 << v.VIRTIO_RING_F_EVENT_IDX)),
                              indirect=bool(features & (1 << v.VIRTIO_RING_F_INDIRECT_DESC)),
                              last_avail_idx=last_avail, used_idx=used)
        except RingError as exc:
            raise PyvduseError(f"queue {index}: {exc}") from exc

    def _start_queues(self, recover: bool) -> int:
        """Map and start every ready queue; return the requests resubmitted.

        A fresh start (DRIVER_OK) begins where the driver says and clears the
        queue's log; ``recover`` takes the positions and the requests to
        resubmit from the inflight log (or, without one, trusts the used index).
        """
        resubmitted = 0
        log_ = self.inflight_log
        with self._lock:
            try:
                for index in range(self.model.num_queues):
                    info = self.channel.vq_get_info(index)
                    if not info.ready:
                        continue
                    queue_log = log_.queues[index] if log_ is not None else None
                    if not recover:
                        queue = self._map_queue(index, info.num, info.desc_addr,
                                                info.driver_addr, info.device_addr,
                                                info.avail_index, None)
                        if queue_log is not None:
                            queue_log.clear()
                        heads: list[int] = []
                    else:
                        queue = self._map_queue(index, info.num, info.desc_addr,
                                                info.driver_addr, info.device_addr, 0, None)
                        heads = self._recover_positions(index, queue, queue_log)
                    worker = self._worker(index, queue, queue_log)
                    if heads:
                        resubmitted += len(heads)
                        worker.resubmit(heads)
                    elif recover:
                        worker.publish()
                        self._notifier(index)()  # a completion may have missed its interrupt
            except BaseException:
                self._release_queues(self.workers, inflight_timeout=0)
                self.workers = {}
                raise
            self._serve(self.workers)
        return resubmitted

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

    def _worker(self, index: int, queue: SplitQueue, queue_log: QueueLog | None) -> QueueWorker:
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._kick_fds[index] = kick_fd
        self.channel.vq_setup_kickfd(index, kick_fd)
        model = self.model
        worker = QueueWorker(
            f"{self.name}-vq{index}", queue, model.handle, kick_fd,
            self._notifier(index), plug=model.plug if model.batches else None,
            unplug=model.unplug if model.batches else None, log=queue_log)
        self.workers[index] = worker
        return worker

    def _serve(self, workers: dict[int, QueueWorker]) -> None:
        """Start the queue threads: queue ``i`` on thread ``i % queue_threads``."""
        for first in range(self.queue_threads):
            served = [i for i in sorted(workers) if i % self.queue_threads == first
                      and not workers[i].broken]
            if served:
                thread = QueueThread(f"{self.name}-vq{','.join(map(str, served))}",
                                     [workers[i] for i in served], self.poll_max_ns)
                self._serving.append(thread)
                thread.start()

    def _notifier(self, index: int) -> Callable[[], None]:
        """The used-buffer interrupt of one queue; failures are logged, not raised."""
        channel = self.channel

        def notify() -> None:
            try:
                channel.vq_inject_irq(index)
            except KernelError as exc:
                log.warning("%s", exc)

        return notify

    def _stop_queues(self, inflight_timeout: float | None) -> None:
        """Stop every queue, wait for requests in flight up to ``inflight_timeout``,
        then give the queues up: kick fds and mappings are dropped, later
        completions too."""
        with self._lock:
            workers, self.workers = self.workers, {}
            self._release_queues(workers, inflight_timeout)

    def _release_queues(self, workers: dict[int, QueueWorker],
                        inflight_timeout: float | None) -> None:
        serving, self._serving = self._serving, []
        for thread in serving:
            thread.stop(inflight_timeout)
        for index, worker in workers.items():
            worker.detach()
            self.served[index] = self.served.get(index, 0) + worker.requests
        for index, fd in self._kick_fds.items():
            if self._channel is not None and self.status & v.VIRTIO_CONFIG_S_DRIVER_OK:
                try:
                    self._channel.vq_setup_kickfd(index, u.VDUSE_EVENTFD_DEASSIGN)
                except KernelError:
                    pass  # after a reset the kernel has dropped it already
            os.close(fd)
        self._kick_fds.clear()
        if self._memory is not None:
            self._memory.invalidate()
