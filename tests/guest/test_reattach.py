"""The library API under the real driver: detach and re-attach one device (VM guest)."""

from __future__ import annotations

import os

from conftest import assert_gone, find_device_node
from test_blk_kernel import MiB, direct_io

from pyvduse.backends.memory import MemoryBackend
from pyvduse.binding import attach, detach
from pyvduse.blk import BlkConfig, BlkDevice
from pyvduse.device import VduseDevice
from pyvduse.netlink import VdpaClient


def test_detached_device_can_be_reattached() -> None:
    backend = MemoryBackend(8 * MiB)
    device = VduseDevice("pv-again", BlkDevice(backend, BlkConfig.for_backend(backend)))
    device.create()
    try:
        with VdpaClient() as client:
            first = attach("pv-again", "virtio_vdpa", client, timeout=60)
            direct_io(first.dev_path, 0, b"\x01" * 4096)
            detach("pv-again", client)
            assert not device.driver_ok.is_set()
            assert find_device_node("pv-again") == ""
            second = attach("pv-again", "virtio_vdpa", client, timeout=60)
            assert direct_io(second.dev_path, 0, length=4096) == b"\x01" * 4096
            direct_io(second.dev_path, 4096, b"\x02" * 4096)
            detach("pv-again", client)
    finally:
        device.destroy()
    assert backend.size() == 8 * MiB
    buf = bytearray(8192)
    backend.read(0, memoryview(buf))
    assert buf == b"\x01" * 4096 + b"\x02" * 4096
    assert_gone("pv-again")
    assert not os.path.exists("/dev/vduse/pv-again")
