"""A block export: one backend served as one VDUSE virtio-blk device, optionally attached.

An export owns its backend, its :class:`~pyvduse.device.VduseDevice` and its
vdpa attachment, and releases them in reverse order. It is the unit that a
daemon (the CLI today, an export registry with a control socket later)
creates and removes; nothing in it depends on ``main()``.
"""

from __future__ import annotations

import logging
import struct
from typing import Literal

from pyvduse.backends.base import Backend
from pyvduse.binding import AttachedDevice, attach, detach
from pyvduse.blk.config import BlkConfig
from pyvduse.blk.device import BlkDevice
from pyvduse.device import VduseDevice
from pyvduse.kernel import VduseKernel
from pyvduse.netlink import VdpaClient

log = logging.getLogger(__name__)

AttachMode = Literal["virtio", "vhost", "none"]
_DRIVERS: dict[str, Literal["virtio_vdpa", "vhost_vdpa"]] = {
    "virtio": "virtio_vdpa", "vhost": "vhost_vdpa"}


class BlkExport:
    """Serves ``backend`` as VDUSE device ``name`` under ``config``.

    :meth:`start` creates the device and, unless ``attach`` is ``"none"``,
    attaches it through vdpa to ``virtio_vdpa`` (a ``/dev/vdX`` on this host)
    or ``vhost_vdpa`` (a ``/dev/vhost-vdpa-N`` for a VMM). :meth:`stop`
    detaches, drains and destroys it and closes the backend. If :meth:`start`
    fails, everything it did is undone before the error propagates.
    """

    def __init__(self, name: str, backend: Backend, config: BlkConfig,
                 attach: AttachMode = "virtio", kernel: VduseKernel | None = None,
                 attach_timeout: float = 30.0, queue_threads: int = 1,
                 poll_max_ns: int = 0) -> None:
        self.name = name
        self.backend = backend
        self.config = config
        self.attach_mode: AttachMode = attach
        self.attach_timeout = attach_timeout
        self.model = BlkDevice(backend, config)
        self.device = VduseDevice(name, self.model, kernel, queue_threads=queue_threads,
                                  poll_max_ns=poll_max_ns)
        self.attached: AttachedDevice | None = None

    def start(self) -> AttachedDevice | None:
        """Create and attach; return where the device appeared (None if not attached)."""
        self.device.create()
        try:
            if self.attach_mode != "none":
                with VdpaClient() as client:
                    self.attached = attach(self.name, _DRIVERS[self.attach_mode], client,
                                           timeout=self.attach_timeout)
        except BaseException:
            self.device.destroy()
            raise
        return self.attached

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
        if capacity == config.capacity:
            return None
        if capacity <= 0:
            log.error("%s: the backend now reports %d bytes, no whole block; the device keeps "
                      "its size of %d bytes", self.name, size, config.capacity)
            return None
        sectors = struct.pack("<Q", capacity >> 9)
        if capacity > config.capacity:
            self.model.set_capacity(capacity)
            self.device.update_config(0, sectors)
        else:
            self.device.update_config(0, sectors)
            self.model.set_capacity(capacity)
        log.info("%s: resized from %d to %d bytes", self.name, config.capacity, capacity)
        return capacity

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
