"""The nbd backend against real NBD servers (nbdkit, qemu-nbd) and a scripted one.

Servers run as child processes on Unix sockets in a short temporary directory
(or on a TCP port of 127.0.0.1). Covered: the conformance suite over several
server configurations, capabilities from the transmission flags, many requests
in flight, splitting, holes, the whole device path, reconnecting after the
server was killed mid-I/O, the retry timeout, the connection events (lost,
restored) up to a control socket client, error replies, protocol
violations, multi-conn, close, and one-line errors for bad options and
unreachable servers.
"""

from __future__ import annotations

import errno
import itertools
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Recorder
from test_device import Rig, thread_names, wait_until

from pyvduse.backends import BACKENDS, open_backend
from pyvduse.backends import nbd as nbd_module
from pyvduse.backends.nbd import NbdBackend, parse_nbd_url
from pyvduse.commands import daemon_commands
from pyvduse.control import ControlServer
from pyvduse.ctl import ControlClient
from pyvduse.errors import ConfigError
from pyvduse.ratelimit import RateLimitedLog
from pyvduse.registry import ExportRegistry
from pyvduse.spec import ExportSpec
from pyvduse.testing import FakeVduse
from pyvduse.testing.conformance import check_backend
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v

MiB = 1 << 20
OK, IOERR = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR
T_IN, T_OUT, T_FLUSH = v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH
T_DISCARD, T_WZ = v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES
RESULT_OK = u.VDUSE_REQ_RESULT_OK
FAST = {"reconnect_delay": 0.02, "timeout": 2.0}  # quick reconnects for the tests


def data(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


# -- servers ----------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/setup-vm installs it (apt packages "
                    "nbdkit and qemu-utils)")
    return path


class Server:
    """An NBD server process on a Unix socket (or a TCP port), which can be killed and
    started again on the same address."""

    def __init__(self, argv: list[str], sock: Path | None, port: int | None,
                 log_path: Path) -> None:
        self.argv = argv
        self.sock = sock
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.sock is not None:
            return f"nbd+unix:///?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self, argv: list[str] | None = None) -> Server:
        if argv is not None:
            self.argv = argv
        if self.sock is not None:
            self.sock.unlink(missing_ok=True)  # left behind by a killed server
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{' '.join(self.argv)} did not start: "
                                     f"{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.005)
        return self

    def _answers(self) -> bool:
        """True once the server sends the NBD greeting."""
        try:
            if self.sock is not None:
                probe = socket.socket(socket.AF_UNIX)
                probe.settimeout(1)
                probe.connect(str(self.sock))
            else:
                probe = socket.create_connection(("127.0.0.1", self.port or 0), timeout=1)
        except OSError:
            return False
        with probe:
            try:
                return probe.recv(8) == b"NBDMAGIC"
            except OSError:
                return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nbd"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


Start = Callable[..., Server]


