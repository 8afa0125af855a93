"""Transcription of the virtio uapi headers this project needs.

Sources: ``linux/virtio_config.h``, ``linux/virtio_ring.h``, ``linux/virtio_ids.h``
and ``linux/virtio_blk.h``. Constants only; everything is little-endian on the wire.
"""

from __future__ import annotations

import struct

# virtio_ids.h
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2

# virtio_config.h: device status bits
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# virtio_config.h / virtio_ring.h: transport feature bits
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# virtio_ring.h: split ring layout
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

# struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; }
vring_desc = struct.Struct("<QIHH")
# struct vring_used_elem { le32 id; le32 len; }
vring_used_elem = struct.Struct("<II")
VRING_AVAIL_HEADER_SIZE = 4  # le16 flags; le16 idx
VRING_USED_HEADER_SIZE = 4  # le16 flags; le16 idx


def vring_desc_table_size(num: int) -> int:
    """Bytes of a descriptor table with ``num`` entries."""
    return vring_desc.size * num


def vring_avail_size(num: int) -> int:
    """Bytes of the avail ring incl. the ``used_event`` word (EVENT_IDX)."""
    return VRING_AVAIL_HEADER_SIZE + 2 * num + 2


def vring_used_size(num: int) -> int:
    """Bytes of the used ring incl. the ``avail_event`` word (EVENT_IDX)."""
    return VRING_USED_HEADER_SIZE + vring_used_elem.size * num + 2


# virtio_blk.h: feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# virtio_blk.h: request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1

# status byte
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_SECTOR_SHIFT = 9
VIRTIO_BLK_SECTOR_SIZE = 1 << VIRTIO_BLK_SECTOR_SHIFT

# struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
virtio_blk_outhdr = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
virtio_blk_discard_write_zeroes = struct.Struct("<QII")
# struct virtio_blk_config, up to and including write_zeroes_may_unmap + unused1[3] (60 bytes):
# capacity, size_max, seg_max, geometry{cylinders, heads, sectors}, blk_size,
# physical_block_exp, alignment_offset, min_io_size, opt_io_size, wce, unused0,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
virtio_blk_config = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
VIRTIO_BLK_CONFIG_CAPACITY_OFFSET = 0
