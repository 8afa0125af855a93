"""User backends served by ``pyvduse serve python`` under the real kernel (in the VM guest)."""

from __future__ import annotations

import errno
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import assert_gone, scratch_dir, serving, start_daemon
from test_blk_kernel import MiB, direct_io, sysfs_block

RAMDISK = Path(__file__).resolve().parents[2] / "examples" / "ramdisk.py"


def test_ramdisk_example_serves_direct_io_and_discard() -> None:
    with serving("pv-user", "python", f"script={RAMDISK}", "size=16M") as daemon:
        disk = daemon.disk
        assert int(sysfs_block(disk, "size")) * 512 == 16 * MiB
        assert sysfs_block(disk, "ro") == "0"
        assert int(sysfs_block(disk, "queue/discard_max_bytes")) > 0
        writes = {0: b"\x11" * 4096, 5 * MiB + 512: os.urandom(64 * 1024),
                  16 * MiB - 4096: b"\x22" * 4096}
        for offset, data in writes.items():
            direct_io(daemon.device, offset, data)
        for offset, data in writes.items():
            assert direct_io(daemon.device, offset, length=len(data)) == data
        subprocess.run(["blkdiscard", "-o", str(5 * MiB), "-l", str(MiB), daemon.device],
                       check=True, capture_output=True, timeout=300)
        assert direct_io(daemon.device, 5 * MiB, length=128 * 1024) == bytes(128 * 1024)
        assert direct_io(daemon.device, 0, length=4096) == writes[0]
    assert "serving python backend on pv-user" in daemon.output()


def test_user_exception_is_an_io_error_and_the_device_lives_on() -> None:
    script = scratch_dir() / "flaky_backend.py"
    script.write_text(textwrap.dedent("""
        from pyvduse.backends import Backend

        class Flaky(Backend):
            def __init__(self, bad="8M"):
                self.bad = int(bad.rstrip("M")) << 20
                self.data = bytearray(16 << 20)
            def size(self):
                return len(self.data)
            def read(self, offset, buf):
                if offset <= self.bad < offset + len(buf):
                    raise RuntimeError("a bug in the user's backend")
                buf[:] = self.data[offset:offset + len(buf)]
            def write(self, offset, buf):
                self.data[offset:offset + len(buf)] = buf
    """))
    with serving("pv-flaky", "python", f"script={script}", "bad=8M") as daemon:
        direct_io(daemon.device, 0, b"\x66" * 4096)
        with pytest.raises(OSError) as failed:
            direct_io(daemon.device, 8 * MiB, length=4096)
        assert failed.value.errno == errno.EIO
        assert daemon.proc.poll() is None, "daemon died on a backend exception"
        assert direct_io(daemon.device, 0, length=4096) == b"\x66" * 4096
    output = daemon.output()
    assert "RuntimeError: a bug in the user's backend" in output, output
    assert "flaky_backend.py" in output  # the traceback points into the script


def test_broken_script_fails_with_one_line_and_leaves_nothing() -> None:
    script = scratch_dir() / "broken_backend.py"
    script.write_text("from pyvduse.backends import Backend\n\nclass Broken(Backend:\n")
    daemon = start_daemon("pv-broken", "python", f"script={script}", expect_ready=False)
    assert daemon.wait() == 1
    lines = daemon.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pyvduse: error: backend 'python': syntax error in {script}:3: ")
    assert_gone("pv-broken")
    assert not daemon.pidfile.exists()
