"""Transcription of ``linux/vdpa.h`` plus the netlink and generic-netlink constants it needs.

Only constants and wire layouts live here; no logic. The names are the kernel's
(``linux/netlink.h``, ``linux/genetlink.h``, ``linux/vdpa.h``).

Attribute numbering is that of Linux 6.12 (Debian trixie). Caveat: the 6.1
header (Debian bookworm ``linux-libc-dev``) has ``21 =
VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES``; that attribute was removed in 6.2
("merge functionally duplicated dev_features attributes") and number 21 was
reused by ``VDPA_ATTR_DEV_BLK_CFG_CAPACITY`` in 6.9. Do not take numbers >= 21
from an older header. pyvduse sends only ``VDPA_ATTR_MGMTDEV_DEV_NAME`` (2) and
``VDPA_ATTR_DEV_NAME`` (4), which never moved, and never sends
``VDPA_ATTR_MGMTDEV_BUS_NAME``: the ``vduse`` management device has no bus, so
naming one makes the lookup fail with ``ENODEV``.
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------------------
# linux/netlink.h
# ---------------------------------------------------------------------------

NETLINK_GENERIC = 16

# Socket options (level SOL_NETLINK).
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

# nlmsg_flags
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP_FILTERED = 0x20
# Modifiers to GET requests
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_ATOMIC = 0x400
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
# Flags of NLMSG_ERROR acknowledgements
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

# Reserved message types
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4
NLMSG_MIN_TYPE = 0x10

NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4

# enum nlmsgerr_attrs: TLVs appended to NLMSG_ERROR / NLMSG_DONE when
# NLM_F_ACK_TLVS is set (extended ack, NETLINK_EXT_ACK).
NLMSGERR_ATTR_UNUSED = 0
NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2
NLMSGERR_ATTR_COOKIE = 3
NLMSGERR_ATTR_POLICY = 4
NLMSGERR_ATTR_MISS_TYPE = 5
NLMSGERR_ATTR_MISS_NEST = 6

# struct nlattr nla_type bits
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags;
#                   __u32 nlmsg_seq; __u32 nlmsg_pid; }
nlmsghdr = struct.Struct("=IHHII")
NLMSG_HDRLEN = nlmsghdr.size  # 16
# struct nlmsgerr { int error; struct nlmsghdr msg; }
nlmsgerr = struct.Struct("=iIHHII")
# struct nlattr { __u16 nla_len; __u16 nla_type; }
nlattr = struct.Struct("=HH")
NLA_HDRLEN = nlattr.size  # 4

# ---------------------------------------------------------------------------
# linux/genetlink.h
# ---------------------------------------------------------------------------

# struct genlmsghdr { __u8 cmd; __u8 version; __u16 reserved; }
genlmsghdr = struct.Struct("=BBH")
GENL_HDRLEN = genlmsghdr.size  # 4

GENL_ID_CTRL = NLMSG_MIN_TYPE  # 0x10, the "nlctrl" family
GENL_CTRL_NAME = "nlctrl"
GENL_CTRL_VERSION = 0x2

# enum ctrl_cmd (subset in use: NEWFAMILY is the reply type, GETFAMILY can dump)
CTRL_CMD_UNSPEC = 0
CTRL_CMD_NEWFAMILY = 1
CTRL_CMD_DELFAMILY = 2
CTRL_CMD_GETFAMILY = 3
CTRL_CMD_NEWOPS = 4
CTRL_CMD_DELOPS = 5
CTRL_CMD_GETOPS = 6
CTRL_CMD_NEWMCAST_GRP = 7
CTRL_CMD_DELMCAST_GRP = 8
CTRL_CMD_GETMCAST_GRP = 9
CTRL_CMD_GETPOLICY = 10

# enum ctrl_attr
CTRL_ATTR_UNSPEC = 0
CTRL_ATTR_FAMILY_ID = 1  # u16
CTRL_ATTR_FAMILY_NAME = 2  # NUL-terminated string
CTRL_ATTR_VERSION = 3  # u32
CTRL_ATTR_HDRSIZE = 4  # u32
CTRL_ATTR_MAXATTR = 5  # u32
CTRL_ATTR_OPS = 6  # nested
CTRL_ATTR_MCAST_GROUPS = 7  # nested
CTRL_ATTR_POLICY = 8
CTRL_ATTR_OP_POLICY = 9
CTRL_ATTR_OP = 10

# ---------------------------------------------------------------------------
# linux/vdpa.h (6.12)
# ---------------------------------------------------------------------------

VDPA_GENL_NAME = "vdpa"
VDPA_GENL_VERSION = 0x1

# enum vdpa_command
VDPA_CMD_UNSPEC = 0
VDPA_CMD_MGMTDEV_NEW = 1  # reply type of MGMTDEV_GET
VDPA_CMD_MGMTDEV_GET = 2  # can dump
VDPA_CMD_DEV_NEW = 3  # GENL_ADMIN_PERM
VDPA_CMD_DEV_DEL = 4  # GENL_ADMIN_PERM
VDPA_CMD_DEV_GET = 5  # can dump
VDPA_CMD_DEV_CONFIG_GET = 6  # can dump
VDPA_CMD_DEV_VSTATS_GET = 7  # GENL_ADMIN_PERM
VDPA_CMD_DEV_ATTR_SET = 8  # GENL_ADMIN_PERM (added 2024)

# enum vdpa_attr
VDPA_ATTR_UNSPEC = 0
VDPA_ATTR_PAD = VDPA_ATTR_UNSPEC  # pad attribute for 64-bit alignment

# bus name (optional) + dev name together make the parent device handle
VDPA_ATTR_MGMTDEV_BUS_NAME = 1  # NUL string; never send it for "vduse"
VDPA_ATTR_MGMTDEV_DEV_NAME = 2  # string
VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES = 3  # u64

VDPA_ATTR_DEV_NAME = 4  # string
VDPA_ATTR_DEV_ID = 5  # u32
VDPA_ATTR_DEV_VENDOR_ID = 6  # u32
VDPA_ATTR_DEV_MAX_VQS = 7  # u32
VDPA_ATTR_DEV_MAX_VQ_SIZE = 8  # u16
VDPA_ATTR_DEV_MIN_VQ_SIZE = 9  # u16

VDPA_ATTR_DEV_NET_CFG_MACADDR = 10  # binary
VDPA_ATTR_DEV_NET_STATUS = 11  # u8
VDPA_ATTR_DEV_NET_CFG_MAX_VQP = 12  # u16
VDPA_ATTR_DEV_NET_CFG_MTU = 13  # u16

VDPA_ATTR_DEV_NEGOTIATED_FEATURES = 14  # u64
VDPA_ATTR_DEV_MGMTDEV_MAX_VQS = 15  # u32
# virtio features that are supported by the vDPA management device
VDPA_ATTR_DEV_SUPPORTED_FEATURES = 16  # u64

VDPA_ATTR_DEV_QUEUE_INDEX = 17  # u32
VDPA_ATTR_DEV_VENDOR_ATTR_NAME = 18  # string
VDPA_ATTR_DEV_VENDOR_ATTR_VALUE = 19  # u64

# virtio features that are provisioned to the vDPA device
VDPA_ATTR_DEV_FEATURES = 20  # u64

VDPA_ATTR_DEV_BLK_CFG_CAPACITY = 21  # u64
VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX = 22  # u32
VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE = 23  # u32
VDPA_ATTR_DEV_BLK_CFG_SEG_MAX = 24  # u32
VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES = 25  # u16
VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP = 26  # u8
VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET = 27  # u8
VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE = 28  # u16
VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE = 29  # u32
VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC = 30  # u32
VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG = 31  # u32
VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN = 32  # u32
VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC = 33  # u32
VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG = 34  # u32
VDPA_ATTR_DEV_BLK_READ_ONLY = 35  # u8
VDPA_ATTR_DEV_BLK_FLUSH = 36  # u8

# new attributes must be added above here
VDPA_ATTR_MAX = 37
