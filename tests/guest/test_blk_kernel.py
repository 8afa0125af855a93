"""virtio-blk through the real VDUSE driver, checked byte by byte (runs in the VM guest)."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import assert_gone, scratch_dir, serving, start_daemon

MiB = 1 << 20


def make_file(path: Path, size: int, fill: bytes | None = None) -> None:
    """A backing file of ``size`` bytes: sparse, or filled with a repeated pattern."""
    with path.open("wb") as stream:
        if fill is None:
            stream.truncate(size)
        else:
            chunk = (fill * (MiB // len(fill) + 1))[:MiB]
            for _ in range(size // MiB):
                stream.write(chunk)


def direct_io(device: str, offset: int, data: bytes | None = None, length: int = 0) -> bytes:
    """One O_DIRECT write of ``data`` or read of ``length`` bytes at ``offset``."""
    size = len(data) if data is not None else length
    flags = (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT
    # an anonymous mapping is page aligned, as O_DIRECT wants
    with mmap.mmap(-1, max(size, mmap.PAGESIZE)) as buf, memoryview(buf) as view:
        fd = os.open(device, flags)
        try:
            if data is not None:
                view[:size] = data
                done = os.pwritev(fd, [view[:size]], offset)
            else:
                done = os.preadv(fd, [view[:size]], offset)
        finally:
            os.close(fd)
        assert done == size, f"{done} of {size} bytes at {offset}"
        return b"" if data is not None else bytes(view[:size])


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=900)


def sysfs_block(disk: str, attribute: str) -> str:
    return Path("/sys/block", disk, attribute).read_text().strip()


def test_device_identity_size_serial_queues(backing_file: Path) -> None:
    make_file(backing_file, 48 * MiB)
    with serving("pv-ident", "--num-queues", "2", "--serial", "pyvduse-serial-01",
                 "file", f"path={backing_file}") as daemon:
        assert re.fullmatch(r"/dev/vd[a-z]+", daemon.device), daemon.device
        disk = daemon.disk
        assert int(sysfs_block(disk, "size")) * 512 == 48 * MiB
        assert sysfs_block(disk, "serial") == "pyvduse-serial-01"
        assert sysfs_block(disk, "ro") == "0"
        assert sorted(p.name for p in Path("/sys/block", disk, "mq").iterdir()) == ["0", "1"]
        assert sysfs_block(disk, "queue/logical_block_size") == "512"
        assert Path("/sys/bus/vdpa/devices/pv-ident/driver").resolve().name == "virtio_vdpa"
        assert os.path.exists(daemon.device)


def test_random_direct_io_matches_device_and_backing_file(backing_file: Path) -> None:
    size = 32 * MiB
    make_file(backing_file, size)
    rng = random.Random(1234)
    model = bytearray(rng.randbytes(size))
    with serving("pv-rand", "--num-queues", "2", "file", f"path={backing_file}") as daemon:
        for offset in range(0, size, 4 * MiB):  # the whole device
            direct_io(daemon.device, offset, bytes(model[offset:offset + 4 * MiB]))
        for _ in range(300):  # then random overwrites of 512 B .. 128 KiB
            length = rng.choice((512, 4096, 8192, 65536, 131072))
            offset = rng.randrange(0, size - length + 1) & ~511
            data = rng.randbytes(length)
            model[offset:offset + length] = data
            direct_io(daemon.device, offset, data)
        for _ in range(100):
            length = rng.choice((512, 4096, 65536))
            offset = rng.randrange(0, size - length + 1) & ~511
            assert direct_io(daemon.device, offset, length=length) == model[offset:offset + length]
        for offset in range(0, size, 4 * MiB):
            got = direct_io(daemon.device, offset, length=4 * MiB)
            assert got == model[offset:offset + 4 * MiB], f"device differs near {offset}"
        assert backing_file.read_bytes() == model, "backing file differs from what was written"
        # at the end of the device the kernel reports end-of-file: nothing wraps around
        with pytest.raises(AssertionError, match="0 of 4096 bytes"):
            direct_io(daemon.device, size, length=4096)


def test_fio_verify_crc32c_iodepth32_two_queues(backing_file: Path) -> None:
    make_file(backing_file, 64 * MiB)
    with serving("pv-fio", "--num-queues", "2", "file", f"path={backing_file}") as daemon:
        result = run("fio", "--name=verify", f"--filename={daemon.device}", "--ioengine=libaio",
                     "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                     "--numjobs=2", "--size=32M", "--offset_increment=32M",
                     "--cpus_allowed_policy=split", "--cpus_allowed=0-1",
                     "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                     "--group_reporting", "--output-format=terse", check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verify" not in result.stderr.lower() or "bad" not in result.stderr.lower()
    counts = re.search(r"served (\d+) requests \(([^)]*)\)", daemon.output())
    assert counts, daemon.output()
    per_queue = dict(re.findall(r"vq(\d+) (\d+)", counts.group(2)))
    assert int(per_queue["0"]) > 0 and int(per_queue["1"]) > 0, counts.group(0)


def test_ext4_survives_remount_and_daemon_restart(backing_file: Path) -> None:
    make_file(backing_file, 128 * MiB)
    mnt = scratch_dir() / "mnt-ext4"
    mnt.mkdir(exist_ok=True)
    rng = random.Random(7)
    files = {f"dir{i % 3}/file{i}.bin": rng.randbytes(rng.randrange(1, 3 * MiB))
             for i in range(12)}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    def read_back() -> dict[str, str]:
        return {name: hashlib.sha256((mnt / name).read_bytes()).hexdigest() for name in files}

    with serving("pv-ext4", "file", f"path={backing_file}") as daemon:
        run("mkfs.ext4", "-q", "-F", daemon.device)
        run("mount", daemon.device, str(mnt))
        try:
            for name, data in files.items():
                (mnt / name).parent.mkdir(exist_ok=True)
                (mnt / name).write_bytes(data)
            run("sync")
        finally:
            run("umount", str(mnt))
        run("mount", daemon.device, str(mnt))
        try:
            assert read_back() == digests
        finally:
            run("umount", str(mnt))
        fsck = run("e2fsck", "-fn", daemon.device, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # a new daemon on the same image sees the same file system
    with serving("pv-ext4", "file", f"path={backing_file}") as daemon:
        run("mount", daemon.device, str(mnt))
        try:
            assert read_back() == digests
        finally:
            run("umount", str(mnt))


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_discard_and_write_zeroes_reach_the_backing_file(backing_file: Path) -> None:
    size = 32 * MiB
    make_file(backing_file, size, fill=b"\xaa")
    with serving("pv-trim", "file", f"path={backing_file}") as daemon:
        disk = daemon.disk
        assert int(sysfs_block(disk, "queue/discard_max_bytes")) > 0
        assert int(sysfs_block(disk, "queue/write_zeroes_max_bytes")) > 0
        before = _allocated(backing_file)
        run("blkdiscard", "-o", str(4 * MiB), "-l", str(4 * MiB), daemon.device)
        after = _allocated(backing_file)
        assert before - after >= 4 * MiB - 64 * 1024, (before, after)
        run("blkdiscard", "-z", "-o", str(16 * MiB), "-l", str(2 * MiB), daemon.device)
        data = backing_file.read_bytes()
        assert data[16 * MiB:18 * MiB] == bytes(2 * MiB)
        assert data[4 * MiB:8 * MiB] == bytes(4 * MiB)  # a punched hole reads as zeroes
        assert data[:4 * MiB] == b"\xaa" * (4 * MiB)
        assert data[8 * MiB:16 * MiB] == b"\xaa" * (8 * MiB)
        assert data[18 * MiB:] == b"\xaa" * (size - 18 * MiB)
        assert direct_io(daemon.device, 16 * MiB, length=MiB) == bytes(MiB)


def test_readonly_device_refuses_writes(backing_file: Path) -> None:
    make_file(backing_file, 16 * MiB, fill=b"\x5c")
    with serving("pv-ro", "--readonly", "file", f"path={backing_file}") as daemon:
        assert sysfs_block(daemon.disk, "ro") == "1"
        with pytest.raises(OSError) as refused:
            direct_io(daemon.device, 0, b"\0" * 4096)
        assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        # The kernel honours VIRTIO_BLK_F_RO (even `blockdev --setrw` cannot lift a
        # disk-level read-only flag), so a write never reaches the device here; the
        # device's own refusal (IOERR) is covered by tests/unit/test_blk_handler.py.
        assert run("blockdev", "--getro", daemon.device).stdout.strip() == "1"
        assert direct_io(daemon.device, 0, length=4096) == b"\x5c" * 4096
    assert backing_file.read_bytes() == b"\x5c" * (16 * MiB)


def test_vhost_vdpa_binding(backing_file: Path) -> None:
    make_file(backing_file, 16 * MiB)
    with serving("pv-vhost", "--attach", "vhost", "file", f"path={backing_file}") as daemon:
        assert re.fullmatch(r"/dev/vhost-vdpa-\d+", daemon.device), daemon.device
        assert os.path.exists(daemon.device)
        driver = Path("/sys/bus/vdpa/devices/pv-vhost/driver").resolve().name
        assert driver == "vhost_vdpa"


def test_sigint_and_memory_backend() -> None:
    daemon = start_daemon("pv-int", "memory", "size=16M")
    try:
        direct_io(daemon.device, 8 * MiB, b"\x42" * 8192)
        assert direct_io(daemon.device, 8 * MiB, length=8192) == b"\x42" * 8192
    finally:
        assert daemon.stop(signal.SIGINT) == 0, daemon.output()
    assert_gone("pv-int")


def test_bad_input_fails_with_one_line_and_leaves_nothing(backing_file: Path) -> None:
    missing = start_daemon("pv-bad", "file", f"path={backing_file}", expect_ready=False)
    assert missing.wait() == 1
    assert missing.output().strip().splitlines() == [
        f"pyvduse: error: file backend: no such file: {backing_file}"]
    make_file(backing_file, 16 * MiB)
    bad_queue = start_daemon("pv-bad", "--queue-size", "100", "file", f"path={backing_file}",
                             expect_ready=False)
    assert bad_queue.wait() == 1
    assert "queue size 100 must be a power of two" in bad_queue.output()
    assert len(bad_queue.output().strip().splitlines()) == 1
    assert_gone("pv-bad")
    assert not bad_queue.pidfile.exists()


def test_name_collision_is_refused_and_first_device_keeps_working(backing_file: Path) -> None:
    make_file(backing_file, 16 * MiB)
    with serving("pv-dup", "file", f"path={backing_file}") as first:
        second = start_daemon("pv-dup", "memory", "size=16M", expect_ready=False)
        assert second.wait() == 1
        assert "exists" in second.output(), second.output()
        direct_io(first.device, 0, b"\x17" * 4096)
        assert direct_io(first.device, 0, length=4096) == b"\x17" * 4096


def test_block_device_backend_and_4k_logical_blocks() -> None:
    run("modprobe", "brd", "rd_nr=1", "rd_size=65536")  # /dev/ram0, 64 MiB
    try:
        ram = "/dev/ram0"
        rng = random.Random(99)
        with serving("pv-bdev", "--logical-block-size", "4096", "file", f"path={ram}") as daemon:
            disk = daemon.disk
            assert sysfs_block(disk, "queue/logical_block_size") == "4096"
            assert int(sysfs_block(disk, "size")) * 512 == 64 * MiB
            writes = {}
            for _ in range(50):
                offset = rng.randrange(0, 64 * MiB // 4096) * 4096
                writes[offset] = rng.randbytes(4096)
                direct_io(daemon.device, offset, writes[offset])
            with pytest.raises(OSError) as unaligned:  # the kernel refuses sub-block I/O
                direct_io(daemon.device, 512, b"x" * 512)
            assert unaligned.value.errno == errno.EINVAL
            run("blkdiscard", "-z", "-o", str(8 * MiB), "-l", str(MiB), daemon.device)
            for offset in list(writes):
                if 8 * MiB <= offset < 9 * MiB:
                    writes[offset] = bytes(4096)
            for offset, data in writes.items():
                assert direct_io(daemon.device, offset, length=4096) == data
        with open(ram, "rb") as raw:
            for offset, data in writes.items():
                raw.seek(offset)
                assert raw.read(4096) == data, f"/dev/ram0 differs at {offset}"
    finally:
        run("rmmod", "brd", check=False)


def test_backend_failure_is_an_io_error_and_the_device_lives_on() -> None:
    small = scratch_dir() / "small-fs"
    small.mkdir(exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small))
    try:
        image = small / "disk.img"
        make_file(image, 64 * MiB)  # sparse: more than the file system can hold
        with serving("pv-enospc", "file", f"path={image}") as daemon:
            direct_io(daemon.device, 0, b"\x33" * MiB)
            chunk = 64 * 1024  # one request each: it succeeds or fails whole
            with pytest.raises(OSError) as failed:
                for offset in range(MiB, 64 * MiB, chunk):  # runs out of space near 8 MiB
                    direct_io(daemon.device, offset, b"\x44" * chunk)
            assert failed.value.errno in (errno.EIO, errno.ENOSPC)
            assert daemon.proc.poll() is None, "daemon died on a backend failure"
            assert direct_io(daemon.device, 0, length=MiB) == b"\x33" * MiB
            direct_io(daemon.device, 0, b"\x55" * 4096)  # allocated space is still writable
            assert direct_io(daemon.device, 0, length=4096) == b"\x55" * 4096
        assert "backend failed" in daemon.output(), daemon.output()
    finally:
        run("umount", str(small), check=False)
