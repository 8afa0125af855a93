"""The syscall seam: every ioctl, read and write on VDUSE file descriptors.

Nothing above this module touches a VDUSE fd directly. :class:`VduseKernel`
is the interface; :class:`LinuxVduse` implements it on the real driver, and
tests substitute an in-process fake with the same behaviour, so the device
code runs unchanged against both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass
from typing import Protocol

from pyvduse.errors import ConfigError, KernelError, MemoryAccessError, VduseUnavailableError
from pyvduse.memory import IotlbEntry
from pyvduse.native import NativeIrq
from pyvduse.uapi import vduse as u

VDUSE_FIX_HINT = (
    "load the driver with 'modprobe vduse' (Linux >= 5.15 built with CONFIG_VDPA_USER; "
    "attaching also needs 'modprobe virtio_vdpa' or 'modprobe vhost_vdpa')"
)


@dataclass(frozen=True)
class VqInfo:
    """``struct vduse_vq_info``: what the driver set up for one virtqueue."""

    index: int
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    avail_index: int
    ready: bool


@dataclass(frozen=True)
class DeviceSpec:
    """Arguments of ``VDUSE_CREATE_DEV``."""

    name: str
    device_id: int
    features: int
    vq_num: int
    config: bytes
    vendor_id: int = 0
    vq_align: int = 4096


class VduseChannel(Protocol):
    """An open ``/dev/vduse/$NAME``: control messages and device ioctls."""

    name: str

    def fileno(self) -> int:
        """Pollable fd: readable when a control message waits."""
        ...

    def read_request(self) -> bytes | None:
        """One 152-byte ``vduse_dev_request``, or None if none is pending (non-blocking)."""
        ...

    def write_response(self, response: bytes) -> None:
        """Send one 152-byte ``vduse_dev_response``."""
        ...

    def vq_setup(self, index: int, max_size: int) -> None: ...
    def vq_get_info(self, index: int) -> VqInfo: ...
    def vq_setup_kickfd(self, index: int, fd: int) -> None: ...
    def vq_inject_irq(self, index: int) -> None: ...
    def iotlb_get_fd(self, start: int, last: int) -> IotlbEntry: ...
    def get_features(self) -> int: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def inject_config_irq(self) -> None: ...
    def close(self) -> None: ...


class VduseKernel(Protocol):
    """Creates, opens and destroys VDUSE devices."""

    def create_device(self, spec: DeviceSpec) -> None:
        """Create the device (``VDUSE_SET_API_VERSION(0)`` then ``VDUSE_CREATE_DEV``)."""
        ...

    def open_device(self, name: str) -> VduseChannel:
        """Open ``/dev/vduse/$NAME``, waiting briefly for the node to appear."""
        ...

    def destroy_device(self, name: str) -> None:
        """``VDUSE_DESTROY_DEV``."""
        ...

    def device_exists(self, name: str) -> bool:
        """Whether a VDUSE device ``name`` exists (e.g. left by a daemon that died)."""
        ...

    def device_id(self, name: str) -> str:
        """A string that names this incarnation of device ``name``.

        Differs once the device is destroyed and created again, or after a
        reboot: an inflight log recorded for another incarnation is stale.
        """
        ...


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= u.VDUSE_NAME_MAX or b"/" in raw or b"\0" in raw:
        raise ConfigError(
            f"invalid device name {name!r}: 1 to {u.VDUSE_NAME_MAX - 1} bytes, no '/'")
    return raw


class LinuxVduse:
    """:class:`VduseKernel` on the real driver."""

    def __init__(self, control_path: str = u.CONTROL_DEVICE, device_dir: str = u.DEVICE_DIR,
                 open_timeout: float = 5.0) -> None:
        self.control_path = control_path
        self.device_dir = device_dir
        self.open_timeout = open_timeout

    def _open_control(self) -> int:
        try:
            return os.open(self.control_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VduseUnavailableError(
                f"{self.control_path} does not exist: {VDUSE_FIX_HINT}") from None
        except PermissionError:
            raise VduseUnavailableError(
                f"{self.control_path}: permission denied (run as root or grant access "
                "to the device node)") from None

    def check_available(self) -> None:
        """Raise :class:`VduseUnavailableError` (saying what to do) if the control
        device cannot be opened: checked before a backend contacts any server."""
        os.close(self._open_control())

    def create_device(self, spec: DeviceSpec) -> None:
        name = _name_bytes(spec.name)
        header = u.vduse_dev_config.pack(name, spec.vendor_id, spec.device_id, spec.features,
                                         spec.vq_num, spec.vq_align, len(spec.config))
        fd = self._open_control()
        try:
            try:
                fcntl.ioctl(fd, u.VDUSE_SET_API_VERSION,
                            bytearray(u.VDUSE_API_VERSION.to_bytes(8, "little")))
            except OSError as exc:
                raise KernelError.from_oserror(spec.name, "VDUSE_SET_API_VERSION", exc) from None
            try:
                fcntl.ioctl(fd, u.VDUSE_CREATE_DEV, bytearray(header + spec.config))
            except OSError as exc:
                hint = "a VDUSE device with this name exists" if exc.errno == errno.EEXIST else ""
                raise KernelError.from_oserror(spec.name, "VDUSE_CREATE_DEV", exc, hint) from None
        finally:
            os.close(fd)

    def destroy_device(self, name: str) -> None:
        fd = self._open_control()
        try:
            fcntl.ioctl(fd, u.VDUSE_DESTROY_DEV, bytearray(_name_bytes(name).ljust(256, b"\0")))
        except OSError as exc:
            raise KernelError.from_oserror(name, "VDUSE_DESTROY_DEV", exc) from None
        finally:
            os.close(fd)

    def device_exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.device_dir, _name_bytes(name).decode()))

    def device_id(self, name: str) -> str:
        path = os.path.join(self.device_dir, name)
        try:
            rdev = os.stat(path).st_rdev
            with open("/proc/sys/kernel/random/boot_id") as stream:
                boot = stream.read().strip()
        except OSError as exc:
            raise KernelError.from_oserror(name, f"stat {path}", exc) from None
        return f"{boot}/{os.major(rdev)}:{os.minor(rdev)}"

    def open_device(self, name: str) -> LinuxVduseChannel:
        path = os.path.join(self.device_dir, name)
        deadline = time.monotonic() + self.open_timeout
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                return LinuxVduseChannel(name, fd)
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise KernelError(name, f"open {path}", errno.ENOENT) from None
                time.sleep(0.02)
            except OSError as exc:
                hint = "another process serves this device" if exc.errno == errno.EBUSY else ""
                raise KernelError.from_oserror(name, f"open {path}", exc, hint) from None


class LinuxVduseChannel:
    """:class:`VduseChannel` on a real ``/dev/vduse/$NAME`` fd (opened non-blocking)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self._fd = fd
        self._u64 = bytearray(8)

    def fileno(self) -> int:
        return self._fd

    def _ioctl(self, operation: str, request: int, arg: bytearray | int) -> int:
        try:
            return fcntl.ioctl(self._fd, request, arg, True) if isinstance(
                arg, bytearray) else fcntl.ioctl(self._fd, request, arg)
        except OSError as exc:
            raise KernelError.from_oserror(self.name, operation, exc) from None

    def read_request(self) -> bytes | None:
        try:
            data = os.read(self._fd, u.VDUSE_DEV_REQUEST_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise KernelError.from_oserror(self.name, "read control message", exc) from None
        if len(data) != u.VDUSE_DEV_REQUEST_SIZE:
            raise KernelError(self.name, f"read control message ({len(data)} bytes)", errno.EIO)
        return data

    def write_response(self, response: bytes) -> None:
        try:
            os.write(self._fd, response)
        except OSError as exc:
            raise KernelError.from_oserror(self.name, "write control reply", exc) from None

    def vq_setup(self, index: int, max_size: int) -> None:
        self._ioctl("VDUSE_VQ_SETUP", u.VDUSE_VQ_SETUP,
                    bytearray(u.vduse_vq_config.pack(index, max_size)))

    def vq_get_info(self, index: int) -> VqInfo:
        buf = bytearray(u.vduse_vq_info.pack(index, 0, 0, 0, 0, 0, 0))
        self._ioctl("VDUSE_VQ_GET_INFO", u.VDUSE_VQ_GET_INFO, buf)
        idx, num, desc, driver, device, avail, ready = u.vduse_vq_info.unpack(buf)
        return VqInfo(idx, num, desc, driver, device, avail, bool(ready))

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        self._ioctl("VDUSE_VQ_SETUP_KICKFD", u.VDUSE_VQ_SETUP_KICKFD,
                    bytearray(u.vduse_vq_eventfd.pack(index, fd)))

    def native_irq(self, index: int) -> NativeIrq:
        """How the compiled data path interrupts the driver of queue ``index`` itself."""
        return NativeIrq(self._fd, u.VDUSE_VQ_INJECT_IRQ, index)

    def vq_inject_irq(self, index: int) -> None:
        self._ioctl("VDUSE_VQ_INJECT_IRQ", u.VDUSE_VQ_INJECT_IRQ,
                    bytearray(u.vduse_vq_index.pack(index)))

    def iotlb_get_fd(self, start: int, last: int) -> IotlbEntry:
        buf = bytearray(u.vduse_iotlb_entry.pack(0, start, last, 0))
        try:
            fd = fcntl.ioctl(self._fd, u.VDUSE_IOTLB_GET_FD, buf, True)
        except OSError as exc:
            raise MemoryAccessError(
                f"{self.name}: no IOTLB mapping for IOVA {start:#x}: {os.strerror(exc.errno or 0)}"
            ) from None
        offset, first, last_, perm = u.vduse_iotlb_entry.unpack(buf)
        return IotlbEntry(fd=fd, start=first, last=last_, offset=offset, perm=perm)

    def get_features(self) -> int:
        self._ioctl("VDUSE_DEV_GET_FEATURES", u.VDUSE_DEV_GET_FEATURES, self._u64)
        return int.from_bytes(self._u64, "little")

    def set_config(self, offset: int, data: bytes) -> None:
        self._ioctl("VDUSE_DEV_SET_CONFIG", u.VDUSE_DEV_SET_CONFIG,
                    bytearray(u.vduse_config_data.pack(offset, len(data)) + data))

    def inject_config_irq(self) -> None:
        self._ioctl("VDUSE_DEV_INJECT_CONFIG_IRQ", u.VDUSE_DEV_INJECT_CONFIG_IRQ, 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
