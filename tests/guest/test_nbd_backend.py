"""The ``nbd`` backend under the real kernel: pyvduse serving qemu-nbd's export as /dev/vdX.

Real server (qemu-nbd on a file in the guest's tmpfs), real clients (O_DIRECT I/O,
mkfs + mount, fio with verification), bytes compared with the server's file; the
server killed and restarted while writes are in flight. qemu-nbd --shared=8 allows
several connections, so where the compiled data path is built each queue sends its
requests over a connection of its own, in C (see pyvduse.native).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import scratch_dir, serving
from test_blk_kernel import MiB, direct_io, run

from pyvduse import native

IMAGE_SIZE = 64 * MiB


class QemuNbd:
    """``qemu-nbd`` exporting ``image`` on a Unix socket, restartable on the same socket."""

    def __init__(self, image: Path, socket: Path) -> None:
        self.image = image
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared=8", "--format=raw", "--discard=unmap",
             "--socket", str(self.socket), str(self.image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-nbd exited: {self.proc.stderr.read()!r}"
                                     if self.proc.stderr else "qemu-nbd exited")
            assert time.monotonic() < deadline, "qemu-nbd did not create its socket"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@contextlib.contextmanager
def qemu_nbd(name: str) -> Iterator[QemuNbd]:
    image = scratch_dir() / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    server = QemuNbd(image, scratch_dir() / f"{name}.sock")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        image.unlink()


def test_nbd_export_byte_exact_with_a_file_system_and_discard() -> None:
    with qemu_nbd("nbd-fs") as server, serving(
            "pv-nbd", "--num-queues", "2", "nbd", f"uri={server.url}") as daemon:
        device = daemon.device
        assert int(Path("/sys/block", daemon.disk, "size").read_text()) * 512 == IMAGE_SIZE
        rng = random.Random(5)
        expected = bytearray(server.image.read_bytes())  # what the disk must hold: the
        writes = []                                       # writes applied in order
        for _ in range(24):
            length = rng.choice([4096, 65536, 512 * 1024])
            offset = rng.randrange(0, IMAGE_SIZE - length, 4096)
            data = rng.randbytes(length)
            direct_io(device, offset, data)
            expected[offset:offset + length] = data
            writes.append((offset, length))
        image = server.image.read_bytes()
        for offset, length in writes:  # against the data written, not the server's copy
            want = bytes(expected[offset:offset + length])
            assert direct_io(device, offset, length=length) == want, f"device differs at {offset}"
            assert image[offset:offset + length] == want, f"the image differs at {offset}"

        run("blkdiscard", "-z", "-o", str(8 * MiB), "-l", str(MiB), device)
        assert server.image.read_bytes()[8 * MiB:9 * MiB] == bytes(MiB)

        run("mkfs.ext4", "-q", "-F", device)
        mount = scratch_dir() / "nbd-mnt"
        mount.mkdir(exist_ok=True)
        run("mount", device, str(mount))
        try:
            payload = os.urandom(3 * MiB + 123)
            (mount / "data.bin").write_bytes(payload)
            run("sync")
        finally:
            run("umount", str(mount))
        run("e2fsck", "-fn", device)
        run("mount", "-o", "ro", device, str(mount))
        try:
            assert (mount / "data.bin").read_bytes() == payload
        finally:
            run("umount", str(mount))
    assert "serving nbd backend on pv-nbd" in daemon.output()


def test_fio_verify_with_many_requests_in_flight() -> None:
    with qemu_nbd("nbd-fio") as server, serving(
            "pv-nbdfio", "--num-queues", "2", "nbd", f"uri={server.url}",
            "connections=2") as daemon:
        result = run("fio", "--name=verify", f"--filename={daemon.device}", "--direct=1",
                     "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                     "--numjobs=2", "--offset_increment=16M", "--size=8M",
                     "--verify=crc32c", "--verify_fatal=1", "--group_reporting")
        assert "err= 0" in result.stdout, result.stdout


def test_server_killed_and_restarted_while_writing_loses_nothing() -> None:
    chunk, count = 64 * 1024, 160
    with qemu_nbd("nbd-restart") as server, serving(
            "pv-nbdrs", "nbd", f"uri={server.url}", "reconnect-delay=0.2") as daemon:
        errors: list[BaseException] = []
        progress = threading.Semaphore(0)

        def writer() -> None:
            try:
                for i in range(count):
                    direct_io(daemon.device, i * chunk, bytes([i % 251 + 1]) * chunk)
                    progress.release()
            except BaseException as exc:
                errors.append(exc)
                progress.release()

        thread = threading.Thread(target=writer)
        thread.start()
        for _ in range(40):
            assert progress.acquire(timeout=120), "the writer made no progress"
        server.kill()  # writes in flight are lost by the server: the client must resend
        time.sleep(1.5)
        server.start()
        thread.join(600)
        assert not thread.is_alive(), "the writer hung"
        assert not errors, errors
        image = server.image.read_bytes()
        for i in range(count):
            want = bytes([i % 251 + 1]) * chunk
            assert image[i * chunk:(i + 1) * chunk] == want, f"chunk {i} lost"
            assert direct_io(daemon.device, i * chunk, length=chunk) == want
    output = daemon.output()
    assert "lost" in output and "reconnected" in output, output
    if native.available():  # qemu-nbd --shared=8 allows several connections
        # Each queue's own connection served it in C; losing it went to the Python client.
        assert "native data path" in output, output
        assert "native NBD connection is gone" in output, output
