"""Pin the VDUSE / virtio ABI: ioctl numbers, struct sizes and field offsets of linux/vduse.h."""

from __future__ import annotations

import struct

import pytest

from pyvduse.uapi import ioctl
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v

# -- ioctl request numbers (section 3, x86_64 values computed against the real headers) ----------

IOCTLS = [
    ("VDUSE_GET_API_VERSION", 0x80088100),
    ("VDUSE_SET_API_VERSION", 0x40088101),
    ("VDUSE_CREATE_DEV", 0x41508102),
    ("VDUSE_DESTROY_DEV", 0x41008103),
    ("VDUSE_IOTLB_GET_FD", 0xC0208110),
    ("VDUSE_DEV_GET_FEATURES", 0x80088111),
    ("VDUSE_DEV_SET_CONFIG", 0x40088112),
    ("VDUSE_DEV_INJECT_CONFIG_IRQ", 0x00008113),
    ("VDUSE_VQ_SETUP", 0x40208114),
    ("VDUSE_VQ_GET_INFO", 0xC0308115),
    ("VDUSE_VQ_SETUP_KICKFD", 0x40088116),
    ("VDUSE_VQ_INJECT_IRQ", 0x40048117),
    ("VDUSE_IOTLB_REG_UMEM", 0x40308118),
    ("VDUSE_IOTLB_DEREG_UMEM", 0x40308119),
    ("VDUSE_IOTLB_GET_INFO", 0xC030811A),
]


@pytest.mark.parametrize(("name", "value"), IOCTLS, ids=[n for n, _ in IOCTLS])
def test_ioctl_request_numbers(name: str, value: int) -> None:
    assert getattr(u, name) == value


def test_ioctl_request_numbers_are_distinct() -> None:
    values = [getattr(u, name) for name, _ in IOCTLS]
    assert len(set(values)) == len(values)


def test_ioc_encoding() -> None:
    assert ioctl.ioc(ioctl.IOC_NONE, 0x81, 0x13, 0) == 0x00008113
    assert ioctl.ioc(ioctl.IOC_READ | ioctl.IOC_WRITE, 0x81, 0x1B, 80) == 0xC050811B
    assert ioctl.ioc(ioctl.IOC_WRITE, 0x81, 0x02, (1 << 14) - 1) == 0x7FFF8102
    assert (ioctl.IOC_NRSHIFT, ioctl.IOC_TYPESHIFT, ioctl.IOC_SIZESHIFT, ioctl.IOC_DIRSHIFT) == (
        0, 8, 16, 30)


@pytest.mark.parametrize("size", [-1, 1 << 14, 1 << 20])
def test_ioc_rejects_sizes_that_do_not_fit(size: int) -> None:
    with pytest.raises(ValueError):
        ioctl.ioc(ioctl.IOC_WRITE, 0x81, 0x02, size)


# -- struct sizes (section 4) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (u.vduse_dev_config, 336),
        (u.vduse_iotlb_entry, 32),
        (u.vduse_config_data, 8),
        (u.vduse_vq_config, 32),
        (u.vduse_vq_info, 48),
        (u.vduse_vq_eventfd, 8),
        (u.vduse_iova_umem, 48),
        (u.vduse_iova_info, 48),
        (u.vduse_vq_index, 4),
    ],
    ids=["dev_config", "iotlb_entry", "config_data", "vq_config", "vq_info", "vq_eventfd",
         "iova_umem", "iova_info", "vq_index"],
)
def test_struct_sizes(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


def test_request_and_response_sizes() -> None:
    assert u.VDUSE_DEV_REQUEST_SIZE == 152
    assert u.VDUSE_DEV_RESPONSE_SIZE == 152
    assert u.vduse_dev_request_header.size == 24
    assert u.vduse_dev_response_header.size == 24
    assert u.VDUSE_REQUEST_PAYLOAD_OFFSET == 24


def _ioc_size(req: int) -> int:
    return (req >> ioctl.IOC_SIZESHIFT) & ((1 << ioctl.IOC_SIZEBITS) - 1)


def test_ioctl_sizes_match_structs() -> None:
    size = _ioc_size
    assert size(u.VDUSE_CREATE_DEV) == u.vduse_dev_config.size
    assert size(u.VDUSE_DESTROY_DEV) == u.VDUSE_NAME_MAX
    assert size(u.VDUSE_IOTLB_GET_FD) == u.vduse_iotlb_entry.size
    assert size(u.VDUSE_VQ_GET_INFO) == u.vduse_vq_info.size
    assert size(u.VDUSE_VQ_INJECT_IRQ) == u.vduse_vq_index.size


# -- field offsets: pack distinct values, look at the bytes -----------------------------------


def _u(raw: bytes | bytearray, offset: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, raw, offset)[0])


