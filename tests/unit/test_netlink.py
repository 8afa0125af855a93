"""Tests of pyvduse.netlink: golden bytes, reply parsing, a scripted fake peer, the real kernel."""

from __future__ import annotations

import errno
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvduse.errors import PyvduseError
from pyvduse.netlink import (
    FamilyNotFoundError,
    GenericNetlink,
    NetlinkError,
    VdpaClient,
    VdpaDeviceInfo,
    decode_dev_info,
    decode_mgmtdev_name,
    dev_del_attrs,
    dev_new_attrs,
    encode_request,
    get_string,
    get_u16,
    get_u32,
    get_u64,
    nla,
    nla_get_uint,
    nla_string,
    nla_u8,
    nla_u16,
    nla_u32,
    nla_u64,
    parse_attrs,
    parse_done_payload,
    parse_error_payload,
    split_messages,
)
from pyvduse.uapi import vdpa as uapi

LITTLE = sys.byteorder == "little"

# Hand-written wire layouts (independent of the module under test).
NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
GENLHDR = struct.Struct("=BBH")
VDPA_FAMILY_ID = 0x1B


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def attr(atype: int, payload: bytes) -> bytes:
    return pad4(NLATTR.pack(4 + len(payload), atype) + payload)


def nlmsg(mtype: int, flags: int, seq: int, payload: bytes, pid: int = 4242) -> bytes:
    return pad4(NLMSGHDR.pack(16 + len(payload), mtype, flags, seq, pid) + payload)


def genl_reply(
    seq: int, cmd: int, attrs: bytes, *, family: int = VDPA_FAMILY_ID, flags: int = 0
) -> bytes:
    return nlmsg(family, flags, seq, GENLHDR.pack(cmd, 1, 0) + attrs)


def error_msg(
    seq: int,
    err: int,
    request: bytes,
    *,
    capped: bool = True,
    extack: str | None = None,
    offs: int | None = None,
) -> bytes:
    """NLMSG_ERROR as the kernel builds it (err is a positive errno, 0 = ack)."""
    flags = 0
    payload = struct.pack("=i", -err)
    if capped:
        payload += request[:16]
        flags |= uapi.NLM_F_CAPPED
    else:
        payload += pad4(request)
    tlvs = b""
    if extack is not None:
        tlvs += attr(uapi.NLMSGERR_ATTR_MSG, extack.encode() + b"\0")
    if offs is not None:
        tlvs += attr(uapi.NLMSGERR_ATTR_OFFS, struct.pack("=I", offs))
    if tlvs:
        flags |= uapi.NLM_F_ACK_TLVS
    return nlmsg(uapi.NLMSG_ERROR, flags, seq, payload + tlvs)


def done_msg(seq: int, err: int = 0, extack: str | None = None) -> bytes:
    flags = uapi.NLM_F_MULTI
    payload = struct.pack("=i", -err)
    if extack is not None:
        payload += attr(uapi.NLMSGERR_ATTR_MSG, extack.encode() + b"\0")
        flags |= uapi.NLM_F_ACK_TLVS
    return nlmsg(uapi.NLMSG_DONE, flags, seq, payload)


# ---------------------------------------------------------------------------
# Golden encodings
# ---------------------------------------------------------------------------


def test_dev_new_golden_48_bytes() -> None:
    data = encode_request(
        VDPA_FAMILY_ID,
        uapi.VDPA_CMD_DEV_NEW,
        dev_new_attrs("vduse-blk0", "vduse"),
        seq=1,
        flags=uapi.NLM_F_REQUEST | uapi.NLM_F_ACK,
    )
    expected = (
        struct.pack("=IHHII", 48, 0x1B, 0x0005, 1, 0)  # nlmsghdr
        + struct.pack("=BBH", 3, 1, 0)  # genlmsghdr: DEV_NEW, version 1
        + struct.pack("=HH", 10, 2)  # MGMTDEV_DEV_NAME, 4 + len("vduse\0")
        + b"vduse\0"
        + b"\0\0"  # pad 10 -> 12
        + struct.pack("=HH", 15, 4)  # DEV_NAME, 4 + len("vduse-blk0\0")
        + b"vduse-blk0\0"
        + b"\0"  # pad 15 -> 16
    )
    assert len(expected) == 48
    assert data == expected
    if LITTLE:
        assert data.hex() == (
            "30000000" "1b00" "0500" "01000000" "00000000"
            "03010000"
            "0a000200" "76647573650000" "00"
            "0f000400" "76647573652d626c6b3000" "00"
        )  # fmt: skip


