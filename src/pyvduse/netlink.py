"""Generic netlink over the stdlib, and the vdpa family client (attach/detach).

Layers, bottom up:

* pure encoders and decoders (:func:`nla`, :func:`nla_string`, :func:`nla_u32`,
  :func:`encode_request`, :func:`split_messages`, :func:`parse_attrs`,
  :func:`parse_error_payload`, ...): bytes in, bytes or values out; no socket, so
  they are golden-tested without a kernel;
* :class:`GenericNetlink`: one ``AF_NETLINK``/``NETLINK_GENERIC`` socket (or an
  injected socket that behaves like one), family resolution through ``nlctrl``,
  and :meth:`GenericNetlink.request` (sequence numbers, multipart replies,
  ``NLMSG_DONE``, acks, extended-ack error messages, a deadline on every request);
* :class:`VdpaClient`: the three-and-a-bit vdpa commands pyvduse needs.

Errors are :class:`NetlinkError` (an :class:`OSError` carrying the errno and, when
the kernel sent one, its extended-ack message), e.g.
``"vdpa DEV_NEW vduse0: No such device (Fail to find the specified mgmt device)"``.

Threading: each instance serialises its requests with a lock (one request in
flight per socket), so one instance may be shared by threads. ``VDPA_CMD_DEV_NEW``
and ``VDPA_CMD_DEV_DEL`` make the kernel probe or remove the bus driver
synchronously, which sends VDUSE control messages to the daemon and waits for
the answers: call them from a thread other than the VDUSE control loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

from pyvduse.errors import PyvduseError
from pyvduse.uapi.vdpa import (
    CTRL_ATTR_FAMILY_ID,
    CTRL_ATTR_FAMILY_NAME,
    CTRL_ATTR_VERSION,
    CTRL_CMD_GETFAMILY,
    GENL_CTRL_NAME,
    GENL_CTRL_VERSION,
    GENL_HDRLEN,
    GENL_ID_CTRL,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NLA_ALIGNTO,
    NLA_HDRLEN,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_ALIGNTO,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDRLEN,
    NLMSG_MIN_TYPE,
    NLMSG_NOOP,
    NLMSG_OVERRUN,
    NLMSGERR_ATTR_MSG,
    NLMSGERR_ATTR_OFFS,
    SOL_NETLINK,
    VDPA_ATTR_DEV_ID,
    VDPA_ATTR_DEV_MAX_VQ_SIZE,
    VDPA_ATTR_DEV_MAX_VQS,
    VDPA_ATTR_DEV_MIN_VQ_SIZE,
    VDPA_ATTR_DEV_NAME,
    VDPA_ATTR_DEV_VENDOR_ID,
    VDPA_ATTR_MGMTDEV_BUS_NAME,
    VDPA_ATTR_MGMTDEV_DEV_NAME,
    VDPA_CMD_DEV_DEL,
    VDPA_CMD_DEV_GET,
    VDPA_CMD_DEV_NEW,
    VDPA_CMD_MGMTDEV_GET,
    VDPA_GENL_NAME,
    VDPA_GENL_VERSION,
    genlmsghdr,
    nlattr,
    nlmsghdr,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Attrs",
    "FamilyNotFoundError",
    "GenericNetlink",
    "NetlinkError",
    "NetlinkMessage",
    "VdpaClient",
    "VdpaDeviceInfo",
    "decode_dev_info",
    "decode_mgmtdev_name",
    "dev_del_attrs",
    "dev_get_attrs",
    "dev_new_attrs",
    "encode_request",
    "get_bytes",
    "get_string",
    "get_u8",
    "get_u16",
    "get_u32",
    "get_u64",
    "nla",
    "nla_align",
    "nla_get_string",
    "nla_get_uint",
    "nla_string",
    "nla_u8",
    "nla_u16",
    "nla_u32",
    "nla_u64",
    "nlmsg_align",
    "parse_attrs",
    "parse_done_payload",
    "parse_error_payload",
    "split_messages",
]

#: Default deadline of one request, in seconds.
DEFAULT_TIMEOUT = 30.0

#: recv() buffer; the kernel never builds netlink replies larger than 32 KiB.
RECV_BUFSIZE = 65536

#: Parsed attributes of one message: attribute type (flags masked off) -> payloads
#: in the order they appeared (an attribute may repeat).
Attrs = dict[int, list[bytes]]

_DUMP_ATTEMPTS = 3

# Netlink integers are in host byte order.
_BYTEORDER = sys.byteorder


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class NetlinkError(PyvduseError, OSError):
    """A netlink request failed.

    Attributes: ``errno`` (positive), ``strerror``, ``operation`` (what was asked,
    e.g. ``"vdpa DEV_NEW vduse0"``), ``extack`` (the kernel's extended-ack
    message, or ``None``), ``extack_offset`` (byte offset of the offending
    attribute in the request, or ``None``), ``hint`` (a fix-it sentence, or
    ``None``).

    ``str()`` reads ``"<operation>: <strerror>[ (<extack>)][. <hint>]"``.
    """

    def __init__(
        self,
        errno_: int,
        operation: str,
        extack: str | None = None,
        *,
        extack_offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(errno_, os.strerror(errno_))
        self.operation = operation
        self.extack = extack
        self.extack_offset = extack_offset
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.operation}: {self.strerror}"
        if self.extack:
            text += f" ({self.extack})"
        if self.hint:
            text += f". {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_netlink_error,
            (type(self), self.errno, self.operation, self.extack, self.extack_offset, self.hint),
        )


def _rebuild_netlink_error(
    cls: type[NetlinkError],
    errno_: int,
    operation: str,
    extack: str | None,
    extack_offset: int | None,
    hint: str | None,
) -> NetlinkError:
    exc = NetlinkError.__new__(cls)
    NetlinkError.__init__(exc, errno_, operation, extack, extack_offset=extack_offset, hint=hint)
    return exc


class FamilyNotFoundError(NetlinkError):
    """The generic netlink family is not registered (``errno`` is ``ENOENT``).

    ``family`` is the name that was looked up; ``hint`` says how to get it
    (for vdpa: a kernel with ``CONFIG_VDPA`` and the ``vdpa`` module loaded).
    """

    def __init__(self, family: str, hint: str | None = None, extack: str | None = None) -> None:
        if hint is None:
            hint = f"The generic netlink family {family!r} is not registered in this kernel"
        super().__init__(errno.ENOENT, f"{GENL_CTRL_NAME} GETFAMILY {family}", extack, hint=hint)
        self.family = family

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.family, self.hint, self.extack))


# ---------------------------------------------------------------------------
# Pure encoders
# ---------------------------------------------------------------------------


def nlmsg_align(length: int) -> int:
    """Round ``length`` up to the netlink message alignment (4)."""
    return (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


def nla_align(length: int) -> int:
    """Round ``length`` up to the netlink attribute alignment (4)."""
    return (length + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)


def nla(attr_type: int, payload: bytes) -> bytes:
    """Encode one attribute: ``struct nlattr`` + payload + zero padding to 4 bytes.

    ``nla_len`` counts header and payload but not the padding, as the kernel
    expects. Raises :class:`ValueError` if the type or length do not fit u16.
    """
    length = NLA_HDRLEN + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"netlink attribute {attr_type} too long ({len(payload)} bytes)")
    if not 0 <= attr_type <= 0xFFFF:
        raise ValueError(f"netlink attribute type {attr_type} out of range")
    return nlattr.pack(length, attr_type) + payload + b"\0" * (nla_align(length) - length)


def nla_string(attr_type: int, value: str) -> bytes:
    """Encode a NUL-terminated UTF-8 string attribute (``NLA_STRING``/``NLA_NUL_STRING``).

    Raises :class:`ValueError` if ``value`` contains a NUL character.
    """
    if "\0" in value:
        raise ValueError(f"netlink string attribute {attr_type} contains NUL: {value!r}")
    return nla(attr_type, value.encode() + b"\0")


def nla_u8(attr_type: int, value: int) -> bytes:
    """Encode a u8 attribute (host byte order)."""
    return nla(attr_type, value.to_bytes(1, "little"))


def nla_u16(attr_type: int, value: int) -> bytes:
    """Encode a u16 attribute (host byte order, padded to 4 bytes on the wire)."""
    return nla(attr_type, value.to_bytes(2, _BYTEORDER))


def nla_u32(attr_type: int, value: int) -> bytes:
    """Encode a u32 attribute (host byte order)."""
    return nla(attr_type, value.to_bytes(4, _BYTEORDER))


def nla_u64(attr_type: int, value: int) -> bytes:
    """Encode a u64 attribute (host byte order)."""
    return nla(attr_type, value.to_bytes(8, _BYTEORDER))


def encode_request(
    family_id: int,
    cmd: int,
    attrs: bytes = b"",
    seq: int = 1,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
    *,
    version: int = 1,
    pid: int = 0,
) -> bytes:
    """Encode one generic netlink request.

    Layout: ``struct nlmsghdr`` (``nlmsg_len`` = total length, ``nlmsg_type`` =
    ``family_id``, ``flags``, ``seq``, ``pid``) + ``struct genlmsghdr`` (``cmd``,
    ``version``, reserved 0) + ``attrs`` (already encoded with :func:`nla` & co.,
    so a multiple of 4 bytes long; :class:`ValueError` otherwise).
    """
    if len(attrs) % NLA_ALIGNTO:
        raise ValueError(f"attribute stream length {len(attrs)} is not 4-byte aligned")
    length = NLMSG_HDRLEN + GENL_HDRLEN + len(attrs)
    return (
        nlmsghdr.pack(length, family_id, flags, seq & 0xFFFFFFFF, pid)
        + genlmsghdr.pack(cmd, version, 0)
        + attrs
    )


# ---------------------------------------------------------------------------
# Pure decoders
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    """One netlink message: header fields and the payload after ``struct nlmsghdr``."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def split_messages(data: bytes) -> list[NetlinkMessage]:
    """Split one datagram into its netlink messages.

    Raises :class:`ValueError` on a truncated or malformed header (a length
    shorter than the header or running past the end of ``data``).
    """
    out: list[NetlinkMessage] = []
    off = 0
    while off < len(data):
        if len(data) - off < NLMSG_HDRLEN:
            raise ValueError(f"truncated netlink header at offset {off}")
        length, mtype, flags, seq, pid = nlmsghdr.unpack_from(data, off)
        if length < NLMSG_HDRLEN or off + length > len(data):
            raise ValueError(f"bad netlink message length {length} at offset {off}")
        out.append(
            NetlinkMessage(mtype, flags, seq, pid, bytes(data[off + NLMSG_HDRLEN : off + length]))
        )
        off += nlmsg_align(length)
    return out


