"""The virtio-blk device model: config, features and request handling in one object."""

from __future__ import annotations

from pyvduse.backends.base import Backend
from pyvduse.blk.config import BlkConfig
from pyvduse.blk.handler import BlkHandler
from pyvduse.uapi.virtio import VIRTIO_ID_BLOCK


class BlkDevice:
    """A virtio-blk device over ``backend``; satisfies :class:`pyvduse.device.DeviceModel`."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, backend: Backend, config: BlkConfig) -> None:
        self.backend = backend
        self.config = config
        self.handler = BlkHandler(backend, config)
        self.num_queues = config.num_queues
        self.queue_size = config.queue_size
        self.handle = self.handler.handle

    def set_capacity(self, capacity: int) -> None:
        """Serve ``capacity`` bytes from now on (the config space is the transport's job)."""
        self.handler.set_capacity(capacity)
        self.config = self.handler.config

    @property
    def features(self) -> int:
        """Feature bits offered to the driver."""
        return self.config.features

    def config_space(self) -> bytes:
        """``struct virtio_blk_config``."""
        return self.config.config_space()
