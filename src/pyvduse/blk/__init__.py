"""virtio-blk: the device model, independent of the transport (VDUSE, vhost-user)."""

from pyvduse.blk.config import BlkConfig
from pyvduse.blk.device import BlkDevice
from pyvduse.blk.handler import BlkHandler

__all__ = ["BlkConfig", "BlkDevice", "BlkHandler"]