def test_vduse_dev_config_offsets() -> None:
    raw = u.vduse_dev_config.pack(b"dev0", 0x11223344, 0x55667788, 0x0102030405060708,
                                  0x0A0B0C0D, 0x1000, 0xCAFE)
    assert raw[:4] == b"dev0" and raw[4:256] == bytes(252)
    assert _u(raw, 256, "I") == 0x11223344  # vendor_id
    assert _u(raw, 260, "I") == 0x55667788  # device_id
    assert _u(raw, 264, "Q") == 0x0102030405060708  # features
    assert _u(raw, 272, "I") == 0x0A0B0C0D  # vq_num
    assert _u(raw, 276, "I") == 0x1000  # vq_align
    assert raw[280:332] == bytes(52)  # reserved[13] must be zero
    assert _u(raw, 332, "I") == 0xCAFE  # config_size


def test_vduse_iotlb_entry_offsets() -> None:
    raw = u.vduse_iotlb_entry.pack(0x1111, 0x2222, 0x3333, 0x3)
    assert (_u(raw, 0, "Q"), _u(raw, 8, "Q"), _u(raw, 16, "Q")) == (0x1111, 0x2222, 0x3333)
    assert raw[24] == 3 and raw[25:] == bytes(7)
    # the kernel's answer parses back
    assert u.vduse_iotlb_entry.unpack(raw) == (0x1111, 0x2222, 0x3333, 3)


def test_vduse_vq_config_offsets() -> None:
    raw = u.vduse_vq_config.pack(7, 0x1234)
    assert _u(raw, 0, "I") == 7
    assert _u(raw, 4, "H") == 0x1234
    assert raw[6:] == bytes(26)


def test_vduse_vq_info_offsets() -> None:
    raw = u.vduse_vq_info.pack(3, 256, 0xD000, 0xA000, 0xB000, 0xBEEF, 1)
    assert _u(raw, 0, "I") == 3  # index
    assert _u(raw, 4, "I") == 256  # num
    assert _u(raw, 8, "Q") == 0xD000  # desc_addr
    assert _u(raw, 16, "Q") == 0xA000  # driver_addr
    assert _u(raw, 24, "Q") == 0xB000  # device_addr
    assert _u(raw, 32, "H") == 0xBEEF  # split.avail_index
    assert raw[34:40] == bytes(6)
    assert raw[40] == 1  # ready
    assert raw[41:] == bytes(7)


def test_vduse_vq_eventfd_and_config_data_offsets() -> None:
    raw = u.vduse_vq_eventfd.pack(5, -1)
    assert _u(raw, 0, "I") == 5 and _u(raw, 4, "i") == -1
    assert raw[4:] == b"\xff\xff\xff\xff"
    raw = u.vduse_config_data.pack(0x10, 0x20)
    assert (_u(raw, 0, "I"), _u(raw, 4, "I")) == (0x10, 0x20)


def test_vduse_iova_umem_and_info_offsets() -> None:
    for layout in (u.vduse_iova_umem, u.vduse_iova_info):
        raw = layout.pack(0x1000, 0x2000, 0x3000)
        assert (_u(raw, 0, "Q"), _u(raw, 8, "Q"), _u(raw, 16, "Q")) == (0x1000, 0x2000, 0x3000)
        assert raw[24:] == bytes(24)


