"""virtio-blk geometry, offered feature bits and config space, derived from a backend."""

from __future__ import annotations

from dataclasses import dataclass

from pyvduse.backends.base import Backend
from pyvduse.errors import ConfigError
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import MAX_QUEUE_SIZE, is_valid_queue_size

MAX_QUEUES = 64
DEFAULT_QUEUE_SIZE = 256
# Largest discard / write-zeroes request, in sectors: 32 MiB keeps one request short.
MAX_DISCARD_SECTORS = 1 << 16
MAX_WRITE_ZEROES_SECTORS = 1 << 16
SERIAL_MAX = v.VIRTIO_BLK_ID_BYTES


def _feature(bit: int) -> int:
    return 1 << bit


@dataclass(frozen=True)
class BlkConfig:
    """Everything the driver is told about a virtio-blk device.

    ``capacity`` is in bytes and must be a multiple of ``logical_block_size``.
    Build one with :meth:`for_backend`, which validates user input.
    """

    capacity: int
    logical_block_size: int = 512
    num_queues: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    serial: str = ""
    readonly: bool = False
    flush: bool = True
    discard: bool = False
    write_zeroes: bool = False
    event_idx: bool = True
    indirect: bool = True

    @classmethod
    def for_backend(
        cls,
        backend: Backend,
        *,
        logical_block_size: int = 512,
        num_queues: int = 1,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        serial: str = "",
        readonly: bool = False,
    ) -> BlkConfig:
        """Derive a config from what ``backend`` can do; raise :class:`ConfigError` on bad input."""
        if logical_block_size < 512 or logical_block_size > 65536 or (
            logical_block_size & (logical_block_size - 1)
        ):
            raise ConfigError(
                f"logical block size {logical_block_size} must be a power of two "
                "from 512 to 65536")
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ConfigError(f"number of queues {num_queues} must be from 1 to {MAX_QUEUES}")
        if not is_valid_queue_size(queue_size) or queue_size < 4:
            raise ConfigError(
                f"queue size {queue_size} must be a power of two from 4 to {MAX_QUEUE_SIZE}")
        if len(serial.encode()) > SERIAL_MAX:
            raise ConfigError(f"serial {serial!r} is longer than {SERIAL_MAX} bytes")
        size = backend.size()
        capacity = size - size % logical_block_size
        if capacity <= 0:
            raise ConfigError(
                f"backend size {size} bytes holds no {logical_block_size}-byte block")
        readonly = readonly or not backend.can_write
        return cls(
            capacity=capacity,
            logical_block_size=logical_block_size,
            num_queues=num_queues,
            queue_size=queue_size,
            serial=serial,
            readonly=readonly,
            flush=not readonly,
            discard=not readonly and backend.can_discard,
            write_zeroes=not readonly and backend.can_write_zeroes,
        )

    @property
    def seg_max(self) -> int:
        """Data segments per request: the chain holds the header and status too."""
        return self.queue_size - 2

    @property
    def features(self) -> int:
        """Device and ring feature bits to offer; a transport adds its own
        (VDUSE: ``VIRTIO_F_ACCESS_PLATFORM``)."""
        bits = (
            _feature(v.VIRTIO_F_VERSION_1)
            | _feature(v.VIRTIO_BLK_F_SEG_MAX)
            | _feature(v.VIRTIO_BLK_F_BLK_SIZE)
            | _feature(v.VIRTIO_BLK_F_TOPOLOGY)
        )
        if self.event_idx:
            bits |= _feature(v.VIRTIO_RING_F_EVENT_IDX)
        if self.indirect:
            bits |= _feature(v.VIRTIO_RING_F_INDIRECT_DESC)
        if self.num_queues > 1:
            bits |= _feature(v.VIRTIO_BLK_F_MQ)
        if self.readonly:
            bits |= _feature(v.VIRTIO_BLK_F_RO)
        if self.flush:
            bits |= _feature(v.VIRTIO_BLK_F_FLUSH)
        if self.discard:
            bits |= _feature(v.VIRTIO_BLK_F_DISCARD)
        if self.write_zeroes:
            bits |= _feature(v.VIRTIO_BLK_F_WRITE_ZEROES)
        return bits

    @property
    def sectors_per_block(self) -> int:
        """512-byte sectors in one logical block."""
        return self.logical_block_size >> v.VIRTIO_BLK_SECTOR_SHIFT

    def config_space(self) -> bytes:
        """The ``struct virtio_blk_config`` bytes (little-endian)."""
        per_block = self.sectors_per_block
        return v.virtio_blk_config.pack(
            self.capacity >> v.VIRTIO_BLK_SECTOR_SHIFT,  # capacity, 512-byte sectors
            0,  # size_max (not offered)
            self.seg_max,
            0, 0, 0,  # geometry (not offered)
            self.logical_block_size,
            0,  # physical_block_exp: physical block = logical block
            0,  # alignment_offset
            1,  # min_io_size, in logical blocks
            0,  # opt_io_size
            0,  # writeback (CONFIG_WCE is not allowed by VDUSE)
            self.num_queues,
            MAX_DISCARD_SECTORS if self.discard else 0,
            1 if self.discard else 0,  # max_discard_seg
            per_block if self.discard else 0,  # discard_sector_alignment
            MAX_WRITE_ZEROES_SECTORS if self.write_zeroes else 0,
            1 if self.write_zeroes else 0,  # max_write_zeroes_seg
            1 if self.write_zeroes and self.discard else 0,  # write_zeroes_may_unmap
        )
