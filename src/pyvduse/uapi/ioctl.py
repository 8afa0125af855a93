"""The ``_IOC`` encoding of ``asm-generic/ioctl.h`` (x86_64, arm64, riscv)."""

from __future__ import annotations

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Return the request number ``_IOC(direction, type_, nr, size)``."""
    if not 0 <= size < (1 << IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {IOC_SIZEBITS} bits")
    return (
        (direction << IOC_DIRSHIFT)
        | (type_ << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )
