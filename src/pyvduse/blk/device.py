"""The virtio-blk device model: config, features and request handling in one object."""

from __future__ import annotations

import logging

from pyvduse.backends.base import Backend
from pyvduse.blk.config import BlkConfig
from pyvduse.blk.handler import BlkHandler
from pyvduse.metrics import ExportMetrics
from pyvduse.native import NativePlan
from pyvduse.uapi.virtio import VIRTIO_ID_BLOCK

log = logging.getLogger(__name__)


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
        cls = type(backend)
        #: Whether the backend batches (overrides plug or unplug): else no calls are made.
        self.batches = cls.plug is not Backend.plug or cls.unplug is not Backend.unplug
        #: How the compiled data path serves the queues (None: the Python path does).
        self.native: NativePlan | None = None
        #: What is counted of the requests (None: nothing, see :meth:`collect_metrics`).
        self.metrics: ExportMetrics | None = None

    def collect_metrics(self) -> ExportMetrics:
        """Count every request from now on (call it before the queues start: each
        queue's block is handed to it when it starts, see :mod:`pyvduse.metrics`)."""
        if self.metrics is None:
            self.metrics = ExportMetrics()
            self.handler.measure(self.metrics.requests)
            self.handle = self.handler.handle_measured
        return self.metrics

    def serve_natively(self) -> None:
        """Let the compiled data path serve the queues started from now on, if the
        backend offers it a target (see :mod:`pyvduse.native`)."""
        self.native = self.handler.native_plan()

    def plug(self) -> None:
        """A batch of requests begins on this thread (:meth:`Backend.plug`)."""
        try:
            self.backend.plug()
        except Exception:  # a backend bug must not stop the queue
            log.exception("backend %s: plug() failed", type(self.backend).__name__)

    def unplug(self) -> None:
        """The batch ends: the backend starts what it held (:meth:`Backend.unplug`)."""
        try:
            self.backend.unplug()
        except Exception:  # requests it held may never finish: say so, loudly
            log.exception("backend %s: unplug() failed; requests of this batch may never "
                          "complete", type(self.backend).__name__)

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
