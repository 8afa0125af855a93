"""A block export: one backend served as one VDUSE virtio-blk device, optionally attached.

An export owns its backend, its :class:`~pyvduse.device.VduseDevice`, its
inflight log and its vdpa attachment, and releases them in reverse order. It
is the unit that the export registry (:mod:`pyvduse.registry`) creates and
removes; nothing in it depends on ``main()``.

:meth:`BlkExport.start` creates the device, or, when a device of that name
exists already (its daemon died), recovers it: the inflight log must exist,
belong to that very kernel device, and record the options asked for now;
then the device is re-opened and its requests in flight resubmitted, and its
vdpa attachment (which survives the daemon) is taken over as it is.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from typing import Any, Literal, Protocol

from pyvduse.backends.base import Backend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.binding import AttachedDevice, attach, detach, find_attached
from pyvduse.blk.config import BlkConfig
from pyvduse.blk.device import BlkDevice
from pyvduse.device import TRANSPORT_FEATURES, VduseDevice
from pyvduse.errors import ConfigError, KernelError, PyvduseError
from pyvduse.inflight import InflightLog
from pyvduse.kernel import VduseKernel
from pyvduse.netlink import VdpaClient
from pyvduse.queue_worker import QueueWorker
from pyvduse.virtio_device import VirtioDevice

log = logging.getLogger(__name__)

AttachMode = Literal["virtio", "vhost", "none"]
_DRIVERS: dict[str, Literal["virtio_vdpa", "vhost_vdpa"]] = {
    "virtio": "virtio_vdpa", "vhost": "vhost_vdpa"}


def _label(backend: Backend) -> str:
    """A backend as messages name it: by its name or class, not by a thread pool around it."""
    if isinstance(backend, ThreadPoolBackend):
        backend = backend.backend
    return backend.name or type(backend).__name__


def device_identity(name: str, model: BlkDevice) -> dict[str, Any]:
    """What a restarted daemon must agree on with the device it re-attaches to."""
    config = model.config
    return {"name": name, "type": "virtio-blk", "num_queues": config.num_queues,
            "queue_size": config.queue_size, "logical_block_size": config.logical_block_size,
            "readonly": config.readonly, "serial": config.serial,
            "features": f"{config.features | TRANSPORT_FEATURES:#x}"}


class ServedDevice(Protocol):
    """What an export's transport device offers the registry, whatever the transport."""

    driver_ok: threading.Event
    failed: threading.Event
    failure: str
    inflight_log: InflightLog | None

    @property
    def workers(self) -> dict[int, QueueWorker]: ...

    @property
    def served(self) -> dict[int, int]: ...

    @property
    def virtio(self) -> VirtioDevice: ...

    def update_config(self, offset: int, data: bytes) -> None: ...