@pytest.fixture
def servers(sockdir: Path) -> Iterator[Start]:
    """``start(tool, *args, tcp=False)``: run ``nbdkit`` or ``qemu-nbd`` with ``args``
    on a new socket; every server is killed at the end, and no client thread may remain."""
    started: list[Server] = []

    def start(tool: str, *args: str, tcp: bool = False) -> Server:
        n = len(started)
        sock = None if tcp else sockdir / f"s{n}.sock"
        port = free_port() if tcp else None
        if tool == "nbdkit":
            where = ["-i", "127.0.0.1", "-p", str(port)] if tcp else ["-U", str(sock)]
            argv = [_tool("nbdkit"), "--exit-with-parent", "-f", *where, *args]
        else:
            where = ["-b", "127.0.0.1", "-p", str(port)] if tcp else ["-k", str(sock)]
            argv = [_tool("qemu-nbd"), "-t", "-e", "16", *where, *args]
        server = Server(argv, sock, port, sockdir / f"s{n}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
    wait_until(lambda: not thread_names("nbd-"), what="the nbd client threads to end")


def uneven(view: memoryview, seed: int) -> list[memoryview]:
    """``view`` cut into a few pieces of random lengths (guest buffers need not be aligned)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(view)), min(3, len(view) - 1)))
    edges = [0, *cuts, len(view)]
    return [view[a:b] for a, b in itertools.pairwise(edges)]


def image(directory: Path, size: int = 4 * MiB) -> Path:
    path = directory / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern_initial(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin serves: each 8-byte word is its own offset, big-endian."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", pos) for pos in range(first, offset + length + 8, 8))
    return words[offset - first:offset - first + length]


# -- the conformance suite over several servers -----------------------------------------

CONFIGS = {
    "nbdkit-memory": ("nbdkit", ["memory", "4M"], {}),
    "nbdkit-no-structured-replies": ("nbdkit", ["--no-sr", "memory", "4M"], {}),
    "nbdkit-4k-blocks-64k-max": ("nbdkit", ["--filter=blocksize-policy", "memory", "4M",
                                            "blocksize-minimum=4096", "blocksize-maximum=64K",
                                            "blocksize-error-policy=error"], {}),
    "nbdkit-no-write-zeroes": ("nbdkit", ["--filter=nozero", "memory", "4M",
                                          "zeromode=none"], {}),
    "nbdkit-tcp": ("nbdkit", ["memory", "4M"], {"tcp": True}),
    "nbdkit-file": ("nbdkit", ["file"], {"file": True}),
    "qemu-nbd-raw-file": ("qemu-nbd", ["-f", "raw", "--cache=writeback"], {"file": True}),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_conformance(config: str, servers: Start, sockdir: Path) -> None:
    tool, args, extra = CONFIGS[config]
    if extra.get("file"):
        args = [*args, str(image(sockdir))]
    server = servers(tool, *args, tcp=bool(extra.get("tcp")))
    ran = check_backend(lambda: NbdBackend(server.url, **FAST),
                        initial=lambda offset, length: bytes(length))
    assert ran == ["geometry", "capabilities", "reads", "round_trip", "vectored",
                   "write_zeroes", "discard", "concurrency", "submit"]


def test_conformance_read_only(servers: Start) -> None:
    server = servers("nbdkit", "-r", "pattern", "4M")
    ran = check_backend(lambda: NbdBackend(server.url, **FAST), initial=pattern_initial)
    assert ran == ["geometry", "capabilities", "reads", "concurrency", "submit"]


# -- what the handshake says ------------------------------------------------------------


def test_capabilities_follow_the_transmission_flags(servers: Start) -> None:
    full = NbdBackend(servers("nbdkit", "memory", "3M").url)
    readonly = NbdBackend(servers("nbdkit", "-r", "memory", "2M").url)
    blocks = NbdBackend(servers("nbdkit", "--filter=blocksize-policy", "memory", "1M",
                                "blocksize-minimum=4096").url)
    odd = NbdBackend(servers("nbdkit", "--filter=blocksize-policy", "memory", "1M",
                             "blocksize-minimum=256").url)
    nozero = NbdBackend(servers("nbdkit", "--filter=nozero", "memory", "1M",
                                "zeromode=none").url)
    try:
        assert full.size() == 3 * MiB and full.info.structured
        assert (full.can_write, full.can_flush, full.can_discard, full.can_write_zeroes,
                full.native_write_zeroes) == (True, True, True, True, True)
        assert full.submit_min_bytes == 0 and full.preferred_block_size == 512
        assert readonly.size() == 2 * MiB
        assert (readonly.can_write, readonly.can_flush, readonly.can_discard,
                readonly.can_write_zeroes) == (False, False, False, False)
        with pytest.raises(OSError) as refused:
            readonly.write(0, memoryview(bytes(512)))
        assert refused.value.errno == errno.EROFS
        assert blocks.preferred_block_size == 4096
        assert odd.preferred_block_size == 512
        assert (nozero.can_write_zeroes, nozero.native_write_zeroes) == (True, False)
    finally:
        for backend in (full, readonly, blocks, odd, nozero):
            backend.close()


def test_registered_and_built_from_options(servers: Start) -> None:
    assert BACKENDS["nbd"] is NbdBackend
    server = servers("nbdkit", "memory", "1M")
    backend = open_backend("nbd", [f"uri={server.url}", "connections=1",
                                   "reconnect-delay=0.5", "retry-timeout=0", "timeout=3"])
    try:
        assert isinstance(backend, NbdBackend)
        assert (backend.reconnect_delay, backend.retry_timeout, backend.timeout) == (0.5, 0, 3)
        assert backend.size() == MiB
    finally:
        backend.close()


# -- requests in flight -----------------------------------------------------------------


def test_many_requests_in_flight_move_the_exact_bytes(servers: Start, sockdir: Path) -> None:
    disk = image(sockdir)
    server = servers("qemu-nbd", "-f", "raw", str(disk))
    backend = NbdBackend(server.url, **FAST)
    rec = Recorder()
    rng = random.Random(1)
    spans, at = [], 0
    while True:
        length = rng.choice([512, 4096, 3 * 512, 64 << 10, 200 << 10])
        if at + length > 4 * MiB:
            break
        spans.append((at, length))
        at += length + rng.choice([0, 512, 8192])
    try:
        sources = [data(length, n) for n, (_, length) in enumerate(spans)]
        for n, ((offset, _), source) in enumerate(zip(spans, sources, strict=True)):
            # odd-address, uneven, read-only pieces
            raw = bytes(1) + source
            backend.submit_writev(offset, uneven(memoryview(raw)[1:], n), rec.done(n))
        assert set(rec.wait().values()) == {None}
        backend.submit_flush(rec.done(0))
        assert rec.wait() == {0: None}
        on_disk = disk.read_bytes()
        for (offset, length), source in zip(spans, sources, strict=True):
            assert on_disk[offset:offset + length] == source
        outs = [bytearray(b"\xa5") * length for _, length in spans]
        for n, ((offset, _), out) in enumerate(zip(spans, outs, strict=True)):
            backend.submit_readv(offset, uneven(memoryview(out), n + 7), rec.done(n))
        assert set(rec.wait().values()) == {None}
        assert outs == [bytearray(s) for s in sources]
    finally:
        backend.close()


@pytest.mark.parametrize("connections", [1, 3])
def test_a_plugged_batch_is_sent_when_unplugged(servers: Start, connections: int) -> None:
    server = servers("nbdkit", "memory", "4M")
    backend = NbdBackend(server.url, connections=connections, **FAST)
    rec = Recorder()
    try:
        sources = [data(4096 * (1 + n % 3), n) for n in range(40)]
        backend.plug()
        for n, source in enumerate(sources):
            backend.submit_writev(n * 16384, [memoryview(source)], rec.done(n))
        # Another thread that did not plug is not held back by this thread's batch.
        other = Recorder()
        out = bytearray(4096)
        thread = threading.Thread(
            target=lambda: backend.submit_readv(MiB, [memoryview(out)], other.done(0)))
        thread.start()
        thread.join()
        assert other.wait() == {0: None}
        time.sleep(0.2)
        assert not any(rec.results.values()), "a held write was sent before unplug()"
        assert backend.in_flight == len(sources)
        backend.unplug()
        assert set(rec.wait().values()) == {None}
        backend.unplug()  # nothing held: nothing happens
        outs = [bytearray(len(source)) for source in sources]
        backend.plug()
        for n, out in enumerate(outs):
            backend.submit_readv(n * 16384, [memoryview(out)], rec.done(n))
        backend.unplug()
        assert set(rec.wait().values()) == {None}
        assert outs == [bytearray(source) for source in sources]
    finally:
        backend.close()


def test_a_plugged_batch_on_a_broken_connection_is_sent_again(servers: Start,
                                                              sockdir: Path) -> None:
    disk = image(sockdir)
    server = servers("qemu-nbd", "-f", "raw", str(disk))
    backend = NbdBackend(server.url, **FAST)
    rec = Recorder()
    try:
        source = data(8192, 5)
        backend.plug()
        backend.submit_writev(8192, [memoryview(source)], rec.done(0))
        server.kill()  # the held command's connection breaks before it was ever sent
        wait_until(lambda: backend.live_connections == 0, what="the connection to break")
        server.start()
        backend.unplug()  # finds its connection broken: the reader handed the command on
        assert rec.wait() == {0: None}
        backend.flush()
        assert disk.read_bytes()[8192:16384] == source
    finally:
        backend.close()


def test_long_requests_are_split_to_the_server_maximum(servers: Start) -> None:
    # The server refuses any request over 64 KiB: 1 MiB must go as 16 commands.
    server = servers("nbdkit", "--filter=blocksize-policy", "memory", "4M",
                     "blocksize-maximum=64K", "blocksize-error-policy=error")
    backend = NbdBackend(server.url, **FAST)
    try:
        source = data(MiB + 4096, 3)
        backend.writev(8192, [memoryview(source)[:5], memoryview(source)[5:]])
        out = bytearray(len(source))
        backend.readv(8192, uneven(memoryview(out), 1))
        assert out == source
        backend.write_zeroes(8192, MiB, may_unmap=False)
        backend.read(8192, memoryview(out))
        assert out == bytes(MiB) + source[MiB:]
    finally:
        backend.close()


def test_holes_in_structured_replies_read_as_zeroes(servers: Start, sockdir: Path) -> None:
    disk = image(sockdir)
    with open(disk, "r+b") as f:  # data islands in a sparse file: qemu-nbd sends hole chunks
        f.seek(MiB)
        f.write(b"island")
        f.seek(3 * MiB - 512)
        f.write(b"x" * 1024)
    server = servers("qemu-nbd", "-f", "raw", str(disk))
    backend = NbdBackend(server.url, **FAST)
    try:
        out = bytearray(b"\xee") * (4 * MiB)
        backend.readv(0, uneven(memoryview(out), 5))
        assert out == disk.read_bytes()
    finally:
        backend.close()


def test_write_zeroes_without_server_support_writes_zero_data(servers: Start) -> None:
    server = servers("nbdkit", "--filter=nozero", "memory", "2M", "zeromode=none")
    backend = NbdBackend(server.url, **FAST)
    try:
        backend.write(0, memoryview(b"\xff" * (3 * MiB // 2)))
        backend.write_zeroes(512, MiB + 512, may_unmap=True)
        out = bytearray(3 * MiB // 2)
        backend.read(0, memoryview(out))
        assert out == b"\xff" * 512 + bytes(MiB + 512) + b"\xff" * (MiB // 2 - 1024)
    finally:
        backend.close()


# -- the whole device path --------------------------------------------------------------


def test_device_over_qemu_nbd_matches_the_file(servers: Start, sockdir: Path) -> None:
    disk = image(sockdir)
    server = servers("qemu-nbd", "-f", "raw", "--discard=unmap", str(disk))
    backend = NbdBackend(server.url, **FAST)
    rig = Rig(name="nbd0", backend=backend)
    try:
        assert rig.ch.start() == RESULT_OK
        sizes = [512, 4096, 8192, 65536, 3 * 4096, 128 << 10]
        for q in (0, 1):
            reqs, expected, sector = [], [], q * 4096
            for n, size in enumerate(sizes * 3):
                payload = data(size, 100 * q + n)
                reqs.append((T_OUT, sector, payload, 0))
                expected.append((sector * 512, payload))
                sector += size // 512
            writes = rig.batch(q, reqs)
            assert len(rig.ch.wait_used(q, len(writes))) == len(writes)
            assert [rig.status(w) for w in writes] == [OK] * len(writes)
            assert rig.run(q, T_FLUSH)[0] == OK
            content = disk.read_bytes()
            for offset, payload in expected:
                assert content[offset:offset + len(payload)] == payload
            reads = rig.batch(q, [(T_IN, offset // 512, b"", len(payload))
                                  for offset, payload in expected])
            rig.ch.wait_used(q, len(reads))
            for req, (_, payload) in zip(reads, expected, strict=True):
                assert (rig.status(req), rig.data(req)) == (OK, payload)
        # Write-zeroes and discard reach the server too.
        zero = v.virtio_blk_discard_write_zeroes.pack(1, 6, 0)
        assert rig.run(0, T_WZ, 0, zero)[0] == OK
        assert rig.run(1, T_DISCARD, 0, v.virtio_blk_discard_write_zeroes.pack(4096, 8, 0))[0] \
            == OK
        content = disk.read_bytes()
        assert content[512:7 * 512] == bytes(6 * 512)
        assert content[:512] == data(512, 0)  # the first write, before the zeroed range
    finally:
        rig.close()
        backend.close()


# -- reconnecting -----------------------------------------------------------------------


def test_server_killed_mid_io_requests_are_sent_again_after_restart(
        servers: Start, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = image(sockdir)
    # Slow at first, so that requests are surely in flight when the server dies.
    server = servers("nbdkit", "--filter=delay", "file", str(disk), "delay-write=2",
                     "delay-read=2")
    fast = [arg for arg in server.argv if not arg.startswith(("--filter=delay", "delay-"))]
    backend = NbdBackend(server.url, **FAST)
    rec = Recorder()
    try:
        sources = [data(65536, n) for n in range(16)]
        for n, source in enumerate(sources):
            backend.submit_writev(n * 65536, [memoryview(source)], rec.done(n))
        wait_until(lambda: backend.in_flight == 16, what="16 requests in flight")
        server.kill()
        wait_until(lambda: backend.live_connections == 0, what="the loss to be noticed")
        # Requests made while the server is away wait for it.
        more = data(65536, 99)
        backend.submit_writev(16 * 65536, [memoryview(more)], rec.done(16))
        out = bytearray(17 * 65536)
        backend.submit_readv(0, [memoryview(out)], rec.done(17))
        wait_until(lambda: backend.waiting == 18, what="18 requests waiting")
        time.sleep(0.05)
        assert not any(rec.results.values())
        assert backend.reconnections() == 0
        server.start(fast)  # the same socket, no delay
        outcome = rec.wait()
        assert set(outcome.values()) == {None}, outcome
        assert backend.reconnections() == 1  # the metrics' backend_reconnects
        # The read may have been served before or after the writes: read again.
        backend.read(0, memoryview(out))
        assert out == b"".join([*sources, more])
        assert disk.read_bytes()[:17 * 65536] == out
    finally:
        backend.close()
    assert "connection 1 lost" in caplog.text
    assert "reconnected after" in caplog.text


def test_outage_longer_than_the_retry_timeout_fails_requests_then_recovers(
        servers: Start, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = image(sockdir)
    server = servers("nbdkit", "file", str(disk))
    backend = NbdBackend(server.url, reconnect_delay=0.02, retry_timeout=0.3, timeout=2)
    rec = Recorder()
    try:
        backend.write(0, memoryview(b"k" * 4096))
        server.kill()
        started = time.monotonic()
        out = bytearray(4096)
        backend.submit_readv(0, [memoryview(out)], rec.done(0))
        error = rec.wait()[0]
        assert isinstance(error, OSError) and error.errno == errno.EIO
        assert 0.25 <= time.monotonic() - started < 3
        assert "unreachable" in str(error)
        # Once the retry timeout passed, new requests fail after one attempt, not 0.3 s.
        started = time.monotonic()
        with pytest.raises(OSError) as excinfo:
            backend.read(0, memoryview(out))
        assert excinfo.value.errno == errno.EIO
        assert time.monotonic() - started < 0.25
        server.start()
        # A request fails at once while the last attempt failed less than reconnect-delay
        # ago; after that it gets an attempt of its own, which now succeeds.
        time.sleep(0.05)
        backend.read(0, memoryview(out))  # the device is usable again
        assert out == b"k" * 4096
        assert backend.live_connections == 1
    finally:
        backend.close()
    assert "failing 1 request(s) with EIO" in caplog.text


def test_retry_timeout_zero_fails_at_once(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, reconnect_delay=5, retry_timeout=0, timeout=2)
    try:
        server.kill()
        started = time.monotonic()
        with pytest.raises(OSError) as excinfo:
            backend.flush()
        assert excinfo.value.errno == errno.EIO
        assert time.monotonic() - started < 1  # no wait for reconnect-delay
    finally:
        backend.close()


# -- connection events ------------------------------------------------------------------


class Events:
    """An event sink that records ``(name, data)``, thread-safely."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.seen.append((event, data))
            self.cond.notify_all()

    def names(self) -> list[str]:
        with self.cond:
            return [name for name, _ in self.seen]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.seen) >= count, timeout), (
                f"{count} event(s) expected, got {self.seen}")
            return list(self.seen)


