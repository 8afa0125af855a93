"""The VDUSE transport: a device's kernel lifecycle and its control-message loop.

:class:`VduseDevice` offers a :class:`~pyvduse.virtio_device.DeviceModel`
(e.g. virtio-blk) to the kernel through VDUSE: it creates the device, sets up
its virtqueues, answers the driver's control messages on a dedicated thread
(so data-path work can never block them), and on DRIVER_OK hands each ready
queue (its ring addresses and position as a
:class:`~pyvduse.virtio_device.QueueState`, the IOTLB-backed memory, a kick
eventfd it registers with the kernel, an interrupt that injects one) to the
transport-neutral :class:`~pyvduse.virtio_device.VirtioDevice` that serves
the rings. What is VDUSE's alone stays here: the control messages, the IOTLB
and its remapping, ``VIRTIO_F_ACCESS_PLATFORM`` (VDUSE requires it), the
device's kernel lifecycle and its recovery after a crash.

Lifecycle::

    device = VduseDevice("vduse0", model, inflight_log=log)
    device.create()      # VDUSE_CREATE_DEV, open, VQ_SETUP, control thread
    ...                  # attach through vdpa (pyvduse.binding), serve, detach
    device.destroy()     # stop queues, close the fd, VDUSE_DESTROY_DEV

``create`` undoes its partial work if it fails; ``destroy`` is idempotent.

Crash recovery: the kernel keeps a device whose daemon died, with its
driver, its rings and the requests in them. :meth:`VduseDevice.reopen`
serves such a device again from its inflight log (:mod:`pyvduse.inflight`,
kept up to date by the queue workers): it opens the device instead of
creating it, takes the driver's status and features from the log, rebuilds
each ready queue from ``VDUSE_VQ_GET_INFO`` and the log, and resubmits the
requests that were taken and never completed.

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

from pyvduse.errors import KernelError, PyvduseError
from pyvduse.inflight import InflightLog, InflightLogError
from pyvduse.kernel import DeviceSpec, LinuxVduse, VduseChannel, VduseKernel, VqInfo
from pyvduse.memory import IotlbEntry, IotlbMemory
from pyvduse.native import NativeIrq
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v
from pyvduse.virtio_device import DeviceModel, QueueState, Transport, VirtioDevice

__all__ = ["TRANSPORT_FEATURES", "DeviceModel", "VduseDevice"]

log = logging.getLogger(__name__)

TRANSPORT_FEATURES = (1 << v.VIRTIO_F_VERSION_1) | (1 << v.VIRTIO_F_ACCESS_PLATFORM)
"""Bits VDUSE offers with every device and the driver must accept."""
_RUNNING = (v.VIRTIO_CONFIG_S_ACKNOWLEDGE | v.VIRTIO_CONFIG_S_DRIVER
            | v.VIRTIO_CONFIG_S_FEATURES_OK | v.VIRTIO_CONFIG_S_DRIVER_OK)

DESTROY_INFLIGHT_TIMEOUT = 10.0
"""Seconds :meth:`VduseDevice.destroy` lets requests still in a backend finish."""
CONTROL_JOIN_TIMEOUT = 10.0
"""Seconds :meth:`VduseDevice.destroy` waits for the control thread."""


class VduseDevice(Transport):
    """One VDUSE device serving ``model``. See the module docstring for the lifecycle."""

    def __init__(self, name: str, model: DeviceModel, kernel: VduseKernel | None = None,
                 queue_threads: int = 1, poll_max_ns: int = 0,
                 inflight_log: InflightLog | None = None) -> None:
        #: The transport-neutral half: the rings, their threads and the inflight record.
        self.virtio = VirtioDevice(name, model, queue_threads=queue_threads,
                                   poll_max_ns=poll_max_ns, inflight_log=inflight_log)
        self.name = name
        self.model = model
        self.kernel: VduseKernel = kernel if kernel is not None else LinuxVduse()
        self.status = 0
        self.driver_ok = threading.Event()
        #: Set when the device can no longer be served (see :attr:`failure`).
        self.failed = threading.Event()
        self.failure = ""
        self._channel: VduseChannel | None = None
        self._memory: IotlbMemory | None = None
        self._kick_fds: dict[int, int] = {}
        self._created = False
        self._stop_fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # serialises queue start/stop

    @property
    def features(self) -> int:
        """Feature bits offered to the driver: the model's and VDUSE's own."""
        return self.model.features | TRANSPORT_FEATURES

    @property
    def inflight_log(self) -> InflightLog | None:
        """Where the device's state and requests in flight are recorded (None: nowhere;
        the device then cannot be recovered after a crash)."""
        return self.virtio.inflight_log

    @inflight_log.setter
    def inflight_log(self, log_: InflightLog | None) -> None:
        self.virtio.inflight_log = log_

    @property
    def driver_features(self) -> int:
        """The features the driver accepted."""
        return self.virtio.driver_features

    @property
    def queue_threads(self) -> int:
        """Threads serving the queues."""
        return self.virtio.queue_threads

    @property
    def poll_max_ns(self) -> int:
        """Queue threads poll their rings up to this long before sleeping."""
        return self.virtio.poll_max_ns

    # -- lifecycle ----------------------------------------------------------------------

    def create(self) -> None:
        """Create the device, set up its queues and start answering control messages."""
        model = self.model
        spec = DeviceSpec(name=self.name, device_id=model.device_id, features=self.features,
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
            self.virtio.driver_features = features
            self._iotlb()
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
        self._iotlb()
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
            self.virtio.reset()
            self.status = 0
            self.driver_ok.clear()
            return u.VDUSE_REQ_RESULT_OK
        new = status & ~self.status
        if new & v.VIRTIO_CONFIG_S_FEATURES_OK:
            features = self.channel.get_features()
            refused = self.virtio.refused_features(features, self.features, TRANSPORT_FEATURES)
            if refused is not None:
                log.error("%s: %s", self.name, refused)
                return u.VDUSE_REQ_RESULT_FAILED
            self.virtio.accept_features(features)
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
        position = self.virtio.last_avail(index)
        if position is not None:
            return position
        return self.channel.vq_get_info(index).avail_index

    def _update_iotlb(self, start: int, last: int) -> int:
        """Drop every mapping and serve the running queues through new ones.

        Requests in flight stay in flight (their buffers keep the old
        mappings alive until they complete); nothing waits for a backend.
        """
        log.debug("%s: IOTLB update %#x-%#x", self.name, start, last)
        with self._lock:
            self.virtio.pause()
            memory = self._iotlb()
            memory.invalidate()
            for index in list(self.workers):
                self.virtio.remap(index, _queue_state(self.channel.vq_get_info(index)), memory)
            self.virtio.serve()
        return u.VDUSE_REQ_RESULT_OK

    # -- queues -------------------------------------------------------------------------

    def _resolve(self, iova: int) -> IotlbEntry:
        entry = self.channel.iotlb_get_fd(iova, iova)
        log.debug("%s: IOTLB entry %#x-%#x at offset %#x, access %d", self.name, entry.start,
                  entry.last, entry.offset, entry.perm)
        return entry

    def _iotlb(self) -> IotlbMemory:
        if self._memory is None:
            self._memory = IotlbMemory(self._resolve)
        return self._memory

    def _start_queues(self, recover: bool) -> int:
        """Start every ready queue; return the requests resubmitted.

        A fresh start (DRIVER_OK) begins where the driver says; ``recover``
        takes the positions and the requests to resubmit from the inflight
        log (see :meth:`VirtioDevice.start_queue`).
        """
        resubmitted = 0
        with self._lock:
            try:
                for index in range(self.model.num_queues):
                    info = self.channel.vq_get_info(index)
                    if not info.ready:
                        continue
                    state = _queue_state(info, 0 if recover else info.avail_index)
                    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    self._kick_fds[index] = kick_fd
                    self.channel.vq_setup_kickfd(index, kick_fd)
                    resubmitted += self.virtio.start_queue(
                        index, state, self._iotlb(), kick_fd, self._notifier(index),
                        recover=recover, serve=False)
            except BaseException:
                self._release_queues(inflight_timeout=0)
                raise
            self.virtio.serve()
        return resubmitted

    def _notifier(self, index: int) -> Callable[[], None]:
        """The used-buffer interrupt of one queue; failures are logged, not raised."""
        return _QueueInterrupt(self.channel, index)

    def _stop_queues(self, inflight_timeout: float | None) -> None:
        """Stop every queue, wait for requests in flight up to ``inflight_timeout``,
        then give the queues up: kick fds and mappings are dropped, later
        completions too."""
        with self._lock:
            self._release_queues(inflight_timeout)

    def _release_queues(self, inflight_timeout: float | None) -> None:
        self.virtio.stop_all(inflight_timeout)
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


def _queue_state(info: VqInfo, last_avail: int = 0) -> QueueState:
    """A ring as ``VDUSE_VQ_GET_INFO`` describes it, taken from ``last_avail``."""
    return QueueState(info.num, info.desc_addr, info.driver_addr, info.device_addr,
                      last_avail)


class _QueueInterrupt:
    """Interrupts the driver of one queue (``VDUSE_VQ_INJECT_IRQ``); failures are logged.

    ``native_irq`` says how the compiled serving loop does the same without Python
    (None when the channel has no kernel fd, e.g. a test's fake kernel).
    """

    def __init__(self, channel: VduseChannel, index: int) -> None:
        self._channel = channel
        self._index = index
        native_irq = getattr(channel, "native_irq", None)
        self.native_irq: NativeIrq | None = native_irq(index) if native_irq else None

    def __call__(self) -> None:
        try:
            self._channel.vq_inject_irq(self._index)
        except KernelError as exc:
            log.warning("%s", exc)
