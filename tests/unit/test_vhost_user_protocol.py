"""vhost-user wire format and framing: payload structs, request rules, Connection."""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvduse.errors import PyvduseError
from pyvduse.vhost_user import protocol as p
from pyvduse.vhost_user.connection import Connection, Message, validate
from pyvduse.vhost_user.protocol import ProtocolError, Request


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _raw(request: int, payload: bytes = b"", flags: int = p.VERSION,
         size: int | None = None) -> bytes:
    """A message as a front-end writes it (header built by hand, not by the module)."""
    return struct.pack("=III", request, flags, len(payload) if size is None else size) + payload


def _sendfds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    control = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
    assert sock.sendmsg([data], control) == len(data)


class Pair:
    """A front-end socket and the back-end Connection on the other end."""

    def __init__(self) -> None:
        self.front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = Connection(back)

    def close(self) -> None:
        self.front.close()
        self.conn.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    pr = Pair()
    yield pr
    pr.close()


@pytest.fixture
def pipes() -> Iterator[Callable[[int], list[int]]]:
    """Make ``n`` pipe read ends (closed at the end): fds to send."""
    made: list[int] = []

    def make(n: int) -> list[int]:
        out = []
        for _ in range(n):
            r, w = os.pipe()
            made.extend((r, w))
            out.append(r)
        return out

    yield make
    for fd in made:
        os.close(fd)


# -- payload structs ---------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[Callable[[Any], bytes], Callable[[bytes], Any], Any, int]] = [
    (p.encode_u64, p.decode_u64, 0xFEDC_BA98_7654_3210, 8),
    (p.encode_vring_state, p.decode_vring_state, p.VringState(3, 0xFFFF_FFFF), 8),
    (p.encode_vring_fd, p.decode_vring_fd, p.VringFd(7, True), 8),
    (p.encode_vring_fd, p.decode_vring_fd, p.VringFd(255, False), 8),
    (p.encode_vring_addr, p.decode_vring_addr,
     p.VringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x1_0000), 40),
    (p.encode_single_region, p.decode_single_region,
     p.MemoryRegion(0x1_0000_0000, 1 << 30, 0x7F12_3400_0000, 0xC000_0000), 40),
    (p.encode_log, p.decode_log, p.LogDescription(4096, 64), 16),
    (p.encode_iotlb, p.decode_iotlb, p.IotlbMessage(0x1000, 0x2000, 0x7F00_0000, 3, 2), 32),
    (p.encode_config, p.decode_config, p.ConfigSpace(0x14, 0, bytes(range(60))), 72),
    (p.encode_config, p.decode_config, p.ConfigSpace(0, 1, bytes(256)), 268),
    (p.encode_config, p.decode_config, p.ConfigSpace(8, 0, b""), 12),
    (p.encode_vring_area, p.decode_vring_area, p.VringArea(0x101, 4096, 8192), 24),
    (p.encode_inflight, p.decode_inflight, p.Inflight(8256, 0, 4, 256), 24),
    (p.encode_device_state, p.decode_device_state, p.DeviceStateTransfer(1, 0), 8),
]


@pytest.mark.parametrize(("encode", "decode", "value", "size"), ROUND_TRIPS)
def test_structs_round_trip(encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
                            value: Any, size: int) -> None:
    raw = encode(value)
    assert len(raw) == size
    assert decode(raw) == value
    for bad in (raw[:-1], raw + b"\0"):
        with pytest.raises(ProtocolError):
            decode(bad)


def test_layouts_match_the_front_end_structs() -> None:
    # native order, packed header, C padding kept in the payloads
    assert p.HEADER.size == 12
    assert p.encode_vring_fd(p.VringFd(2, True)) == struct.pack("=Q", 0x102)
    assert p.encode_inflight(p.Inflight(1, 2, 3, 4)) == struct.pack("=QQHH", 1, 2, 3, 4) + bytes(4)
    region = p.MemoryRegion(1, 2, 3, 4)
    assert p.encode_single_region(region) == bytes(8) + struct.pack("=QQQQ", 1, 2, 3, 4)
    assert p.encode_vring_addr(p.VringAddr(1, 2, 3, 4, 5, 6)) == struct.pack(
        "=IIQQQQ", 1, 2, 3, 4, 5, 6)
    assert p.ProtocolFeature.CONFIGURE_MEM_SLOTS.mask == 1 << 15
    assert issubclass(ProtocolError, PyvduseError)


