"""A minimal vhost-user front-end in Python, to drive a back-end in unit tests.

:class:`VhostUserFrontend` plays QEMU's part on a back-end's UNIX socket: it
negotiates features and protocol features (``REPLY_ACK`` included: every
request without a reply of its own then asks for an ack, and a failure ack
raises :class:`RequestFailed`), shares guest memory as one memfd region
(``SET_MEM_TABLE`` or ``ADD_MEM_REG``), lays out split rings in it with
:class:`~pyvduse.testing.mock_driver.MockSplitRing`, hands them over
(``SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE``), submits virtio-blk requests
and waits for their completions on the call eventfd. ``GET_VRING_BASE``,
``RESET_DEVICE`` and ``GET_CONFIG`` are one call each, and :meth:`send` /
:meth:`send_raw` put anything at all on the wire, for tests of malformed input.

Guest memory is a :class:`~pyvduse.testing.mock_driver.DriverMemory`: guest
addresses are its addresses (what descriptors hold); the front-end's own
"user" addresses (what ``SET_VRING_ADDR`` holds) are the same bytes shifted
by ``user_base - memory.base``, so a back-end that confuses the two fails.
One memory can outlive a front-end: pass it (and the rings) to the next one
to model a front-end that reconnects.

The framing is written here from the specification, independently of
:mod:`pyvduse.vhost_user.connection`; only the payload layouts come from
:mod:`pyvduse.vhost_user.protocol`. Not thread-safe: one thread drives a
front-end (another may wait for a reply with :meth:`receive`).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pyvduse.testing.mock_driver import Buffer, DriverMemory, MockSplitRing
from pyvduse.uapi import virtio as v
from pyvduse.vhost_user import protocol as p

USER_BASE = 0x7F00_0000_0000
"""Where the front-end's (fake) virtual address space puts guest memory by default."""
TIMEOUT = 5.0
"""Seconds a front-end waits for a reply or a completion unless told otherwise."""

_HEADER = struct.Struct("=III")
_FD_SIZE = array.array("i").itemsize


class VhostUserError(Exception):
    """The back-end did not behave: no reply, a wrong reply, a closed connection."""


class ConnectionClosed(VhostUserError):
    """The back-end closed the connection."""


class RequestFailed(VhostUserError):
    """The back-end acknowledged a request with a failure (``REPLY_ACK``)."""

    def __init__(self, request: int, value: int) -> None:
        super().__init__(f"{p.request_name(request)} failed (ack {value})")
        self.request = request
        self.value = value