def test_dev_new_never_sends_bus_name() -> None:
    attrs = parse_attrs(dev_new_attrs("x", "vduse"))
    assert sorted(attrs) == [uapi.VDPA_ATTR_MGMTDEV_DEV_NAME, uapi.VDPA_ATTR_DEV_NAME]
    assert uapi.VDPA_ATTR_MGMTDEV_BUS_NAME not in attrs
    assert attrs[uapi.VDPA_ATTR_DEV_NAME] == [b"x\0"]


def test_dev_del_golden() -> None:
    data = encode_request(0x22, uapi.VDPA_CMD_DEV_DEL, dev_del_attrs("vduse0"), seq=7)
    expected = (
        struct.pack("=IHHII", 32, 0x22, 0x0005, 7, 0)
        + struct.pack("=BBH", 4, 1, 0)
        + struct.pack("=HH", 11, 4)
        + b"vduse0\0"
        + b"\0"
    )
    assert len(data) == 32
    assert data == expected


def test_getfamily_golden() -> None:
    data = encode_request(
        uapi.GENL_ID_CTRL,
        uapi.CTRL_CMD_GETFAMILY,
        nla_string(uapi.CTRL_ATTR_FAMILY_NAME, "vdpa"),
        seq=3,
        version=2,
    )
    expected = (
        struct.pack("=IHHII", 32, 0x10, 0x0005, 3, 0)
        + struct.pack("=BBH", 3, 2, 0)
        + struct.pack("=HH", 9, 2)
        + b"vdpa\0"
        + b"\0\0\0"
    )
    assert data == expected


def test_dump_flags_and_pid() -> None:
    data = encode_request(0x30, 5, b"", seq=0x1_0000_0002, flags=0x301, pid=99)
    assert NLMSGHDR.unpack_from(data) == (20, 0x30, 0x301, 2, 99)  # seq wraps to u32
    assert len(data) == 20


@pytest.mark.parametrize(
    ("encoded", "length", "total"),
    [
        (nla_u8(7, 0xAB), 5, 8),
        (nla_u16(7, 0xABCD), 6, 8),
        (nla_u32(7, 0xDEADBEEF), 8, 8),
        (nla_u64(7, 0x0102030405060708), 12, 12),
        (nla(7, b""), 4, 4),
        (nla_string(7, ""), 5, 8),
    ],
)
def test_attribute_length_and_padding(encoded: bytes, length: int, total: int) -> None:
    assert len(encoded) == total
    assert NLATTR.unpack_from(encoded) == (length, 7)
    assert encoded[length:] == b"\0" * (total - length)


def test_integer_attributes_are_host_order() -> None:
    assert nla_u32(1, 0x11223344)[4:] == struct.pack("=I", 0x11223344)
    assert nla_u16(1, 0x1122)[4:6] == struct.pack("=H", 0x1122)
    assert nla_u64(1, 1 << 40)[4:] == struct.pack("=Q", 1 << 40)


