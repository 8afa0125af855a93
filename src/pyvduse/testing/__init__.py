"""Test doubles for device and backend authors: driver memory, a mock virtio
driver and an in-process fake of the VDUSE kernel interface.

They let a :class:`pyvduse.device.VduseDevice` or a backend run under test
without a kernel: the device code is exactly the production code, only the
syscall seam (:mod:`pyvduse.kernel`) is replaced.
"""

from pyvduse.testing.fake_kernel import FakeChannel, FakeVduse
from pyvduse.testing.mock_driver import DriverMemory, MockSplitRing

__all__ = ["DriverMemory", "FakeChannel", "FakeVduse", "MockSplitRing"]