@dataclass(frozen=True)
class Reply:
    """One message from the back-end."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    def u64(self) -> int:
        return p.decode_u64(self.payload)


@dataclass
class BlkRequest:
    """A virtio-blk request submitted to a ring: its head and where its results land."""

    queue: int
    head: int
    status: Buffer
    data_in: Buffer | None


@dataclass(eq=False)
class FrontendRing:
    """One ring as the front-end set it up: the driver side and its two eventfds."""

    index: int
    ring: MockSplitRing
    kick_fd: int
    call_fd: int
    #: Interrupts seen on :attr:`call_fd` (each eventfd read counts once).
    interrupts: int = 0
    #: Completions taken from the used ring so far, oldest first.
    completions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.ring.size

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1


def eventfd() -> int:
    """A non-blocking close-on-exec eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VhostUserFrontend:
    """A front-end connected to the back-end listening on ``path``; see the module docstring.

    ``memory`` (default: a new 16 MiB :class:`DriverMemory`, closed with the
    front-end) is what it shares. ``timeout`` bounds every wait.
    """

    def __init__(self, path: str, *, memory: DriverMemory | None = None,
                 user_base: int = USER_BASE, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._owns_memory = memory is None
        self.memory = memory if memory is not None else DriverMemory()
        self.user_base = user_base
        #: What the back-end offered and what was accepted (after :meth:`negotiate`).
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.rings: dict[int, FrontendRing] = {}
        #: Further guest memory (see :meth:`add_memory`) and its user bases.
        self.extra_memory: list[tuple[DriverMemory, int]] = []
        self._buffer = bytearray()
        self._fds: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._connect(path, time.monotonic() + timeout)
        except BaseException:
            self.sock.close()
            if self._owns_memory:
                self.memory.close()
            raise

    def _connect(self, path: str, deadline: float) -> None:
        # A back-end busy with another front-end has a full backlog: a UNIX socket's
        # connect then fails with EAGAIN at once instead of waiting, so try again.
        self.sock.setblocking(False)
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: the back-end accepts no connection") from None
                time.sleep(0.005)
        self.sock.setblocking(True)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection, the rings' eventfds and (if ours) the memory; idempotent."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        for ring in self.rings.values():
            ring.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._owns_memory and self.memory.fd >= 0:
            self.memory.close()
            self.memory.fd = -1

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def acks(self) -> bool:
        """Whether ``REPLY_ACK`` was negotiated (requests then wait for their ack)."""
        return bool(self.protocol_features & p.ProtocolFeature.REPLY_ACK.mask)

    # -- the wire -------------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put ``data`` (anything at all) on the socket, with ``fds`` beside its first byte."""
        control = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                   if fds else [])
        sent = self.sock.sendmsg([data], control)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             flags: int = p.VERSION, size: int | None = None) -> None:
        """Send one message; ``flags`` and ``size`` go into the header as given."""
        header = _HEADER.pack(request, flags, len(payload) if size is None else size)
        self.send_raw(header + payload, fds)

    def _fill(self, length: int, deadline: float) -> None:
        while len(self._buffer) < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError(f"no reply from the back-end within {self.timeout} s")
            data, ancdata, _flags, _ = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(8 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    self._fds.extend(array.array("i", cdata[:usable]))
            if not data:
                raise ConnectionClosed("the back-end closed the connection")
            self._buffer += data

    def receive(self, timeout: float | None = None) -> Reply:
        """The next message from the back-end.

        Raises :class:`TimeoutError` if none comes within ``timeout`` (default
        :attr:`timeout`) and :class:`ConnectionClosed` when the back-end closed.
        The reply's :attr:`~Reply.fds` are the caller's to close.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(_HEADER.size, deadline)
        request, flags, size = _HEADER.unpack_from(self._buffer)
        if size > p.MAX_PAYLOAD:
            raise VhostUserError(f"reply of {size} bytes")
        self._fill(_HEADER.size + size, deadline)
        payload = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
        del self._buffer[:_HEADER.size + size]
        fds, self._fds = tuple(self._fds), []
        return Reply(request, flags, payload, fds)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Whether the back-end closes the connection within ``timeout``, reading (and
        dropping) whatever it sends meanwhile."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                self._fill(len(self._buffer) + 1, deadline)
        except ConnectionClosed:
            return True
        except TimeoutError:
            return False
        except OSError:  # ECONNRESET: closed too
            return True

    def _reply_to(self, request: int, timeout: float | None = None) -> Reply:
        reply = self.receive(timeout)
        for fd in reply.fds:
            os.close(fd)
        if reply.request != request or reply.flags != p.VERSION | p.FLAG_REPLY:
            raise VhostUserError(f"expected the reply to {p.request_name(request)}, got "
                                 f"{p.request_name(reply.request)} (flags {reply.flags:#x})")
        return reply

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """A request with a reply of its own: send it and return the reply's payload."""
        self.send(request, payload, fds)
        return self._reply_to(request).payload

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool | None = None) -> None:
        """A request without a reply of its own.

        With ``REPLY_ACK`` negotiated (or ``ack`` True) it asks for an ack and
        raises :class:`RequestFailed` on a failure; ``ack`` False never asks.
        """
        wanted = self.acks if ack is None else ack
        self.send(request, payload, fds,
                  flags=p.VERSION | (p.FLAG_NEED_REPLY if wanted else 0))
        if wanted:
            value = self._reply_to(request).u64()
            if value:
                raise RequestFailed(request, value)

    # -- features -------------------------------------------------------------------------

    def get_features(self) -> int:
        return p.decode_u64(self.call(p.Request.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self.request(p.Request.SET_FEATURES, p.encode_u64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        return p.decode_u64(self.call(p.Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        self.request(p.Request.SET_PROTOCOL_FEATURES, p.encode_u64(features))
        self.protocol_features = features

    def negotiate(self, features: int | None = None,
                  protocol_features: int | None = None) -> None:
        """What QEMU does on connecting: features (all offered, or those of ``features``
        offered), protocol features likewise if offered and wanted, ``SET_OWNER``."""
        self.offered_features = self.get_features()
        wanted = self.offered_features if features is None else features
        if self.offered_features & (1 << p.F_PROTOCOL_FEATURES) and wanted & (
                1 << p.F_PROTOCOL_FEATURES):
            self.offered_protocol_features = self.get_protocol_features()
            wanted_protocol = (self.offered_protocol_features if protocol_features is None
                               else protocol_features)
            self.set_protocol_features(self.offered_protocol_features & wanted_protocol)
        self.request(p.Request.SET_OWNER)
        self.set_features(self.offered_features & wanted)

    def get_queue_num(self) -> int:
        return p.decode_u64(self.call(p.Request.GET_QUEUE_NUM))

    def get_max_mem_slots(self) -> int:
        return p.decode_u64(self.call(p.Request.GET_MAX_MEM_SLOTS))

    # -- memory ---------------------------------------------------------------------------

    def add_memory(self, memory: DriverMemory, user_base: int) -> p.MemoryRegion:
        """Use ``memory`` (the caller's: it stays open) as guest memory too, at its own
        guest addresses and at ``user_base`` in the front-end's; return its region.
        Rings may be laid out in it (``setup_ring(ring=MockSplitRing(memory, n))``);
        the default memory table holds it from now on."""
        self.extra_memory.append((memory, user_base))
        return self.region(memory)

    def _memories(self) -> list[tuple[DriverMemory, int]]:
        return [(self.memory, self.user_base), *self.extra_memory]

    def region(self, memory: DriverMemory | None = None) -> p.MemoryRegion:
        """All of ``memory`` (default :attr:`memory`) as one region: its guest and
        user bases, file offset 0."""
        memory = memory or self.memory
        for known, user_base in self._memories():
            if known is memory:
                return p.MemoryRegion(memory.base, memory.size, user_base, 0)
        raise ValueError("not a memory of this front-end (see add_memory)")

    def user_addr(self, guest_addr: int) -> int:
        """The front-end (user) address of a guest address of one of its memories."""
        for memory, user_base in self._memories():
            if memory.base <= guest_addr < memory.base + memory.size:
                return guest_addr - memory.base + user_base
        raise ValueError(f"guest address {guest_addr:#x} is in no memory of this front-end")

    def set_mem_table(self, regions: Sequence[tuple[p.MemoryRegion, int]] | None = None) -> None:
        """``SET_MEM_TABLE`` of ``(region, fd)`` pairs (default: every memory's
        :meth:`region` and memfd)."""
        table = ([(self.region(m), m.fd) for m, _ in self._memories()] if regions is None
                 else list(regions))
        self.request(p.Request.SET_MEM_TABLE, p.encode_memory_table([r for r, _ in table]),
                     [fd for _, fd in table])

    def add_mem_reg(self, region: p.MemoryRegion | None = None, fd: int | None = None) -> None:
        """``ADD_MEM_REG`` (default: :meth:`region` and the memfd)."""
        self.request(p.Request.ADD_MEM_REG, p.encode_single_region(region or self.region()),
                     [self.memory.fd if fd is None else fd])

    def rem_mem_reg(self, region: p.MemoryRegion | None = None) -> None:
        self.request(p.Request.REM_MEM_REG, p.encode_single_region(region or self.region()))

    # -- rings ----------------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(p.Request.SET_VRING_NUM, p.encode_vring_state(p.VringState(index, num)))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(p.Request.SET_VRING_BASE, p.encode_vring_state(p.VringState(index, base)))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, *,
                       flags: int = 0, log: int = 0) -> None:
        """``SET_VRING_ADDR`` with front-end (user) addresses, as given."""
        self.request(p.Request.SET_VRING_ADDR,
                     p.encode_vring_addr(p.VringAddr(index, flags, desc, used, avail, log)))

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        payload = p.encode_vring_fd(p.VringFd(index, fd is None))
        self.request(request, payload, [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(p.Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(p.Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(p.Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(p.Request.SET_VRING_ENABLE,
                     p.encode_vring_state(p.VringState(index, int(enable))))

    def get_vring_base(self, index: int, timeout: float | None = None) -> int:
        """``GET_VRING_BASE``: the back-end stops the ring and says where it stands."""
        self.send(p.Request.GET_VRING_BASE, p.encode_vring_state(p.VringState(index, 0)))
        return self.vring_base_reply(index, timeout)

    def vring_base_reply(self, index: int, timeout: float | None = None) -> int:
        """The reply of a ``GET_VRING_BASE`` sent earlier (with :meth:`send`)."""
        state = p.decode_vring_state(self._reply_to(p.Request.GET_VRING_BASE, timeout).payload)
        if state.index != index:
            raise VhostUserError(f"GET_VRING_BASE of ring {index} answered for {state.index}")
        return state.num

    def setup_ring(self, index: int, size: int, *, base: int = 0,
                   ring: MockSplitRing | None = None, enable: bool | None = None) -> FrontendRing:
        """Lay out ring ``index`` (or reuse ``ring``) and hand it over to the back-end.

        Sends ``SET_VRING_NUM``, ``SET_VRING_BASE``, ``SET_VRING_ADDR``,
        ``SET_VRING_CALL``, ``SET_VRING_KICK`` with new eventfds and, when
        protocol features were negotiated (or ``enable`` is given),
        ``SET_VRING_ENABLE``. A reused ring keeps its driver state.
        """
        if ring is None:
            ring = MockSplitRing(self.memory, size)
            if base:  # a ring that starts elsewhere than 0: both indexes stand there
                ring.used_seen = base
                ring.publish([], avail_idx=base)
                self.memory.write(ring.used_addr + 2, struct.pack("<H", base & 0xFFFF))
        old = self.rings.pop(index, None)
        if old is not None:
            old.close()
        frontend_ring = FrontendRing(index, ring, eventfd(), eventfd())
        self.rings[index] = frontend_ring
        self.set_vring_num(index, size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, self.user_addr(ring.desc_addr), self.user_addr(ring.used_addr),
                            self.user_addr(ring.avail_addr))
        self.set_vring_call(index, frontend_ring.call_fd)
        self.set_vring_kick(index, frontend_ring.kick_fd)
        if enable is None and self.features & (1 << p.F_PROTOCOL_FEATURES):
            enable = True
        if enable is not None:
            self.set_vring_enable(index, enable)
        return frontend_ring

    def start(self, num_queues: int = 1, size: int = 64, *,
              features: int | None = None, protocol_features: int | None = None) -> None:
        """Negotiate, share the memory and set up ``num_queues`` rings of ``size``."""
        self.negotiate(features, protocol_features)
        self.set_mem_table()
        for index in range(num_queues):
            self.setup_ring(index, size)

    def reset_device(self) -> None:
        """``RESET_DEVICE``: the back-end forgets the rings and the features."""
        self.request(p.Request.RESET_DEVICE)
        self.features = 0

    def get_config(self, offset: int = 0, size: int = 60) -> bytes:
        """``GET_CONFIG``: ``size`` bytes of the config space from ``offset``."""
        reply = p.decode_config(self.call(p.Request.GET_CONFIG, p.encode_config(
            p.ConfigSpace(offset, 0, bytes(size)))))
        return reply.data

    # -- requests -------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def submit(self, index: int, req_type: int, sector: int = 0, data: bytes = b"",
               in_len: int = 0, *, kick: bool = True, indirect: bool = False) -> BlkRequest:
        """Lay out one virtio-blk request (header, data out, data in, status) and
        make it available on ring ``index`` (and kick, unless ``kick`` is False)."""
        memory = self.memory
        buffers = [memory.buffer(v.virtio_blk_outhdr.pack(req_type, 0, sector))]
        if data:
            buffers.append(memory.buffer(data))
        data_in = memory.buffer(in_len, writable=True) if in_len else None
        if data_in is not None:
            buffers.append(data_in)
        status = memory.buffer(b"\xff", writable=True)
        head = self.rings[index].ring.add_chain([*buffers, status], indirect=indirect)
        if kick:
            self.kick(index)
        return BlkRequest(index, head, status, data_in)

    def status(self, request: BlkRequest) -> int:
        """The status byte (0xff until the back-end wrote it)."""
        return self.memory.read(request.status.addr, 1)[0]

    def data(self, request: BlkRequest) -> bytes:
        assert request.data_in is not None
        return self.memory.read(request.data_in.addr, request.data_in.length)

    def wait_used(self, index: int, count: int = 1,
                  timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait (on the call eventfd) for ``count`` completions on ring ``index``.

        Returns the ``(head, written)`` pairs taken from the used ring;
        raises :class:`TimeoutError` if fewer arrive within ``timeout``.
        """
        ring = self.rings[index]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out: list[tuple[int, int]] = []
        while True:
            out += ring.ring.take_used()
            if len(out) >= count:
                ring.completions += out
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ring.completions += out
                raise TimeoutError(f"ring {index}: {len(out)} of {count} completions "
                                   f"within the timeout")
            # short waits: a completion published while used_event moved needs no interrupt
            if select.select([ring.call_fd], [], [], min(remaining, 0.05))[0]:
                try:
                    os.eventfd_read(ring.call_fd)
                    ring.interrupts += 1
                except BlockingIOError:
                    pass

    def run(self, index: int, req_type: int, sector: int = 0, data: bytes = b"",
            in_len: int = 0) -> tuple[int, bytes]:
        """One request, waited for: ``(status, data in)``."""
        request = self.submit(index, req_type, sector, data, in_len)
        done = self.wait_used(index, 1)
        if done[0][0] != request.head:
            raise VhostUserError(f"ring {index}: completion of head {done[0][0]}, "
                                 f"expected {request.head}")
        return self.status(request), self.data(request) if request.data_in else b""

    def write(self, index: int, sector: int, data: bytes) -> None:
        """Write ``data`` at ``sector``; :class:`VhostUserError` unless the status is OK."""
        status, _ = self.run(index, v.VIRTIO_BLK_T_OUT, sector, data)
        if status != v.VIRTIO_BLK_S_OK:
            raise VhostUserError(f"write at sector {sector}: status {status}")

    def read(self, index: int, sector: int, length: int) -> bytes:
        """Read ``length`` bytes at ``sector``; :class:`VhostUserError` unless OK."""
        status, data = self.run(index, v.VIRTIO_BLK_T_IN, sector, in_len=length)
        if status != v.VIRTIO_BLK_S_OK:
            raise VhostUserError(f"read at sector {sector}: status {status}")
        return data
