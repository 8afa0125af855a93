"""The pyvduse command line: option and backend errors, a serve cycle on the fake kernel."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvduse import cli
from pyvduse.errors import VduseUnavailableError
from pyvduse.kernel import DeviceSpec, LinuxVduse
from pyvduse.testing import FakeVduse
from pyvduse.uapi import virtio as v


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["serve", "--bogus", "memory"],
    ["serve", "--num-queues", "zero", "memory"],
    ["serve", "--queue-size", "-4", "memory"],
    ["serve", "--attach", "sideways", "memory"],
    ["serve", "--io-threads", "-1", "memory"],
    ["serve", "--io-threads", "many", "memory"],
    ["serve", "--io-threads-min", "64KB", "memory"],
    ["serve", "--transport", "vhost", "memory"],
    ["serve"],
    [],
])
def test_bad_syntax_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str],
                                             argv: list[str]) -> None:
    status, err = run_cli(capsys, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pyvduse") and "error:" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "nosuch"], "unknown backend 'nosuch' (known: file, memory, nbd, null, python, rbd)"),
    (["serve", "file", "path=/nonexistent/disk.img"],
     "file backend: no such file: /nonexistent/disk.img"),
    (["serve", "memory"], "size"),
    (["serve", "memory", "size=1M", "colour=blue"], "colour"),
    (["serve", "--queue-size", "100", "memory", "size=1M"], "queue size 100"),
    (["serve", "--num-queues", "65", "memory", "size=1M"], "number of queues 65"),
    (["serve", "--logical-block-size", "1000", "memory", "size=1M"], "logical block size 1000"),
    (["serve", "--serial", "x" * 21, "memory", "size=1M"], "longer than 20 bytes"),
    (["serve", "--transport", "vhost-user", "memory", "size=1M"], "needs a socket path"),
    (["serve", "--socket", "/tmp/x.sock", "memory", "size=1M"],
     "--socket is for the vhost-user transport"),
    (["serve", "--transport", "vhost-user", "--socket", "/nonexistent/dir/s.sock", "memory",
      "size=1M"], "cannot listen on /nonexistent/dir/s.sock"),
])
def test_bad_input_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    status, err = run_cli(capsys, *argv)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyvduse: error: ")
    assert message in lines[0]


def test_serve_vhost_user_listens_until_a_signal_then_removes_its_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "vu.sock"
    pidfile = tmp_path / "pid"
    seen: list[bool] = []

    def signal_when_ready() -> None:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(sock.is_socket())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    status, err = run_cli(capsys, "serve", "--transport", "vhost-user", "--socket", str(sock),
                          "--name", "vu0", "--pidfile", str(pidfile), "memory", "size=1M")
    assert status == 0, err
    assert seen == [True]  # the socket listened by the time the pidfile appeared
    assert not sock.exists() and not pidfile.exists()


def test_missing_control_device_says_how_to_fix(tmp_path: Path) -> None:
    kernel = LinuxVduse(control_path=str(tmp_path / "control"))
    spec = DeviceSpec(name="x", device_id=2, features=1 << 33, vq_num=1, config=b"\0" * 60)
    with pytest.raises(VduseUnavailableError, match="modprobe vduse"):
        kernel.create_device(spec)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_writes_pidfile_when_ready_and_cleans_up_on_signal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_kernel: FakeVduse,
        wait_for_file: Callable[[Path], None], signum: int) -> None:
    pidfile = tmp_path / "pyvduse.pid"
    seen: dict[str, Any] = {}

    def drive() -> None:
        wait_for_file(pidfile)
        seen["pid"] = pidfile.read_text()
        seen["devices"] = dict(fake_kernel.devices)
        channel = fake_kernel.channels["cli0"]
        seen["driver_ok"] = channel.start()
        os.kill(os.getpid(), signum)

    driver = threading.Thread(target=drive)
    driver.start()
    status, err = run_cli(capsys, "serve", "--name", "cli0", "--attach", "none",
                          "--pidfile", str(pidfile), "--num-queues", "2", "--serial", "s1",
                          "memory", "size=4M")
    driver.join()
    assert status == 0, err
    assert seen["pid"] == f"{os.getpid()}\n"
    assert list(seen["devices"]) == ["cli0"]
    assert seen["devices"]["cli0"].vq_num == 2
    assert seen["driver_ok"] == 0
    assert not pidfile.exists()
    assert fake_kernel.destroyed == ["cli0"]
    assert "serving memory backend on cli0 (not attached): 4194304 bytes" in err
    assert signal.Signals(signum).name in err


def test_serve_reports_a_name_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     fake_kernel: FakeVduse) -> None:
    fake_kernel.devices["busy"] = DeviceSpec("busy", 2, 0, 1, b"")
    pidfile = tmp_path / "pid"
    status, err = run_cli(capsys, "serve", "--name", "busy", "--attach", "none",
                          "--pidfile", str(pidfile), "null")
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyvduse: error: busy: a VDUSE device with this name exists but "
                           "its inflight log")  # not ours to recover: refused, untouched
    assert not pidfile.exists()
    assert fake_kernel.devices["busy"].vq_num == 1  # the other device is untouched
    assert not [t for t in threading.enumerate() if t.name.startswith("io-")]  # pool closed


def test_serve_exits_1_when_the_device_breaks(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              fake_kernel: FakeVduse,
        wait_for_file: Callable[[Path], None]) -> None:
    pidfile = tmp_path / "pid"

    def break_device() -> None:
        wait_for_file(pidfile)
        channel = fake_kernel.channels["cli1"]
        channel.fail_reads = True  # the next control read fails as on a broken device
        channel.send_nowait(1)

    thread = threading.Thread(target=break_device)
    thread.start()
    status, err = run_cli(capsys, "serve", "--name", "cli1", "--attach", "none",
                          "--pidfile", str(pidfile), "null")
    thread.join()
    assert status == 1
    assert err.strip().splitlines()[-1].startswith("pyvduse: error: cli1: control channel:")
    assert fake_kernel.destroyed == ["cli1"]
    assert not pidfile.exists()


def test_serve_with_io_threads_runs_large_requests_on_the_pool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_kernel: FakeVduse,
        wait_for_file: Callable[[Path], None]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    pidfile = tmp_path / "pid"
    big, small = bytes(range(256)) * 512, b"\x5a" * 4096  # 128 KiB goes to the pool, 4 KiB not
    seen: dict[str, Any] = {}

    def drive() -> None:
        wait_for_file(pidfile)
        channel = fake_kernel.channels["cli1"]
        assert channel.start() == 0
        memory, ring = fake_kernel.memory, channel.rings[0]
        statuses = []
        for sector, data in ((0, big), (512, small)):
            header = memory.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_OUT, 0, sector))
            status = memory.buffer(b"\xff", writable=True)
            ring.add_chain([header, memory.buffer(data), status])
            statuses.append(status)
        seen["pool"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("io-"))
        channel.kick(0)
        seen["used"] = channel.wait_used(0, 2)
        seen["status"] = [memory.read(s.addr, 1) for s in statuses]
        os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    status, err = run_cli(capsys, "serve", "--name", "cli1", "--attach", "none",
                          "--pidfile", str(pidfile), "--io-threads", "3",
                          "--io-threads-min", "64k", "file", f"path={image}")
    driver.join()
    assert status == 0, err
    assert seen["pool"] == ["io-0", "io-1", "io-2"]
    assert [written for _, written in seen["used"]] == [1, 1]
    assert seen["status"] == [b"\0", b"\0"]
    data = image.read_bytes()
    assert data[:len(big)] == big and data[512 * 512:512 * 512 + 4096] == small
    assert not [t for t in threading.enumerate() if t.name.startswith("io-")]
