"""The vhost-user wire format: request numbers, feature bits, payload layouts.

A message is a 12-byte header (request u32, flags u32, payload size u32)
followed by the payload, in the host's byte order; file descriptors travel
beside it as ``SCM_RIGHTS`` ancillary data. This module knows the payload
of every front-end request (:data:`EXPECTED`: its size, the descriptors it
carries, whether it has a reply of its own) and turns payloads into small
frozen dataclasses and back. Every decoder checks the length exactly and
raises :class:`ProtocolError`, never :class:`struct.error`.

Layouts follow the front-end's C structures, padding included: the inflight
description is 24 bytes (two u64, two u16, 4 bytes of tail padding), the
IOTLB message 32, the single memory region of ``ADD_MEM_REG`` 40 (8 bytes of
padding first).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from pyvduse.errors import PyvduseError


class ProtocolError(PyvduseError):
    """A vhost-user message is malformed or breaks the rules of its request."""


class Request(IntEnum):
    """Requests the front-end sends to the back-end."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Requests the back-end sends on the channel of ``SET_BACKEND_REQ_FD``."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntEnum):
    """Bit numbers of the protocol features (``GET/SET_PROTOCOL_FEATURES``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19

    @property
    def mask(self) -> int:
        """The feature as a bit in the protocol feature mask."""
        return 1 << self.value


F_PROTOCOL_FEATURES = 30
"""Virtio feature bit (``GET/SET_FEATURES``): the back-end speaks protocol features."""
F_LOG_ALL = 26
"""Virtio feature bit ``VHOST_F_LOG_ALL``: dirty-page logging for migration."""

# header flags
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# the u64 of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

VRING_F_LOG = 0
"""Bit number in the vring address flags: log writes to the used ring."""

CONFIG_F_WRITABLE = 0
"""Config space flags: the front-end writes a writable field."""
CONFIG_F_MIGRATION = 1
"""Config space flags: the front-end restores the config space (live migration)."""

MAX_MEMORY_REGIONS = 8
"""Regions in one ``SET_MEM_TABLE`` (and file descriptors in one message)."""
MAX_FDS = 8
MAX_CONFIG_SIZE = 256
"""The largest config space access (``GET_CONFIG`` / ``SET_CONFIG``)."""
MAX_PAYLOAD = 4096
"""No request is larger (``SET_CONFIG``: 268 bytes); anything beyond is refused."""
MAX_MEM_SLOTS = 509
"""A reasonable answer to ``GET_MAX_MEM_SLOTS`` (front-ends cap it at their own limit)."""

# -- layouts ---------------------------------------------------------------------------

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
MEMORY_REGION = struct.Struct("=QQQQ")  # guest addr, size, user addr, mmap offset
MEMORY_TABLE_HEADER = struct.Struct("=II")  # nregions, padding
MEMORY_TABLE_MAX = MEMORY_TABLE_HEADER.size + MAX_MEMORY_REGIONS * MEMORY_REGION.size
SINGLE_MEMORY_REGION = struct.Struct("=8xQQQQ")  # padding, then one region
LOG = struct.Struct("=QQ")  # size, offset
IOTLB = struct.Struct("=QQQBB6x")  # iova, size, uaddr, perm, type (struct vhost_iotlb_msg)
CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags; then ``size`` bytes
CONFIG_MAX = CONFIG_HEADER.size + MAX_CONFIG_SIZE
VRING_AREA = struct.Struct("=QQQ")  # u64 (index and flags), size, offset
INFLIGHT = struct.Struct("=QQHH4x")  # mmap size, mmap offset, num queues, queue size
SHARED_OBJECT = struct.Struct("=16s")  # UUID
DEVICE_STATE = struct.Struct("=II")  # transfer direction, migration phase


def request_name(request: int) -> str:
    """``"SET_MEM_TABLE"``, or ``"unknown request 99"``, for messages."""
    try:
        return Request(request).name
    except ValueError:
        return f"unknown request {request}"


def backend_request_name(request: int) -> str:
    """The name of a back-end request (``"CONFIG_CHANGE_MSG"``) for messages."""
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"unknown back-end request {request}"


# -- payloads --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable...)."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of ``SET_VRING_KICK/CALL/ERR``: the ring, and whether no fd comes with it."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: ring addresses in the front-end's address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of the memory table: guest-physical and front-end-virtual bases."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class LogDescription:
    """``SET_LOG_BASE`` with ``LOG_SHMFD``: the log's size and offset in its fd."""

    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class IotlbMessage:
    """``struct vhost_iotlb_msg``."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """``GET/SET_CONFIG``: ``data`` is the config bytes at ``offset`` (its length is the size)."""

    offset: int
    flags: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class VringArea:
    """Back-end ``VRING_HOST_NOTIFIER_MSG``: a ring index (and flags), an mmap size, offset."""

    u64: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class Inflight:
    """``GET/SET_INFLIGHT_FD``: where the inflight buffer lies in its fd, and its geometry."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """``SET_DEVICE_STATE_FD``: transfer direction (0 save, 1 load) and migration phase."""

    direction: int
    phase: int


def _unpack(layout: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def _pack(layout: struct.Struct, what: str, *values: object) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {what}: {exc}") from None


def decode_u64(payload: bytes) -> int:
    return _unpack(U64, payload, "u64")[0]


def encode_u64(value: int) -> bytes:
    return _pack(U64, "u64", value)


def decode_vring_state(payload: bytes) -> VringState:
    return VringState(*_unpack(VRING_STATE, payload, "vring state"))


def encode_vring_state(state: VringState) -> bytes:
    return _pack(VRING_STATE, "vring state", state.index, state.num)


def decode_vring_fd(payload: bytes) -> VringFd:
    """The u64 of ``SET_VRING_KICK/CALL/ERR``: bits 0-7 the ring, bit 8 "no fd"."""
    value = decode_u64(payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring fd request: unknown bits in {value:#x}")
    return VringFd(value & VRING_INDEX_MASK, bool(value & VRING_NOFD))


def encode_vring_fd(vring: VringFd) -> bytes:
    if not 0 <= vring.index <= VRING_INDEX_MASK:
        raise ProtocolError(f"cannot encode vring fd request: ring index {vring.index}")
    return encode_u64(vring.index | (VRING_NOFD if vring.nofd else 0))


def decode_vring_addr(payload: bytes) -> VringAddr:
    return VringAddr(*_unpack(VRING_ADDR, payload, "vring address"))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _pack(VRING_ADDR, "vring address", addr.index, addr.flags, addr.desc, addr.used,
                 addr.avail, addr.log)


def decode_memory_table(payload: bytes) -> tuple[MemoryRegion, ...]:
    """``SET_MEM_TABLE``: the regions, in the order of their file descriptors.

    The payload is the 8-byte header and exactly ``nregions`` regions (what
    QEMU sends), or the whole 8-region table with the unused tail ignored.
    """
    if len(payload) < MEMORY_TABLE_HEADER.size:
        raise ProtocolError(f"memory table: payload of {len(payload)} bytes, shorter than "
                            f"its {MEMORY_TABLE_HEADER.size}-byte header")
    count = MEMORY_TABLE_HEADER.unpack_from(payload)[0]
    if count > MAX_MEMORY_REGIONS:
        raise ProtocolError(f"memory table: {count} regions, at most {MAX_MEMORY_REGIONS}")
    exact = MEMORY_TABLE_HEADER.size + count * MEMORY_REGION.size
    if len(payload) not in (exact, MEMORY_TABLE_MAX):
        raise ProtocolError(f"memory table: payload of {len(payload)} bytes for {count} "
                            f"regions, expected {exact}")
    return tuple(
        MemoryRegion(*MEMORY_REGION.unpack_from(
            payload, MEMORY_TABLE_HEADER.size + index * MEMORY_REGION.size))
        for index in range(count))


def encode_memory_table(regions: tuple[MemoryRegion, ...] | list[MemoryRegion]) -> bytes:
    if len(regions) > MAX_MEMORY_REGIONS:
        raise ProtocolError(f"cannot encode a memory table of {len(regions)} regions")
    parts = [_pack(MEMORY_TABLE_HEADER, "memory table", len(regions), 0)]
    parts += [_pack(MEMORY_REGION, "memory region", r.guest_addr, r.size, r.user_addr,
                    r.mmap_offset) for r in regions]
    return b"".join(parts)


def decode_single_region(payload: bytes) -> MemoryRegion:
    """``ADD_MEM_REG`` / ``REM_MEM_REG``: 8 bytes of padding, then one region."""
    return MemoryRegion(*_unpack(SINGLE_MEMORY_REGION, payload, "memory region"))


def encode_single_region(region: MemoryRegion) -> bytes:
    return _pack(SINGLE_MEMORY_REGION, "memory region", region.guest_addr, region.size,
                 region.user_addr, region.mmap_offset)


def decode_log(payload: bytes) -> LogDescription:
    return LogDescription(*_unpack(LOG, payload, "log description"))


def encode_log(log: LogDescription) -> bytes:
    return _pack(LOG, "log description", log.size, log.offset)


def decode_iotlb(payload: bytes) -> IotlbMessage:
    return IotlbMessage(*_unpack(IOTLB, payload, "IOTLB message"))


def encode_iotlb(msg: IotlbMessage) -> bytes:
    return _pack(IOTLB, "IOTLB message", msg.iova, msg.size, msg.uaddr, msg.perm, msg.type)


def decode_config(payload: bytes) -> ConfigSpace:
    """``GET/SET_CONFIG``: the 12-byte header, then exactly ``size`` (<= 256) bytes."""
    if len(payload) < CONFIG_HEADER.size:
        raise ProtocolError(f"config space: payload of {len(payload)} bytes, shorter than "
                            f"its {CONFIG_HEADER.size}-byte header")
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config space: access of {size} bytes, at most {MAX_CONFIG_SIZE}")
    if len(payload) != CONFIG_HEADER.size + size:
        raise ProtocolError(f"config space: payload of {len(payload)} bytes for an access of "
                            f"{size}, expected {CONFIG_HEADER.size + size}")
    return ConfigSpace(offset, flags, bytes(payload[CONFIG_HEADER.size:]))


def encode_config(config: ConfigSpace) -> bytes:
    if len(config.data) > MAX_CONFIG_SIZE:
        raise ProtocolError(f"cannot encode a config access of {len(config.data)} bytes")
    return _pack(CONFIG_HEADER, "config space", config.offset, len(config.data),
                 config.flags) + bytes(config.data)


def decode_vring_area(payload: bytes) -> VringArea:
    return VringArea(*_unpack(VRING_AREA, payload, "vring area"))


def encode_vring_area(area: VringArea) -> bytes:
    return _pack(VRING_AREA, "vring area", area.u64, area.size, area.offset)


def decode_inflight(payload: bytes) -> Inflight:
    return Inflight(*_unpack(INFLIGHT, payload, "inflight description"))


def encode_inflight(inflight: Inflight) -> bytes:
    return _pack(INFLIGHT, "inflight description", inflight.mmap_size, inflight.mmap_offset,
                 inflight.num_queues, inflight.queue_size)


def decode_device_state(payload: bytes) -> DeviceStateTransfer:
    return DeviceStateTransfer(*_unpack(DEVICE_STATE, payload, "device state transfer"))


def encode_device_state(transfer: DeviceStateTransfer) -> bytes:
    return _pack(DEVICE_STATE, "device state transfer", transfer.direction, transfer.phase)


# -- what each request carries ---------------------------------------------------------


class Fds(Enum):
    """How many file descriptors a request carries."""

    NONE = "no fd"
    ONE = "exactly one fd"
    OPTIONAL = "at most one fd"
    VRING = "one fd, or none if bit 8 of the payload is set"
    PER_REGION = "one fd per memory region"


@dataclass(frozen=True, slots=True)
class Expect:
    """The rules of one request.

    The payload size is ``min_size + k * step`` for some ``k >= 0`` and at
    most ``max_size``. ``reply``: the back-end always answers it (with its
    own payload), whether or not ``NEED_REPLY`` is set; for the others a
    ``NEED_REPLY`` flag asks for a u64 ack (see :func:`needs_ack`).
    """

    min_size: int
    max_size: int
    step: int = 1
    fds: Fds = Fds.NONE
    reply: bool = False

    def size_ok(self, size: int) -> bool:
        return (self.min_size <= size <= self.max_size
                and (size - self.min_size) % self.step == 0)

    def describe_size(self) -> str:
        if self.min_size == self.max_size:
            return f"{self.min_size} bytes"
        steps = f" in steps of {self.step}" if self.step > 1 else ""
        return f"{self.min_size}..{self.max_size} bytes{steps}"


def _fixed(size: int, fds: Fds = Fds.NONE, reply: bool = False) -> Expect:
    return Expect(size, size, 1, fds, reply)


_NOTHING = _fixed(0)
_U64 = _fixed(U64.size)
_STATE = _fixed(VRING_STATE.size)

EXPECTED: dict[int, Expect] = {
    Request.GET_FEATURES: _fixed(0, reply=True),
    Request.SET_FEATURES: _U64,
    Request.SET_OWNER: _NOTHING,
    Request.RESET_OWNER: _NOTHING,
    Request.SET_MEM_TABLE: Expect(MEMORY_TABLE_HEADER.size, MEMORY_TABLE_MAX,
                                  MEMORY_REGION.size, Fds.PER_REGION),
    # u64 without LOG_SHMFD; with it a log description, one fd, and a u64 reply
    Request.SET_LOG_BASE: Expect(U64.size, LOG.size, LOG.size - U64.size, Fds.OPTIONAL,
                                 reply=True),
    Request.SET_LOG_FD: _fixed(0, Fds.ONE),
    Request.SET_VRING_NUM: _STATE,
    Request.SET_VRING_ADDR: _fixed(VRING_ADDR.size),
    Request.SET_VRING_BASE: _STATE,
    Request.GET_VRING_BASE: _fixed(VRING_STATE.size, reply=True),
    Request.SET_VRING_KICK: _fixed(U64.size, Fds.VRING),
    Request.SET_VRING_CALL: _fixed(U64.size, Fds.VRING),
    Request.SET_VRING_ERR: _fixed(U64.size, Fds.VRING),
    Request.GET_PROTOCOL_FEATURES: _fixed(0, reply=True),
    Request.SET_PROTOCOL_FEATURES: _U64,
    Request.GET_QUEUE_NUM: _fixed(0, reply=True),
    Request.SET_VRING_ENABLE: _STATE,
    Request.SEND_RARP: _U64,
    Request.NET_SET_MTU: _U64,
    Request.SET_BACKEND_REQ_FD: _fixed(0, Fds.ONE),
    Request.IOTLB_MSG: _fixed(IOTLB.size, reply=True),
    Request.SET_VRING_ENDIAN: _STATE,
    Request.GET_CONFIG: Expect(CONFIG_HEADER.size, CONFIG_MAX, reply=True),
    Request.SET_CONFIG: Expect(CONFIG_HEADER.size, CONFIG_MAX),
    Request.CREATE_CRYPTO_SESSION: Expect(0, MAX_PAYLOAD, reply=True),
    Request.CLOSE_CRYPTO_SESSION: _U64,
    Request.POSTCOPY_ADVISE: _fixed(0, reply=True),
    Request.POSTCOPY_LISTEN: _NOTHING,
    Request.POSTCOPY_END: _fixed(0, reply=True),
    Request.GET_INFLIGHT_FD: _fixed(INFLIGHT.size, reply=True),
    Request.SET_INFLIGHT_FD: _fixed(INFLIGHT.size, Fds.ONE),
    Request.GPU_SET_SOCKET: _fixed(0, Fds.ONE),
    Request.RESET_DEVICE: _NOTHING,
    Request.VRING_KICK: _STATE,
    Request.GET_MAX_MEM_SLOTS: _fixed(0, reply=True),
    Request.ADD_MEM_REG: _fixed(SINGLE_MEMORY_REGION.size, Fds.ONE),
    # the spec allows (and says to close unused) one fd, sent by older front-ends
    Request.REM_MEM_REG: _fixed(SINGLE_MEMORY_REGION.size, Fds.OPTIONAL),
    Request.SET_STATUS: _U64,
    Request.GET_STATUS: _fixed(0, reply=True),
    Request.GET_SHARED_OBJECT: _fixed(SHARED_OBJECT.size, reply=True),
    Request.SET_DEVICE_STATE_FD: _fixed(DEVICE_STATE.size, Fds.ONE, reply=True),
    Request.CHECK_DEVICE_STATE: _fixed(0, reply=True),
}
"""The rules of every front-end request, by number."""


def check_request(request: int, payload: bytes, nfds: int) -> None:
    """Raise :class:`ProtocolError` unless ``payload`` and ``nfds`` fit ``request``'s rules.

    Beyond :data:`EXPECTED`: the memory table's region count must match its
    size and its fds, a ``SET_VRING_KICK/CALL/ERR`` carries an fd exactly when
    bit 8 is clear, a config access's size field matches the payload, and
    ``SET_LOG_BASE`` carries an fd exactly with the 16-byte log description.
    """
    rule = EXPECTED.get(request)
    name = request_name(request)
    if rule is None:
        raise ProtocolError(f"{name} (with {len(payload)} bytes and {nfds} fds)")
    if not rule.size_ok(len(payload)):
        raise ProtocolError(f"{name}: payload of {len(payload)} bytes, expected "
                            f"{rule.describe_size()}")
    fds = rule.fds
    if fds is Fds.NONE:
        wanted_fds = 0
    elif fds is Fds.ONE:
        wanted_fds = 1
    elif fds is Fds.OPTIONAL:
        wanted_fds = min(nfds, 1)
        if request == Request.SET_LOG_BASE:
            wanted_fds = 1 if len(payload) == LOG.size else 0
    elif fds is Fds.VRING:
        wanted_fds = 0 if decode_vring_fd(payload).nofd else 1
    else:
        wanted_fds = len(decode_memory_table(payload))
    if nfds != wanted_fds:
        raise ProtocolError(f"{name}: {nfds} fds, expected {wanted_fds} ({fds.value})")
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        decode_config(payload)


def needs_ack(request: int, flags: int) -> bool:
    """Does the back-end owe a u64 ack (0 success, else failure) after handling this?

    Yes when the front-end set ``NEED_REPLY`` (it does so only once
    ``REPLY_ACK`` is negotiated) on a request without a reply of its own;
    requests with one answer with that reply alone.
    """
    if not flags & FLAG_NEED_REPLY:
        return False
    rule = EXPECTED.get(request)
    return rule is None or not rule.reply