def test_request_payload_offsets() -> None:
    request = bytearray(u.VDUSE_DEV_REQUEST_SIZE)
    u.vduse_dev_request_header.pack_into(request, 0, u.VDUSE_UPDATE_IOTLB, 0x12345678)
    u.vduse_iova_range.pack_into(request, u.VDUSE_REQUEST_PAYLOAD_OFFSET, 0x1000, 0xFFFF)
    assert _u(request, 0, "I") == u.VDUSE_UPDATE_IOTLB
    assert _u(request, 4, "I") == 0x12345678
    assert request[8:24] == bytes(16)  # reserved[4]
    assert _u(request, 24, "Q") == 0x1000  # iova.start
    assert _u(request, 32, "Q") == 0xFFFF  # iova.last
    u.vduse_dev_status.pack_into(request, 24, 0x0F)
    assert request[24] == 0x0F  # s.status
    u.vduse_vq_state_index.pack_into(request, 24, 9)
    assert _u(request, 24, "I") == 9  # vq_state.index


def test_response_vq_state_offsets() -> None:
    response = bytearray(u.VDUSE_DEV_RESPONSE_SIZE)
    u.vduse_dev_response_header.pack_into(response, 0, 42, u.VDUSE_REQ_RESULT_FAILED)
    u.vduse_vq_state_split.pack_into(response, 24, 3, 0xABCD)
    assert _u(response, 0, "I") == 42  # request_id
    assert _u(response, 4, "I") == 1  # result
    assert response[8:24] == bytes(16)  # reserved: the kernel refuses non-zero
    assert _u(response, 24, "I") == 3  # vq_state.index
    assert _u(response, 28, "H") == 0xABCD  # vq_state.split.avail_index


def test_vduse_constants() -> None:
    assert u.VDUSE_BASE == 0x81
    assert u.VDUSE_NAME_MAX == 256
    assert u.VDUSE_API_VERSION == 0
    assert (u.VDUSE_GET_VQ_STATE, u.VDUSE_SET_STATUS, u.VDUSE_UPDATE_IOTLB) == (0, 1, 2)
    assert (u.VDUSE_REQ_RESULT_OK, u.VDUSE_REQ_RESULT_FAILED) == (0, 1)
    assert (u.VDUSE_ACCESS_RO, u.VDUSE_ACCESS_WO, u.VDUSE_ACCESS_RW) == (1, 2, 3)
    assert u.VDUSE_EVENTFD_DEASSIGN == -1
    assert u.CONTROL_DEVICE == "/dev/vduse/control"


# -- virtio -----------------------------------------------------------------------------------


def test_virtio_blk_config_size_and_offsets() -> None:
    assert v.virtio_blk_config.size == 60
    values = (
        0x0102030405060708,  # capacity @0
        0x11111111,  # size_max @8
        0x22222222,  # seg_max @12
        0x3333,  # cylinders @16
        0x44,  # heads @18
        0x55,  # sectors @19
        0x66666666,  # blk_size @20
        0x77,  # physical_block_exp @24
        0x88,  # alignment_offset @25
        0x9999,  # min_io_size @26
        0xAAAAAAAA,  # opt_io_size @28
        0xBB,  # wce @32
        0xCCCC,  # num_queues @34
        0xD0D0D0D0,  # max_discard_sectors @36
        0xD1D1D1D1,  # max_discard_seg @40
        0xD2D2D2D2,  # discard_sector_alignment @44
        0xE0E0E0E0,  # max_write_zeroes_sectors @48
        0xE1E1E1E1,  # max_write_zeroes_seg @52
        0xFE,  # write_zeroes_may_unmap @56
    )
    raw = v.virtio_blk_config.pack(*values)
    assert _u(raw, 0, "Q") == 0x0102030405060708
    assert raw[0] == 0x08  # little-endian on the wire
    assert _u(raw, 8, "I") == 0x11111111
    assert _u(raw, 12, "I") == 0x22222222
    assert _u(raw, 16, "H") == 0x3333
    assert (raw[18], raw[19]) == (0x44, 0x55)
    assert _u(raw, 20, "I") == 0x66666666
    assert (raw[24], raw[25]) == (0x77, 0x88)
    assert _u(raw, 26, "H") == 0x9999
    assert _u(raw, 28, "I") == 0xAAAAAAAA
    assert raw[32] == 0xBB
    assert raw[33] == 0  # unused0
    assert _u(raw, 34, "H") == 0xCCCC
    assert _u(raw, 36, "I") == 0xD0D0D0D0
    assert _u(raw, 40, "I") == 0xD1D1D1D1
    assert _u(raw, 44, "I") == 0xD2D2D2D2
    assert _u(raw, 48, "I") == 0xE0E0E0E0
    assert _u(raw, 52, "I") == 0xE1E1E1E1
    assert raw[56] == 0xFE
    assert raw[57:] == bytes(3)
    assert v.VIRTIO_BLK_CONFIG_CAPACITY_OFFSET == 0