LOST, RESTORED = "BACKEND_CONNECTION_LOST", "BACKEND_CONNECTION_RESTORED"


def test_a_lost_and_restored_server_is_reported_once_per_transition(servers: Start,
                                                                    sockdir: Path) -> None:
    server = servers("nbdkit", "file", str(image(sockdir)))
    backend = NbdBackend(server.url, reconnect_delay=0.02, timeout=2)
    events = Events()
    backend.event_sink = events
    rec = Recorder()
    try:
        backend.write(0, memoryview(b"e" * 512))
        assert events.seen == []
        for outage in range(2):
            server.kill()
            (lost,) = events.wait_for(1 + 2 * outage)[2 * outage:]
            assert lost[0] == LOST
            assert lost[1]["uri"] == server.url
            assert isinstance(lost[1]["reason"], str) and lost[1]["reason"]
            out = bytearray(512)
            backend.submit_readv(0, [memoryview(out)], rec.done(outage))
            # Reconnection attempts fail meanwhile (delays 0.02, 0.04, 0.08, 0.16 s):
            # none of them is a transition.
            time.sleep(0.4)
            assert events.names() == [LOST, RESTORED] * outage + [LOST]
            server.start()
            assert rec.wait() == {outage: None}
            assert out == b"e" * 512
            restored = events.wait_for(2 + 2 * outage)[-1]
            assert restored[0] == RESTORED
            assert restored[1]["uri"] == server.url
            assert 0.4 <= restored[1]["down-for"] < 10
            time.sleep(0.1)
            assert events.names() == [LOST, RESTORED] * (outage + 1)
    finally:
        backend.close()
    assert events.names() == [LOST, RESTORED] * 2  # closing is no loss


