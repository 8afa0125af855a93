"""A block export served over vhost-user: a backend, the virtio-blk model, a socket."""

from __future__ import annotations

from pyvduse.backends.base import Backend
from pyvduse.binding import AttachedDevice
from pyvduse.blk.config import BlkConfig
from pyvduse.export import Export
from pyvduse.vhost_user.server import VhostUserServer


class VhostUserExport(Export):
    """Serves ``backend`` as a vhost-user-blk device on the UNIX socket ``path``.

    :meth:`start` listens on the socket (front-ends connect, leave and come
    back as they like); :meth:`stop` waits (bounded) for the requests in
    flight, removes the socket and closes the backend. Nothing is attached
    and no inflight log is kept: the front-end owns the rings.
    """

    def __init__(self, name: str, backend: Backend, config: BlkConfig, path: str, *,
                 queue_threads: int = 1, poll_max_ns: int = 0) -> None:
        super().__init__(name, backend, config)
        self.socket_path = path
        self.device: VhostUserServer = VhostUserServer(
            name, self.model, path, queue_threads=queue_threads, poll_max_ns=poll_max_ns)

    def start(self) -> AttachedDevice | None:
        """Listen on the socket; nothing is attached (returns None)."""
        self.device.start()
        return None

    def stop(self) -> None:
        """Stop serving, remove the socket, close the backend."""
        try:
            self.device.destroy()
        finally:
            self.backend.close()
