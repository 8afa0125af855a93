"""vhost-user: serving virtio devices to a front-end (QEMU) over a Unix socket.

``protocol`` holds the wire format (constants, payload structs, per-request
rules), ``connection`` frames messages and file descriptors on the socket,
``memory`` maps the front-end's memory table for the rings, and ``inflight``
the shared buffer of ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``. Nothing here
knows about a particular device.
"""