def test_encoder_rejections() -> None:
    with pytest.raises(ValueError, match="NUL"):
        nla_string(4, "a\0b")
    with pytest.raises(ValueError, match="too long"):
        nla(4, b"x" * 65532)
    assert len(nla(4, b"x" * 65531)) == 65536  # nla_len 65535, padded to 65536
    with pytest.raises(ValueError, match="aligned"):
        encode_request(0x20, 3, b"\x05\x00\x04\x00\x41")
    with pytest.raises(OverflowError):
        nla_u16(1, 0x10000)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def test_parse_attrs_repeats_masks_flags_and_strips_padding() -> None:
    buf = (
        attr(4, b"dev0\0")
        + attr(5 | uapi.NLA_F_NESTED, attr(1, b"\x01\x02"))
        + attr(4, b"dev1\0")
        + attr(8, struct.pack("=H", 256))
    )
    got = parse_attrs(buf)
    assert got == {
        4: [b"dev0\0", b"dev1\0"],
        5: [attr(1, b"\x01\x02")],
        8: [struct.pack("=H", 256)],
    }
    assert get_string(got, 4) == "dev0"
    assert get_u16(got, 8) == 256
    assert get_u32(got, 99) is None
    assert parse_attrs(got[5][0]) == {1: [b"\x01\x02"]}


def test_get_wrong_size_raises() -> None:
    got = parse_attrs(attr(8, struct.pack("=H", 256)))
    with pytest.raises(ValueError, match="4-byte"):
        get_u32(got, 8)
    with pytest.raises(ValueError):
        nla_get_uint(b"\x01\x02\x03", 2)
    assert get_u64(parse_attrs(attr(3, struct.pack("=Q", 1 << 63))), 3) == 1 << 63


@pytest.mark.parametrize(
    "buf",
    [
        b"\x08\x00\x04\x00ab",  # length past the end
        b"\x02\x00\x04\x00",  # length shorter than the header
        attr(4, b"abcd") + b"\x01",  # trailing garbage
    ],
)
def test_parse_attrs_malformed(buf: bytes) -> None:
    with pytest.raises(ValueError):
        parse_attrs(buf)


def test_split_messages_multipart_alignment() -> None:
    m1 = genl_reply(5, 1, attr(2, b"abc\0") + attr(9, b"\x01"), flags=uapi.NLM_F_MULTI)
    m2 = nlmsg(0x1B, uapi.NLM_F_MULTI, 5, GENLHDR.pack(1, 1, 0) + b"\x05\x00\x02\x00z")
    assert NLMSGHDR.unpack_from(m2)[0] == 25  # unaligned length; next message at 28
    m3 = done_msg(5)
    msgs = split_messages(m1 + m2 + m3)
    assert [(m.type, m.flags, m.seq, m.pid) for m in msgs] == [
        (0x1B, 2, 5, 4242),
        (0x1B, 2, 5, 4242),
        (uapi.NLMSG_DONE, 2, 5, 4242),
    ]
    assert msgs[1].payload == GENLHDR.pack(1, 1, 0) + b"\x05\x00\x02\x00z"
    assert parse_attrs(msgs[1].payload[4:]) == {2: [b"z"]}


@pytest.mark.parametrize(
    "buf",
    [NLMSGHDR.pack(40, 3, 0, 1, 0) + b"\0" * 8, NLMSGHDR.pack(8, 3, 0, 1, 0), b"\x10\x00\x00"],
)
def test_split_messages_malformed(buf: bytes) -> None:
    with pytest.raises(ValueError):
        split_messages(buf)


REQ = encode_request(VDPA_FAMILY_ID, uapi.VDPA_CMD_DEV_NEW, dev_new_attrs("vduse0"), seq=9)


def test_parse_ack() -> None:
    (m,) = split_messages(error_msg(9, 0, REQ))
    assert m.type == uapi.NLMSG_ERROR
    assert parse_error_payload(m.payload, m.flags) == (0, None, None)


def test_parse_error_capped_with_extack() -> None:
    text = "Fail to find the specified management device"
    (m,) = split_messages(error_msg(9, errno.ENODEV, REQ, extack=text, offs=20))
    assert m.flags == uapi.NLM_F_CAPPED | uapi.NLM_F_ACK_TLVS
    assert parse_error_payload(m.payload, m.flags) == (errno.ENODEV, text, 20)