def parse_attrs(buf: bytes) -> Attrs:
    """Parse a stream of attributes into ``{type: [payload, ...]}``.

    The nested/byte-order flag bits are masked off the type; payloads exclude
    the alignment padding. Nested attributes are left as bytes (parse them again
    with this function). Raises :class:`ValueError` on a malformed stream.
    """
    out: Attrs = {}
    off = 0
    while off < len(buf):
        if len(buf) - off < NLA_HDRLEN:
            raise ValueError(f"truncated netlink attribute header at offset {off}")
        length, atype = nlattr.unpack_from(buf, off)
        if length < NLA_HDRLEN or off + length > len(buf):
            raise ValueError(f"bad netlink attribute length {length} at offset {off}")
        out.setdefault(atype & NLA_TYPE_MASK, []).append(
            bytes(buf[off + NLA_HDRLEN : off + length])
        )
        off += nla_align(length)
    return out


def nla_get_string(payload: bytes) -> str:
    """Decode a string attribute payload (stops at the first NUL, UTF-8 with replacement)."""
    end = payload.find(b"\0")
    if end >= 0:
        payload = payload[:end]
    return payload.decode(errors="replace")


def nla_get_uint(payload: bytes, size: int) -> int:
    """Decode a host-order unsigned integer attribute payload of exactly ``size`` bytes.

    Raises :class:`ValueError` if the payload has another length.
    """
    if len(payload) != size:
        raise ValueError(f"expected a {size}-byte integer attribute, got {len(payload)} bytes")
    return int.from_bytes(payload, _BYTEORDER)