def test_memory_table_round_trip() -> None:
    regions = (p.MemoryRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
               p.MemoryRegion(0xC0000, 0x7FF4_0000, 0x7F00_000C_0000, 0xC0000))
    raw = p.encode_memory_table(regions)
    assert len(raw) == 8 + 2 * 32
    assert p.decode_memory_table(raw) == regions
    # the whole 8-slot table (unused tail ignored) is accepted too
    assert p.decode_memory_table(raw + bytes(6 * 32)) == regions
    assert p.decode_memory_table(p.encode_memory_table([])) == ()


@pytest.mark.parametrize("raw", [
    b"", bytes(7),
    struct.pack("=II", 9, 0) + bytes(9 * 32),  # more than 8 regions
    struct.pack("=II", 2, 0) + bytes(32),  # fewer regions than announced
    struct.pack("=II", 1, 0) + bytes(64),  # more bytes than announced, not the full table
    struct.pack("=II", 1, 0) + bytes(33),
])
def test_memory_table_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_memory_table(raw)


@pytest.mark.parametrize("raw", [
    b"", bytes(11),
    struct.pack("=III", 0, 257, 0) + bytes(257),  # beyond the 256-byte maximum
    struct.pack("=III", 0, 4, 0) + bytes(3),  # size field and payload disagree
    struct.pack("=III", 0, 4, 0) + bytes(5),
])
def test_config_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_config(raw)


def test_vring_fd_refuses_unknown_bits() -> None:
    with pytest.raises(ProtocolError, match="unknown bits"):
        p.decode_vring_fd(struct.pack("=Q", 0x200))


def test_encoders_refuse_out_of_range_values() -> None:
    with pytest.raises(ProtocolError):
        p.encode_u64(-1)
    with pytest.raises(ProtocolError):
        p.encode_vring_state(p.VringState(1 << 32, 0))
    with pytest.raises(ProtocolError):
        p.encode_vring_fd(p.VringFd(256, False))
    with pytest.raises(ProtocolError):
        p.encode_config(p.ConfigSpace(0, 0, bytes(257)))
    with pytest.raises(ProtocolError):
        p.encode_memory_table([p.MemoryRegion(0, 1, 0, 0)] * 9)


def test_request_names() -> None:
    assert p.request_name(5) == "SET_MEM_TABLE"
    assert p.request_name(Request.GET_FEATURES) == "GET_FEATURES"
    assert p.request_name(999) == "unknown request 999"
    assert p.backend_request_name(2) == "CONFIG_CHANGE_MSG"
    assert "unknown" in p.backend_request_name(0)


def test_every_request_has_a_rule() -> None:
    assert set(p.EXPECTED) == set(Request)
    for rule in p.EXPECTED.values():
        assert 0 <= rule.min_size <= rule.max_size <= p.MAX_PAYLOAD


DECODERS = [p.decode_u64, p.decode_vring_state, p.decode_vring_fd, p.decode_vring_addr,
            p.decode_memory_table, p.decode_single_region, p.decode_log, p.decode_iotlb,
            p.decode_config, p.decode_vring_area, p.decode_inflight, p.decode_device_state]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DECODERS), st.binary(max_size=300))
def test_decoders_raise_only_protocol_error(decode: Callable[[bytes], Any], raw: bytes) -> None:
    try:
        decode(raw)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 50), st.binary(max_size=300), st.integers(0, 9))
def test_check_request_raises_only_protocol_error(request: int, raw: bytes, nfds: int) -> None:
    try:
        p.check_request(request, raw, nfds)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=8))
def test_memory_table_round_trips_any_values(values: list[tuple[int, int, int, int]]) -> None:
    regions = tuple(p.MemoryRegion(*v) for v in values)
    assert p.decode_memory_table(p.encode_memory_table(regions)) == regions


# -- request rules -----------------------------------------------------------------------------

