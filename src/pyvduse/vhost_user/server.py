"""The vhost-user transport: a device served to one front-end at a time on a UNIX socket.

:class:`VhostUserServer` listens on a socket; a front-end (QEMU's
``vhost-user-blk-pci``, Cloud Hypervisor, libblkio, SPDK...) connects and
tells it, message by message, what the driver negotiated, where the guest's
memory is (``SET_MEM_TABLE``, regions passed as fds) and where each ring lives
(``SET_VRING_*``). Each ring is handed to the transport-neutral
:class:`~pyvduse.virtio_device.VirtioDevice` once it is complete: size,
addresses, base, kick fd, and enabled. The same device model, backends and
queue threads serve it as under VDUSE.

A ring runs from the moment it is complete until ``GET_VRING_BASE`` stops
it (the reply carries its next avail entry), ``SET_VRING_ENABLE 0``,
``RESET_DEVICE``/``RESET_OWNER``, or the front-end going away. Stopping
waits for the requests in flight (up to :data:`STOP_TIMEOUT`) so that their
completions reach the ring before the front-end reads the base: a front-end
that disconnects and reconnects loses nothing, because every request taken
from its rings was completed into them. A reset gives requests in flight up
at once, as a virtio reset does.

Any message that breaks the protocol (wrong size, fds where none belong, an
unknown request, an address outside the memory table) is refused: with a
failure ack when the front-end asked for one (``REPLY_ACK``), else by closing
the connection. The server then waits for the next front-end. Nothing a
front-end sends can stop the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvduse.errors import MemoryAccessError, PyvduseError
from pyvduse.inflight import InflightLog, InflightLogError, QueueLog
from pyvduse.vhost_user import inflight
from pyvduse.vhost_user import protocol as p
from pyvduse.vhost_user.connection import Connection, Message, validate
from pyvduse.vhost_user.memory import VhostUserMemory
from pyvduse.virtio_device import DeviceModel, QueueState, Transport, VirtioDevice
from pyvduse.virtqueue import is_valid_queue_size

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 32
"""Memory regions a front-end may add one by one (``CONFIGURE_MEM_SLOTS``)."""
STOP_TIMEOUT = 30.0
"""Seconds a ring being stopped waits for the requests it has in a backend."""
JOIN_TIMEOUT = 10.0
"""Seconds :meth:`VhostUserServer.destroy` waits for the server thread beyond the two stop
timeouts it may spend (a ``GET_VRING_BASE`` under way, then the session's end)."""

TRANSPORT_FEATURES = 1 << p.F_PROTOCOL_FEATURES
"""Virtio feature bits the transport offers besides the model's."""
PROTOCOL_FEATURES = (p.ProtocolFeature.MQ.mask | p.ProtocolFeature.REPLY_ACK.mask
                     | p.ProtocolFeature.CONFIG.mask | p.ProtocolFeature.RESET_DEVICE.mask
                     | p.ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
                     | p.ProtocolFeature.INFLIGHT_SHMFD.mask)
"""The protocol features offered."""


class _Refused(PyvduseError):
    """A request this back-end cannot or will not carry out (the session goes on)."""


@dataclass(eq=False)
class _Vring:
    """What the front-end said of one ring."""

    num: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    call_lock: threading.Lock = field(default_factory=threading.Lock)

    def notify(self) -> None:
        """Interrupt the driver (the call eventfd), unless the front-end polls."""
        with self.call_lock:
            if self.call_fd >= 0:
                try:
                    os.eventfd_write(self.call_fd, 1)
                except OSError as exc:
                    log.debug("call eventfd: %s", exc)

    def set_call(self, fd: int) -> None:
        """Use ``fd`` (-1: none) to interrupt from now on; the old one is closed."""
        with self.call_lock:
            old, self.call_fd = self.call_fd, fd
        _close(old)

    def close(self) -> None:
        """Close every fd of the ring."""
        self.set_call(-1)
        _close(self.kick_fd)
        _close(self.err_fd)
        self.kick_fd = self.err_fd = -1


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class VhostUserServer(Transport):
    """Serves ``model`` over vhost-user on the UNIX socket ``path``.

    :meth:`start` binds the socket (a stale one is replaced, one a live
    server listens on is refused) and serves front-ends one after the other
    on a thread of its own; :meth:`destroy` stops serving, waits (bounded)
    for requests in flight and removes the socket. The attributes the
    export registry reads (:attr:`driver_ok`, :attr:`failed`,
    :attr:`workers`, :attr:`served`) mean what they mean for a VDUSE device.
    """

    def __init__(self, name: str, model: DeviceModel, path: str, *, queue_threads: int = 1,
                 poll_max_ns: int = 0, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.name = name
        self.model = model
        self.path = path
        self.stop_timeout = stop_timeout
        self.virtio = VirtioDevice(name, model, queue_threads=queue_threads,
                                   poll_max_ns=poll_max_ns)
        #: Set while a front-end has rings running.
        self.driver_ok = threading.Event()
        #: Set when the server cannot serve anymore (its socket failed).
        self.failed = threading.Event()
        self.failure = ""
        #: Front-ends served so far (connections accepted).
        self.connections = 0
        #: Crash-recovery records are not kept over vhost-user yet.
        self.inflight_log: InflightLog | None = None
        self._listener: socket.socket | None = None
        self._stop_fd = -1
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None

    @property
    def features(self) -> int:
        """The virtio feature bits offered: the model's and the transport's."""
        return self.model.features | TRANSPORT_FEATURES

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen on the socket, then serve front-ends on a thread."""
        listener = _listen(self.path)
        self._listener = listener
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-vhost-user",
                                        daemon=True)
        self._thread.start()
        log.info("%s: vhost-user-blk socket %s ready", self.name, self.path)

    def destroy(self) -> None:
        """Stop serving: the front-end is disconnected after its requests in flight
        completed (bounded), and the socket removed. Idempotent."""
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        session = self._session
        if session is not None:
            session.interrupt()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT + 2 * self.stop_timeout)
            if self._thread.is_alive():
                log.error("%s: the vhost-user thread did not stop", self.name)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        _close(self._stop_fd)
        self._stop_fd = -1
        log.info("%s: stopped; served %d requests over %d connection(s)", self.name,
                 sum(self.served.values()), self.connections)

    def update_config(self, offset: int, data: bytes) -> None:
        """The config space changed (the model holds it): the front-end reads it anew
        with its next ``GET_CONFIG``. (Announcing it needs the back-end request
        channel, not offered yet.)"""
        log.info("%s: config space changed at offset %d; vhost-user front-ends see it on "
                 "their next GET_CONFIG", self.name, offset)

    # -- serving ------------------------------------------------------------------------

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_fd in ready:
                return
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                    continue
                self.failure = f"the socket {self.path} failed: {exc}"
                log.error("%s: %s", self.name, self.failure)
                self.failed.set()
                return
            self.connections += 1
            session = _Session(self, Connection(sock))
            self._session = session
            try:
                session.run(self._stop_fd)
            except Exception:
                log.exception("%s: the vhost-user session failed", self.name)
            finally:
                session.end()
                self._session = None


def _listen(path: str) -> socket.socket:
    """A listening socket at ``path``; a stale socket there is replaced, a live one refused."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise PyvduseError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left by a daemon that died
        except (BlockingIOError, TimeoutError):  # a live server with a full backlog
            raise PyvduseError(f"{path}: another server listens on this socket (busy)") from None
        except OSError as exc:  # EACCES...: nobody can tell, so the socket stays
            raise PyvduseError(f"cannot tell whether a server listens on {path}: "
                               f"{exc.strerror or exc}") from None
        else:
            raise PyvduseError(f"{path}: another server listens on this socket")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(1)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        raise PyvduseError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return listener


class _Session:
    """One front-end's connection: the protocol state it built up."""

    def __init__(self, server: VhostUserServer, connection: Connection) -> None:
        self.server = server
        self.name = server.name
        self.virtio = server.virtio
        self.connection = connection
        self.features = 0
        self.protocol_features = 0
        self.memory: VhostUserMemory | None = None
        self.vrings = [_Vring() for _ in range(server.model.num_queues)]
        #: The front-end's inflight buffer (INFLIGHT_SHMFD) and its per-ring records.
        self.inflight: inflight.InflightRegion | None = None
        self.queue_logs: list[QueueLog] = []
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            p.Request.GET_FEATURES: self._get_features,
            p.Request.SET_FEATURES: self._set_features,
            p.Request.SET_OWNER: self._nothing,
            p.Request.RESET_OWNER: self._reset,
            p.Request.RESET_DEVICE: self._reset,
            p.Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            p.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.Request.GET_QUEUE_NUM: self._get_queue_num,
            p.Request.SET_MEM_TABLE: self._set_mem_table,
            p.Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            p.Request.ADD_MEM_REG: self._add_mem_reg,
            p.Request.REM_MEM_REG: self._rem_mem_reg,
            p.Request.SET_VRING_NUM: self._set_vring_num,
            p.Request.SET_VRING_ADDR: self._set_vring_addr,
            p.Request.SET_VRING_BASE: self._set_vring_base,
            p.Request.GET_VRING_BASE: self._get_vring_base,
            p.Request.SET_VRING_KICK: self._set_vring_kick,
            p.Request.SET_VRING_CALL: self._set_vring_call,
            p.Request.SET_VRING_ERR: self._set_vring_err,
            p.Request.SET_VRING_ENABLE: self._set_vring_enable,
            p.Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            p.Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            p.Request.GET_CONFIG: self._get_config,
            p.Request.SET_CONFIG: self._set_config,
        }

    def interrupt(self) -> None:
        """Make :meth:`run` return (from another thread)."""
        with contextlib.suppress(OSError):
            self.connection.sock.shutdown(socket.SHUT_RDWR)

    def run(self, stop_fd: int) -> None:
        """Serve messages until the front-end leaves, breaks the protocol or we stop."""
        log.info("%s: vhost-user front-end connected", self.name)
        poller = select.poll()
        poller.register(self.connection.fileno(), select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if stop_fd in ready:
                return
            try:
                message = self.connection.receive()
            except p.ProtocolError as exc:
                log.error("%s: %s; closing the connection", self.name, exc)
                return
            except OSError as exc:
                log.info("%s: front-end connection: %s", self.name, exc)
                return
            if message is None:
                log.info("%s: vhost-user front-end disconnected", self.name)
                return
            if not self._handle(message):
                return

    def _handle(self, message: Message) -> bool:
        """Carry out one message and answer it; False to close the connection."""
        with message:
            ack = p.needs_ack(message.request, message.flags) and bool(
                self.protocol_features & p.ProtocolFeature.REPLY_ACK.mask)
            handler = self._handlers.get(message.request)
            try:
                validate(message)
                if handler is None:
                    raise p.ProtocolError(f"{message.name} is not supported")
                reply = handler(message)
            except (_Refused, p.ProtocolError, MemoryAccessError) as exc:
                log.error("%s: %s refused: %s", self.name, message.name, exc)
                if ack:
                    self._send_ack(message.request, False)
                    return True
                return isinstance(exc, _Refused) and self._refusal_reply(message)
            try:
                if reply is not None:
                    self.connection.reply(message.request, reply)
                elif ack:
                    self._send_ack(message.request, True)
            except OSError as exc:
                log.info("%s: cannot answer %s: %s", self.name, message.name, exc)
                return False
            return True

    def _send_ack(self, request: int, ok: bool) -> None:
        with contextlib.suppress(OSError):
            self.connection.reply_ack(request, ok)

    def _refusal_reply(self, message: Message) -> bool:
        """A refused request without an ack: answer GET_CONFIG with an empty config
        (how a back-end says no), close the connection for anything else."""
        if message.request == p.Request.GET_CONFIG:
            asked = p.decode_config(message.payload)
            with contextlib.suppress(OSError):
                self.connection.reply(message.request, p.encode_config(
                    p.ConfigSpace(asked.offset, asked.flags, b"")))
            return True
        return False

    def end(self) -> None:
        """The front-end is gone: stop its rings (requests in flight complete into them,
        bounded), close what it gave us, and be ready for the next one."""
        positions = self.virtio.stop_all(self.server.stop_timeout)
        if positions:
            log.info("%s: rings stopped at %s", self.name,
                     ", ".join(f"vq{i} {n}" for i, n in sorted(positions.items())))
        self.virtio.reset()
        self.server.driver_ok.clear()
        for vring in self.vrings:
            vring.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._drop_inflight()
        self.connection.close()

    # -- requests -----------------------------------------------------------------------

    def _nothing(self, message: Message) -> None:
        return None

    def _get_features(self, message: Message) -> bytes:
        return p.encode_u64(self.server.features)

    def _set_features(self, message: Message) -> None:
        features = p.decode_u64(message.payload)
        refused = self.virtio.refused_features(features, self.server.features, 0)
        if refused is not None:
            raise _Refused(refused)
        self.features = features
        self.virtio.accept_features(features)
        if not features & TRANSPORT_FEATURES:
            # Without protocol features rings start enabled: those complete run now.
            for index, vring in enumerate(self.vrings):
                vring.enabled = True
                try:
                    self._start_if_ready(index)
                except (_Refused, MemoryAccessError) as exc:
                    log.error("%s: ring %d cannot start: %s", self.name, index, exc)

    def _get_protocol_features(self, message: Message) -> bytes:
        return p.encode_u64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, message: Message) -> None:
        features = p.decode_u64(message.payload)
        if features & ~PROTOCOL_FEATURES:
            raise _Refused(f"protocol features {features:#x} include bits never offered "
                           f"({PROTOCOL_FEATURES:#x})")
        self.protocol_features = features

    def _get_queue_num(self, message: Message) -> bytes:
        return p.encode_u64(self.server.model.num_queues)

    def _reset(self, message: Message) -> None:
        log.info("%s: device reset by the front-end (%s)", self.name, message.name)
        self.virtio.reset()
        self.server.driver_ok.clear()
        for queue_log in self.queue_logs:  # a reset device has nothing in flight
            queue_log.clear()
        for index, vring in enumerate(self.vrings):
            vring.close()
            self.vrings[index] = _Vring()
        self.features = 0

    def _vring(self, index: int) -> _Vring:
        if not 0 <= index < len(self.vrings):
            raise _Refused(f"ring {index} does not exist ({len(self.vrings)} ring(s))")
        return self.vrings[index]

    def _idle_vring(self, index: int, what: str) -> _Vring:
        vring = self._vring(index)
        if index in self.virtio.workers:
            raise _Refused(f"ring {index} is running: its {what} cannot change now")
        return vring

    def _set_mem_table(self, message: Message) -> None:
        regions = p.decode_memory_table(message.payload)
        memory = VhostUserMemory()
        try:
            for region in regions:
                memory.add_region(region, message.take_fd())
        except BaseException:
            memory.close()
            raise
        old, self.memory = self.memory, memory
        if self.virtio.workers:  # remap the running rings under their requests in flight
            self.virtio.pause()
            try:
                gone = []
                for index in list(self.virtio.workers):
                    try:
                        state = self._queue_state(index)
                    except (_Refused, MemoryAccessError) as exc:
                        gone.append(index)
                        log.error("%s: ring %d is not in the new memory table (%s); it stops",
                                  self.name, index, exc)
                        continue
                    self.virtio.remap(index, state, memory)
                deadline = time.monotonic() + self.server.stop_timeout  # for them all
                for index in gone:  # as GET_VRING_BASE: its requests complete, then it stops
                    self._stop_ring(index, max(deadline - time.monotonic(), 0.0))
            finally:
                self.virtio.serve()
        if old is not None:
            old.close()
        log.debug("%s: memory table of %d region(s)", self.name, len(regions))

    def _get_max_mem_slots(self, message: Message) -> bytes:
        return p.encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, message: Message) -> None:
        region = p.decode_single_region(message.payload)
        if self.memory is None:
            self.memory = VhostUserMemory()
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            message.close_fds()
            raise _Refused(f"all {MAX_MEM_SLOTS} memory slots are in use")
        self.memory.add_region(region, message.take_fd())

    def _rem_mem_reg(self, message: Message) -> None:
        region = p.decode_single_region(message.payload)
        if self.memory is None:
            raise _Refused("no memory region to remove")
        self.memory.remove_region(region)

    def _set_vring_num(self, message: Message) -> None:
        state = p.decode_vring_state(message.payload)
        vring = self._idle_vring(state.index, "size")
        limit = self.server.model.queue_size
        if not is_valid_queue_size(state.num) or state.num > limit:
            raise _Refused(f"ring {state.index}: size {state.num} is not a power of two "
                           f"up to {limit}")
        vring.num = state.num

    def _set_vring_addr(self, message: Message) -> None:
        addr = p.decode_vring_addr(message.payload)
        if addr.flags & (1 << p.VRING_F_LOG):
            raise _Refused("dirty logging of the used ring is not supported")
        self._idle_vring(addr.index, "addresses").addr = addr

    def _set_vring_base(self, message: Message) -> None:
        state = p.decode_vring_state(message.payload)
        if state.num > 0xFFFF:
            raise _Refused(f"ring {state.index}: base {state.num} is beyond 16 bits")
        self._idle_vring(state.index, "base").base = state.num

    def _get_vring_base(self, message: Message) -> bytes:
        state = p.decode_vring_state(message.payload)
        vring = self._vring(state.index)
        self._stop_ring(state.index, self.server.stop_timeout)
        _close(vring.kick_fd)
        vring.kick_fd = -1
        return p.encode_vring_state(p.VringState(state.index, vring.base))

    def _vring_fd(self, message: Message) -> tuple[_Vring, int, int]:
        which = p.decode_vring_fd(message.payload)
        vring = self._vring(which.index)
        return vring, which.index, -1 if which.nofd else message.take_fd()

    def _set_vring_kick(self, message: Message) -> None:
        vring, index, fd = self._vring_fd(message)
        if fd < 0:
            raise _Refused(f"ring {index}: a ring without a kick eventfd (polling by the "
                           "back-end) is not supported")
        if index in self.virtio.workers:  # a new kick fd for a running ring: restart it
            self._stop_ring(index, self.server.stop_timeout)
        _close(vring.kick_fd)
        vring.kick_fd = fd
        self._start_if_ready(index)

    def _set_vring_call(self, message: Message) -> None:
        vring, _index, fd = self._vring_fd(message)
        vring.set_call(fd)

    def _set_vring_err(self, message: Message) -> None:
        vring, _index, fd = self._vring_fd(message)
        _close(vring.err_fd)
        vring.err_fd = fd

    def _set_vring_enable(self, message: Message) -> None:
        state = p.decode_vring_state(message.payload)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise _Refused(f"ring {state.index}: enable must be 0 or 1, not {state.num}")
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._start_if_ready(state.index)
        else:
            self._stop_ring(state.index, self.server.stop_timeout)

    def _get_inflight_fd(self, message: Message) -> None:
        asked = p.decode_inflight(message.payload)
        if asked.num_queues != len(self.vrings):
            raise _Refused(f"inflight buffer for {asked.num_queues} queue(s); the device has "
                           f"{len(self.vrings)}")
        if asked.queue_size > self.server.model.queue_size:
            raise _Refused(f"inflight buffer for queues of {asked.queue_size}, more than the "
                           f"queue size {self.server.model.queue_size}")
        fd, size = inflight.allocate(asked.num_queues, asked.queue_size)
        try:
            region = inflight.InflightRegion.map(fd, size, 0, asked.num_queues,
                                                 asked.queue_size)
            self._use_inflight(region)
            self.connection.reply(message.request, p.encode_inflight(
                p.Inflight(size, 0, asked.num_queues, asked.queue_size)), fds=[fd])
        finally:
            os.close(fd)
        log.debug("%s: new inflight buffer of %d bytes", self.name, size)

    def _set_inflight_fd(self, message: Message) -> None:
        given = p.decode_inflight(message.payload)
        fd = message.take_fd()
        try:
            if given.num_queues != len(self.vrings):
                raise _Refused(f"inflight buffer for {given.num_queues} queue(s); the device "
                               f"has {len(self.vrings)}")
            region = inflight.InflightRegion.map(fd, given.mmap_size, given.mmap_offset,
                                                 given.num_queues, given.queue_size)
        finally:
            os.close(fd)
        self._use_inflight(region)
        log.info("%s: the front-end handed back its inflight buffer", self.name)

    def _use_inflight(self, region: inflight.InflightRegion) -> None:
        if self.virtio.workers:
            region.close()
            raise _Refused("the inflight buffer cannot change while rings run")
        self._drop_inflight()
        self.inflight = region
        self.queue_logs = [region.queue_log(i) for i in range(len(self.vrings))]

    def _drop_inflight(self) -> None:
        for queue_log in self.queue_logs:
            queue_log.release()
        self.queue_logs = []
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    def _get_config(self, message: Message) -> bytes:
        asked = p.decode_config(message.payload)
        config = self.server.model.config_space()
        if asked.offset + asked.size > len(config):
            raise _Refused(f"config bytes {asked.offset}..{asked.offset + asked.size} are "
                           f"beyond the {len(config)}-byte config space")
        data = config[asked.offset:asked.offset + asked.size]
        return p.encode_config(p.ConfigSpace(asked.offset, asked.flags, data))

    def _set_config(self, message: Message) -> None:
        raise _Refused("the config space is read-only")

    # -- rings --------------------------------------------------------------------------

    def _queue_state(self, index: int) -> QueueState:
        """Ring ``index`` in guest-physical addresses, from its base."""
        vring = self.vrings[index]
        memory = self.memory
        if memory is None or vring.addr is None:
            raise _Refused(f"ring {index}: no memory table or no addresses yet")
        num = vring.num
        addr = vring.addr
        return QueueState(num, memory.user_to_guest(addr.desc, 16 * num),
                          memory.user_to_guest(addr.avail, 6 + 2 * num),
                          memory.user_to_guest(addr.used, 6 + 8 * num), vring.base)

    def _stop_ring(self, index: int, timeout: float) -> None:
        """Stop ring ``index`` if it runs (its requests in flight get ``timeout``
        seconds to complete) and keep where it stopped as its base."""
        position = self.virtio.stop_queue(index, timeout)
        if position is not None:
            self.vrings[index].base = position
        if not self.virtio.workers:
            self.server.driver_ok.clear()

    def _start_if_ready(self, index: int) -> None:
        """Start ring ``index`` once it is complete and enabled."""
        vring = self.vrings[index]
        if (index in self.virtio.workers or not vring.enabled or vring.kick_fd < 0
                or not vring.num or vring.addr is None or self.memory is None):
            return
        queue_log = self.queue_logs[index] if self.queue_logs else None
        if queue_log is not None and vring.num > queue_log.size:
            raise _Refused(f"ring {index} has {vring.num} entries, the inflight buffer "
                           f"{queue_log.size}")
        try:
            try:
                # With an inflight buffer the record, not the base, says where the ring
                # stands: after a restart of ours the front-end's base is its used index.
                self.virtio.start_queue(index, self._queue_state(index), self.memory,
                                        vring.kick_fd, vring.notify,
                                        recover=queue_log is not None, queue_log=queue_log)
            except InflightLogError as exc:
                assert queue_log is not None
                log.warning("%s: ring %d: the inflight buffer does not fit the ring (%s); "
                            "starting from the front-end's base %d", self.name, index, exc,
                            vring.base)
                queue_log.clear()
                self.virtio.start_queue(index, self._queue_state(index), self.memory,
                                        vring.kick_fd, vring.notify, queue_log=queue_log)
        except PyvduseError as exc:
            raise _Refused(str(exc)) from None
        log.info("%s: ring %d running (%d entries, from avail entry %d)", self.name, index,
                 vring.num, vring.base)
        self.server.driver_ok.set()
