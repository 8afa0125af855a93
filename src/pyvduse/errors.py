"""The exception hierarchy of pyvduse.

Every error the library raises on purpose derives from :class:`PyvduseError`,
so callers (the CLI above all) can turn it into one clear line.
"""

from __future__ import annotations

import errno as errno_module
import os


class PyvduseError(Exception):
    """Base class of all pyvduse errors."""


class ConfigError(PyvduseError):
    """Invalid user configuration (CLI option, backend argument, device geometry)."""


class KernelError(PyvduseError):
    """A kernel call failed; names the operation and the device.

    ``str()`` reads like ``"vduse0: VDUSE_VQ_SETUP: Invalid argument"``.
    """

    def __init__(self, device: str, operation: str, errno: int, hint: str = "") -> None:
        self.device = device
        self.operation = operation
        self.errno = errno
        self.hint = hint
        text = f"{device}: {operation}: {os.strerror(errno)}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    @classmethod
    def from_oserror(
        cls, device: str, operation: str, exc: OSError, hint: str = ""
    ) -> KernelError:
        """Wrap ``exc`` (its errno, EIO if it has none)."""
        return cls(device, operation, exc.errno or errno_module.EIO, hint)


class VduseUnavailableError(PyvduseError):
    """The VDUSE driver is not present or not accessible on this host."""


class MemoryAccessError(PyvduseError):
    """A driver-supplied address range cannot be accessed as requested."""


class RingError(PyvduseError):
    """The driver put something malformed in a virtqueue."""


class BackendError(PyvduseError):
    """A storage backend failed; carries an errno like :class:`OSError`.

    Backends raise this (or any :class:`OSError`) to fail one request; the
    request then completes with an I/O error and the daemon carries on.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        super().__init__(message or os.strerror(errno))