def test_virtio_ring_layouts() -> None:
    assert v.vring_desc.size == 16
    raw = v.vring_desc.pack(0x1122334455667788, 0xAABBCCDD, 0x0102, 0x0304)
    assert raw == bytes.fromhex("8877665544332211" "ddccbbaa" "0201" "0403")
    assert v.vring_used_elem.pack(1, 2) == bytes.fromhex("01000000" "02000000")
    assert v.vring_desc_table_size(256) == 4096
    assert v.vring_avail_size(256) == 4 + 512 + 2
    assert v.vring_used_size(256) == 4 + 2048 + 2


def test_virtio_blk_request_layouts() -> None:
    assert v.virtio_blk_outhdr.size == 16
    raw = v.virtio_blk_outhdr.pack(1, 2, 0x0102030405060708)
    assert raw == bytes.fromhex("01000000" "02000000" "0807060504030201")
    assert v.virtio_blk_discard_write_zeroes.size == 16
    raw = v.virtio_blk_discard_write_zeroes.pack(0x10, 0x20, 1)
    assert raw == bytes.fromhex("1000000000000000" "20000000" "01000000")


def test_virtio_feature_bits() -> None:
    assert v.VIRTIO_F_NOTIFY_ON_EMPTY == 24
    assert v.VIRTIO_F_ANY_LAYOUT == 27
    assert v.VIRTIO_RING_F_INDIRECT_DESC == 28
    assert v.VIRTIO_RING_F_EVENT_IDX == 29
    assert v.VIRTIO_F_VERSION_1 == 32
    assert v.VIRTIO_F_ACCESS_PLATFORM == 33
    assert v.VIRTIO_F_RING_PACKED == 34
    blk = (v.VIRTIO_BLK_F_SIZE_MAX, v.VIRTIO_BLK_F_SEG_MAX, v.VIRTIO_BLK_F_GEOMETRY,
           v.VIRTIO_BLK_F_RO, v.VIRTIO_BLK_F_BLK_SIZE, v.VIRTIO_BLK_F_FLUSH,
           v.VIRTIO_BLK_F_TOPOLOGY, v.VIRTIO_BLK_F_CONFIG_WCE, v.VIRTIO_BLK_F_MQ,
           v.VIRTIO_BLK_F_DISCARD, v.VIRTIO_BLK_F_WRITE_ZEROES)
    assert blk == (1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14)


def test_virtio_ring_flags() -> None:
    assert (v.VRING_DESC_F_NEXT, v.VRING_DESC_F_WRITE, v.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert v.VRING_USED_F_NO_NOTIFY == 1
    assert v.VRING_AVAIL_F_NO_INTERRUPT == 1


def test_virtio_blk_request_types_and_status() -> None:
    types = (v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH, v.VIRTIO_BLK_T_GET_ID,
             v.VIRTIO_BLK_T_GET_LIFETIME, v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES,
             v.VIRTIO_BLK_T_SECURE_ERASE)
    assert types == (0, 1, 4, 8, 10, 11, 13, 14)
    assert (v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR, v.VIRTIO_BLK_S_UNSUPP) == (0, 1, 2)
    assert v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 1
    assert v.VIRTIO_BLK_ID_BYTES == 20
    assert v.VIRTIO_BLK_SECTOR_SHIFT == 9
    assert v.VIRTIO_BLK_SECTOR_SIZE == 512


def test_virtio_status_and_ids() -> None:
    status = (v.VIRTIO_CONFIG_S_ACKNOWLEDGE, v.VIRTIO_CONFIG_S_DRIVER,
              v.VIRTIO_CONFIG_S_DRIVER_OK, v.VIRTIO_CONFIG_S_FEATURES_OK,
              v.VIRTIO_CONFIG_S_NEEDS_RESET, v.VIRTIO_CONFIG_S_FAILED)
    assert status == (1, 2, 4, 8, 0x40, 0x80)
    assert (v.VIRTIO_ID_NET, v.VIRTIO_ID_BLOCK) == (1, 2)
