"""README options that no other real-kernel test uses, each shown to do what it says.

``--queue-size``, ``--queue-threads`` above 1, ``--poll-max-us 0``, ``--io-threads 0``,
the file backend's ``direct=on`` and ``readonly=on``, the null backend, ``--attach
none``, and the nbd backend over TCP. Data is compared with what was written, not
with what the server holds (a dropped write could not pass).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import find_device_node, scratch_dir, serving, start_daemon
from test_blk_kernel import MiB, direct_io, sysfs_block


def payload(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def test_queue_size_threads_no_polling_no_io_threads_and_o_direct(backing_file: Path) -> None:
    backing_file.write_bytes(bytes(16 * MiB))
    with serving("pvopt0", "--num-queues", "2", "--queue-size", "64", "--queue-threads", "2",
                 "--poll-max-us", "0", "--io-threads", "0", "file", f"path={backing_file}",
                 "direct=on") as daemon:
        disk = daemon.disk
        queues = sorted(p.name for p in Path("/sys/block", disk, "mq").iterdir())
        assert queues == ["0", "1"], queues
        # virtio-blk takes its tag depth from the virtqueue's size
        assert [sysfs_block(disk, f"mq/{q}/nr_tags") for q in queues] == ["64", "64"]
        written = {}
        slots = random.Random(1).sample(range(16 * MiB // (32 * 1024)), 24)
        for n, slot in enumerate(slots):  # spread over the device, 4 to 32 KiB each
            data = payload(4096 * (1 + n % 8), n)
            direct_io(daemon.device, slot * 32 * 1024, data)
            written[slot * 32 * 1024] = data
        for offset, data in written.items():
            assert direct_io(daemon.device, offset, length=len(data)) == data, offset
        log = daemon.log.read_text()
        assert "2 queue(s) of 64" in log, log
    content = backing_file.read_bytes()
    for offset, data in written.items():
        assert content[offset:offset + len(data)] == data, offset


def test_readonly_file_gives_a_read_only_disk(backing_file: Path) -> None:
    data = payload(4 * MiB, 7)
    backing_file.write_bytes(data)
    with serving("pvopt1", "file", f"path={backing_file}", "readonly=on") as daemon:
        assert sysfs_block(daemon.disk, "ro") == "1"
        assert direct_io(daemon.device, MiB, length=64 * 1024) == data[MiB:MiB + 64 * 1024]
        with pytest.raises(OSError) as excinfo:  # the open or the write is refused
            direct_io(daemon.device, MiB, bytes(4096))
        assert excinfo.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
    assert backing_file.read_bytes() == data


def test_the_null_backend_reads_zeroes_and_forgets_writes() -> None:
    with serving("pvopt2", "null", "size=64M") as daemon:
        assert int(sysfs_block(daemon.disk, "size")) * 512 == 64 * MiB
        direct_io(daemon.device, 8 * MiB, payload(64 * 1024, 3))
        assert direct_io(daemon.device, 8 * MiB, length=64 * 1024) == bytes(64 * 1024)


def test_attach_none_creates_the_device_without_a_node(backing_file: Path) -> None:
    backing_file.write_bytes(bytes(MiB))
    status = scratch_dir() / "pvopt3.status"
    daemon = start_daemon("pvopt3", "--attach", "none", "--status-file", str(status), "file",
                          f"path={backing_file}")
    try:
        assert Path("/dev/vduse/pvopt3").exists()
        assert not Path("/sys/bus/vdpa/devices/pvopt3").exists()
        assert daemon.device == ""
        assert json.loads(status.read_text())["path"] is None
    finally:
        assert daemon.stop() == 0
    assert not Path("/dev/vduse/pvopt3").exists()


@contextlib.contextmanager
def nbdkit_tcp(image: Path) -> Iterator[int]:
    """nbdkit serving ``image`` on a TCP port of the loopback interface; the port."""
    pidfile = scratch_dir() / "nbdkit-tcp.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    port = 10800 + os.getpid() % 100
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-P",
                             str(pidfile), "file", f"file={image}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nbdkit exited"
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_nbd_over_tcp_moves_the_bytes_written() -> None:
    image = scratch_dir() / "nbd-tcp.img"
    image.write_bytes(bytes(16 * MiB))
    try:
        with nbdkit_tcp(image) as port, serving(
                "pvopt4", "nbd", f"uri=nbd://127.0.0.1:{port}/") as daemon:
            written = {}
            for n in range(16):
                offset = n * MiB + 4096 * (n % 5)
                data = payload(8192 * (1 + n % 4), 100 + n)
                direct_io(daemon.device, offset, data)
                written[offset] = data
            for offset, data in written.items():
                assert direct_io(daemon.device, offset, length=len(data)) == data
            assert find_device_node("pvopt4") == daemon.device
        content = image.read_bytes()
        for offset, data in written.items():
            assert content[offset:offset + len(data)] == data
    finally:
        image.unlink()
