"""vhost-user-blk servers, data patterns and a crashing client for the libblkio tests.

Shared by the host tests (``test_vhost_user_clients.py``) and meant for the
guest-side tests too, so it depends on nothing but the standard library and
:mod:`pyvduse.testing.blkio`:

* :func:`start_server` runs ``qemu-storage-daemon`` (``"qsd"``, the reference)
  or ``pyvduse serve --transport vhost-user`` (``"pyvduse"``) exporting a file
  on a UNIX socket, and waits (bounded) for the socket;
  :meth:`Server.stop` sends SIGTERM and returns the exit status.
* :func:`pattern` makes pseudo-random data in which every 512-byte sector
  carries its own offset and a seed, so a sector read back from the wrong place,
  or from another write, is recognised; :func:`describe_mismatch` says what went
  wrong and where.
* Run as a script (``python vhost_user_servers.py writer DRIVER PATH``), this file
  is a client that writes 4 KiB blocks at random, several in flight, and reports
  on stdout each write before submitting it (``S offset seed``) and once it is
  acknowledged (``A offset seed``), until it is killed: :func:`start_writer`
  and :func:`acknowledged_state` use it to test a client killed with SIGKILL.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
BLOCK = 4096
IMAGE_SIZE = 64 << 20
SOCKET_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 10.0
"""Seconds a test client waits for any one request (a hung server fails the test, not CI)."""

SERVER_KINDS = ("qsd", "pyvduse")

_MAGIC = b"PYVDUSE!"
_HEADER = struct.Struct("<8sQQ")  # magic, seed, absolute byte offset of the sector
_NOISE_SIZE = 1 << 20
_noise_cache: dict[int, bytes] = {}


# -- data patterns ------------------------------------------------------------------------


def _noise(seed: int) -> bytes:
    noise = _noise_cache.get(seed)
    if noise is None:
        if len(_noise_cache) > 64:
            _noise_cache.clear()
        noise = random.Random(seed).randbytes(_NOISE_SIZE + SECTOR)
        _noise_cache[seed] = noise
    return noise


def pattern(offset: int, length: int, seed: int = 1) -> bytes:
    """Pseudo-random bytes for ``[offset, offset + length)``, sector by sector.

    Each 512-byte sector starts with a magic, ``seed`` and its own absolute
    offset, followed by noise that depends on both; so no two sectors of one
    seed are alike and ``pattern(a, n)[k:]`` equals ``pattern(a + k, n - k)``
    for sector-aligned ``k``. ``offset`` and ``length`` must be multiples of 512.
    """
    if offset % SECTOR or length % SECTOR:
        raise ValueError(f"pattern({offset}, {length}): not sector-aligned")
    noise = _noise(seed)
    out = bytearray(length)
    for pos in range(0, length, SECTOR):
        absolute = offset + pos
        start = (absolute // SECTOR * 4099) % _NOISE_SIZE
        out[pos:pos + SECTOR] = noise[start:start + SECTOR]
        _HEADER.pack_into(out, pos, _MAGIC, seed, absolute)
    return bytes(out)


def sector_identity(sector: bytes) -> tuple[int, int] | None:
    """``(seed, offset)`` of a :func:`pattern` sector, or None for anything else."""
    magic, seed, offset = _HEADER.unpack_from(sector)
    if magic != _MAGIC:
        return None
    return seed, offset


def describe_mismatch(got: bytes, offset: int, want: bytes) -> str:
    """Where ``got`` (read at ``offset``) first differs from ``want``, and what it holds.

    Empty when equal. Names the first bad sector, whose data it holds (a
    pattern sector's seed and origin, zeros, or unknown bytes) and how many
    sectors are bad.
    """
    if got == want:
        return ""
    if len(got) != len(want):
        return f"read {len(got)} bytes at {offset}, expected {len(want)}"
    bad = [pos for pos in range(0, len(want), SECTOR)
           if got[pos:pos + SECTOR] != want[pos:pos + SECTOR]]
    pos = bad[0]
    sector = got[pos:pos + SECTOR]
    identity = sector_identity(sector)
    if identity is not None:
        holds = f"pattern seed {identity[0]} for offset {identity[1]}"
    elif sector == bytes(SECTOR):
        holds = "zeros"
    else:
        holds = f"unknown bytes {sector[:16].hex()}..."
    wanted = sector_identity(want[pos:pos + SECTOR])
    expected = (f"seed {wanted[0]}" if wanted is not None
                else "zeros" if want[pos:pos + SECTOR] == bytes(SECTOR) else "other data")
    return (f"{len(bad)} of {len(want) // SECTOR} sectors differ; the first at byte "
            f"{offset + pos} holds {holds}, expected {expected}")


def classify_sectors(got: bytes, offset: int, seeds: Iterable[int]) -> list[str]:
    """Per sector of ``got`` (read at ``offset``): ``"zero"``, ``"seed N"`` or ``"garbage"``.

    A sector counts as ``"seed N"`` only if it is exactly :func:`pattern` of
    one of ``seeds`` for its own offset.
    """
    seeds = list(seeds)
    result = []
    for pos in range(0, len(got), SECTOR):
        sector = got[pos:pos + SECTOR]
        if sector == bytes(SECTOR):
            result.append("zero")
            continue
        for seed in seeds:
            if sector == pattern(offset + pos, SECTOR, seed):
                result.append(f"seed {seed}")
                break
        else:
            result.append("garbage")
    return result


# -- servers ------------------------------------------------------------------------------


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A sparse file of ``size`` bytes (zeros) at ``path``."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass
class Server:
    """A running vhost-user-blk server: its process, socket, image and stderr log."""

    kind: str
    proc: subprocess.Popen[bytes]
    socket: Path
    image: Path
    log: Path
    num_queues: int
    argv: list[str] = field(default_factory=list)
    returncode: int | None = None

    def stderr(self) -> str:
        """What the server wrote to stderr and stdout so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait up to ``timeout`` s: the exit status (SIGKILL and -9 past that).

        Idempotent: a second call returns the first one's status.
        """
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = -signal.SIGKILL
        return self.returncode

    def describe(self) -> str:
        """The command line and stderr, for failure messages."""
        return f"{self.kind}: {' '.join(self.argv)}\n--- stderr ---\n{self.stderr()}"


def qsd_argv(socket_path: Path, image: Path, num_queues: int) -> list[str]:
    """qemu-storage-daemon (7.2) exporting ``image`` as vhost-user-blk, discard on."""
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        raise FileNotFoundError(
            "qemu-storage-daemon not found (Debian package qemu-system-common; "
            "scripts/setup-vm installs it)")
    return [
        binary,
        "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off,"
                      "discard=unmap",
        "--blockdev", "driver=raw,node-name=r0,file=f0,discard=unmap",
        "--export", f"type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,"
                    f"addr.path={socket_path},writable=on,num-queues={num_queues}",
    ]


def pyvduse_argv(socket_path: Path, image: Path, num_queues: int) -> list[str]:
    """``pyvduse serve --transport vhost-user`` exporting ``image`` with the file backend."""
    return [sys.executable, "-m", "pyvduse", "serve", "--transport", "vhost-user",
            "--socket", str(socket_path), "--num-queues", str(num_queues), "--name", "t0",
            "file", f"path={image}"]


ARGV: dict[str, Callable[[Path, Path, int], list[str]]] = {
    "qsd": qsd_argv,
    "pyvduse": pyvduse_argv,
}


def is_listening(path: Path) -> bool:
    """Whether a UNIX stream socket is listening at ``path`` (from ``/proc/net/unix``).

    The socket file appears at ``bind()``, a moment before ``listen()``: a
    client connecting in between is refused. Looking it up instead of
    connecting spares the server a probe connection.
    """
    if not path.is_socket():
        return False
    wanted = os.fsencode(path)
    with open("/proc/net/unix", "rb") as table:
        next(table)
        for line in table:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000: __SO_ACCEPTCON
            if len(fields) >= 8 and fields[7] == wanted and int(fields[3], 16) & 0x10000:
                return True
    return False


def start_server(kind: str, directory: Path, *, num_queues: int = 1,
                 image: Path | None = None, timeout: float = SOCKET_TIMEOUT) -> Server:
    """Start a ``kind`` server over ``image`` (default: a new 64 MiB sparse file).

    Returns once its socket accepts connections; raises AssertionError with
    the server's stderr if it exits first or the socket does not appear within
    ``timeout`` s (the process is killed then).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = make_image(directory / f"{kind}.img")
    socket_path = directory / f"{kind}.sock"
    log = directory / f"{kind}.log"
    argv = ARGV[kind](socket_path, image, num_queues)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=directory)
    server = Server(kind, proc, socket_path, image, log, num_queues, argv)
    deadline = time.monotonic() + timeout
    while not is_listening(socket_path):
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with status {proc.returncode} before "
                                 f"its socket appeared\n{server.describe()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no socket {socket_path} after {timeout:.0f} s\n"
                                 f"{server.describe()}")
        time.sleep(0.01)
    return server


