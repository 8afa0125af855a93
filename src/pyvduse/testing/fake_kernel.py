"""An in-process fake of the VDUSE driver, with the virtio driver's side to drive it.

:class:`FakeVduse` implements :class:`pyvduse.kernel.VduseKernel`. Its
channels behave like ``/dev/vduse/$NAME``: control messages are queued and
signalled on an eventfd, answered through ``write_response`` and matched by
id; ``VQ_GET_INFO`` reports what the fake driver set up; kicks are real
eventfds; interrupts are counted. The driver-side methods
(:meth:`FakeChannel.set_status`, :meth:`FakeChannel.setup_queue`, ...) play
the kernel's part: ``set_status`` blocks until the device answers, as the
real ``vduse_dev_msg_sync`` does.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque

from pyvduse.errors import KernelError
from pyvduse.kernel import DeviceSpec, VqInfo
from pyvduse.memory import IotlbEntry
from pyvduse.testing.mock_driver import DriverMemory, MockSplitRing
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v


class FakeVduse:
    """In-process :class:`~pyvduse.kernel.VduseKernel`."""

    def __init__(self, memory: DriverMemory | None = None) -> None:
        self.memory = memory or DriverMemory()
        self.devices: dict[str, DeviceSpec] = {}
        self.channels: dict[str, FakeChannel] = {}
        self.destroyed: list[str] = []
        self._ids: dict[str, str] = {}
        self._created = 0

    def create_device(self, spec: DeviceSpec) -> None:
        if spec.name in self.devices:
            raise KernelError(spec.name, "VDUSE_CREATE_DEV", errno.EEXIST)
        if not spec.features & (1 << v.VIRTIO_F_ACCESS_PLATFORM):
            raise KernelError(spec.name, "VDUSE_CREATE_DEV", errno.EINVAL)
        self.devices[spec.name] = spec
        self._created += 1
        self._ids[spec.name] = f"fake/{self._created}"

    def open_device(self, name: str) -> FakeChannel:
        if name not in self.devices:
            raise KernelError(name, "open", errno.ENOENT)
        channel = self.channels.get(name)
        if channel is not None and channel.is_open:
            raise KernelError(name, "open", errno.EBUSY)
        if channel is not None and channel.crashed_open:
            channel.reopen()  # the driver's side survives its daemon
            return channel
        channel = FakeChannel(name, self.devices[name], self.memory)
        self.channels[name] = channel
        return channel

    def destroy_device(self, name: str) -> None:
        channel = self.channels.get(name)
        if name not in self.devices:
            raise KernelError(name, "VDUSE_DESTROY_DEV", errno.EINVAL)
        if channel is not None and channel.is_open:
            raise KernelError(name, "VDUSE_DESTROY_DEV", errno.EBUSY)
        del self.devices[name]
        self.destroyed.append(name)

    def device_exists(self, name: str) -> bool:
        return name in self.devices

    def device_id(self, name: str) -> str:
        if name not in self.devices:
            raise KernelError(name, "stat", errno.ENOENT)
        return self._ids[name]

    def crash(self, name: str) -> FakeChannel:
        """The daemon serving ``name`` died: its fd is closed, the device and rings stay.

        Returns the old channel, whose driver side (rings, kick eventfds of
        the dead process aside) the test keeps using; a new :meth:`open_device`
        carries them over. Control messages read and not answered would be
        queued again by the kernel; the fake has none in flight here.
        """
        channel = self.channels[name]
        channel.is_open = False
        channel._crashed = True
        return channel


class FakeChannel:
    """A fake ``/dev/vduse/$NAME`` plus the kernel-side driver operations."""

    def __init__(self, name: str, spec: DeviceSpec, memory: DriverMemory) -> None:
        self.name = name
        self.spec = spec
        self.memory = memory
        self.config = bytearray(spec.config)
        self.is_open = True
        self.max_sizes: dict[int, int] = {}
        self.rings: dict[int, MockSplitRing] = {}
        self.kick_fds: dict[int, int] = {}
        self.irqs = [0] * spec.vq_num
        self.config_irqs = 0
        self.driver_features = 0
        self._irq_cond = threading.Condition()
        self._pending: deque[bytes] = deque()
        self._responses: dict[int, bytes] = {}
        self._response_cond = threading.Condition()
        self._next_id = 1
        self._ready_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        #: Make the next control-message read fail with EIO (a broken channel).
        self.fail_reads = False
        self._crashed = False

    # -- device side (VduseChannel) -----------------------------------------------------

    def fileno(self) -> int:
        return self._ready_fd

    def read_request(self) -> bytes | None:
        if self.fail_reads:
            raise KernelError(self.name, "read control message", errno.EIO)
        with self._lock:
            if not self._pending:
                try:
                    os.eventfd_read(self._ready_fd)
                except BlockingIOError:
                    pass
                return None
            request = self._pending.popleft()
            if not self._pending:
                try:
                    os.eventfd_read(self._ready_fd)
                except BlockingIOError:
                    pass
            return request

    def write_response(self, response: bytes) -> None:
        if len(response) != u.VDUSE_DEV_RESPONSE_SIZE or any(response[8:24]):
            raise KernelError(self.name, "write control reply", errno.EINVAL)
        request_id, _result = u.vduse_dev_response_header.unpack_from(response)
        with self._response_cond:
            self._responses[request_id] = response
            self._response_cond.notify_all()

    def vq_setup(self, index: int, max_size: int) -> None:
        if index >= self.spec.vq_num:
            raise KernelError(self.name, "VDUSE_VQ_SETUP", errno.EINVAL)
        self.max_sizes[index] = max_size

    def vq_get_info(self, index: int) -> VqInfo:
        if index >= self.spec.vq_num:
            raise KernelError(self.name, "VDUSE_VQ_GET_INFO", errno.EINVAL)
        ring = self.rings.get(index)
        if ring is None:
            return VqInfo(index, 0, 0, 0, 0, 0, False)
        return VqInfo(index, ring.size, ring.desc_addr, ring.avail_addr, ring.used_addr, 0, True)

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        if index >= self.spec.vq_num:
            raise KernelError(self.name, "VDUSE_VQ_SETUP_KICKFD", errno.EINVAL)
        if fd == u.VDUSE_EVENTFD_DEASSIGN:
            self.kick_fds.pop(index, None)
        else:
            self.kick_fds[index] = fd

    def vq_inject_irq(self, index: int) -> None:
        with self._irq_cond:
            self.irqs[index] += 1
            self._irq_cond.notify_all()

    def iotlb_get_fd(self, start: int, last: int) -> IotlbEntry:
        return self.memory.resolve(start)

    def get_features(self) -> int:
        return self.driver_features

    def set_config(self, offset: int, data: bytes) -> None:
        if offset > len(self.config) or not data or offset + len(data) > len(self.config):
            raise KernelError(self.name, "VDUSE_DEV_SET_CONFIG", errno.EINVAL)
        self.config[offset:offset + len(data)] = data

    def inject_config_irq(self) -> None:
        self.config_irqs += 1

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            os.close(self._ready_fd)

    @property
    def crashed_open(self) -> bool:
        """Closed by :meth:`FakeVduse.crash` (the fd of a dead process), not by the daemon."""
        return not self.is_open and self._ready_fd >= 0 and self._crashed

    def reopen(self) -> None:
        """A new daemon opens the device: same driver state, no kick fds (the kernel
        dropped the dead process's eventfds)."""
        self.is_open = True
        self._crashed = False
        self.kick_fds.clear()

    # -- kernel / driver side -------------------------------------------------------------

    def send(self, req_type: int, payload: bytes = b"", timeout: float = 10.0) -> bytes:
        """Queue a control message and wait for the device's answer (like msg_sync)."""
        return self.wait_response(self.send_nowait(req_type, payload), timeout)

    def wait_response(self, request_id: int, timeout: float = 10.0) -> bytes:
        """Wait for the answer to a message queued by :meth:`send_nowait`; return it."""
        with self._response_cond:
            if not self._response_cond.wait_for(lambda: request_id in self._responses, timeout):
                raise TimeoutError(f"device did not answer control message {request_id}")
            return self._responses.pop(request_id)

    def send_nowait(self, req_type: int, payload: bytes = b"") -> int:
        """Queue a control message; return its request id."""
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            request = bytearray(u.VDUSE_DEV_REQUEST_SIZE)
            u.vduse_dev_request_header.pack_into(request, 0, req_type, request_id)
            start = u.VDUSE_REQUEST_PAYLOAD_OFFSET
            request[start:start + len(payload)] = payload
            self._pending.append(bytes(request))
            os.eventfd_write(self._ready_fd, 1)
        return request_id

    def set_status(self, status: int) -> int:
        """Send SET_STATUS; return the device's result (0 = OK)."""
        response = self.send(u.VDUSE_SET_STATUS, u.vduse_dev_status.pack(status))
        return int(u.vduse_dev_response_header.unpack_from(response)[1])

    def setup_queue(self, index: int, size: int | None = None) -> MockSplitRing:
        """Allocate ring ``index`` (default: the device's max size) and mark it ready."""
        ring = MockSplitRing(self.memory, size or self.max_sizes[index])
        self.rings[index] = ring
        return ring

    def start(self, features: int | None = None) -> int:
        """Run the driver's bring-up: ACK, DRIVER, FEATURES_OK, rings, DRIVER_OK.

        Returns the DRIVER_OK result. ``features`` defaults to all offered.
        """
        self.driver_features = self.spec.features if features is None else features
        status = v.VIRTIO_CONFIG_S_ACKNOWLEDGE | v.VIRTIO_CONFIG_S_DRIVER
        for step in (v.VIRTIO_CONFIG_S_ACKNOWLEDGE, status):
            if self.set_status(step):
                return 1
        status |= v.VIRTIO_CONFIG_S_FEATURES_OK
        if self.set_status(status):
            return 1
        for index in range(self.spec.vq_num):
            self.setup_queue(index)
        return self.set_status(status | v.VIRTIO_CONFIG_S_DRIVER_OK)

    def reset(self) -> int:
        """SET_STATUS(0), then forget rings and kick fds as the kernel does."""
        result = self.set_status(0)
        self.rings.clear()
        self.kick_fds.clear()
        self.driver_features = 0
        return result

    def kick(self, index: int) -> None:
        """Notify the device that queue ``index`` has new buffers."""
        os.eventfd_write(self.kick_fds[index], 1)

    def wait_used(self, index: int, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait until ``count`` more completions are visible on queue ``index``; return them."""
        ring = self.rings[index]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        with self._irq_cond:
            while True:
                got.extend(ring.take_used())
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"queue {index}: {len(got)} of {count} completions")
                self._irq_cond.wait(min(remaining, 0.01))