VALID: list[tuple[int, bytes, int]] = [
    (Request.GET_FEATURES, b"", 0),
    (Request.SET_FEATURES, bytes(8), 0),
    (Request.SET_OWNER, b"", 0),
    (Request.SET_MEM_TABLE, p.encode_memory_table([p.MemoryRegion(0, 4096, 0, 0)] * 2), 2),
    (Request.SET_MEM_TABLE, p.encode_memory_table([]), 0),
    (Request.SET_LOG_BASE, bytes(8), 0),
    (Request.SET_LOG_BASE, bytes(16), 1),
    (Request.SET_VRING_KICK, p.encode_vring_fd(p.VringFd(0, False)), 1),
    (Request.SET_VRING_CALL, p.encode_vring_fd(p.VringFd(1, True)), 0),
    (Request.SET_VRING_ERR, p.encode_vring_fd(p.VringFd(1, False)), 1),
    (Request.GET_VRING_BASE, bytes(8), 0),
    (Request.GET_CONFIG, p.encode_config(p.ConfigSpace(0, 0, bytes(60))), 0),
    (Request.SET_CONFIG, p.encode_config(p.ConfigSpace(0x20, 0, b"\1")), 0),
    (Request.GET_INFLIGHT_FD, p.encode_inflight(p.Inflight(0, 0, 1, 128)), 0),
    (Request.SET_INFLIGHT_FD, p.encode_inflight(p.Inflight(4096, 0, 1, 128)), 1),
    (Request.ADD_MEM_REG, bytes(40), 1),
    (Request.REM_MEM_REG, bytes(40), 0),
    (Request.REM_MEM_REG, bytes(40), 1),
    (Request.SET_BACKEND_REQ_FD, b"", 1),
    (Request.SET_STATUS, bytes(8), 0),
    (Request.RESET_DEVICE, b"", 0),
]


@pytest.mark.parametrize(("request_", "payload", "nfds"), VALID)
def test_check_request_accepts(request_: int, payload: bytes, nfds: int) -> None:
    p.check_request(request_, payload, nfds)


INVALID: list[tuple[int, bytes, int, str]] = [
    (Request.GET_FEATURES, bytes(8), 0, "payload of 8 bytes"),
    (Request.SET_FEATURES, bytes(4), 0, "payload of 4 bytes"),
    (Request.SET_FEATURES, bytes(8), 1, "1 fds, expected 0"),
    (Request.SET_VRING_ADDR, bytes(39), 0, "expected 40 bytes"),
    (Request.SET_MEM_TABLE, p.encode_memory_table([p.MemoryRegion(0, 1, 0, 0)] * 2), 1,
     "1 fds, expected 2"),
    (Request.SET_MEM_TABLE, p.encode_memory_table([p.MemoryRegion(0, 1, 0, 0)]), 2,
     "2 fds, expected 1"),
    (Request.SET_MEM_TABLE, bytes(8 + 32 * 9), 0, "payload of 296 bytes"),
    (Request.SET_VRING_KICK, p.encode_vring_fd(p.VringFd(0, False)), 0, "0 fds, expected 1"),
    (Request.SET_VRING_CALL, p.encode_vring_fd(p.VringFd(0, True)), 1, "1 fds, expected 0"),
    (Request.SET_VRING_KICK, struct.pack("=Q", 1 << 9), 0, "unknown bits"),
    (Request.SET_LOG_BASE, bytes(16), 0, "0 fds, expected 1"),
    (Request.SET_LOG_BASE, bytes(12), 0, "payload of 12 bytes"),
    (Request.ADD_MEM_REG, bytes(40), 0, "0 fds, expected 1"),
    (Request.ADD_MEM_REG, bytes(32), 1, "payload of 32 bytes"),
    (Request.REM_MEM_REG, bytes(40), 2, "2 fds, expected 1"),
    (Request.GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(4), 0, "access of 8"),
    (Request.GET_CONFIG, bytes(11), 0, "payload of 11 bytes"),
    (Request.SET_INFLIGHT_FD, bytes(20), 1, "payload of 20 bytes"),
    (Request.SET_INFLIGHT_FD, bytes(24), 0, "0 fds, expected 1"),
    (99, b"", 0, "unknown request 99"),
    (0, b"", 0, "unknown request 0"),
]