# -- a client killed mid-I/O --------------------------------------------------------------


def start_writer(driver: str, path: Path | str, *, seed_base: int = 1000,
                 iodepth: int = 8) -> subprocess.Popen[bytes]:
    """A child process running :func:`_writer` against ``path``; its stdout is a pipe."""
    return subprocess.Popen(
        [sys.executable, __file__, "writer", driver, str(path), str(seed_base), str(iodepth)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def acknowledged_state(lines: Iterable[str]) -> tuple[dict[int, int], dict[int, set[int]]]:
    """From a writer's report: ``(acknowledged, possible)`` per block offset.

    ``acknowledged[offset]`` is the seed of the last acknowledged write of the
    block; ``possible[offset]`` the seeds it may hold instead: writes to it
    that were submitted after that one and never acknowledged (in flight when
    the writer died). A torn final line is ignored.
    """
    acknowledged: dict[int, int] = {}
    possible: dict[int, set[int]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("S", "A"):
            continue
        offset, seed = int(parts[1]), int(parts[2])
        if parts[0] == "S":
            possible.setdefault(offset, set()).add(seed)
        else:
            acknowledged[offset] = seed
            # an older submission still in flight could land later: keep only newer ones
            possible[offset] = {s for s in possible.get(offset, set()) if s > seed}
    return acknowledged, possible


def _writer(driver: str, path: str, seed_base: int, iodepth: int) -> None:
    """Write 4 KiB blocks of :func:`pattern` at random offsets, ``iodepth`` in flight, for ever.

    Each block has at most one write in flight; every write gets a new seed.
    Reports ``S offset seed`` before submitting and ``A offset seed`` after a
    successful completion; exits 1 on a failed request.
    """
    from pyvduse.testing.blkio import BlkioClient

    out = sys.stdout.fileno()
    with BlkioClient(driver, path, timeout=CLIENT_TIMEOUT) as client:
        blocks = client.capacity // BLOCK
        rng = random.Random(seed_base)
        buf = client.buffer(iodepth * BLOCK)
        slots = {}  # tag -> (slot, offset, seed)
        busy: set[int] = set()
        free = list(range(iodepth))
        seed = seed_base
        while True:
            while free:
                slot = free.pop()
                offset = rng.randrange(blocks) * BLOCK
                while offset in busy:
                    offset = rng.randrange(blocks) * BLOCK
                seed += 1
                view = buf[slot * BLOCK:(slot + 1) * BLOCK]
                view[:] = pattern(offset, BLOCK, seed)
                os.write(out, f"S {offset} {seed}\n".encode())
                tag = client.submit_write(offset, view)
                slots[tag] = (slot, offset, seed)
                busy.add(offset)
            for tag, ret in client.wait(1, CLIENT_TIMEOUT):
                slot, offset, done_seed = slots.pop(tag)
                if ret != 0:
                    os.write(2, f"write at {offset} failed: {os.strerror(-ret)}\n".encode())
                    sys.exit(1)
                os.write(out, f"A {offset} {done_seed}\n".encode())
                busy.discard(offset)
                free.append(slot)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "writer":
        _writer(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(f"usage: {sys.argv[0]} writer DRIVER PATH SEED_BASE IODEPTH")