def test_with_several_connections_only_losing_all_of_them_is_an_event(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, connections=2, reconnect_delay=0.05, timeout=2)
    events = Events()
    backend.event_sink = events
    try:
        assert backend.live_connections == 2
        first = backend._live[0]
        first.shut()  # one connection breaks, the other carries on
        wait_until(lambda: first not in backend._live, what="the loss to be noticed")
        wait_until(lambda: backend.live_connections == 2, what="the connection back")
        time.sleep(0.1)
        assert events.seen == []
        server.kill()  # both connections break
        wait_until(lambda: backend.live_connections == 0, what="both losses to be noticed")
        server.start()
        wait_until(lambda: backend.live_connections == 2, what="both connections back")
        time.sleep(0.2)
        assert events.names() == [LOST, RESTORED]
    finally:
        backend.close()


def test_a_failing_event_sink_never_reaches_the_backend(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, reconnect_delay=0.02, timeout=2)
    calls: list[str] = []

    def broken(event: str, data: dict[str, Any]) -> None:
        calls.append(event)
        raise RuntimeError("the sink is broken")

    backend.event_sink = broken
    try:
        server.kill()
        wait_until(lambda: calls == [LOST], what="the loss reported")
        server.start()
        wait_until(lambda: calls == [LOST, RESTORED], what="the recovery reported")
        backend.write(0, memoryview(b"f" * 512))  # the client still works
        out = bytearray(512)
        backend.read(0, memoryview(out))
        assert out == b"f" * 512
        assert backend.live_connections == 1
    finally:
        backend.close()


def test_connection_events_reach_the_registry_and_control_clients(
        servers: Start, sockdir: Path) -> None:
    server = servers("nbdkit", "memory", "1M")
    recorded = Events()
    control: ControlServer | None = None

    def emit(event: str, data: dict[str, Any]) -> None:
        recorded(event, data)
        if control is not None:
            control.emit(event, data)

    fake = FakeVduse()
    registry = ExportRegistry(kernel=fake, emit=emit)
    control = ControlServer(str(sockdir / "ctl.sock"),
                            daemon_commands(registry, lambda: None), version="test")
    control.start()
    try:
        registry.add(ExportSpec(id="nbdev0", backend="nbd", attach="none",
                                backend_options=(f"uri={server.url}", "reconnect-delay=0.02",
                                                 "timeout=2"),
                                inflight_log=str(sockdir / "nbdev0.inflight")))
        with ControlClient(control.path, timeout=10) as client:
            assert [e["id"] for e in client.execute("query-exports")] == ["nbdev0"]
            server.kill()
            lost = client.next_event(timeout=10)
            assert lost is not None and lost["event"] == LOST, lost
            assert lost["data"]["id"] == "nbdev0" and lost["data"]["uri"] == server.url
            assert lost["data"]["reason"]
            time.sleep(0.3)  # failed reconnection attempts are no events
            server.start()
            restored = client.next_event(timeout=10)
            assert restored is not None and restored["event"] == RESTORED, restored
            assert restored["data"]["id"] == "nbdev0"
            assert restored["data"]["down-for"] >= 0.3
            assert client.next_event(timeout=0.3) is None
        assert [(name, data["id"]) for name, data in recorded.seen] == [
            (LOST, "nbdev0"), (RESTORED, "nbdev0")]
        assert list(recorded.seen[0][1]) == ["id", "uri", "reason"]
    finally:
        control.close()
        registry.close()
        fake.memory.close()
    assert fake.destroyed == ["nbdev0"]
    assert [name for name, _ in recorded.seen] == [LOST, RESTORED]  # removing it is no loss


# -- errors from the server -------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_error_replies_fail_the_request_and_the_connection_goes_on(
        structured: bool, servers: Start, sockdir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    read_trigger, write_trigger = sockdir / "fail-reads", sockdir / "fail-writes"
    server = servers("nbdkit", *([] if structured else ["--no-sr"]), "--filter=error",
                     "memory", "1M",
                     "error-pread=EIO", "error-pread-rate=1", f"error-pread-file={read_trigger}",
                     "error-pwrite=ENOSPC", "error-pwrite-rate=1",
                     f"error-pwrite-file={write_trigger}")
    backend = NbdBackend(server.url, **FAST)
    try:
        assert backend.info.structured == structured
        read_trigger.touch()
        write_trigger.touch()
        buf = bytearray(4096)
        with pytest.raises(OSError) as excinfo:
            backend.read(0, memoryview(buf))
        assert excinfo.value.errno == errno.EIO
        with pytest.raises(OSError) as excinfo:
            backend.write(0, memoryview(b"w" * 4096))
        assert excinfo.value.errno == errno.ENOSPC
        assert "nbd server: write 0+4096" in str(excinfo.value)
        write_trigger.unlink()
        backend.write(0, memoryview(b"w" * 4096))
        read_trigger.unlink()
        backend.read(0, memoryview(buf))
        assert buf == b"w" * 4096
        assert backend.live_connections == 1
        assert "lost" not in caplog.text  # errors are not connection trouble
    finally:
        backend.close()