def test_parse_error_uncapped_echo_with_extack() -> None:
    # The kernel echoes the whole request (aligned) before the TLVs; make its
    # length unaligned to check the alignment of the TLV offset.
    req = NLMSGHDR.pack(23, VDPA_FAMILY_ID, 5, 9, 0) + b"\x03\x01\x00\x00\x07\x00\x04"
    raw = error_msg(9, errno.EINVAL, req, capped=False, extack="vqs not set up")
    (m,) = split_messages(raw)
    assert m.flags == uapi.NLM_F_ACK_TLVS
    assert parse_error_payload(m.payload, m.flags) == (errno.EINVAL, "vqs not set up", None)


def test_parse_error_without_tlvs() -> None:
    (m,) = split_messages(error_msg(9, errno.EPERM, REQ, capped=False))
    assert parse_error_payload(m.payload, m.flags) == (errno.EPERM, None, None)
    with pytest.raises(ValueError):
        parse_error_payload(b"\x01\x00", 0)


def test_parse_done() -> None:
    (m,) = split_messages(done_msg(4))
    assert parse_done_payload(m.payload, m.flags) == (0, None, None)
    (m,) = split_messages(done_msg(4, errno.EMSGSIZE, "dump too big"))
    assert parse_done_payload(m.payload, m.flags) == (errno.EMSGSIZE, "dump too big", None)
    assert parse_done_payload(b"", uapi.NLM_F_MULTI) == (0, None, None)


def test_decode_dev_info() -> None:
    attrs = parse_attrs(
        attr(uapi.VDPA_ATTR_DEV_NAME, b"vduse-blk0\0")
        + attr(uapi.VDPA_ATTR_MGMTDEV_DEV_NAME, b"vduse\0")
        + attr(uapi.VDPA_ATTR_DEV_ID, struct.pack("=I", 2))
        + attr(uapi.VDPA_ATTR_DEV_VENDOR_ID, struct.pack("=I", 0x1AF4))
        + attr(uapi.VDPA_ATTR_DEV_MAX_VQS, struct.pack("=I", 4))
        + attr(uapi.VDPA_ATTR_DEV_MAX_VQ_SIZE, struct.pack("=H", 1024))
    )
    assert decode_dev_info(attrs) == VdpaDeviceInfo(
        name="vduse-blk0",
        mgmtdev_dev_name="vduse",
        mgmtdev_bus_name=None,
        device_id=2,
        vendor_id=0x1AF4,
        max_vqs=4,
        max_vq_size=1024,
        min_vq_size=None,
    )
    with pytest.raises(ValueError, match="DEV_NAME"):
        decode_dev_info({})


def test_decode_mgmtdev_name() -> None:
    assert decode_mgmtdev_name(parse_attrs(attr(2, b"vduse\0"))) == "vduse"
    bus = parse_attrs(attr(1, b"pci\0") + attr(2, b"0000:00:04.0\0"))
    assert decode_mgmtdev_name(bus) == "pci/0000:00:04.0"


def test_netlink_error_shape() -> None:
    exc = NetlinkError(
        errno.EINVAL,
        "vdpa DEV_NEW vduse0",
        "Fail to find the specified management device",
        extack_offset=24,
    )
    assert isinstance(exc, OSError)
    assert isinstance(exc, PyvduseError)
    assert exc.errno == errno.EINVAL
    assert exc.strerror == "Invalid argument"
    assert str(exc) == (
        "vdpa DEV_NEW vduse0: Invalid argument (Fail to find the specified management device)"
    )
    assert str(NetlinkError(errno.EPERM, "vdpa DEV_DEL x")) == (
        "vdpa DEV_DEL x: Operation not permitted"
    )
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is NetlinkError
    assert (back.errno, back.operation, back.extack, back.extack_offset) == (
        errno.EINVAL,
        "vdpa DEV_NEW vduse0",
        "Fail to find the specified management device",
        24,
    )
    fam = pickle.loads(pickle.dumps(FamilyNotFoundError("vdpa", "load it")))
    assert (type(fam), fam.errno, fam.family, str(fam)) == (
        FamilyNotFoundError,
        errno.ENOENT,
        "vdpa",
        "nlctrl GETFAMILY vdpa: No such file or directory. load it",
    )


# ---------------------------------------------------------------------------
# Scripted fake peer (socketpair)
# ---------------------------------------------------------------------------