class Export:
    """One backend served as one virtio-blk device over some transport.

    The transport-neutral half of an export: the backend, the device model
    (which owns the config), resizing. Subclasses add the transport:
    :class:`BlkExport` (VDUSE) and
    :class:`pyvduse.vhost_user.export.VhostUserExport`.
    """

    device: ServedDevice

    def __init__(self, name: str, backend: Backend, config: BlkConfig) -> None:
        self.name = name
        self.backend = backend
        self.model = BlkDevice(backend, config)
        self.attached: AttachedDevice | None = None
        #: True when :meth:`start` re-attached to a device a previous daemon left.
        self.recovered = False
        #: Requests resubmitted by that recovery.
        self.resubmitted = 0
        #: Which data path serves the queues: "native", or "python" with the reason when
        #: the native one was not to be had (see :func:`pyvduse.native.choose`).
        self.datapath = "python"
        #: The inflight log's path (None: none kept).
        self.inflight_log_path: str | None = None

    @property
    def config(self) -> BlkConfig:
        """The device's current config (the model owns it; it changes on resize)."""
        return self.model.config

    def start(self) -> AttachedDevice | None:
        """Start serving; return where the device is attached (None: not attached)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving and close the backend."""
        raise NotImplementedError

    def refresh_size(self) -> int | None:
        """Read the backend's size again; if it changed, serve and announce the new one.

        The new capacity (rounded down to whole logical blocks) is written to
        the config space and the driver gets a config interrupt, as a disk
        resize does. Growing, requests may use the new blocks before the driver
        hears of them; shrinking, the driver hears first. Returns the new
        capacity in bytes, or None if it did not change (or the new size holds
        no block: that is logged and ignored).
        """
        config = self.model.config
        size = self.backend.size()
        capacity = size - size % config.logical_block_size
        log_ = self.device.inflight_log
        if capacity == config.capacity and (log_ is None or log_.capacity == capacity):
            return None
        if capacity <= 0:
            log.error("%s: the backend now reports %d bytes, no whole block; the device keeps "
                      "its size of %d bytes", self.name, size, config.capacity)
            return None
        self._set_capacity(capacity)
        return capacity

    def _set_capacity(self, capacity: int) -> None:
        """Serve and announce ``capacity``: growing, serve first; shrinking, announce first."""
        old = self.model.config.capacity
        sectors = struct.pack("<Q", capacity >> 9)
        if capacity > old:
            self.model.set_capacity(capacity)
            self.device.update_config(0, sectors)
        else:
            self.device.update_config(0, sectors)
            self.model.set_capacity(capacity)
        if self.device.inflight_log is not None:
            self.device.inflight_log.capacity = capacity
        if capacity != old:
            log.info("%s: resized from %d to %d bytes", self.name, old, capacity)

    def resize(self, size: int, *, shrink: bool = False) -> int:
        """Make the export ``size`` bytes: resize the backend and tell the driver.

        ``size`` must be a whole number of logical blocks. Shrinking over data
        is refused by the backend unless ``shrink``; the driver hears of a
        smaller size before the backend shrinks (no request reaches past the
        new end), and of a larger one after it grew. Returns the new capacity.
        """
        block = self.config.logical_block_size
        if size <= 0 or size % block:
            raise ConfigError(f"{self.name}: size {size} is not a positive multiple of the "
                              f"logical block size {block}")
        old = self.config.capacity
        if size != self.backend.size():
            if not self.backend.can_resize:
                raise ConfigError(f"{self.name}: the {_label(self.backend)} backend "
                                  "cannot be resized")
            if size < old:
                self._set_capacity(size)
            try:
                self.backend.resize(size, shrink=shrink)
            except BaseException:
                if size < old:
                    self._set_capacity(old)
                raise
        self.refresh_size()
        return self.config.capacity


