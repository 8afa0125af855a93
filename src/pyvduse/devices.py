"""The VDUSE devices on this host, whoever made them: ``pyvduse list`` and ``destroy``.

:func:`list_devices` reads sysfs and ``/proc`` only (it opens no device): each
VDUSE device's name, the vdpa driver bound to it, its node, its size when it is
a block device, and the processes that hold ``/dev/vduse/NAME`` open (a daemon
serving it).

:func:`destroy_device` removes a device nobody serves any more (a daemon killed
and not restarted): it refuses while a process holds the device, or while its
block device is mounted or open (``force`` overrides the latter), then deletes
the vdpa device and the VDUSE device. Deleting the vdpa device resets the
device, which the kernel asks of the device's daemon; since there is none, this
process holds ``/dev/vduse/NAME`` meanwhile and answers those requests itself
(otherwise the kernel would wait 30 s and then break the device).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyvduse.binding import BindingError, find_attached
from pyvduse.errors import PyvduseError
from pyvduse.kernel import LinuxVduse
from pyvduse.uapi import vduse as u

__all__ = ["DeviceInfo", "destroy_device", "list_devices"]

CLASS_DIR = "/sys/class/vduse"
NOT_DEVICES = {"control"}  # the control node lives in the same class
RESPONDER_POLL = 0.05  # seconds between the responder's looks at its stop flag


@dataclass(frozen=True)
class DeviceInfo:
    """One VDUSE device as :func:`list_devices` sees it."""

    name: str
    driver: str | None  # virtio_vdpa, vhost_vdpa, or None (no vdpa device, or unbound)
    node: str | None  # /dev/vdX or /dev/vhost-vdpa-N
    size: int | None  # bytes, when bound to virtio_vdpa as a block device
    holders: tuple[int, ...]  # pids holding /dev/vduse/NAME open

    @property
    def served(self) -> bool:
        """Whether some process (a daemon) holds the device."""
        return bool(self.holders)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``served``."""
        return {**asdict(self), "holders": list(self.holders), "served": self.served}


def device_names(class_dir: str = CLASS_DIR) -> list[str]:
    """The VDUSE devices' names, sorted."""
    try:
        return sorted(entry for entry in os.listdir(class_dir) if entry not in NOT_DEVICES)
    except FileNotFoundError:
        return []


def holders_of(path: str, proc: str = "/proc") -> tuple[int, ...]:
    """Pids of the processes with ``path`` open (other users' processes need root)."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except OSError:  # gone, or not ours to look at
            continue
        if path in targets:
            found.append(int(entry))
    return tuple(sorted(found))


def _block_size(sysfs_block: str | None) -> int | None:
    if sysfs_block is None:
        return None
    try:
        return int(Path(sysfs_block, "size").read_text()) * 512
    except (OSError, ValueError):
        return None


def describe_device(name: str) -> DeviceInfo:
    """What sysfs and /proc say of VDUSE device ``name``."""
    try:
        attached = find_attached(name)
    except BindingError:
        attached = None  # a vdpa device without a usable binding
    driver_link = Path("/sys/bus/vdpa/devices", name, "driver")
    driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
    return DeviceInfo(
        name=name, driver=driver,
        node=attached.dev_path if attached is not None else None,
        size=_block_size(attached.sysfs_block) if attached is not None else None,
        holders=holders_of(os.path.join(u.DEVICE_DIR, name)))


def list_devices() -> list[DeviceInfo]:
    """Every VDUSE device on the host, by name."""
    return [describe_device(name) for name in device_names()]


def _mounted_or_open(info: DeviceInfo) -> str:
    """Why the block device of ``info`` is in use ('' if it is not): mounted (itself
    or a partition), held by another device (LVM, RAID), or open by a process."""
    if info.node is None or info.driver != "virtio_vdpa":
        return ""
    disk = os.path.basename(info.node)
    with open("/proc/self/mounts") as stream:
        for line in stream:
            source = line.split(" ", 1)[0]
            partition = source[len(info.node):].lstrip("p")
            if source.startswith(info.node) and (not partition or partition.isdigit()):
                return f"{source} is mounted"
    holders_dir = Path("/sys/block", disk, "holders")
    if holders_dir.is_dir() and any(holders_dir.iterdir()):
        return f"{info.node} is held by {', '.join(p.name for p in holders_dir.iterdir())}"
    users = holders_of(info.node)
    if users:
        return f"{info.node} is open by pid {', '.join(map(str, users))}"
    return ""


def _answer_requests(fd: int, stop: threading.Event) -> None:
    """Answer every control message of the device on ``fd`` with success (and vq
    state 0) until ``stop``: the device's reset while it is being deleted."""
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], RESPONDER_POLL)
        if not ready:
            continue
        try:
            request = os.read(fd, u.VDUSE_DEV_REQUEST_SIZE)
        except BlockingIOError:
            continue
        except OSError:
            return
        if len(request) < u.vduse_dev_request_header.size:
            continue
        _type, request_id = u.vduse_dev_request_header.unpack_from(request)
        response = bytearray(u.VDUSE_DEV_RESPONSE_SIZE)
        u.vduse_dev_response_header.pack_into(response, 0, request_id, u.VDUSE_REQ_RESULT_OK)
        response[u.VDUSE_REQUEST_PAYLOAD_OFFSET:u.VDUSE_REQUEST_PAYLOAD_OFFSET + 4] = \
            request[u.VDUSE_REQUEST_PAYLOAD_OFFSET:u.VDUSE_REQUEST_PAYLOAD_OFFSET + 4]
        try:
            os.write(fd, bytes(response))
        except OSError:
            return


def destroy_device(name: str, *, force: bool = False) -> list[str]:
    """Remove VDUSE device ``name`` and its vdpa device; return what was done.

    Raises :class:`PyvduseError` (nothing touched) if there is no such device, a
    process holds it (a live daemon: stop that instead), or, without ``force``,
    its block device is mounted or open.
    """
    if name not in device_names():
        raise PyvduseError(f"no VDUSE device {name!r} on this host")
    info = describe_device(name)
    if info.served:
        raise PyvduseError(f"{name} is served by pid {', '.join(map(str, info.holders))}: "
                           "stop that daemon instead (it destroys the device on SIGTERM)")
    busy = _mounted_or_open(info)
    if busy and not force:
        raise PyvduseError(f"{name}: {busy}; unmount or close it first (--force removes "
                           "the device all the same: its I/O then fails)")
    path = os.path.join(u.DEVICE_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "a process took it meanwhile" if exc.errno == errno.EBUSY else exc.strerror
        raise PyvduseError(f"cannot open {path}: {why}") from None
    done = []
    try:
        if info.driver is not None or Path("/sys/bus/vdpa/devices", name).exists():
            from pyvduse.netlink import VdpaClient

            stop = threading.Event()
            responder = threading.Thread(target=_answer_requests, args=(fd, stop),
                                         name=f"{name}-reset", daemon=True)
            responder.start()
            try:
                VdpaClient().dev_del(name)
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    raise PyvduseError(f"{name}: deleting the vdpa device: "
                                       f"{exc.strerror}") from None
            finally:
                stop.set()
                responder.join()
            done.append(f"vdpa device {name} deleted" + (f" ({info.node} gone)"
                                                       if info.node else ""))
    finally:
        os.close(fd)
    LinuxVduse().destroy_device(name)
    done.append(f"VDUSE device {name} destroyed")
    return done