@dataclass
class Request:
    raw: bytes
    type: int
    flags: int
    seq: int
    cmd: int
    version: int
    attrs: dict[int, list[bytes]]


def _parse_request(raw: bytes) -> Request:
    length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(raw)
    assert length == len(raw), "one request per datagram, nlmsg_len == datagram size"
    cmd, version, _ = GENLHDR.unpack_from(raw, 16)
    attrs: dict[int, list[bytes]] = {}
    off = 20
    while off < len(raw):
        alen, atype = NLATTR.unpack_from(raw, off)
        attrs.setdefault(atype, []).append(raw[off + 4 : off + alen])
        off += (alen + 3) & ~3
    return Request(raw, mtype, flags, seq, cmd, version, attrs)


Handler = Callable[[Request], list[bytes]]


class FakePeer:
    """Plays the kernel on the other end of a SOCK_SEQPACKET socketpair.

    Resolves GETFAMILY for the families given; every other request goes to
    ``handler``, which returns the datagrams to send back (in order).
    """

    def __init__(self, handler: Handler, families: dict[str, int] | None = None) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handler = handler
        self.families = {"vdpa": VDPA_FAMILY_ID} if families is None else families
        self.requests: list[Request] = []
        self.overlap = False  # a request arrived while another was being answered
        self.delay = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                raw = self.theirs.recv(65536)
            except OSError:
                return
            if not raw:
                return
            req = _parse_request(raw)
            self.requests.append(req)
            if self.delay:
                time.sleep(self.delay)
                if select.select([self.theirs], [], [], 0)[0]:
                    self.overlap = True
            try:
                for dgram in self._answer(req):
                    self.theirs.send(dgram)
            except OSError:
                return

    def _answer(self, req: Request) -> list[bytes]:
        if req.type == uapi.GENL_ID_CTRL and req.cmd == uapi.CTRL_CMD_GETFAMILY:
            name = req.attrs[uapi.CTRL_ATTR_FAMILY_NAME][0].rstrip(b"\0").decode()
            if name not in self.families:
                return [error_msg(req.seq, errno.ENOENT, req.raw)]
            reply = attr(uapi.CTRL_ATTR_FAMILY_ID, struct.pack("=H", self.families[name]))
            reply += attr(uapi.CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
            reply += attr(uapi.CTRL_ATTR_VERSION, struct.pack("=I", 1))
            return [
                genl_reply(req.seq, uapi.CTRL_CMD_NEWFAMILY, reply, family=uapi.GENL_ID_CTRL)
                + error_msg(req.seq, 0, req.raw)
            ]
        return self.handler(req)

    def close(self) -> None:
        self.theirs.close()
        self.thread.join(5)


@pytest.fixture
def peer_factory() -> Iterator[Callable[..., FakePeer]]:
    peers: list[FakePeer] = []

    def make(handler: Handler, families: dict[str, int] | None = None) -> FakePeer:
        p = FakePeer(handler, families)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def ack(req: Request) -> list[bytes]:
    return [error_msg(req.seq, 0, req.raw)]


def test_client_resolves_family_and_dev_add_sends_golden_bytes(
    peer_factory: Callable[..., FakePeer],
) -> None:
    peer = peer_factory(ack)
    with VdpaClient(sock=peer.ours) as client:
        assert client.family_id == VDPA_FAMILY_ID
        assert client.family_version == 1
        client.dev_add("vduse-blk0")
    getfamily, dev_new = peer.requests
    assert getfamily.raw == encode_request(
        0x10, 3, nla_string(uapi.CTRL_ATTR_FAMILY_NAME, "vdpa"), seq=getfamily.seq, version=2
    )
    assert dev_new.seq != getfamily.seq
    assert dev_new.raw == encode_request(
        VDPA_FAMILY_ID, 3, dev_new_attrs("vduse-blk0", "vduse"), seq=dev_new.seq
    )
    assert len(dev_new.raw) == 48
    assert peer.ours.fileno() == -1  # the context manager closed the injected socket


def test_dev_del_and_error_with_extack(peer_factory: Callable[..., FakePeer]) -> None:
    def handler(req: Request) -> list[bytes]:
        if req.cmd == uapi.VDPA_CMD_DEV_NEW:
            return [
                error_msg(
                    req.seq,
                    errno.ENODEV,
                    req.raw,
                    extack="Fail to find the specified management device",
                    offs=20,
                )
            ]
        assert req.cmd == uapi.VDPA_CMD_DEV_DEL
        assert req.flags == uapi.NLM_F_REQUEST | uapi.NLM_F_ACK
        assert req.attrs == {uapi.VDPA_ATTR_DEV_NAME: [b"vduse0\0"]}
        return ack(req)

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours) as client:
        client.dev_del("vduse0")
        with pytest.raises(NetlinkError) as info:
            client.dev_add("vduse0", mgmtdev="nope")
    exc = info.value
    assert exc.errno == errno.ENODEV
    assert exc.extack == "Fail to find the specified management device"
    assert exc.extack_offset == 20
    assert str(exc) == (
        "vdpa DEV_NEW vduse0: No such device (Fail to find the specified management device)"
    )
    assert peer.requests[-1].attrs[uapi.VDPA_ATTR_MGMTDEV_DEV_NAME] == [b"nope\0"]