def test_error_replies_become_io_errors_on_a_device_that_stays_alive(
        servers: Start, sockdir: Path) -> None:
    trigger = sockdir / "fail"
    server = servers("nbdkit", "--filter=error", "memory", "1M", "error-rate=1",
                     f"error-file={trigger}")
    backend = NbdBackend(server.url, **FAST)
    rig = Rig(name="nbd1", backend=backend)
    try:
        assert rig.ch.start() == RESULT_OK
        trigger.touch()
        assert rig.run(0, T_OUT, 8, b"d" * 4096)[0] == IOERR
        assert rig.run(1, T_IN, 8, b"", 4096)[0] == IOERR
        trigger.unlink()
        assert rig.run(0, T_OUT, 8, b"d" * 4096)[0] == OK
        assert rig.run(1, T_IN, 8, b"", 4096)[:2] == (OK, b"d" * 4096)
    finally:
        rig.close()
        backend.close()


@pytest.mark.parametrize(("nbd_error", "expected"), [
    (1, errno.EPERM), (5, errno.EIO), (12, errno.ENOMEM), (22, errno.EINVAL),
    (28, errno.ENOSPC), (75, errno.EOVERFLOW), (95, errno.ENOTSUP), (108, errno.ESHUTDOWN),
    (9999, errno.EIO)])
def test_nbd_errors_map_to_errno(nbd_error: int, expected: int) -> None:
    assert nbd_module.nbd_errno(nbd_error) == expected


# -- a scripted server, for replies no real server sends --------------------------------


class ScriptedServer:
    """A small NBD server on a Unix socket over a bytearray.

    Structured reads are answered in 512-byte chunks in reverse order, all-zero
    chunks as holes. ``sabotage`` spoils the first reply of the first connection
    (of connection number ``sabotage_connection``):
    ``handle`` (unknown handle), ``magic`` (bad magic), ``outside`` (a data chunk
    outside the request), ``eshutdown`` (an ESHUTDOWN error), ``short`` (a read
    reply without data); for a read of 4 KiB, ``overlap`` (data chunks 0+2560 and
    1024+1536: 4096 bytes in all, yet the last 1536 never sent) and ``duplicate``
    (chunk 0+2048 twice). ``fail_reads`` answers every read with an error chunk.
    ``info_every`` (seconds; None: off), when set, makes the handshakes that start
    from then on endless: NBD_OPT_GO gets an NBD_REP_INFO every ``info_every``
    seconds (as fast as possible for 0) and never an ACK, until the server gives
    up after ENDLESS_FOR seconds and hangs up (so that a broken client fails a
    test instead of hanging it). ``hang_up()`` closes the connections in service.
    ``multi_conn`` advertises ``NBD_FLAG_CAN_MULTI_CONN``.
    """

    ENDLESS_FOR = 5.0

    def __init__(self, path: Path, structured: bool = True, sabotage: str = "",
                 fail_reads: bool = False, go: bool = True,
                 info_every: float | None = None, multi_conn: bool = False,
                 sabotage_connection: int = 1) -> None:
        self.path = path
        self.multi_conn = multi_conn
        self.sabotage_connection = sabotage_connection
        self.structured = structured
        self.go = go
        self.sabotage = sabotage
        self.fail_reads = fail_reads
        self.info_every = info_every
        self.data = bytearray(MiB)
        self.connections = 0
        self.disconnects = 0
        self.serving: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._accept, name="scripted-server",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()

    def hang_up(self) -> None:
        for conn in list(self.serving):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections),
                             name="scripted-conn", daemon=True).start()

    @staticmethod
    def _recv(conn: socket.socket, length: int) -> bytes:
        buf = b""
        while len(buf) < length:
            more = conn.recv(length - len(buf))
            if not more:
                raise EOFError
            buf += more
        return buf

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            try:
                self._session(conn, number)
            except (EOFError, OSError):
                pass

    def _session(self, conn: socket.socket, number: int) -> None:
        m = nbd_module
        conn.sendall(struct.pack(">QQH", m.NBDMAGIC, m.IHAVEOPT,
                                 m.FLAG_FIXED_NEWSTYLE | m.FLAG_NO_ZEROES))
        self._recv(conn, 4)
        structured = False
        endless = self.info_every
        while True:
            _, option, length = struct.unpack(">QII", self._recv(conn, 16))
            self._recv(conn, length)

            def reply(kind: int, payload: bytes = b"", option: int = option) -> None:
                conn.sendall(struct.pack(">QIII", m.OPT_REPLY_MAGIC, option, kind,
                                         len(payload)) + payload)

            flags = (m.FLAG_HAS_FLAGS | m.FLAG_SEND_FLUSH | m.FLAG_SEND_TRIM
                     | m.FLAG_SEND_WRITE_ZEROES | (m.FLAG_CAN_MULTI_CONN if self.multi_conn else 0))
            if option == m.OPT_STRUCTURED_REPLY and self.structured:
                structured = True
                reply(m.REP_ACK)
            elif option == m.OPT_GO and self.go:
                info = struct.pack(">HQH", m.INFO_EXPORT, len(self.data), flags)
                if endless is not None:
                    give_up = time.monotonic() + self.ENDLESS_FOR
                    while time.monotonic() < give_up:
                        reply(m.REP_INFO, info)
                        time.sleep(endless)
                    return
                reply(m.REP_INFO, info)
                reply(m.REP_ACK)
                break
            elif option == m.OPT_EXPORT_NAME:  # no reply header; no zeroes (NO_ZEROES)
                conn.sendall(struct.pack(">QH", len(self.data), flags))
                break
            else:
                reply(m.REP_ERR_UNSUP)
        sabotage = self.sabotage if number == self.sabotage_connection else ""
        self.serving.append(conn)
        while True:
            _, _, kind, handle, offset, length = struct.unpack(">IHHQQI",
                                                               self._recv(conn, 28))
            if kind == m.CMD_DISC:
                self.disconnects += 1
                return
            if kind == m.CMD_WRITE:
                self.data[offset:offset + length] = self._recv(conn, length)
            if sabotage:
                self._spoil(conn, sabotage, kind, handle, offset, length)
                sabotage = ""
                continue
            if kind == m.CMD_WRITE_ZEROES:
                self.data[offset:offset + length] = bytes(length)
            if kind != m.CMD_READ:
                conn.sendall(struct.pack(">IIQ", m.SIMPLE_REPLY_MAGIC, 0, handle))
            elif self.fail_reads:
                message = b"disk on fire"
                chunk = struct.pack(">IH", 1, len(message)) + message
                conn.sendall(struct.pack(">IHHQI", m.STRUCTURED_REPLY_MAGIC, m.REPLY_FLAG_DONE,
                                         m.REPLY_TYPE_ERROR, handle, len(chunk)) + chunk)
            elif structured:
                self._structured_read(conn, handle, offset, length)
            else:
                conn.sendall(struct.pack(">IIQ", m.SIMPLE_REPLY_MAGIC, 0, handle)
                             + bytes(self.data[offset:offset + length]))

    def _structured_read(self, conn: socket.socket, handle: int, offset: int,
                         length: int) -> None:
        m = nbd_module
        out = b""
        for start in reversed(range(offset, offset + length, 512)):
            piece = bytes(self.data[start:min(start + 512, offset + length)])
            if piece.count(0) == len(piece):
                out += struct.pack(">IHHQIQI", m.STRUCTURED_REPLY_MAGIC, 0,
                                   m.REPLY_TYPE_OFFSET_HOLE, handle, 12, start, len(piece))
            else:
                out += struct.pack(">IHHQIQ", m.STRUCTURED_REPLY_MAGIC, 0,
                                   m.REPLY_TYPE_OFFSET_DATA, handle, 8 + len(piece),
                                   start) + piece
        out += struct.pack(">IHHQI", m.STRUCTURED_REPLY_MAGIC, m.REPLY_FLAG_DONE,
                           m.REPLY_TYPE_NONE, handle, 0)
        conn.sendall(out)

    def _spoil(self, conn: socket.socket, how: str, kind: int, handle: int, offset: int,
               length: int) -> None:
        m = nbd_module
        if how == "handle":
            conn.sendall(struct.pack(">IIQ", m.SIMPLE_REPLY_MAGIC, 0, handle ^ 0xBAD))
        elif how == "magic":
            conn.sendall(struct.pack(">IIQ", 0x12345678, 0, handle))
        elif how == "outside":
            conn.sendall(struct.pack(">IHHQIQ", m.STRUCTURED_REPLY_MAGIC, 0,
                                     m.REPLY_TYPE_OFFSET_DATA, handle, 8 + 512,
                                     offset + length) + bytes(512))
        elif how == "eshutdown":
            conn.sendall(struct.pack(">IIQ", m.SIMPLE_REPLY_MAGIC, 108, handle))
            self._recv(conn, 28)  # the client says goodbye (NBD_CMD_DISC)
            self.disconnects += 1
        elif how == "short":
            conn.sendall(struct.pack(">IHHQI", m.STRUCTURED_REPLY_MAGIC, m.REPLY_FLAG_DONE,
                                     m.REPLY_TYPE_NONE, handle, 0))
        elif how in ("overlap", "duplicate"):
            assert (kind, length) == (m.CMD_READ, 4096)
            pieces = [(0, 2560), (1024, 1536)] if how == "overlap" else [(0, 2048), (0, 2048)]
            out = b"".join(struct.pack(">IHHQIQ", m.STRUCTURED_REPLY_MAGIC, 0,
                                       m.REPLY_TYPE_OFFSET_DATA, handle, 8 + size,
                                       offset + start)
                           + bytes(self.data[offset + start:offset + start + size])
                           for start, size in pieces)
            conn.sendall(out + struct.pack(">IHHQI", m.STRUCTURED_REPLY_MAGIC,
                                           m.REPLY_FLAG_DONE, m.REPLY_TYPE_NONE, handle, 0))


