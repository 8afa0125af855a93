"""Attach a VDUSE device as a vDPA device bound to a chosen vdpa bus driver.

A vDPA device can be consumed by two bus drivers: ``virtio_vdpa`` (the host
kernel drives it: a virtio-blk device becomes ``/dev/vdX``) or ``vhost_vdpa``
(``/dev/vhost-vdpa-N``, for QEMU, libblkio or DPDK). The vdpa bus matches every
driver to every device unless the device's ``driver_override`` names one, and
with ``/sys/bus/vdpa/drivers_autoprobe`` = 1 (the default) the device binds at
creation, inside ``VDPA_CMD_DEV_NEW``, to whichever of the two drivers was
registered first: the outcome depends on module load order.

:func:`attach` therefore makes the choice explicit (the pattern govdpa and the
vduse-dp PoC use):

1. make sure ``/sys/bus/vdpa/drivers/<driver>`` exists (``modprobe <driver>`` once);
2. ``drivers_autoprobe`` := 0, ``VDPA_CMD_DEV_NEW``, write ``<driver>`` to
   ``devices/<name>/driver_override``, restore ``drivers_autoprobe``;
3. write ``<name>`` to ``/sys/bus/vdpa/drivers_probe`` (the driver's probe runs
   synchronously here: virtio_vdpa + virtio_blk exchange VDUSE control messages
   with the daemon and read the partition table);
4. poll until the block or vhost device and its ``/dev`` node exist.

Caveat: ``drivers_autoprobe`` is global to the vdpa bus. While it is 0 (from
just before ``DEV_NEW`` until ``driver_override`` is written, a few
milliseconds) a vDPA device created by someone else is not bound automatically.
The toggle is restored as soon as the override is in place rather than after the
probe, which keeps the window short; attaches within this process are serialised
so they cannot restore each other's value, but nothing serialises against other
processes doing the same dance.

Threading: :func:`attach` and :func:`detach` block while the kernel exchanges
VDUSE control messages with the daemon; call them from a thread other than the
VDUSE control loop, which must already be running.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from pyvduse.errors import PyvduseError
from pyvduse.netlink import NetlinkError

__all__ = [
    "AttachedDevice",
    "BindingError",
    "Driver",
    "VdpaDeviceControl",
    "attach",
    "detach",
    "find_block_device",
    "find_vhost_device",
    "run_modprobe",
]

log = logging.getLogger(__name__)

Driver = Literal["virtio_vdpa", "vhost_vdpa"]

#: Kernel config option behind each driver, for error messages.
_DRIVER_KCONFIG: dict[str, str] = {
    "virtio_vdpa": "CONFIG_VIRTIO_VDPA",
    "vhost_vdpa": "CONFIG_VHOST_VDPA",
}

_POLL_INTERVAL = 0.02

# Serialises the drivers_autoprobe read/0/restore window between threads.
_AUTOPROBE_LOCK = threading.Lock()


class BindingError(PyvduseError, OSError):
    """Attaching or binding vDPA device ``name`` failed; ``str()`` is ``"<name>: <message>"``.

    ``errno`` says what kind of failure (``ENOENT`` driver module missing,
    ``ETIMEDOUT`` device node never appeared, ``ENODEV`` driver did not bind, or
    the errno of a failed sysfs access).
    """

    def __init__(self, errno_: int, name: str, message: str) -> None:
        super().__init__(errno_, message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.name, self.message))


class VdpaDeviceControl(Protocol):
    """What :func:`attach` needs from a vdpa client (:class:`pyvduse.netlink.VdpaClient`)."""

    def dev_add(self, name: str, mgmtdev: str = ...) -> None:
        """Create vDPA device ``name`` on ``mgmtdev``."""

    def dev_del(self, name: str) -> None:
        """Delete vDPA device ``name``."""


@dataclass(frozen=True, slots=True)
class AttachedDevice:
    """Result of :func:`attach`.

    ``dev_path`` is the device node (``/dev/vda`` or ``/dev/vhost-vdpa-0``);
    ``sysfs_block`` the block device's sysfs directory for ``virtio_vdpa``
    (``/sys/bus/vdpa/devices/<name>/virtio0/block/vda``), ``None`` for
    ``vhost_vdpa``.
    """

    name: str
    driver: Driver
    dev_path: str
    sysfs_block: str | None = None


def run_modprobe(module: str) -> str | None:
    """Run ``modprobe <module>``; ``None`` on success, else a one-line reason.

    Never raises for a failed or missing ``modprobe``.
    """
    try:
        proc = subprocess.run(
            ["modprobe", "--", module],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        return "modprobe not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        return proc.stderr.strip() or f"modprobe exited with status {proc.returncode}"
    return None


def find_block_device(name: str, sysfs: str = "/sys") -> str | None:
    """Kernel name of the block device on vDPA device ``name`` (e.g. ``"vda"``), or ``None``.

    Looks for ``<sysfs>/bus/vdpa/devices/<name>/virtio*/block/<disk>``, i.e. a
    device bound to ``virtio_vdpa`` whose virtio device is bound to virtio_blk.
    ``ValueError`` if ``name`` cannot be a device name (empty, ``/``, ``..``).
    """
    found = _find_block_dir(_device_dir(sysfs, name))
    return found.name if found is not None else None


def find_vhost_device(name: str, sysfs: str = "/sys") -> str | None:
    """Name of the vhost-vdpa char device of vDPA device ``name`` (``"vhost-vdpa-0"``), or ``None``.

    Looks for ``<sysfs>/bus/vdpa/devices/<name>/vhost-vdpa-N`` (bound to ``vhost_vdpa``).
    """
    found = _find_vhost_dir(_device_dir(sysfs, name))
    return found.name if found is not None else None


def find_attached(name: str, sysfs: str = "/sys", dev: str = "/dev") -> AttachedDevice | None:
    """Where vDPA device ``name`` is attached already, or ``None`` if it is not.

    For a daemon re-attaching to a device its predecessor left behind: the
    vDPA device and its binding survive the process. ``ENODEV``
    :class:`BindingError` if it exists but is bound to no driver or has no node.
    """
    device_dir = _device_dir(sysfs, name)
    if not device_dir.is_dir():
        return None
    driver = _bound_driver(device_dir)
    if driver == "virtio_vdpa":
        block = _find_block_dir(device_dir)
        if block is not None:
            return AttachedDevice(name, "virtio_vdpa", str(Path(dev, block.name)), str(block))
    elif driver == "vhost_vdpa":
        vhost = _find_vhost_dir(device_dir)
        if vhost is not None:
            return AttachedDevice(name, "vhost_vdpa", str(Path(dev, vhost.name)))
    raise BindingError(errno.ENODEV, name, f"vdpa device {name} exists but is bound to "
                       f"{driver or 'no driver'} with no device node")


def attach(
    name: str,
    driver: Driver,
    client: VdpaDeviceControl,
    sysfs: str = "/sys",
    timeout: float = 10.0,
    *,
    mgmtdev: str = "vduse",
    dev: str = "/dev",
    modprobe: Callable[[str], str | None] = run_modprobe,
) -> AttachedDevice:
    """Create vDPA device ``name`` on ``mgmtdev`` and bind it to ``driver``, deterministically.

    Steps (see the module docstring for why): ensure the driver is registered
    (``modprobe`` once if ``<sysfs>/bus/vdpa/drivers/<driver>`` is missing);
    with ``drivers_autoprobe`` temporarily 0, ``client.dev_add(name, mgmtdev)`` and
    write ``driver_override``; restore ``drivers_autoprobe``; write ``name`` to
    ``drivers_probe``; then poll for up to ``timeout`` seconds until the device is
    bound to ``driver`` and its node exists under ``dev`` (``virtio_vdpa``: the
    virtio-blk disk ``<dev>/vdX``; ``vhost_vdpa``: ``<dev>/vhost-vdpa-N``; if the
    node is a device node its major:minor must match sysfs).

    ``sysfs``, ``dev`` and ``modprobe`` are injectable for tests.

    Raises :class:`BindingError` (``ENOENT`` if the driver module cannot be
    loaded, ``ENODEV`` if the driver does not bind, ``ETIMEDOUT`` if the device
    node does not appear, or a sysfs errno) or the client's error (e.g.
    :class:`~pyvduse.netlink.NetlinkError`) from ``dev_add``. On any failure
    after a successful ``dev_add`` the device is deleted with ``dev_del`` before
    the error propagates (a ``dev_del`` failure is logged and added as a note),
    so nothing is left behind. ``ValueError`` for an invalid name or driver.
    """
    _check_name(name)
    if driver not in get_args(Driver):
        raise ValueError(f"unknown vdpa bus driver {driver!r}; expected one of {get_args(Driver)}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    bus = Path(sysfs, "bus", "vdpa")
    _ensure_driver(bus, name, driver, modprobe)

    added = False
    outcome_unknown = False
    try:
        with _AUTOPROBE_LOCK, _autoprobe_disabled(bus, name):
            try:
                client.dev_add(name, mgmtdev)
            except NetlinkError as exc:
                # A timed-out DEV_NEW may still have created the device.
                outcome_unknown = exc.errno == errno.ETIMEDOUT
                raise
            added = True
            _write_attr(bus / "devices" / name / "driver_override", driver, name)
        deadline = time.monotonic() + timeout
        _probe(bus, name, driver, deadline)
        return _wait_for_node(bus, name, driver, Path(dev), deadline)
    except BaseException as exc:
        if added or outcome_unknown:
            _undo_add(client, name, exc, quiet=not added)
        raise


def detach(name: str, client: VdpaDeviceControl, *, missing_ok: bool = False) -> None:
    """Delete vDPA device ``name`` (``VDPA_CMD_DEV_DEL``), unbinding its driver.

    The driver's remove runs synchronously (a VDUSE reset message the daemon
    must still answer). With ``missing_ok``, a device that does not exist
    (``ENODEV``) is not an error. Other errors propagate from the client.
    """
    _check_name(name)
    try:
        client.dev_del(name)
    except OSError as exc:
        if not (missing_ok and exc.errno == errno.ENODEV):
            raise


# ---------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid vdpa device name {name!r}")


def _device_dir(sysfs: str, name: str) -> Path:
    _check_name(name)
    return Path(sysfs, "bus", "vdpa", "devices", name)


def _find_block_dir(device_dir: Path) -> Path | None:
    found = sorted(device_dir.glob("virtio*/block/*"))
    return found[0] if found else None


def _find_vhost_dir(device_dir: Path) -> Path | None:
    found = sorted(device_dir.glob("vhost-vdpa-*"))
    return found[0] if found else None


def _ensure_driver(
    bus: Path, name: str, driver: str, modprobe: Callable[[str], str | None]
) -> None:
    driver_dir = bus / "drivers" / driver
    if driver_dir.is_dir():
        return
    reason = modprobe(driver)
    if driver_dir.is_dir():
        return
    detail = f" ({reason})" if reason else ""
    raise BindingError(
        errno.ENOENT,
        name,
        f"vdpa bus driver {driver} is not available: {driver_dir} is missing and "
        f"`modprobe {driver}` did not provide it{detail}; load module {driver} "
        f"(kernel needs {_DRIVER_KCONFIG[driver]} and CONFIG_VDPA)",
    )


def _read_attr(path: Path, name: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise BindingError(
            exc.errno or errno.EIO, name, f"cannot read {path}: {exc.strerror}"
        ) from exc


def _write_attr(path: Path, value: str, name: str) -> None:
    """Write ``value`` to an existing sysfs attribute (never creates a file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise BindingError(
            exc.errno or errno.EIO, name, f"cannot open {path}: {exc.strerror}"
        ) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise BindingError(
            exc.errno or errno.EIO, name, f"writing {value!r} to {path} failed: {exc.strerror}"
        ) from exc
    finally:
        os.close(fd)


@contextlib.contextmanager
def _autoprobe_disabled(bus: Path, name: str) -> Iterator[None]:
    """Set ``drivers_autoprobe`` to 0 for the ``with`` body, then restore its old value."""
    path = bus / "drivers_autoprobe"
    old = _read_attr(path, name)
    if old == "0":
        yield
        return
    _write_attr(path, "0", name)
    try:
        yield
    finally:
        try:
            _write_attr(path, old, name)
        except BindingError as exc:
            log.error("%s: could not restore %s to %r: %s", name, path, old, exc)


def _bound_driver(device_dir: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(device_dir / "driver"))
    except OSError:
        return None


def _probe(bus: Path, name: str, driver: str, deadline: float) -> None:
    """Ask the bus to probe ``name`` and wait until it is bound to ``driver``."""
    device_dir = bus / "devices" / name
    _write_attr(bus / "drivers_probe", name, name)
    unbound_other = False
    while True:
        current = _bound_driver(device_dir)
        if current == driver:
            return
        if current is not None and not unbound_other:
            # Bound elsewhere before the override took effect: move it.
            log.warning("%s: bound to %s, rebinding to %s", name, current, driver)
            _write_attr(bus / "drivers" / current / "unbind", name, name)
            _write_attr(bus / "drivers_probe", name, name)
            unbound_other = True
            continue
        if time.monotonic() >= deadline:
            state = f"bound to {current}" if current else "not bound to any driver"
            raise BindingError(
                errno.ENODEV,
                name,
                f"vdpa device did not bind to {driver} ({state}); the driver's probe "
                "may have failed, see the kernel log",
            )
        time.sleep(_POLL_INTERVAL)


def _node_ready(node: Path, sysfs_dir: Path) -> bool:
    """Whether ``node`` exists and, if it is a device node, matches ``sysfs_dir/dev``."""
    try:
        st = os.stat(node)
    except OSError:
        return False
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return True  # not a device node (tests, unusual setups): existence suffices
    try:
        major, minor = (int(x) for x in (sysfs_dir / "dev").read_text().strip().split(":"))
    except (OSError, ValueError):
        return True
    return os.major(st.st_rdev) == major and os.minor(st.st_rdev) == minor


def _wait_for_node(
    bus: Path, name: str, driver: Driver, dev: Path, deadline: float
) -> AttachedDevice:
    device_dir = bus / "devices" / name
    while True:
        if driver == "virtio_vdpa":
            found = _find_block_dir(device_dir)
        else:
            found = _find_vhost_dir(device_dir)
        if found is not None:
            node = dev / found.name
            if _node_ready(node, found):
                return AttachedDevice(
                    name=name,
                    driver=driver,
                    dev_path=str(node),
                    sysfs_block=str(found) if driver == "virtio_vdpa" else None,
                )
        if time.monotonic() >= deadline:
            raise BindingError(errno.ETIMEDOUT, name, _diagnose(device_dir, driver, dev, found))
        time.sleep(_POLL_INTERVAL)


def _diagnose(device_dir: Path, driver: Driver, dev: Path, found: Path | None) -> str:
    if found is not None:
        return f"{dev / found.name} did not appear (is devtmpfs mounted and udev running?)"
    if driver == "vhost_vdpa":
        return f"vhost_vdpa is bound but no vhost-vdpa-N device appeared under {device_dir}"
    virtio = sorted(device_dir.glob("virtio*"))
    if not virtio:
        return f"virtio_vdpa is bound but no virtio device appeared under {device_dir}"
    vdrv = _bound_driver(virtio[0])
    if vdrv is None:
        return (
            f"virtio device {virtio[0].name} is not bound to a driver "
            "(is module virtio_blk loaded?)"
        )
    return f"virtio device {virtio[0].name} is bound to {vdrv} but no block device appeared"


def _undo_add(client: VdpaDeviceControl, name: str, exc: BaseException, *, quiet: bool) -> None:
    """Delete the device added by a failed :func:`attach`, keeping ``exc`` the primary error."""
    try:
        client.dev_del(name)
    except Exception as del_exc:
        if quiet:
            return  # DEV_NEW's outcome was unknown; most likely nothing to delete
        log.error("%s: cleanup dev_del after failed attach failed: %s", name, del_exc)
        exc.add_note(f"cleanup dev_del({name!r}) also failed: {del_exc}")