def _dev_attrs(name: str, dev_id: int, max_vq_size: int) -> bytes:
    return (
        attr(uapi.VDPA_ATTR_DEV_NAME, name.encode() + b"\0")
        + attr(uapi.VDPA_ATTR_MGMTDEV_DEV_NAME, b"vduse\0")
        + attr(uapi.VDPA_ATTR_DEV_ID, struct.pack("=I", dev_id))
        + attr(uapi.VDPA_ATTR_DEV_VENDOR_ID, struct.pack("=I", 0))
        + attr(uapi.VDPA_ATTR_DEV_MAX_VQS, struct.pack("=I", 1))
        + attr(uapi.VDPA_ATTR_DEV_MAX_VQ_SIZE, struct.pack("=H", max_vq_size))
    )


def test_dev_list_multipart_across_datagrams_ignores_other_seq(
    peer_factory: Callable[..., FakePeer],
) -> None:
    def handler(req: Request) -> list[bytes]:
        assert req.cmd == uapi.VDPA_CMD_DEV_GET
        assert req.flags == uapi.NLM_F_REQUEST | uapi.NLM_F_DUMP
        multi = uapi.NLM_F_MULTI
        return [
            # a stale answer to an older request and a NOOP come first
            genl_reply(req.seq - 1, 5, _dev_attrs("stale", 9, 9), flags=multi)
            + nlmsg(uapi.NLMSG_NOOP, 0, req.seq, b""),
            genl_reply(req.seq, 5, _dev_attrs("a", 2, 256), flags=multi)
            + genl_reply(req.seq, 5, _dev_attrs("b", 2, 1024), flags=multi),
            error_msg(req.seq + 7, errno.EIO, req.raw),  # not ours: ignored
            genl_reply(req.seq, 5, _dev_attrs("c", 1, 512), flags=multi) + done_msg(req.seq),
        ]

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours) as client:
        devs = client.dev_list()
    assert [(d.name, d.device_id, d.max_vq_size) for d in devs] == [
        ("a", 2, 256),
        ("b", 2, 1024),
        ("c", 1, 512),
    ]
    assert devs[0].mgmtdev_dev_name == "vduse"
    assert devs[0].max_vqs == 1


def test_mgmtdev_list_and_dump_error(peer_factory: Callable[..., FakePeer]) -> None:
    calls = 0

    def handler(req: Request) -> list[bytes]:
        nonlocal calls
        calls += 1
        assert req.cmd == uapi.VDPA_CMD_MGMTDEV_GET
        if calls == 2:
            return [done_msg(req.seq, errno.EMSGSIZE, "too big")]
        multi = uapi.NLM_F_MULTI
        return [
            genl_reply(req.seq, 1, attr(2, b"vduse\0"), flags=multi)
            + genl_reply(req.seq, 1, attr(1, b"pci\0") + attr(2, b"0000:00:04.0\0"), flags=multi)
            + done_msg(req.seq)
        ]

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours) as client:
        assert client.mgmtdev_list() == ["vduse", "pci/0000:00:04.0"]
        with pytest.raises(NetlinkError) as info:
            client.mgmtdev_list()
    assert info.value.errno == errno.EMSGSIZE
    assert str(info.value) == "vdpa MGMTDEV_GET dump: Message too long (too big)"