def get_bytes(attrs: Attrs, attr_type: int) -> bytes | None:
    """First payload of ``attr_type`` in ``attrs``, or ``None`` if absent."""
    values = attrs.get(attr_type)
    return values[0] if values else None


def get_string(attrs: Attrs, attr_type: int) -> str | None:
    """First ``attr_type`` decoded as a string, or ``None`` if absent."""
    raw = get_bytes(attrs, attr_type)
    return None if raw is None else nla_get_string(raw)


def get_u8(attrs: Attrs, attr_type: int) -> int | None:
    """First ``attr_type`` decoded as u8, or ``None`` if absent (ValueError if malformed)."""
    raw = get_bytes(attrs, attr_type)
    return None if raw is None else nla_get_uint(raw, 1)


def get_u16(attrs: Attrs, attr_type: int) -> int | None:
    """First ``attr_type`` decoded as u16, or ``None`` if absent (ValueError if malformed)."""
    raw = get_bytes(attrs, attr_type)
    return None if raw is None else nla_get_uint(raw, 2)


def get_u32(attrs: Attrs, attr_type: int) -> int | None:
    """First ``attr_type`` decoded as u32, or ``None`` if absent (ValueError if malformed)."""
    raw = get_bytes(attrs, attr_type)
    return None if raw is None else nla_get_uint(raw, 4)


