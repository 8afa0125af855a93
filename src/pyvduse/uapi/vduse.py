"""Transcription of ``linux/vduse.h`` (API version 0, as in kernels 5.15 to 6.19).

Only layouts, request numbers and constants live here; no logic. The names are
the kernel's. Every layout is a :class:`struct.Struct` in native-endian,
native-alignment form (``=`` with explicit padding) so that its size equals the
C ``sizeof`` on x86_64; the sizes and request numbers are pinned by tests.
"""

from __future__ import annotations

import struct

from pyvduse.uapi.ioctl import IOC_NONE, IOC_READ, IOC_WRITE, ioc

VDUSE_BASE = 0x81
VDUSE_NAME_MAX = 256
VDUSE_API_VERSION = 0

# enum vduse_req_type
VDUSE_GET_VQ_STATE = 0
VDUSE_SET_STATUS = 1
VDUSE_UPDATE_IOTLB = 2

VDUSE_REQ_RESULT_OK = 0x00
VDUSE_REQ_RESULT_FAILED = 0x01

VDUSE_ACCESS_RO = 0x1
VDUSE_ACCESS_WO = 0x2
VDUSE_ACCESS_RW = 0x3

VDUSE_EVENTFD_DEASSIGN = -1

# struct vduse_dev_config { char name[256]; u32 vendor_id; u32 device_id; u64 features;
#   u32 vq_num; u32 vq_align; u32 reserved[13]; u32 config_size; u8 config[]; }
vduse_dev_config = struct.Struct("=256sIIQII52xI")
# struct vduse_iotlb_entry { u64 offset; u64 start; u64 last; u8 perm; } (padded to 32)
vduse_iotlb_entry = struct.Struct("=QQQB7x")
# struct vduse_config_data { u32 offset; u32 length; u8 buffer[]; }
vduse_config_data = struct.Struct("=II")
# struct vduse_vq_config { u32 index; u16 max_size; u16 reserved[13]; }
vduse_vq_config = struct.Struct("=IH26x")
# struct vduse_vq_info { u32 index; u32 num; u64 desc_addr; u64 driver_addr;
#   u64 device_addr; union { split {u16 avail_index} | packed {4 x u16} }; u8 ready; }
vduse_vq_info = struct.Struct("=IIQQQH6xB7x")
# struct vduse_vq_eventfd { u32 index; int fd; }
vduse_vq_eventfd = struct.Struct("=Ii")
# __u32 vq index for VDUSE_VQ_INJECT_IRQ
vduse_vq_index = struct.Struct("=I")
# struct vduse_iova_umem { u64 uaddr; u64 iova; u64 size; u64 reserved[3]; }
vduse_iova_umem = struct.Struct("=QQQ24x")
# struct vduse_iova_info { u64 start; u64 last; u64 capability; u64 reserved[3]; }
vduse_iova_info = struct.Struct("=QQQ24x")

# struct vduse_dev_request { u32 type; u32 request_id; u32 reserved[4]; union {...} (128 B) }
VDUSE_DEV_REQUEST_SIZE = 152
vduse_dev_request_header = struct.Struct("=II16x")
VDUSE_REQUEST_PAYLOAD_OFFSET = 24
# payload views, at VDUSE_REQUEST_PAYLOAD_OFFSET
vduse_vq_state_index = struct.Struct("=I")  # struct vduse_vq_state.index
vduse_dev_status = struct.Struct("=B")  # struct vduse_dev_status.status
vduse_iova_range = struct.Struct("=QQ")  # struct vduse_iova_range {start; last}

# struct vduse_dev_response { u32 request_id; u32 result; u32 reserved[4]; union {
#   struct vduse_vq_state { u32 index; union { split {u16 avail_index}; packed } };
#   u32 padding[32] } }
VDUSE_DEV_RESPONSE_SIZE = 152
vduse_dev_response_header = struct.Struct("=II16x")
vduse_vq_state_split = struct.Struct("=IH")  # index, split.avail_index (offset 24)

# ioctls on /dev/vduse/control
VDUSE_GET_API_VERSION = ioc(IOC_READ, VDUSE_BASE, 0x00, 8)
VDUSE_SET_API_VERSION = ioc(IOC_WRITE, VDUSE_BASE, 0x01, 8)
VDUSE_CREATE_DEV = ioc(IOC_WRITE, VDUSE_BASE, 0x02, vduse_dev_config.size)
VDUSE_DESTROY_DEV = ioc(IOC_WRITE, VDUSE_BASE, 0x03, VDUSE_NAME_MAX)

# ioctls on /dev/vduse/$NAME
VDUSE_IOTLB_GET_FD = ioc(IOC_READ | IOC_WRITE, VDUSE_BASE, 0x10, vduse_iotlb_entry.size)
VDUSE_DEV_GET_FEATURES = ioc(IOC_READ, VDUSE_BASE, 0x11, 8)
VDUSE_DEV_SET_CONFIG = ioc(IOC_WRITE, VDUSE_BASE, 0x12, vduse_config_data.size)
VDUSE_DEV_INJECT_CONFIG_IRQ = ioc(IOC_NONE, VDUSE_BASE, 0x13, 0)
VDUSE_VQ_SETUP = ioc(IOC_WRITE, VDUSE_BASE, 0x14, vduse_vq_config.size)
VDUSE_VQ_GET_INFO = ioc(IOC_READ | IOC_WRITE, VDUSE_BASE, 0x15, vduse_vq_info.size)
VDUSE_VQ_SETUP_KICKFD = ioc(IOC_WRITE, VDUSE_BASE, 0x16, vduse_vq_eventfd.size)
VDUSE_VQ_INJECT_IRQ = ioc(IOC_WRITE, VDUSE_BASE, 0x17, vduse_vq_index.size)
VDUSE_IOTLB_REG_UMEM = ioc(IOC_WRITE, VDUSE_BASE, 0x18, vduse_iova_umem.size)
VDUSE_IOTLB_DEREG_UMEM = ioc(IOC_WRITE, VDUSE_BASE, 0x19, vduse_iova_umem.size)
VDUSE_IOTLB_GET_INFO = ioc(IOC_READ | IOC_WRITE, VDUSE_BASE, 0x1A, vduse_iova_info.size)

CONTROL_DEVICE = "/dev/vduse/control"
DEVICE_DIR = "/dev/vduse"
SYSFS_CLASS = "/sys/class/vduse"
