"""A VDUSE device: its lifecycle and the control-message loop.

:class:`VduseDevice` turns a :class:`DeviceModel` (e.g. virtio-blk) into a
device the kernel can attach: it creates it, sets up its virtqueues, answers
the driver's control messages on a dedicated thread (so data-path work can
never block them), starts a :class:`QueueWorker` per queue on DRIVER_OK,
served by ``queue_threads`` threads (queue ``i`` by thread ``i % queue_threads``),
stops, drains and unmaps them on reset, and destroys the device in order.

Lifecycle::

    device = VduseDevice("vduse0", model)
    device.create()      # VDUSE_CREATE_DEV, open, VQ_SETUP, control thread
    ...                  # attach through vdpa (pyvduse.binding), serve, detach
    device.destroy()     # stop queues, close the fd, VDUSE_DESTROY_DEV

``create`` undoes its partial work if it fails; ``destroy`` is idempotent.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

from pyvduse.errors import KernelError, PyvduseError, RingError
from pyvduse.kernel import DeviceSpec, LinuxVduse, VduseChannel, VduseKernel
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.queue_worker import Completer, QueueThread, QueueWorker
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import Chain, SplitQueue

log = logging.getLogger(__name__)

_MANDATORY_FEATURES = (1 << v.VIRTIO_F_VERSION_1) | (1 << v.VIRTIO_F_ACCESS_PLATFORM)


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
                 queue_threads: int = 1, poll_max_ns: int = 0) -> None:
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
            self._memory = IotlbMemory(self._resolve)
            self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._thread = threading.Thread(target=self._control_loop,
                                            name=f"{self.name}-control", daemon=True)
            self._thread.start()
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Stop everything and destroy the device (detach it from vdpa first)."""
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            self._thread = None
        self._stop_queues()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._created:
            self._created = False
            self.kernel.destroy_device(self.name)
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
        if status == 0:
            log.info("%s: reset by the driver", self.name)
            self._stop_queues()
            self.status = 0
            self.driver_features = 0
            self.driver_ok.clear()
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
        if new & v.VIRTIO_CONFIG_S_DRIVER_OK:
            try:
                self._start_queues()
            except PyvduseError as exc:
                log.error("%s: cannot start the queues: %s", self.name, exc)
                self._stop_queues()
                return u.VDUSE_REQ_RESULT_FAILED
            log.info("%s: driver ready, features %#x, %d queue(s) running", self.name,
                     self.driver_features, len(self.workers))
            self.status = status
            self.driver_ok.set()
            return u.VDUSE_REQ_RESULT_OK
        self.status = status
        return u.VDUSE_REQ_RESULT_OK

    def _vq_state(self, index: int) -> int | None:
        if not 0 <= index < self.model.num_queues:
            return None
        worker = self.workers.get(index)
        if worker is not None:
            return worker.queue.last_avail_idx
        return self.channel.vq_get_info(index).avail_index

    def _update_iotlb(self, start: int, last: int) -> int:
        log.debug("%s: IOTLB update %#x-%#x", self.name, start, last)
        workers = dict(self.workers)
        self._stop_queues()  # completes what was in flight: take the positions after it
        running = {i: (w.queue.last_avail_idx, w.queue.used_idx) for i, w in workers.items()}
        if running:
            self._start_queues(running)
        return u.VDUSE_REQ_RESULT_OK

    # -- queues -------------------------------------------------------------------------

    def _resolve(self, iova: int) -> IotlbEntry:
        return self.channel.iotlb_get_fd(iova, iova)

    def _start_queues(self, resume: dict[int, tuple[int, int]] | None = None) -> None:
        """Map and start every ready queue (``resume`` gives ring positions to keep)."""
        features = self.driver_features
        event_idx = bool(features & (1 << v.VIRTIO_RING_F_EVENT_IDX))
        indirect = bool(features & (1 << v.VIRTIO_RING_F_INDIRECT_DESC))
        assert self._memory is not None
        with self._lock:
            for index in range(self.model.num_queues):
                info = self.channel.vq_get_info(index)
                if not info.ready:
                    continue
                last_avail, used = (resume or {}).get(index, (info.avail_index, None))
                try:
                    queue = SplitQueue(self._memory, info.num, info.desc_addr, info.driver_addr,
                                       info.device_addr, event_idx=event_idx, indirect=indirect,
                                       last_avail_idx=last_avail, used_idx=used)
                except RingError as exc:
                    raise PyvduseError(f"queue {index}: {exc}") from exc
                kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._kick_fds[index] = kick_fd
                self.channel.vq_setup_kickfd(index, kick_fd)
                model = self.model
                self.workers[index] = QueueWorker(
                    f"{self.name}-vq{index}", queue, model.handle, kick_fd,
                    self._notifier(index), plug=model.plug if model.batches else None,
                    unplug=model.unplug if model.batches else None)
            for first in range(self.queue_threads):
                served = [i for i in sorted(self.workers) if i % self.queue_threads == first]
                if served:
                    thread = QueueThread(f"{self.name}-vq{','.join(map(str, served))}",
                                         [self.workers[i] for i in served], self.poll_max_ns)
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

    def _stop_queues(self) -> None:
        """Stop and drain every queue worker, then drop kick fds and mappings."""
        with self._lock:
            workers, self.workers = self.workers, {}
            serving, self._serving = self._serving, []
            for thread in serving:
                thread.stop()
            for index, worker in workers.items():
                worker.close()  # a queue whose thread never started
                self.served[index] = self.served.get(index, 0) + worker.requests
            for worker in workers.values():
                worker.queue.release()
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