def get_u64(attrs: Attrs, attr_type: int) -> int | None:
    """First ``attr_type`` decoded as u64, or ``None`` if absent (ValueError if malformed)."""
    raw = get_bytes(attrs, attr_type)
    return None if raw is None else nla_get_uint(raw, 8)


def _extack(tlvs: bytes) -> tuple[str | None, int | None]:
    attrs = parse_attrs(tlvs)
    msg = get_string(attrs, NLMSGERR_ATTR_MSG)
    offs_raw = get_bytes(attrs, NLMSGERR_ATTR_OFFS)
    offs = nla_get_uint(offs_raw, 4) if offs_raw is not None and len(offs_raw) == 4 else None
    return msg or None, offs


def parse_error_payload(payload: bytes, flags: int) -> tuple[int, str | None, int | None]:
    """Decode the payload of an ``NLMSG_ERROR`` message.

    Returns ``(errno, extack_message, extack_offset)`` with ``errno`` positive
    (0 for a plain ack; the kernel stores ``-errno``). The payload is
    ``struct nlmsgerr`` (int error + the request's ``nlmsghdr``), followed by the
    rest of the request unless ``NLM_F_CAPPED`` is set, followed by extended-ack
    TLVs when ``NLM_F_ACK_TLVS`` is set. Raises :class:`ValueError` if malformed.
    """
    if len(payload) < 4:
        raise ValueError(f"NLMSG_ERROR payload too short ({len(payload)} bytes)")
    err = -int.from_bytes(payload[:4], _BYTEORDER, signed=True)
    msg: str | None = None
    offs: int | None = None
    if flags & NLM_F_ACK_TLVS:
        if len(payload) < 4 + NLMSG_HDRLEN:
            raise ValueError("NLMSG_ERROR with TLVs lacks the echoed request header")
        if flags & NLM_F_CAPPED:
            tlv_off = 4 + NLMSG_HDRLEN
        else:
            echoed_len = nlmsghdr.unpack_from(payload, 4)[0]
            tlv_off = 4 + nlmsg_align(max(echoed_len, NLMSG_HDRLEN))
        if tlv_off > len(payload):
            raise ValueError("NLMSG_ERROR echoed request runs past the message")
        msg, offs = _extack(payload[tlv_off:])
    return err, msg, offs


def parse_done_payload(payload: bytes, flags: int) -> tuple[int, str | None, int | None]:
    """Decode the payload of an ``NLMSG_DONE`` message (end of a dump).

    Returns ``(errno, extack_message, extack_offset)``; ``errno`` is 0 when the
    dump completed. An empty payload (very old kernels) counts as success.
    """
    if len(payload) < 4:
        return 0, None, None
    err = -int.from_bytes(payload[:4], _BYTEORDER, signed=True)
    msg: str | None = None
    offs: int | None = None
    if flags & NLM_F_ACK_TLVS:
        msg, offs = _extack(payload[4:])
    return err, msg, offs


