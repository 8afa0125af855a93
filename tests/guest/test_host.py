"""The daemon on a real host: systemd's notifications, the status file, signals.

A datagram socket of the test's stands in for systemd's ``$NOTIFY_SOCKET``; the
daemon serves a real VDUSE device bound to ``virtio_vdpa``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from conftest import PYVDUSE, START_TIMEOUT, STOP_TIMEOUT, assert_gone, scratch_dir
from test_blk_kernel import direct_io

MiB = 1 << 20


def notifications(sock: socket.socket, until: str, timeout: float) -> list[dict[str, str]]:
    """Notifications received until one has key ``until`` (included)."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {until}= within {timeout} s; got {got}") from None
        got.append(dict(line.split("=", 1) for line in data.split("\n")))
        if until in got[-1]:
            return got


def test_ready_status_watchdog_signals_and_stop_as_systemd_sees_them(
        backing_file: Path) -> None:
    name = "pvhost0"
    scratch = scratch_dir()
    status_file = scratch / f"{name}.status"
    log = scratch / f"{name}.log"
    backing_file.write_bytes(bytes(8 * MiB))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(scratch / f"{name}.notify")
    sock.bind(address)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    with log.open("w") as stream:
        proc = subprocess.Popen([PYVDUSE, "serve", "--name", name, "--status-file",
                                 str(status_file), "file", f"path={backing_file}"],
                                stdout=stream, stderr=subprocess.STDOUT, env=env)
    try:
        # READY=1 only once the node it names exists: checked the moment it arrives.
        ready = notifications(sock, "READY", START_TIMEOUT)[-1]
        status = json.loads(status_file.read_text())
        node = status["path"]
        assert os.path.exists(node) and stat.S_ISBLK(os.stat(node).st_mode), status
        assert ready == {"READY": "1", "STATUS": f"serving {name} on {node}"}
        assert status == {"name": name, "transport": "vduse", "path": node,
                          "driver": "virtio_vdpa", "size": 8 * MiB, "queues": 1,
                          "readonly": False, "datapath": status["datapath"]}
        assert Path(f"/sys/block/{os.path.basename(node)}/size").read_text().strip() == str(
            8 * MiB // 512)
        # The watchdog: pinged every half second while the queue is served.
        started = time.monotonic()
        notifications(sock, "WATCHDOG", 10)
        notifications(sock, "WATCHDOG", 10)
        assert time.monotonic() - started < 10
        # I/O, then SIGUSR1 (statistics), SIGHUP and SIGUSR2 (ignored): still serving.
        buf = os.urandom(4096)
        direct_io(node, 0, buf)
        for signum in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2):
            proc.send_signal(signum)
        deadline = time.monotonic() + 30
        while "SIGUSR2 received" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert f"SIGUSR1: {name}: " in text and "requests served" in text, text
        assert "SIGHUP received: nothing to reload" in text, text
        notifications(sock, "WATCHDOG", 10)  # still pinging
        assert backing_file.read_bytes()[:4096] == buf
        # SIGTERM: STOPPING=1, a clean exit, nothing left behind.
        proc.send_signal(signal.SIGTERM)
        assert notifications(sock, "STOPPING", STOP_TIMEOUT)[-1]["STOPPING"] == "1"
        assert proc.wait(STOP_TIMEOUT) == 0, log.read_text()
        assert not status_file.exists()
        assert_gone(name)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        os.unlink(address)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYVDUSE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def listed(name: str) -> dict[str, object] | None:
    done = run_cli("list", "--json")
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        entry = json.loads(line)
        if entry["name"] == name:
            return dict(entry)
    return None


