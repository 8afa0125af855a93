"""pyvduse: virtio devices in userspace through the Linux VDUSE driver.

The first device is virtio-blk: a block device whose storage is any
:class:`pyvduse.backends.Backend`.
"""

__version__ = "0.1.0"