# ---------------------------------------------------------------------------
# Generic netlink socket
# ---------------------------------------------------------------------------


def _open_netlink_socket() -> socket.socket:
    """Open, bind and configure a ``NETLINK_GENERIC`` socket (extended acks on)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        # Kernels < 4.12 lack extended acks: errors then simply come without a message.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class _DumpInterrupted(Exception):
    pass


class GenericNetlink:
    """A generic netlink socket bound to one family; a context manager that closes it.

    ``GenericNetlink(family)`` opens a ``NETLINK_GENERIC`` socket (with
    ``NETLINK_EXT_ACK`` enabled) and resolves ``family`` through ``nlctrl``
    (``"nlctrl"`` itself resolves to ``GENL_ID_CTRL`` without a request).
    If the family is not registered it raises :class:`FamilyNotFoundError`
    (``errno`` ``ENOENT``, with :attr:`family_missing_hint` as its hint).

    ``sock`` injects an already connected socket instead (a test peer such as one
    end of ``socket.socketpair(AF_UNIX, SOCK_SEQPACKET)`` that answers like the
    kernel, one datagram per recv); the instance takes ownership and closes it.
    ``timeout`` is the deadline of each request in seconds, ``version`` the
    ``genlmsghdr.version`` sent with the family's commands.

    Thread safety: requests are serialised by a per-instance lock; :meth:`close`
    waits for a request in flight.
    """

    #: Hint appended to :class:`FamilyNotFoundError`; subclasses name the fix.
    family_missing_hint: ClassVar[str | None] = None

    def __init__(
        self,
        family: str,
        *,
        sock: socket.socket | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        version: int = 1,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.family = family
        self.timeout = timeout
        self.version = version
        self._lock = threading.Lock()
        self._seq = 0
        self._sock: socket.socket | None = sock if sock is not None else _open_netlink_socket()
        self._check_sender = self._sock.family == socket.AF_NETLINK
        try:
            self.family_id, self.family_version = self._resolve(family)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the socket (idempotent). Later requests raise ``EBADF``."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._sock is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests ----------------------------------------------------------

    def request(
        self,
        cmd: int,
        attrs: bytes = b"",
        *,
        dump: bool = False,
        operation: str | None = None,
    ) -> list[Attrs]:
        """Send command ``cmd`` of this family and return the attributes of each reply.

        Non-dump requests carry ``NLM_F_REQUEST|NLM_F_ACK`` and return when the
        kernel's ack arrives (an empty list for commands without a reply). Dump
        requests carry ``NLM_F_REQUEST|NLM_F_DUMP`` and collect multipart replies
        until ``NLMSG_DONE``; a dump the kernel flags as interrupted
        (``NLM_F_DUMP_INTR``) is retried up to 3 times. Messages with another
        sequence number (late answers to an earlier, timed-out request) are
        ignored, as are messages not sent by the kernel.

        Raises :class:`NetlinkError`: the kernel's errno and extack message;
        ``ETIMEDOUT`` when the whole exchange exceeds :attr:`timeout`; ``EPROTO``
        for a malformed reply; ``EBADF`` after :meth:`close`. ``operation`` names
        the request in the error (default ``"<family> cmd <n>"``).
        """
        op = operation or f"{self.family} cmd {cmd}"
        return self._transact(self.family_id, cmd, attrs, self.version, dump, op)

    def _resolve(self, family: str) -> tuple[int, int | None]:
        if family == GENL_CTRL_NAME:
            return GENL_ID_CTRL, GENL_CTRL_VERSION
        op = f"{GENL_CTRL_NAME} GETFAMILY {family}"
        try:
            replies = self._transact(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                nla_string(CTRL_ATTR_FAMILY_NAME, family),
                GENL_CTRL_VERSION,
                False,
                op,
            )
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                raise FamilyNotFoundError(family, self.family_missing_hint, exc.extack) from None
            raise
        try:
            family_id = get_u16(replies[0], CTRL_ATTR_FAMILY_ID) if replies else None
            version = get_u32(replies[0], CTRL_ATTR_VERSION) if replies else None
        except ValueError as exc:
            raise NetlinkError(errno.EPROTO, op, str(exc)) from None
        if family_id is None:
            raise NetlinkError(errno.EPROTO, op, "reply lacks CTRL_ATTR_FAMILY_ID")
        return family_id, version

    def _transact(
        self, msg_type: int, cmd: int, attrs: bytes, version: int, dump: bool, op: str
    ) -> list[Attrs]:
        with self._lock:
            for _attempt in range(_DUMP_ATTEMPTS):
                try:
                    return self._transact_locked(msg_type, cmd, attrs, version, dump, op)
                except _DumpInterrupted:
                    continue
            raise NetlinkError(errno.EINTR, op, "dump kept being interrupted by concurrent changes")

    def _transact_locked(
        self, msg_type: int, cmd: int, attrs: bytes, version: int, dump: bool, op: str
    ) -> list[Attrs]:
        sock = self._sock
        if sock is None:
            raise NetlinkError(errno.EBADF, op, "netlink socket is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        data = encode_request(msg_type, cmd, attrs, seq, flags, version=version)
        deadline = time.monotonic() + self.timeout
        try:
            sock.settimeout(self.timeout)
            sock.send(data)
        except TimeoutError:
            raise NetlinkError(errno.ETIMEDOUT, op, "send timed out") from None
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, op) from exc

        replies: list[Attrs] = []
        interrupted = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetlinkError(errno.ETIMEDOUT, op, f"no answer within {self.timeout:g} s")
            try:
                sock.settimeout(remaining)
                chunk, _anc, msg_flags, addr = sock.recvmsg(RECV_BUFSIZE)
            except TimeoutError:
                raise NetlinkError(
                    errno.ETIMEDOUT, op, f"no answer within {self.timeout:g} s"
                ) from None
            except OSError as exc:
                raise NetlinkError(exc.errno or errno.EIO, op) from exc
            if not chunk:
                raise NetlinkError(errno.ECONNRESET, op, "netlink peer closed the socket")
            if msg_flags & socket.MSG_TRUNC:
                raise NetlinkError(errno.EMSGSIZE, op, "reply truncated")
            if self._check_sender and isinstance(addr, tuple) and addr and addr[0] != 0:
                continue  # unicast from another socket, not the kernel
            try:
                messages = split_messages(chunk)
            except ValueError as exc:
                raise NetlinkError(errno.EPROTO, op, str(exc)) from None
            for m in messages:
                if m.seq != seq:
                    continue
                if m.flags & NLM_F_DUMP_INTR:
                    interrupted = True
                try:
                    if m.type == NLMSG_ERROR:
                        err, text, offs = parse_error_payload(m.payload, m.flags)
                        if err:
                            raise NetlinkError(err, op, text, extack_offset=offs)
                        return replies  # the ack
                    if m.type == NLMSG_DONE:
                        if not dump:
                            continue  # a multipart doit reply; the ack follows
                        err, text, offs = parse_done_payload(m.payload, m.flags)
                        if err:
                            raise NetlinkError(err, op, text, extack_offset=offs)
                        if interrupted:
                            raise _DumpInterrupted
                        return replies
                    if m.type == NLMSG_OVERRUN:
                        raise NetlinkError(errno.EOVERFLOW, op, "netlink overrun")
                    if m.type == NLMSG_NOOP or m.type < NLMSG_MIN_TYPE:
                        continue
                    if len(m.payload) < GENL_HDRLEN:
                        raise ValueError(
                            f"generic netlink reply too short ({len(m.payload)} bytes)"
                        )
                    replies.append(parse_attrs(m.payload[GENL_HDRLEN:]))
                except ValueError as exc:
                    raise NetlinkError(errno.EPROTO, op, str(exc)) from None


# ---------------------------------------------------------------------------
# vdpa
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VdpaDeviceInfo:
    """One vdpa device as reported by ``VDPA_CMD_DEV_GET``; absent attributes are ``None``."""

    name: str
    mgmtdev_dev_name: str | None = None
    mgmtdev_bus_name: str | None = None
    device_id: int | None = None
    vendor_id: int | None = None
    max_vqs: int | None = None
    max_vq_size: int | None = None
    min_vq_size: int | None = None


def dev_new_attrs(name: str, mgmtdev: str = "vduse") -> bytes:
    """Attributes of ``VDPA_CMD_DEV_NEW``: ``MGMTDEV_DEV_NAME=mgmtdev``, ``DEV_NAME=name``.

    ``VDPA_ATTR_MGMTDEV_BUS_NAME`` is deliberately never sent: the ``vduse``
    management device has no bus, and naming one makes the kernel answer ENODEV.
    """
    return nla_string(VDPA_ATTR_MGMTDEV_DEV_NAME, mgmtdev) + nla_string(VDPA_ATTR_DEV_NAME, name)


def dev_del_attrs(name: str) -> bytes:
    """Attributes of ``VDPA_CMD_DEV_DEL``: ``DEV_NAME=name``."""
    return nla_string(VDPA_ATTR_DEV_NAME, name)


def dev_get_attrs(name: str) -> bytes:
    """Attributes of a single-device ``VDPA_CMD_DEV_GET``: ``DEV_NAME=name``."""
    return nla_string(VDPA_ATTR_DEV_NAME, name)


def decode_dev_info(attrs: Attrs) -> VdpaDeviceInfo:
    """Build a :class:`VdpaDeviceInfo` from one ``DEV_GET`` reply.

    Raises :class:`ValueError` if ``VDPA_ATTR_DEV_NAME`` is missing or an integer
    attribute has the wrong size.
    """
    name = get_string(attrs, VDPA_ATTR_DEV_NAME)
    if name is None:
        raise ValueError("vdpa device reply lacks VDPA_ATTR_DEV_NAME")
    return VdpaDeviceInfo(
        name=name,
        mgmtdev_dev_name=get_string(attrs, VDPA_ATTR_MGMTDEV_DEV_NAME),
        mgmtdev_bus_name=get_string(attrs, VDPA_ATTR_MGMTDEV_BUS_NAME),
        device_id=get_u32(attrs, VDPA_ATTR_DEV_ID),
        vendor_id=get_u32(attrs, VDPA_ATTR_DEV_VENDOR_ID),
        max_vqs=get_u32(attrs, VDPA_ATTR_DEV_MAX_VQS),
        max_vq_size=get_u16(attrs, VDPA_ATTR_DEV_MAX_VQ_SIZE),
        min_vq_size=get_u16(attrs, VDPA_ATTR_DEV_MIN_VQ_SIZE),
    )


def decode_mgmtdev_name(attrs: Attrs) -> str:
    """Management device handle from one ``MGMTDEV_GET`` reply: ``bus/dev`` or ``dev``.

    (Same spelling as ``vdpa mgmtdev show``; VDUSE's is plain ``"vduse"``.)
    Raises :class:`ValueError` if ``VDPA_ATTR_MGMTDEV_DEV_NAME`` is missing.
    """
    dev = get_string(attrs, VDPA_ATTR_MGMTDEV_DEV_NAME)
    if dev is None:
        raise ValueError("vdpa mgmtdev reply lacks VDPA_ATTR_MGMTDEV_DEV_NAME")
    bus = get_string(attrs, VDPA_ATTR_MGMTDEV_BUS_NAME)
    return f"{bus}/{dev}" if bus else dev


VDPA_BUS_DIR = "/sys/bus/vdpa"
"""Exists while the kernel's vdpa module (and so its netlink family) is loaded."""


class VdpaClient(GenericNetlink):
    """Client of the ``vdpa`` generic netlink family (attach/detach of vDPA devices).

    Construction raises :class:`FamilyNotFoundError` (``ENOENT``) when the kernel
    has no vdpa family (no ``CONFIG_VDPA``, or module ``vdpa`` not loaded).
    The family is usable only from the initial network namespace, and
    ``DEV_NEW``/``DEV_DEL`` need ``CAP_NET_ADMIN`` (``EPERM`` otherwise).
    See :class:`GenericNetlink` for ``sock``, ``timeout`` and thread safety.
    """

    family_missing_hint: ClassVar[str | None] = (
        "The 'vdpa' generic netlink family is missing: the kernel lacks CONFIG_VDPA, "
        "or module `vdpa` is not loaded (try `modprobe vduse`)"
    )

    #: Why the family is missing when the kernel has it (``vdpa`` is loaded) but this
    #: process cannot see it: the family exists only in the initial network namespace.
    namespace_hint: ClassVar[str] = (
        "The 'vdpa' generic netlink family exists only in the host's initial network "
        "namespace, and this process runs in another one (a container without the host's "
        "network): run pyvduse in the host's network namespace (e.g. docker --network host), "
        "or serve with --attach none and attach from the host with "
        "'vdpa dev add name NAME mgmtdev vduse'"
    )

    def __init__(
        self, *, sock: socket.socket | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        try:
            super().__init__(VDPA_GENL_NAME, sock=sock, timeout=timeout,
                             version=VDPA_GENL_VERSION)
        except FamilyNotFoundError:
            # The bus exists once the vdpa module is loaded, and the family with it: if
            # this process cannot see the family, it is in another network namespace.
            if sock is None and os.path.isdir(VDPA_BUS_DIR):
                raise FamilyNotFoundError(VDPA_GENL_NAME, self.namespace_hint) from None
            raise

    def dev_add(self, name: str, mgmtdev: str = "vduse") -> None:
        """Create vDPA device ``name`` on management device ``mgmtdev`` (``vdpa dev add``).

        For VDUSE, ``name`` is the VDUSE device's name and all its vqs must be set
        up. If a vdpa bus driver binds during the call (``drivers_autoprobe=1``),
        the kernel probes it synchronously, exchanging VDUSE control messages with
        the daemon: the control loop must already run on another thread.
        Errors (:class:`NetlinkError`): ``EINVAL`` (unknown VDUSE name, vqs not set
        up), ``EEXIST`` (already attached), ``ENODEV`` (no such mgmtdev),
        ``EOPNOTSUPP``, ``EPERM`` (no ``CAP_NET_ADMIN``), ``ETIMEDOUT``.
        """
        self.request(
            VDPA_CMD_DEV_NEW, dev_new_attrs(name, mgmtdev), operation=f"vdpa DEV_NEW {name}"
        )

    def dev_del(self, name: str) -> None:
        """Delete vDPA device ``name`` (``vdpa dev del``).

        The bound driver is removed synchronously (a VDUSE reset message the
        daemon must still answer). ``ENODEV`` if there is no such device.
        """
        self.request(VDPA_CMD_DEV_DEL, dev_del_attrs(name), operation=f"vdpa DEV_DEL {name}")

    def dev_get(self, name: str) -> VdpaDeviceInfo:
        """Describe vDPA device ``name`` (``ENODEV`` if it does not exist)."""
        op = f"vdpa DEV_GET {name}"
        replies = self.request(VDPA_CMD_DEV_GET, dev_get_attrs(name), operation=op)
        if not replies:
            raise NetlinkError(errno.EPROTO, op, "no reply")
        try:
            return decode_dev_info(replies[0])
        except ValueError as exc:
            raise NetlinkError(errno.EPROTO, op, str(exc)) from None

    def dev_list(self) -> list[VdpaDeviceInfo]:
        """All vDPA devices (``vdpa dev show``), in kernel order."""
        op = "vdpa DEV_GET dump"
        replies = self.request(VDPA_CMD_DEV_GET, dump=True, operation=op)
        try:
            return [decode_dev_info(r) for r in replies]
        except ValueError as exc:
            raise NetlinkError(errno.EPROTO, op, str(exc)) from None

    def mgmtdev_list(self) -> list[str]:
        """Names of all vDPA management devices (``vdpa mgmtdev show``), e.g. ``["vduse"]``."""
        op = "vdpa MGMTDEV_GET dump"
        replies = self.request(VDPA_CMD_MGMTDEV_GET, dump=True, operation=op)
        try:
            return [decode_mgmtdev_name(r) for r in replies]
        except ValueError as exc:
            raise NetlinkError(errno.EPROTO, op, str(exc)) from None