def test_dump_interrupted_is_retried(peer_factory: Callable[..., FakePeer]) -> None:
    def handler(req: Request) -> list[bytes]:
        flags = uapi.NLM_F_MULTI
        if len(peer.requests) == 2:  # first dump attempt (after GETFAMILY)
            flags |= uapi.NLM_F_DUMP_INTR
            return [
                genl_reply(req.seq, 5, _dev_attrs("old", 1, 8), flags=flags) + done_msg(req.seq)
            ]
        return [genl_reply(req.seq, 5, _dev_attrs("new", 1, 8), flags=flags) + done_msg(req.seq)]

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours) as client:
        assert [d.name for d in client.dev_list()] == ["new"]
    assert len(peer.requests) == 3


def test_doit_reply_then_ack(peer_factory: Callable[..., FakePeer]) -> None:
    def handler(req: Request) -> list[bytes]:
        assert req.attrs == {uapi.VDPA_ATTR_DEV_NAME: [b"a\0"]}
        return [genl_reply(req.seq, 5, _dev_attrs("a", 2, 128)), error_msg(req.seq, 0, req.raw)]

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours) as client:
        assert client.dev_get("a").max_vq_size == 128


def test_family_missing(peer_factory: Callable[..., FakePeer]) -> None:
    peer = peer_factory(ack, families={})
    with pytest.raises(FamilyNotFoundError) as info:
        VdpaClient(sock=peer.ours)
    exc = info.value
    assert exc.errno == errno.ENOENT
    assert isinstance(exc, NetlinkError)
    assert "CONFIG_VDPA" in str(exc)
    assert "`vdpa`" in str(exc)
    assert str(exc).startswith("nlctrl GETFAMILY vdpa: No such file or directory. ")
    assert peer.ours.fileno() == -1  # closed on failure


def test_timeout_then_stale_reply_ignored(peer_factory: Callable[..., FakePeer]) -> None:
    held: list[Request] = []

    def handler(req: Request) -> list[bytes]:
        if not held:
            held.append(req)  # do not answer the first DEV_DEL in time
            return []
        # answer the old request now (late), then the current one with an error
        return [
            error_msg(held[0].seq, 0, held[0].raw),
            error_msg(req.seq, errno.EBUSY, req.raw),
        ]

    peer = peer_factory(handler)
    with VdpaClient(sock=peer.ours, timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(NetlinkError) as info:
            client.dev_del("x")
        elapsed = time.monotonic() - start
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.25 <= elapsed < 2.0
        with pytest.raises(NetlinkError) as info2:
            client.dev_del("x")
        assert info2.value.errno == errno.EBUSY  # the late ack for the old seq was skipped


def test_requests_are_serialised_across_threads(peer_factory: Callable[..., FakePeer]) -> None:
    def handler(req: Request) -> list[bytes]:
        name = req.attrs[uapi.VDPA_ATTR_DEV_NAME][0].rstrip(b"\0").decode()
        return [genl_reply(req.seq, 5, _dev_attrs(name, 2, 64)), error_msg(req.seq, 0, req.raw)]

    peer = peer_factory(handler)
    client = VdpaClient(sock=peer.ours)
    peer.delay = 0.02
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(3):
                name = f"d{i}-{j}"
                results[name] = client.dev_get(name).name
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    client.close()
    assert not errors
    assert results == {f"d{i}-{j}": f"d{i}-{j}" for i in range(4) for j in range(3)}
    assert not peer.overlap  # never two requests in flight on the socket


def test_peer_closes_and_malformed_and_closed(peer_factory: Callable[..., FakePeer]) -> None:
    def handler(req: Request) -> list[bytes]:
        if req.cmd == uapi.VDPA_CMD_DEV_DEL:
            return [NLMSGHDR.pack(64, uapi.NLMSG_ERROR, 0, req.seq, 0) + b"\0" * 4]
        peer.theirs.shutdown(socket.SHUT_RDWR)
        return []

    peer = peer_factory(handler)
    client = VdpaClient(sock=peer.ours, timeout=2)
    with pytest.raises(NetlinkError) as info:
        client.dev_del("x")
    assert info.value.errno == errno.EPROTO
    with pytest.raises(NetlinkError) as info:
        client.dev_add("x")
    assert info.value.errno == errno.ECONNRESET
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(NetlinkError) as info:
        client.dev_del("x")
    assert info.value.errno == errno.EBADF


def test_bad_timeout() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(ValueError):
        GenericNetlink("nlctrl", sock=a, timeout=0)


# ---------------------------------------------------------------------------
# Real kernel (this host has generic netlink but no vdpa family)
# ---------------------------------------------------------------------------


def _netlink_available() -> bool:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, uapi.NETLINK_GENERIC)
    except OSError:
        return False
    s.close()
    return True