@pytest.fixture
def scripted(sockdir: Path) -> Iterator[Callable[..., ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(**kwargs: object) -> ScriptedServer:
        server = ScriptedServer(sockdir / f"x{len(made)}.sock", **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
    wait_until(lambda: not thread_names("nbd-"), what="the nbd client threads to end")


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_chunks_in_any_order_and_holes(structured: bool,
                                       scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(structured=structured)
    server.data[1000:3000] = data(2000, 1)
    server.data[9000:9100] = b"z" * 100
    backend = NbdBackend(server.url, **FAST)
    try:
        assert backend.info.structured == structured
        out = bytearray(b"\x77") * 16384
        backend.readv(0, uneven(memoryview(out), 2))
        assert out == server.data[:16384]
    finally:
        backend.close()


def test_servers_without_nbd_opt_go_or_fixed_newstyle(
        scripted: Callable[..., ScriptedServer], servers: Start) -> None:
    old = scripted(go=False)  # NBD_OPT_GO unknown: NBD_OPT_EXPORT_NAME, structured replies kept
    unfixed = servers("nbdkit", "--mask-handshake=0", "memory", "1M")  # no options at all
    for url, structured in ((old.url, True), (unfixed.url, False)):
        backend = NbdBackend(url, **FAST)
        try:
            assert (backend.size(), backend.info.structured) == (MiB, structured)
            backend.write(4096, memoryview(b"o" * 4096))
            out = bytearray(8192)
            backend.read(0, memoryview(out))
            assert out == bytes(4096) + b"o" * 4096
        finally:
            backend.close()


@pytest.mark.parametrize("how", ["handle", "magic"])
def test_a_protocol_violation_drops_the_connection_and_the_request_is_sent_again(
        how: str, scripted: Callable[..., ScriptedServer],
        caplog: pytest.LogCaptureFixture) -> None:
    server = scripted(sabotage=how)
    server.data[:4096] = data(4096, 9)
    backend = NbdBackend(server.url, **FAST)
    try:
        out = bytearray(4096)
        backend.read(0, memoryview(out))
        assert out == server.data[:4096]
        assert server.connections == 2
    finally:
        backend.close()
    assert "protocol error" in caplog.text


@pytest.mark.parametrize("how", ["overlap", "duplicate", "outside"])
def test_a_chunk_overlapping_another_or_outside_the_read_fails_it_and_drops_the_connection(
        how: str, scripted: Callable[..., ScriptedServer],
        caplog: pytest.LogCaptureFixture) -> None:
    # The overlapping chunks add up to the read's length: counting bytes would take the
    # read for complete, with 1536 (or 2048) bytes of it never filled.
    server = scripted(sabotage=how)
    server.data[:8192] = data(8192, 4)
    backend = NbdBackend(server.url, **FAST)
    rec = Recorder()
    try:
        spoilt, other = bytearray(b"\x55" * 4096), bytearray(4096)
        backend.plug()  # both requests in flight on the first connection
        backend.submit_readv(0, [memoryview(spoilt)], rec.done(0))
        backend.submit_readv(4096, [memoryview(other)], rec.done(1))
        backend.unplug()
        outcome = rec.wait()
        error = outcome[0]
        assert isinstance(error, OSError) and error.errno == errno.EIO, outcome
        assert "read 0+4096: protocol error" in str(error)
        assert ("outside" if how == "outside" else "overlaps") in str(error)
        # The other request goes on as after any protocol violation: on a new connection.
        assert outcome[1] is None and other == server.data[4096:8192]
        assert server.connections == 2
        backend.read(0, memoryview(spoilt))
        assert spoilt == server.data[:4096]
    finally:
        backend.close()
    assert "protocol error" in caplog.text


def test_read_coverage_is_tracked_exactly() -> None:
    rng = random.Random(7)
    for _ in range(200):
        length = rng.randrange(1, 64)
        cmd = nbd_module._Command(nbd_module.CMD_READ, 0, length, (), lambda error: None)
        filled = [False] * length
        for _ in range(rng.randrange(1, 24)):
            start = rng.randrange(length)
            end = rng.randrange(start + 1, length + 1)
            fits = not any(filled[start:end])
            assert cmd.cover(start, end) == fits, (filled, start, end)
            if fits:
                filled[start:end] = [True] * (end - start)
            assert cmd.covered == sum(filled)
            assert cmd.spans is not None
            assert len(cmd.spans) == 2 * sum(1 for i in range(length) if filled[i]
                                             and (i == 0 or not filled[i - 1]))
        cmd.reset()
        assert (cmd.covered, cmd.spans) == (0, None)
    # In order, in reverse, or shuffled, a read cut in pieces ends as one range.
    for order in (lambda p: p, reversed, lambda p: rng.sample(p, len(p))):
        cmd = nbd_module._Command(nbd_module.CMD_READ, 0, 4096, (), lambda error: None)
        pieces = [(pos, pos + 512) for pos in range(0, 4096, 512)]
        assert all(cmd.cover(a, b) for a, b in order(pieces))
        assert (cmd.covered, cmd.spans) == (4096, [0, 4096])


def test_a_reconnection_whose_handshake_never_ends_gives_up_at_the_retry_timeout(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted()
    backend = NbdBackend(server.url, reconnect_delay=0.02, retry_timeout=0.5, timeout=5)
    rec = Recorder()
    try:
        # Every new handshake is endless, each reply coming well within timeout= of the last.
        server.info_every = 0.05
        server.hang_up()
        wait_until(lambda: backend.live_connections == 0, what="the loss to be noticed")
        started = time.monotonic()
        backend.submit_readv(0, [memoryview(bytearray(4096))], rec.done(0))
        error = rec.wait()[0]
        assert isinstance(error, OSError) and error.errno == errno.EIO
        assert time.monotonic() - started < 0.5 + 0.7  # retry-timeout, not timeout=
        assert "the handshake did not finish within" in str(error)
        assert server.connections >= 2
    finally:
        started = time.monotonic()
        backend.close()  # interrupts the attempt under way
        assert time.monotonic() - started < 1


def test_a_handshake_that_never_ends_fails_the_constructor_within_the_timeout(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(info_every=0.05)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot use .*: the handshake did not finish within "
                                          r"0\.5 s$"):
        NbdBackend(server.url, timeout=0.5)
    assert time.monotonic() - started < 0.5 + 0.7


def test_option_replies_are_capped(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(info_every=0.0)  # a flood, faster than any timeout
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"more than \d+ replies to NBD_OPT_GO$"):
        NbdBackend(server.url, timeout=5)
    assert time.monotonic() - started < 2


def test_a_failing_completion_is_logged_rate_limited(
        scripted: Callable[..., ScriptedServer], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    limited = RateLimitedLog(nbd_module.log, interval=3600, burst=3)
    monkeypatch.setattr(nbd_module, "_done_log", limited)  # a fresh one, whatever ran before
    server = scripted()
    backend = NbdBackend(server.url, **FAST)
    calls = []

    def broken_done(error: BaseException | None) -> None:
        calls.append(error)
        raise RuntimeError("completion bug")

    try:
        for n in range(50):
            backend.submit_readv(n * 512, [memoryview(bytearray(512))], broken_done)
        wait_until(lambda: len(calls) == 50, what="50 completions")
        backend.read(0, memoryview(bytearray(512)))  # the connection goes on
    finally:
        backend.close()
    failures = [r for r in caplog.records if "completion failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in failures)
    assert limited.flush(force=True) == 1
    assert "(46 similar messages suppressed" in caplog.records[-1].getMessage()


def test_eshutdown_disconnects_politely_and_retries(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(sabotage="eshutdown")
    backend = NbdBackend(server.url, **FAST)
    try:
        backend.write(0, memoryview(b"s" * 1024))
        assert server.data[:1024] == b"s" * 1024
        assert server.connections == 2
        assert server.disconnects == 1
    finally:
        backend.close()
    wait_until(lambda: server.disconnects == 2, what="NBD_CMD_DISC from close()")


def test_a_read_reply_without_enough_data_fails_only_that_request(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(sabotage="short")
    backend = NbdBackend(server.url, **FAST)
    try:
        with pytest.raises(OSError, match="sent 0 of 4096 bytes") as excinfo:
            backend.read(0, memoryview(bytearray(4096)))
        assert excinfo.value.errno == errno.EIO
        backend.read(0, memoryview(bytearray(4096)))
        assert server.connections == 1
    finally:
        backend.close()


def test_an_error_chunk_carries_its_errno_and_message(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(fail_reads=True)
    backend = NbdBackend(server.url, **FAST)
    try:
        with pytest.raises(OSError, match="disk on fire") as excinfo:
            backend.read(512, memoryview(bytearray(512)))
        assert excinfo.value.errno == errno.EPERM
    finally:
        backend.close()


# -- several connections ----------------------------------------------------------------


def test_multi_conn_spreads_requests_over_several_connections(servers: Start) -> None:
    server = servers("nbdkit", "memory", "4M")
    backend = NbdBackend(server.url, connections=4, **FAST)
    rec = Recorder()
    try:
        assert backend.live_connections == 4
        sources = [data(8192, n) for n in range(64)]
        for n, source in enumerate(sources):
            backend.submit_writev(n * 8192, [memoryview(source)], rec.done(n))
        assert set(rec.wait().values()) == {None}
        backend.flush()
        # Each connection reads what the others wrote (the server's cache is shared).
        outs = [bytearray(8192) for _ in sources]
        for n, out in enumerate(outs):
            backend.submit_readv(n * 8192, [memoryview(out)], rec.done(n))
        assert set(rec.wait().values()) == {None}
        assert outs == [bytearray(s) for s in sources]
        assert len(thread_names("nbd-conn-")) == 4
    finally:
        backend.close()


def test_no_multi_conn_means_one_connection(servers: Start,
                                            caplog: pytest.LogCaptureFixture) -> None:
    server = servers("nbdkit", "--filter=multi-conn", "memory", "1M",
                     "multi-conn-mode=disable")
    backend = NbdBackend(server.url, connections=3, **FAST)
    try:
        assert backend.live_connections == 1
        assert "does not allow several connections" in caplog.text
        check_one = bytearray(512)
        backend.read(0, memoryview(check_one))
    finally:
        backend.close()


def test_one_of_several_connections_breaking_keeps_the_disk_working(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, connections=2, reconnect_delay=0.05, timeout=2)
    try:
        first = backend._live[0]
        first.shut()  # as if the network dropped this one connection
        wait_until(lambda: first not in backend._live, what="the loss to be noticed")
        backend.write(0, memoryview(b"m" * 512))
        out = bytearray(512)
        backend.read(0, memoryview(out))
        assert out == b"m" * 512
        wait_until(lambda: backend.live_connections == 2, what="the second connection back")
    finally:
        backend.close()


# -- close ------------------------------------------------------------------------------


def test_close_fails_requests_still_in_flight_and_stops_every_thread(servers: Start) -> None:
    server = servers("nbdkit", "--filter=delay", "memory", "1M", "delay-read=5")
    backend = NbdBackend(server.url, **FAST)
    rec = Recorder()
    backend.submit_readv(0, [memoryview(bytearray(512))], rec.done(0))
    wait_until(lambda: backend.in_flight == 1, what="the read sent")
    started = time.monotonic()
    backend.close()
    assert time.monotonic() - started < 2
    error = rec.wait()[0]
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert thread_names("nbd-") == []
    backend.close()  # idempotent
    with pytest.raises(OSError, match="closed"):
        backend.submit_flush(rec.done(1))
    assert rec.results[1] == []  # a refused submit does not call done


def test_close_while_the_server_is_away_fails_the_waiting_requests(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, reconnect_delay=10, timeout=2)
    rec = Recorder()
    server.kill()
    wait_until(lambda: backend.live_connections == 0, what="the loss to be noticed")
    backend.submit_flush(rec.done(0))
    backend.close()
    error = rec.wait()[0]
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert thread_names("nbd-") == []


# -- configuration errors: one line each ------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ([], "backend 'nbd': missing required option uri="),
    (["uri=nbd://h/", "url=nbd://h/"], "give uri= or url=, not both"),
    (["uri=http://host/disk"], "bad url 'http://host/disk': use nbd://HOST"),
    (["url=http://host/disk"], "bad url 'http://host/disk': use nbd://HOST"),
    (["url=nbds://host/disk"], "TLS (nbds) is not supported"),
    (["url=nbd+unix:///disk"], "nbd+unix needs exactly one ?socket=PATH"),
    (["url=nbd+unix://host/disk?socket=/s"], "nbd+unix takes no host"),
    (["url=nbd://host:99999/"], "bad url 'nbd://host:99999/': Port out of range"),
    (["url=nbd:///disk"], "no host"),
    (["url=nbd://host/disk?tls=on"], "unknown query parameter 'tls'"),
    (["url=nbd://h/", "connections=0"], "option connections=0: not a whole number from 1 to 16"),
    (["url=nbd://h/", "connections=two"], "option connections=two: not a whole number"),
    (["url=nbd://h/", "connections=17"], "option connections=17"),
    (["url=nbd://h/", "reconnect-delay=0"],
     "option reconnect-delay=0: not a number of seconds (more than 0)"),
    (["url=nbd://h/", "retry-timeout=-1"],
     "option retry-timeout=-1: not a number of seconds (0 or more)"),
    (["url=nbd://h/", "timeout=inf"], "option timeout=inf: not a number of seconds"),
    (["url=nbd://h/", "timeout=soon"], "option timeout=soon"),
    (["url=nbd://h/", "colour=red"],
     "unknown option for backend 'nbd': colour (known: uri, url, connections, reconnect-delay, "
     "retry-timeout, timeout)"),
])
def test_bad_options_are_one_line_config_errors(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        open_backend("nbd", args)
    text = str(excinfo.value)
    assert message in text and "\n" not in text


def test_an_unreachable_server_fails_fast_naming_the_url(sockdir: Path) -> None:
    missing = f"nbd+unix:///?socket={sockdir}/nobody.sock"
    started = time.monotonic()
    with pytest.raises(ConfigError) as excinfo:
        open_backend("nbd", [f"url={missing}"])
    assert str(excinfo.value) == (f"backend 'nbd': cannot use {missing}: "
                                  "No such file or directory")
    closed_port = f"nbd://127.0.0.1:{free_port()}/disk"
    with pytest.raises(ConfigError) as excinfo:
        open_backend("nbd", [f"url={closed_port}"])
    assert str(excinfo.value) == f"backend 'nbd': cannot use {closed_port}: Connection refused"
    assert time.monotonic() - started < 1
    assert thread_names("nbd-") == []


def test_a_server_that_refuses_the_export_or_is_not_nbd(servers: Start, sockdir: Path) -> None:
    server = servers("qemu-nbd", "-f", "raw", "-x", "disk", str(image(sockdir)))
    wrong = server.url.replace(":///", ":///other")
    with pytest.raises(ConfigError, match=r"cannot use .*: no export named 'other'") as excinfo:
        NbdBackend(wrong)
    assert "\n" not in str(excinfo.value)
    right = NbdBackend(server.url.replace(":///", ":///disk"))
    right.close()

    silent = socket.socket(socket.AF_UNIX)  # accepts, never speaks
    silent.bind(str(sockdir / "silent.sock"))
    silent.listen(1)
    chatty = socket.socket(socket.AF_UNIX)  # speaks something else
    chatty.bind(str(sockdir / "chatty.sock"))
    chatty.listen(1)

    def greet() -> None:
        conn, _ = chatty.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    greeter = threading.Thread(target=greet, daemon=True)
    greeter.start()
    try:
        with pytest.raises(ConfigError, match=r"no answer to the handshake within 0\.2 s$"):
            NbdBackend(f"nbd+unix:///?socket={sockdir}/silent.sock", timeout=0.2)
        with pytest.raises(ConfigError, match=r"not an NBD server"):
            NbdBackend(f"nbd+unix:///?socket={sockdir}/chatty.sock")
    finally:
        greeter.join()
        silent.close()
        chatty.close()


@pytest.mark.parametrize(("url", "expected"), [
    ("nbd://host/disk", ("host", 10809, "", "disk")),
    ("nbd://host", ("host", 10809, "", "")),
    ("nbd://10.0.0.1:1234/", ("10.0.0.1", 1234, "", "")),
    ("nbd://[::1]:7000/a%20b", ("::1", 7000, "", "a b")),
    ("nbd://host//abs", ("host", 10809, "", "/abs")),
    ("nbd+unix:///?socket=/run/nbd.sock", ("", 10809, "/run/nbd.sock", "")),
    ("nbd+unix:///vm1?socket=sock", ("", 10809, "sock", "vm1")),
])
def test_urls(url: str, expected: tuple[str, int, str, str]) -> None:
    address = parse_nbd_url(url)
    assert (address.host, address.port, address.path, address.export) == expected
    assert address.is_unix == bool(expected[2])


def test_backends_leave_no_threads_behind(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    for _ in range(3):
        NbdBackend(server.url, connections=2).close()
    assert thread_names("nbd-") == []


def test_close_interrupts_a_reconnection_stuck_in_the_handshake(servers: Start) -> None:
    server = servers("nbdkit", "memory", "1M")
    backend = NbdBackend(server.url, reconnect_delay=0.01, timeout=30)
    assert server.sock is not None
    server.kill()
    server.sock.unlink()
    silent = socket.socket(socket.AF_UNIX)  # takes the connection, never answers
    silent.bind(str(server.sock))
    silent.listen(4)
    try:
        wait_until(lambda: backend._connecting is not None, what="a reconnection attempt")
        started = time.monotonic()
        backend.close()
        assert time.monotonic() - started < 1
        assert thread_names("nbd-") == []
    finally:
        silent.close()
