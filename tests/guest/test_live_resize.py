"""Live resize through the control socket under the real kernel (VM guest): a mounted
ext4 grows online with resize2fs, the new space holds data that reads back."""

from __future__ import annotations

import hashlib
import os
import time

from conftest import PYVDUSE, scratch_dir, serving
from test_blk_kernel import MiB, make_file, run, sysfs_block

NAME = "pv-grow"


def test_mounted_ext4_grows_online_through_pyvduse_ctl() -> None:
    scratch = scratch_dir()
    image, control, mountpoint = scratch / "grow.img", scratch / "grow.sock", scratch / "grow"
    make_file(image, 64 * MiB)
    mark = len(run("dmesg").stdout.splitlines())
    with serving(NAME, "--control", str(control), "file", f"path={image}") as daemon:
        device = daemon.device
        run("mkfs.ext4", "-q", "-F", device)
        mountpoint.mkdir(exist_ok=True)
        run("mount", device, str(mountpoint))
        try:
            before = os.statvfs(mountpoint)
            grown = run(PYVDUSE, "ctl", str(control), "export-resize", f"id={NAME}",
                        f"size={192 * MiB}", check=False)
            assert grown.returncode == 0, grown.stdout + grown.stderr
            deadline = time.monotonic() + 30
            while int(sysfs_block(daemon.disk, "size")) != 192 * MiB // 512:
                assert time.monotonic() < deadline, "the kernel did not see the new size"
                time.sleep(0.1)
            assert os.path.getsize(image) == 192 * MiB
            kernel = "\n".join(run("dmesg").stdout.splitlines()[mark:])
            assert "capacity change" in kernel, kernel[-2000:]
            run("resize2fs", device)  # online
            after = os.statvfs(mountpoint)
            assert after.f_blocks * after.f_frsize > 2.5 * before.f_blocks * before.f_frsize
            # more data than the old file system could hold: it lives in the new space
            data = os.urandom(MiB)
            digests = []
            for number in range(100):
                chunk = data[number:] + data[:number]
                (mountpoint / f"big{number:03d}").write_bytes(chunk)
                digests.append(hashlib.sha256(chunk).hexdigest())
            run("sync")
            shrink = run(PYVDUSE, "ctl", str(control), "export-resize", f"id={NAME}",
                         f"size={32 * MiB}", check=False)
            assert shrink.returncode == 1
            assert "drop data" in shrink.stderr, shrink.stderr
            assert int(sysfs_block(daemon.disk, "size")) == 192 * MiB // 512
        finally:
            run("umount", str(mountpoint))
        with open("/proc/sys/vm/drop_caches", "w") as stream:  # read from the device again
            stream.write("3\n")
        run("mount", device, str(mountpoint))
        try:
            for number, digest in enumerate(digests):
                read = (mountpoint / f"big{number:03d}").read_bytes()
                assert hashlib.sha256(read).hexdigest() == digest, f"big{number:03d} differs"
        finally:
            run("umount", str(mountpoint))
        fsck = run("fsck.ext4", "-fn", device, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
