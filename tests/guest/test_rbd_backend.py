"""The ``rbd`` backend under the real kernel: a Ceph RBD image served as /dev/vdX.

A throwaway one-node Ceph cluster (scripts/ceph-cluster) runs inside the guest;
data written through the device, a file system on it, and what the cluster
stores (``rbd export``) are compared byte for byte.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import scratch_dir, serving
from test_blk_kernel import MiB, direct_io, run

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64 * MiB


@pytest.fixture(scope="module")
def ceph_conf() -> Iterator[Path]:
    directory = scratch_dir() / "ceph"
    # an emulated guest is slow: allow every step of the cluster's start 6 times as long
    env = {**os.environ, "CEPH_CLUSTER_TIME_FACTOR": "6"}
    started = subprocess.run([str(REPO / "scripts" / "ceph-cluster"), str(directory)],
                             capture_output=True, text=True, timeout=1800, check=False, env=env)
    assert started.returncode == 0, f"the Ceph cluster did not start:\n{started.stderr}"
    conf = Path(started.stdout.strip().splitlines()[-1])
    try:
        yield conf
    finally:
        subprocess.run([str(REPO / "scripts" / "ceph-cluster"), "--stop", str(directory)],
                       capture_output=True, timeout=300, check=False)


def rbd(conf: Path, *args: str) -> None:
    run("rbd", "-c", str(conf), *args)


def exported(conf: Path, image: str) -> bytes:
    """The image's content as the cluster stores it."""
    target = scratch_dir() / f"{image}.export"
    target.unlink(missing_ok=True)
    rbd(conf, "export", f"rbd/{image}", str(target))
    try:
        return target.read_bytes()
    finally:
        target.unlink()


def test_rbd_image_byte_exact_with_a_file_system(ceph_conf: Path) -> None:
    rbd(ceph_conf, "create", "--size", str(IMAGE_SIZE // MiB), "rbd/vm0")
    with serving("pv-rbd", "--num-queues", "2", "rbd", "pool=rbd", "image=vm0",
                 f"conf={ceph_conf}", "timeout=60") as daemon:
        device = daemon.device
        assert int(Path("/sys/block", daemon.disk, "size").read_text()) * 512 == IMAGE_SIZE
        rng = random.Random(9)
        expected = bytearray(IMAGE_SIZE)  # a new image reads as zeroes; then the writes
        writes = []
        for _ in range(16):
            length = rng.choice([4096, 65536, 1024 * 1024])
            offset = rng.randrange(0, IMAGE_SIZE - length, 4096)
            data = rng.randbytes(length)
            direct_io(device, offset, data)
            expected[offset:offset + length] = data
            writes.append((offset, length))
        run("blkdiscard", "-z", "-o", str(40 * MiB), "-l", str(4 * MiB), device)
        expected[40 * MiB:44 * MiB] = bytes(4 * MiB)
        run("sync")  # a flush: librbd's cache (if on) reaches the cluster
        stored = exported(ceph_conf, "vm0")
        assert stored == expected, "the image differs from the data written"
        for offset, length in writes:  # and the device reads back the data written
            want = bytes(expected[offset:offset + length])
            assert direct_io(device, offset, length=length) == want, f"device differs at {offset}"

        run("mkfs.ext4", "-q", "-F", device)
        mount = scratch_dir() / "rbd-mnt"
        mount.mkdir(exist_ok=True)
        payload = os.urandom(5 * MiB + 77)
        run("mount", device, str(mount))
        try:
            (mount / "data.bin").write_bytes(payload)
            run("sync")
        finally:
            run("umount", str(mount))
        run("e2fsck", "-fn", device)
    # the file system lives in the cluster: a second daemon sees it
    with serving("pv-rbd2", "rbd", "image=rbd/vm0", f"conf={ceph_conf}",
                 "readonly=on", "timeout=60") as daemon:
        assert Path("/sys/block", daemon.disk, "ro").read_text().strip() == "1"
        run("mount", "-o", "ro", daemon.device, str(mount))
        try:
            assert (mount / "data.bin").read_bytes() == payload
        finally:
            run("umount", str(mount))


def test_fio_verify_with_many_requests_in_flight(ceph_conf: Path) -> None:
    rbd(ceph_conf, "create", "--size", "32", "rbd/fio0")
    with serving("pv-rbdfio", "--num-queues", "2", "rbd", "pool=rbd", "image=fio0",
                 f"conf={ceph_conf}", "timeout=60") as daemon:
        result = run("fio", "--name=verify", f"--filename={daemon.device}", "--direct=1",
                     "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                     "--numjobs=2", "--offset_increment=16M", "--size=8M",
                     "--verify=crc32c", "--verify_fatal=1", "--group_reporting")
        assert "err= 0" in result.stdout, result.stdout


def test_rbd_resize_reaches_the_kernel(ceph_conf: Path) -> None:
    rbd(ceph_conf, "create", "--size", "32", "rbd/grow0")
    with serving("pv-rbdgrow", "rbd", "pool=rbd", "image=grow0",
                 f"conf={ceph_conf}", "timeout=60") as daemon:
        size_file = Path("/sys/block", daemon.disk, "size")
        assert int(size_file.read_text()) * 512 == 32 * MiB
        rbd(ceph_conf, "resize", "--size", "48", "rbd/grow0")
        deadline = time.monotonic() + 120
        while int(size_file.read_text()) * 512 != 48 * MiB:
            assert time.monotonic() < deadline, "the kernel never saw the new size"
            time.sleep(0.5)
        data = os.urandom(64 * 1024)
        direct_io(daemon.device, 40 * MiB, data)
        assert direct_io(daemon.device, 40 * MiB, length=len(data)) == data
        assert exported(ceph_conf, "grow0")[40 * MiB:40 * MiB + len(data)] == data
    assert "pv-rbdgrow: resized from 33554432 to 50331648 bytes" in daemon.output()


def test_a_snapshot_is_a_read_only_disk_with_the_data_of_its_time(ceph_conf: Path) -> None:
    rbd(ceph_conf, "create", "--size", "16", "rbd/snapimg")
    before, after = os.urandom(MiB), os.urandom(MiB)
    with serving("pv-snap0", "rbd", "image=rbd/snapimg", f"conf={ceph_conf}",
                 "timeout=60") as daemon:
        direct_io(daemon.device, 2 * MiB, before)
        run("sync")
    rbd(ceph_conf, "snap", "create", "rbd/snapimg@s1")
    with serving("pv-snap1", "rbd", "image=rbd/snapimg", f"conf={ceph_conf}",
                 "timeout=60") as daemon:
        direct_io(daemon.device, 2 * MiB, after)
        run("sync")
    with serving("pv-snap2", "rbd", "image=rbd/snapimg@s1", f"conf={ceph_conf}",
                 "timeout=60") as daemon:
        assert Path("/sys/block", daemon.disk, "ro").read_text().strip() == "1"
        assert direct_io(daemon.device, 2 * MiB, length=MiB) == before
    assert exported(ceph_conf, "snapimg")[2 * MiB:3 * MiB] == after