@pytest.mark.parametrize(("request_", "payload", "nfds", "why"), INVALID)
def test_check_request_refuses(request_: int, payload: bytes, nfds: int, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.check_request(request_, payload, nfds)


def test_needs_ack() -> None:
    need = p.VERSION | p.FLAG_NEED_REPLY
    assert p.needs_ack(Request.SET_MEM_TABLE, need)
    assert not p.needs_ack(Request.SET_MEM_TABLE, p.VERSION)
    assert not p.needs_ack(Request.GET_FEATURES, need)  # answered by its own reply
    assert not p.needs_ack(Request.GET_VRING_BASE, need)
    assert p.needs_ack(99, need)  # the front-end waits: answer with a failure


# -- Connection: receiving ---------------------------------------------------------------------


def test_receive_message_with_fds(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(2)
    payload = p.encode_memory_table([p.MemoryRegion(0, 4096, 0, 0)] * 2)
    _sendfds(pair.front, _raw(Request.SET_MEM_TABLE, payload, p.VERSION | p.FLAG_NEED_REPLY),
             fds)
    msg = pair.conn.receive()
    assert msg is not None
    with msg:
        assert (msg.request, msg.payload, msg.name) == (5, payload, "SET_MEM_TABLE")
        assert msg.need_reply and not msg.is_reply
        assert len(msg.fds) == 2
        for sent, got in zip(fds, msg.fds, strict=True):
            assert os.fstat(sent).st_ino == os.fstat(got).st_ino
            assert not os.get_inheritable(got)  # MSG_CMSG_CLOEXEC
        validate(msg)
        taken = msg.take_fd()
        assert len(msg.fds) == 1
    assert msg.fds == []
    os.close(taken)


def test_receive_sequence_and_orderly_eof(pair: Pair) -> None:
    pair.front.sendall(_raw(Request.SET_OWNER) + _raw(Request.GET_FEATURES)
                       + _raw(Request.SET_FEATURES, struct.pack("=Q", 1 << 30)))
    pair.front.shutdown(socket.SHUT_WR)
    seen = []
    while (msg := pair.conn.receive()) is not None:
        validate(msg)
        seen.append((msg.request, msg.payload))
    assert seen == [(3, b""), (1, b""), (2, struct.pack("=Q", 1 << 30))]
    assert pair.conn.receive() is None


def test_receive_short_reads(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    # header in pieces, the fd with the payload (a later segment): all collected
    raw = _raw(Request.SET_VRING_CALL, p.encode_vring_fd(p.VringFd(0, False)))
    pair.front.sendall(raw[:5])
    pair.front.sendall(raw[5:12])
    _sendfds(pair.front, raw[12:14], pipes(1))
    pair.front.sendall(raw[14:])
    msg = pair.conn.receive()
    assert msg is not None
    with msg:
        assert len(msg.fds) == 1
        validate(msg)
        assert p.decode_vring_fd(msg.payload) == p.VringFd(0, False)


def test_unknown_request_is_still_a_message(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    before = _open_fds()
    _sendfds(pair.front, _raw(77, b"abc", p.VERSION | p.FLAG_NEED_REPLY), pipes(1))
    msg = pair.conn.receive()
    assert msg is not None and msg.request == 77 and msg.payload == b"abc"
    assert msg.name == "unknown request 77"
    with pytest.raises(ProtocolError, match="unknown request 77"):
        validate(msg)
    assert msg.fds == []
    assert _open_fds() == before + 2  # only the test's own pipe


def _framing_error_leaks_nothing(pair: Pair, data: bytes, fds: list[int], match: str,
                                 shutdown: bool = False) -> None:
    before = _open_fds()
    _sendfds(pair.front, data, fds)
    if shutdown:
        pair.front.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match=match):
        pair.conn.receive()
    assert _open_fds() == before


def test_wrong_version(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(1)
    _framing_error_leaks_nothing(pair, _raw(Request.SET_OWNER, flags=0x2), fds, "version 2")


def test_version_zero(pair: Pair) -> None:
    _framing_error_leaks_nothing(pair, _raw(Request.SET_OWNER, flags=0), [], "version 0")


def test_oversize_payload(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(2)
    _framing_error_leaks_nothing(pair, _raw(Request.SET_CONFIG, size=p.MAX_PAYLOAD + 1), fds,
                                 "at most 4096")


def test_short_header_then_eof(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(1)
    _framing_error_leaks_nothing(pair, _raw(Request.SET_OWNER)[:7], fds, "after 7 of 12",
                                 shutdown=True)


def test_eof_mid_payload(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(3)
    data = _raw(Request.SET_MEM_TABLE, size=8 + 3 * 32) + bytes(20)
    _framing_error_leaks_nothing(pair, data, fds, "after 20 of 104", shutdown=True)


def test_too_many_fds(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(9)
    _framing_error_leaks_nothing(pair, _raw(Request.SET_MEM_TABLE, bytes(8)), fds,
                                 "more than 8 file descriptors")


def test_too_many_fds_across_segments(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(10)
    before = _open_fds()
    raw = _raw(Request.SET_MEM_TABLE, bytes(8))
    _sendfds(pair.front, raw[:12], fds[:5])
    _sendfds(pair.front, raw[12:], fds[5:])
    with pytest.raises(ProtocolError, match="10 file descriptors"):
        pair.conn.receive()
    assert _open_fds() == before


@pytest.mark.parametrize(("request_", "payload", "nfds"), [
    (Request.SET_FEATURES, bytes(4), 0),  # wrong size
    (Request.SET_VRING_NUM, bytes(8), 1),  # fd where none belongs
    (Request.SET_VRING_KICK, p.encode_vring_fd(p.VringFd(0, False)), 0),  # fd missing
    (Request.SET_VRING_KICK, p.encode_vring_fd(p.VringFd(0, True)), 1),  # fd despite NOFD
    (Request.SET_MEM_TABLE, p.encode_memory_table([p.MemoryRegion(0, 1, 0, 0)]), 3),
    (Request.ADD_MEM_REG, bytes(40), 2),  # too many
])
def test_validate_closes_fds(pair: Pair, pipes: Callable[[int], list[int]], request_: int,
                             payload: bytes, nfds: int) -> None:
    fds = pipes(nfds)
    before = _open_fds()
    _sendfds(pair.front, _raw(request_, payload), fds)
    msg = pair.conn.receive()
    assert msg is not None and len(msg.fds) == nfds
    with pytest.raises(ProtocolError):
        validate(msg)
    assert msg.fds == []
    assert _open_fds() == before


def test_validate_closes_the_stray_fd_of_rem_mem_reg(pair: Pair,
                                                     pipes: Callable[[int], list[int]]) -> None:
    fds = pipes(1)
    before = _open_fds()
    _sendfds(pair.front, _raw(Request.REM_MEM_REG, bytes(40)), fds)
    msg = pair.conn.receive()
    assert msg is not None
    validate(msg)
    assert msg.fds == []
    assert _open_fds() == before


def test_take_fd_without_fd() -> None:
    msg = Message(Request.SET_LOG_FD, p.VERSION, b"")
    with pytest.raises(ProtocolError, match="no file descriptor"):
        msg.take_fd()
    assert msg.take_fds() == []


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_receive_random_bytes(data: bytes) -> None:
    """Whatever arrives, receive returns messages, then None or a ProtocolError."""
    pr = Pair()
    try:
        pr.front.sendall(data)
        pr.front.shutdown(socket.SHUT_WR)
        while True:
            try:
                msg = pr.conn.receive()
            except ProtocolError:
                break
            if msg is None:
                break
            try:
                validate(msg)
            except ProtocolError:
                pass
            msg.close_fds()
    finally:
        pr.close()


# -- Connection: sending -----------------------------------------------------------------------


def test_reply_flags_and_payload(pair: Pair) -> None:
    pair.conn.reply(Request.GET_FEATURES, p.encode_u64(1 << 30 | 1 << 32))
    pair.conn.reply_ack(Request.SET_MEM_TABLE, True)
    pair.conn.reply_ack(Request.SET_VRING_ADDR, False)
    data = pair.front.recv(4096)
    assert data == (struct.pack("=IIIQ", 1, 0x5, 8, 1 << 30 | 1 << 32)
                    + struct.pack("=IIIQ", 5, 0x5, 8, 0) + struct.pack("=IIIQ", 9, 0x5, 8, 1))


def test_send_with_fds_round_trip(pair: Pair, pipes: Callable[[int], list[int]]) -> None:
    # the reply of GET_INFLIGHT_FD: payload and one fd, read back by a Connection
    fds = pipes(1)
    front = Connection(pair.front)
    payload = p.encode_inflight(p.Inflight(4096, 0, 1, 128))
    pair.conn.reply(Request.GET_INFLIGHT_FD, payload, fds)
    msg = front.receive()
    assert msg is not None
    with msg:
        assert msg.is_reply and msg.flags == p.VERSION | p.FLAG_REPLY
        assert msg.payload == payload and len(msg.fds) == 1
        assert os.fstat(msg.fds[0]).st_ino == os.fstat(fds[0]).st_ino
    # and the back-end channel's direction: a request that wants an ack
    pair.conn.send(2, b"", flags=p.FLAG_NEED_REPLY)
    msg = front.receive()
    assert msg is not None and msg.request == 2 and msg.need_reply and msg.fds == []


def test_send_refuses_oversize(pair: Pair) -> None:
    with pytest.raises(ProtocolError):
        pair.conn.send(Request.SET_CONFIG, bytes(p.MAX_PAYLOAD + 1))


def test_connection_wants_a_unix_stream_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError):
            Connection(a)
    finally:
        a.close()
        b.close()


def test_receive_survives_signals(pair: Pair) -> None:
    """A signal arriving while receive blocks (EINTR) does not break the message."""
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    raw = _raw(Request.SET_FEATURES, bytes(8))

    def later() -> None:
        pair.front.sendall(raw[:6])
        threading.Event().wait(0.15)
        pair.front.sendall(raw[6:])

    sender = threading.Thread(target=later)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        sender.start()
        msg = pair.conn.receive()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sender.join()
    assert msg is not None and msg.request == Request.SET_FEATURES
    assert hits