class BlkExport(Export):
    """Serves ``backend`` as VDUSE device ``name`` under ``config``.

    :meth:`start` creates (or recovers, see the module docstring) the
    device and, unless ``attach`` is ``"none"``, attaches it through vdpa to
    ``virtio_vdpa`` (a ``/dev/vdX`` on this host) or ``vhost_vdpa`` (a
    ``/dev/vhost-vdpa-N`` for a VMM). :meth:`stop` detaches, drains and
    destroys it, removes its inflight log and closes the backend. If
    :meth:`start` fails, everything it did is undone before the error
    propagates, and a device it was recovering is left as it found it.

    ``inflight_log`` is the log's path; ``None`` serves without one (no
    crash recovery). ``trust_used_index`` (test-only) recovers a device
    without a log as if its requests had completed in order.
    """

    def __init__(self, name: str, backend: Backend, config: BlkConfig,
                 attach: AttachMode = "virtio", kernel: VduseKernel | None = None,
                 attach_timeout: float = 30.0, queue_threads: int = 1,
                 poll_max_ns: int = 0, inflight_log: str | None = None,
                 trust_used_index: bool = False) -> None:
        super().__init__(name, backend, config)
        self.attach_mode: AttachMode = attach
        self.attach_timeout = attach_timeout
        self.inflight_log_path = inflight_log
        self.trust_used_index = trust_used_index
        self.device: VduseDevice = VduseDevice(name, self.model, kernel,
                                               queue_threads=queue_threads,
                                               poll_max_ns=poll_max_ns)

    def start(self) -> AttachedDevice | None:
        """Create or recover, then attach; return where the device is (None if not attached)."""
        if self.device.kernel.device_exists(self.name):
            self._recover()
        else:
            self._create()
        return self.attached

    def _create(self) -> None:
        log_ = None
        if self.inflight_log_path is not None:
            log_ = InflightLog.create(self.inflight_log_path, self.config.num_queues,
                                      self.config.queue_size,
                                      device_identity(self.name, self.model),
                                      self.config.capacity)
        self.device.inflight_log = log_
        try:
            self.device.create()
        except BaseException:
            if log_ is not None:
                log_.remove()
            raise
        try:
            if log_ is not None:
                log_.kernel_id = self.device.kernel.device_id(self.name)
            if self.attach_mode != "none":
                with VdpaClient() as client:
                    self.attached = attach(self.name, _DRIVERS[self.attach_mode], client,
                                           timeout=self.attach_timeout)
        except BaseException:
            self.device.destroy()
            raise

    def _open_log(self) -> InflightLog | None:
        """The log of the existing device, checked against it and against our options."""
        path = self.inflight_log_path
        name = self.name
        if path is None:
            if self.trust_used_index:
                return None
            raise PyvduseError(
                f"{name}: a VDUSE device with this name exists and no inflight log is "
                "configured to recover it")
        if not os.path.exists(path):
            raise PyvduseError(
                f"{name}: a VDUSE device with this name exists but its inflight log {path} "
                "does not: it was not created by pyvduse with this log, so its requests in "
                "flight cannot be recovered; stop whatever serves it, or remove it "
                f"('vdpa dev del {name}', then destroy it) before starting again")
        log_ = InflightLog.open(path)
        try:
            kernel_id = self.device.kernel.device_id(name)
            if log_.kernel_id and log_.kernel_id != kernel_id:
                raise PyvduseError(
                    f"{name}: inflight log {path} is stale: it belongs to an earlier device "
                    f"of this name ({log_.kernel_id}, the device now is {kernel_id}); it "
                    "cannot say what this one has in flight")
            capacity = log_.capacity if self.backend.resizable else self.config.capacity
            differences = log_.mismatches(device_identity(name, self.model), capacity)
            if differences:
                raise ConfigError(
                    f"{name}: the device exists with other options: "
                    + "; ".join(differences)
                    + ". Restart with the options it was created with")
            if not log_.kernel_id:
                log_.kernel_id = kernel_id
        except BaseException:
            log_.close()
            raise
        return log_

    def _recover(self) -> None:
        log_ = self._open_log()
        self.device.inflight_log = log_
        try:
            self.resubmitted = self.device.reopen(trust_used_index=log_ is None)
        except BaseException as exc:
            if log_ is not None:
                log_.close()
            self.device.inflight_log = None
            if isinstance(exc, KernelError) and exc.errno == errno.EBUSY:
                raise PyvduseError(f"{self.name}: a VDUSE device with this name exists and "
                                   "another process serves it") from None
            raise
        self.recovered = True
        try:
            self.attached = find_attached(self.name)
            if self.attached is None and self.attach_mode != "none":
                with VdpaClient() as client:
                    self.attached = attach(self.name, _DRIVERS[self.attach_mode], client,
                                           timeout=self.attach_timeout)
            elif (self.attached is not None and self.attach_mode != "none"
                  and self.attached.driver != _DRIVERS[self.attach_mode]):
                log.warning("%s: the device is attached to %s, kept as it is", self.name,
                            self.attached.driver)
            if log_ is not None and log_.capacity != self.config.capacity:
                self.refresh_size()  # a resizable backend changed while no daemon served it
        except BaseException:
            self.device.abandon()
            raise

    def stop(self) -> None:
        """Detach (serving the driver's reset meanwhile), destroy, close the backend."""
        try:
            if self.attached is not None:
                with VdpaClient() as client:
                    detach(self.name, client, missing_ok=True)
                self.attached = None
            self.device.destroy()
        finally:
            self.backend.close()