real_kernel = pytest.mark.skipif(not _netlink_available(), reason="no AF_NETLINK generic socket")


@real_kernel
def test_real_kernel_family_dump_and_resolve() -> None:
    with GenericNetlink("nlctrl") as ctrl:
        assert ctrl.family_id == uapi.GENL_ID_CTRL
        families = {
            get_string(f, uapi.CTRL_ATTR_FAMILY_NAME): get_u16(f, uapi.CTRL_ATTR_FAMILY_ID)
            for f in ctrl.request(uapi.CTRL_CMD_GETFAMILY, dump=True)
        }
    assert families["nlctrl"] == 0x10
    others = sorted(n for n in families if n and n != "nlctrl")
    if not others:
        pytest.skip("only nlctrl registered")
    name = "ethtool" if "ethtool" in others else others[0]
    with GenericNetlink(name) as fam:
        assert fam.family_id == families[name]
        assert fam.family_version is not None and fam.family_version >= 1


@real_kernel
def test_real_kernel_policy_error_has_extack() -> None:
    # CTRL_ATTR_FAMILY_ID must be a u16; a 1-byte payload fails policy validation.
    with GenericNetlink("nlctrl") as ctrl:
        with pytest.raises(NetlinkError) as info:
            ctrl.request(uapi.CTRL_CMD_GETFAMILY, nla(uapi.CTRL_ATTR_FAMILY_ID, b"\x01"))
        exc = info.value
        assert exc.errno in (errno.EINVAL, errno.ERANGE)
        assert exc.extack is not None and "policy" in exc.extack
        assert exc.extack_offset == 20  # first attribute, right after nlmsghdr + genlmsghdr
        assert str(exc).startswith("nlctrl cmd 3: ")
        # the socket still works afterwards
        reply = ctrl.request(
            uapi.CTRL_CMD_GETFAMILY, nla_string(uapi.CTRL_ATTR_FAMILY_NAME, "nlctrl")
        )
        assert get_u16(reply[0], uapi.CTRL_ATTR_FAMILY_ID) == 0x10


@real_kernel
def test_real_kernel_missing_family() -> None:
    with pytest.raises(FamilyNotFoundError) as info:
        GenericNetlink("pyvduse-nofam")  # < GENL_NAMSIZ (16)
    assert info.value.errno == errno.ENOENT


@real_kernel
def test_real_kernel_vdpa_client() -> None:
    try:
        client = VdpaClient()
    except FamilyNotFoundError as exc:
        assert exc.errno == errno.ENOENT
        assert "CONFIG_VDPA" in str(exc)
        return
    with client:  # a kernel with vdpa: the unprivileged dumps must work
        assert isinstance(client.mgmtdev_list(), list)
        assert isinstance(client.dev_list(), list)
