"""Fixtures for the real-kernel tests; these run INSIDE the VM guest (see tests/vm/).

They need root, /dev/vduse/control and the vdpa modules, and fail (not skip)
without them: the host-side runner only starts them where those exist.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PYVDUSE = str(Path(sys.executable).with_name("pyvduse"))
START_TIMEOUT = 180.0  # software-emulated guests are slow: Python starts in seconds
STOP_TIMEOUT = 120.0


def scratch_dir() -> Path:
    """A writable directory in the guest (a tmpfs)."""
    return Path(os.environ.get("TMPDIR", "/tmp"))


@dataclass
class Daemon:
    """A running ``pyvduse serve`` and where its device appeared."""

    name: str
    proc: subprocess.Popen[str]
    pidfile: Path
    log: Path
    device: str  # /dev/vdX or /dev/vhost-vdpa-N, "" with --attach none

    @property
    def disk(self) -> str:
        """Kernel name of the block device (``vda``)."""
        return os.path.basename(self.device)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name}: daemon did not exit within {STOP_TIMEOUT}s\n"
                                 f"{self.log.read_text()}") from None

    def wait(self) -> int:
        """Wait for a daemon expected to exit by itself; return its exit status."""
        try:
            return self.proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"{self.name}: daemon did not exit by itself:\n"
                                 f"{self.output()}") from None

    def output(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.log.read_text()


def vdpa_device_dir(name: str) -> Path:
    return Path("/sys/bus/vdpa/devices", name)


def find_device_node(name: str) -> str:
    """The /dev node the vdpa device ``name`` is bound to, or ""."""
    base = vdpa_device_dir(name)
    for block in base.glob("virtio*/block/*"):
        return f"/dev/{block.name}"
    for vhost in base.glob("vhost-vdpa-*"):
        return f"/dev/{vhost.name}"
    return ""


def assert_gone(name: str) -> None:
    """No trace of device ``name`` left in /dev/vduse, the vdpa bus or the vduse class."""
    assert not Path("/dev/vduse", name).exists(), f"/dev/vduse/{name} left behind"
    assert not vdpa_device_dir(name).exists(), f"vdpa device {name} left behind"
    assert not Path("/sys/class/vduse", name).exists(), f"vduse device {name} left behind"


def start_daemon(name: str, *args: str, expect_ready: bool = True) -> Daemon:
    """Run ``pyvduse serve --name NAME ARGS`` and wait for its pidfile."""
    scratch = scratch_dir()
    pidfile = scratch / f"{name}.pid"
    log = scratch / f"{name}.log"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    stream = log.open("w")
    proc = subprocess.Popen([PYVDUSE, "serve", "--name", name, "--pidfile", str(pidfile), *args],
                            stdout=stream, stderr=subprocess.STDOUT, text=True)
    stream.close()
    daemon = Daemon(name, proc, pidfile, log, "")
    if not expect_ready:
        return daemon
    deadline = time.monotonic() + START_TIMEOUT
    while not pidfile.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"{name}: daemon exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"{name}: not ready within {START_TIMEOUT}s:\n{log.read_text()}")
        time.sleep(0.2)
    assert int(pidfile.read_text()) == proc.pid
    daemon.device = find_device_node(name)
    return daemon


@contextlib.contextmanager
def serving(name: str, *args: str) -> Iterator[Daemon]:
    """A daemon for the duration of the block; on exit it must stop cleanly and leave nothing."""
    daemon = start_daemon(name, *args)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        output = daemon.output()
        assert status == 0, f"{name}: exit status {status}:\n{output}"
        assert not daemon.pidfile.exists(), "pidfile not removed"
        assert_gone(name)


@pytest.fixture
def backing_file(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh backing file path on the guest tmpfs (created by the test)."""
    path = scratch_dir() / f"{request.node.name[:40]}.img"
    yield path
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@pytest.fixture(autouse=True, scope="session")
def _real_kernel() -> None:
    if not Path("/dev/vduse/control").exists():
        pytest.fail("/dev/vduse/control is missing: these tests run in the VM guest "
                    "(tests/vm/test_real_kernel.py starts them)")