def test_list_and_destroy_a_device_left_by_a_killed_daemon(backing_file: Path) -> None:
    from conftest import start_daemon

    name = "pvleft0"
    backing_file.write_bytes(bytes(4 * MiB))
    daemon = start_daemon(name, "file", f"path={backing_file}")
    try:
        entry = listed(name)
        assert entry is not None
        assert entry == {"name": name, "driver": "virtio_vdpa", "node": daemon.device,
                         "size": 4 * MiB, "holders": [daemon.proc.pid], "served": True}
        refused = run_cli("destroy", name)
        assert refused.returncode == 1
        assert refused.stderr == (f"pyvduse: error: {name} is served by pid {daemon.proc.pid}: "
                                  "stop that daemon instead (it destroys the device on "
                                  "SIGTERM)\n")
        assert os.path.exists(daemon.device)
    finally:
        daemon.stop(signal.SIGKILL)
    # Left behind: still there, served by nobody; then destroyed, leaving nothing.
    entry = listed(name)
    assert entry is not None and entry["served"] is False and entry["holders"] == []
    assert entry["node"] == daemon.device and os.path.exists(daemon.device)
    table = run_cli("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "DRIVER", "NODE", "SIZE", "SERVED", "BY"]
    assert [name, "virtio_vdpa", daemon.device, str(4 * MiB), "nobody"] in [
        row.split() for row in table[1:]]
    started = time.monotonic()
    done = run_cli("destroy", name)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"pyvduse: vdpa device {name} deleted ({daemon.device} gone)\n"
                           f"pyvduse: VDUSE device {name} destroyed\n")
    assert time.monotonic() - started < 20  # the reset was answered, not timed out (30 s)
    assert_gone(name)
    assert listed(name) is None
    missing = run_cli("destroy", name)
    assert (missing.returncode, missing.stderr) == (
        1, f"pyvduse: error: no VDUSE device {name!r} on this host\n")


def test_a_process_in_new_namespaces_uses_the_volume(backing_file: Path) -> None:
    from conftest import serving

    backing_file.write_bytes(bytes(4 * MiB))
    payload = os.urandom(64 * 1024)
    source = scratch_dir() / "ns-payload.bin"
    source.write_bytes(payload)
    with serving("pvns0", "file", f"path={backing_file}") as daemon:
        # New mount, PID and network namespaces, as a container has: the device node is
        # all it needs (no vdpa netlink, no /dev/vduse).
        done = subprocess.run(
            ["unshare", "--mount", "--pid", "--net", "--fork", "sh", "-c",
             f"dd if={source} of={daemon.device} bs=64k count=1 oflag=direct status=none && "
             f"dd if={daemon.device} bs=64k count=1 iflag=direct status=none | cmp - {source}"
             f" && readlink /proc/self/ns/net"],
            capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() != os.readlink("/proc/self/ns/net")  # really another one
    assert backing_file.read_bytes()[:len(payload)] == payload


def test_pyvduse_in_a_new_network_namespace_says_what_is_wrong(backing_file: Path) -> None:
    name = "pvns1"
    backing_file.write_bytes(bytes(MiB))
    done = subprocess.run(["unshare", "--net", PYVDUSE, "serve", "--name", name, "file",
                           f"path={backing_file}"],
                          capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if " error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pyvduse: error: "), done.stderr
    assert done.stderr.splitlines()[-1] == errors[0]  # the last word
    assert "exists only in the host's initial network namespace" in errors[0]
    assert "--attach none" in errors[0] and "modprobe" not in errors[0]
    assert_gone(name)
    # What the message offers works: --attach none in the namespace, attach from the host.
    with subprocess.Popen(["unshare", "--net", PYVDUSE, "serve", "--name", name, "--attach",
                           "none", "--status-file", str(scratch_dir() / f"{name}.status"),
                           "file", f"path={backing_file}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            status_file = scratch_dir() / f"{name}.status"
            deadline = time.monotonic() + START_TIMEOUT
            while not status_file.exists():
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert json.loads(status_file.read_text())["path"] is None
            added = subprocess.run(["vdpa", "dev", "add", "name", name, "mgmtdev", "vduse"],
                                   capture_output=True, text=True, timeout=60, check=False)
            assert added.returncode == 0, added.stderr
            from conftest import find_device_node

            deadline = time.monotonic() + 30
            while not find_device_node(name):
                assert time.monotonic() < deadline, "no device node after vdpa dev add"
                time.sleep(0.1)
            node = find_device_node(name)
            with open(node, "rb") as disk:
                assert disk.read(4096) == bytes(4096)
            deleted = subprocess.run(["vdpa", "dev", "del", name], capture_output=True,
                                     text=True, timeout=60, check=False)
            assert deleted.returncode == 0, deleted.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(STOP_TIMEOUT) == 0
    assert_gone(name)
