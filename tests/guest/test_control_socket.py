"""Exports added and removed through the control socket under the real kernel (VM guest).

A daemon serves export A (a file) with ``--control``; while fio writes and verifies
A's /dev/vdX without a pause, export B (memory) is added with ``pyvduse ctl
export-add``, appears as its own /dev/vdY and is checked byte by byte with
O_DIRECT, then removed with ``export-del`` (its vdpa device, /dev/vduse/B, its
/dev/vdY and its inflight log go); bad commands and garbage get error replies.
fio must pass throughout, A's request count must grow, a ``pyvduse ctl --events``
watcher must see B come and go, and ``pyvduse ctl quit`` must stop the daemon
with status 0 and leave nothing.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import PYVDUSE, assert_gone, find_device_node, scratch_dir, start_daemon
from test_blk_kernel import MiB, direct_io, make_file, run, sysfs_block

from pyvduse.control import CommandError
from pyvduse.ctl import ControlClient

NAME_A = "pv-ctl-a"
NAME_B = "pv-ctl-b"
B_SIZE = 32 * MiB
FIO_TIMEOUT = 600


def run_ctl(control: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``pyvduse ctl [--json ARGS] CONTROL WORDS...``: a leading ``--json ARGS`` in
    ``words`` goes before the socket."""
    options: list[str] = []
    if words[:1] == ("--json",):
        options, words = list(words[:2]), words[2:]
    return run(PYVDUSE, "ctl", *options, str(control), *words, check=False)


def ctl(control: Path, *words: str) -> Any:
    """``pyvduse ctl CONTROL WORDS...``, which must succeed; its result."""
    proc = run_ctl(control, *words)
    assert proc.returncode == 0, f"pyvduse ctl {' '.join(words)}: {proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def ctl_fails(control: Path, *words: str) -> str:
    """``pyvduse ctl CONTROL WORDS...``, which must fail with an error reply; its stderr."""
    proc = run_ctl(control, *words)
    assert proc.returncode == 1, f"pyvduse ctl {' '.join(words)}: {proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("pyvduse ctl: error: GenericError: "), proc.stderr
    return proc.stderr


def requests(control: Path, export_id: str) -> int:
    with ControlClient(str(control), timeout=60) as client:
        for export in client.execute("query-stats")["exports"]:
            if export["id"] == export_id:
                return int(export["requests"])
    raise AssertionError(f"no statistics for {export_id}")


class FioLoop(threading.Thread):
    """fio write-and-verify runs on ``device``, one after the other, until halted."""

    def __init__(self, device: str) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.halt = threading.Event()
        self.runs: list[tuple[int, str]] = []  # (exit status, output)
        self.proc: subprocess.Popen[str] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        number = 0
        try:
            while not self.halt.is_set():
                self.proc = subprocess.Popen(
                    ["fio", f"--name=ctl{number}", f"--filename={self.device}",
                     "--size=16M", "--offset_increment=16M", "--numjobs=2", "--rw=randwrite",
                     "--bs=4k", "--iodepth=16", "--ioengine=libaio", "--direct=1",
                     "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                     "--verify_state_save=0", "--serialize_overlap=1", "--group_reporting",
                     f"--randseed={1000 + number}"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                out, _ = self.proc.communicate(timeout=FIO_TIMEOUT)
                self.runs.append((self.proc.returncode, out))
                number += 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        """Let the run under way finish (it must pass like the others), then stop."""
        self.halt.set()
        self.join(FIO_TIMEOUT + 60)

    def kill(self) -> None:
        self.halt.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.join(60)


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Watcher(threading.Thread):
    """``pyvduse ctl --events CONTROL``: the events it prints, as they come."""

    def __init__(self, control: Path) -> None:
        super().__init__(daemon=True)
        self.proc = subprocess.Popen([PYVDUSE, "ctl", "--events", str(control)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def listening(self, control: Path) -> None:
        """Wait until it prints events: resize A to its own size (an EXPORT_RESIZED
        event that changes nothing) until one shows up."""
        deadline = time.monotonic() + 120
        with ControlClient(str(control), timeout=60) as client:
            size = client.execute("query-exports", id=NAME_A)[0]["size"]
            while not self.events:
                assert self.proc.poll() is None, "pyvduse ctl --events exited"
                assert time.monotonic() < deadline, "pyvduse ctl --events printed nothing"
                client.execute("export-resize", id=NAME_A, size=size)
                time.sleep(1)

    def finish(self) -> tuple[int, str]:
        """Wait for it to end (the daemon closed the connection): status and stderr."""
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.join(10)
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read()


def check_b(device: str) -> int:
    """Random O_DIRECT writes over B, each read back, then all of B against the model;
    returns the number of writes."""
    rng = random.Random(77)
    model = bytearray(B_SIZE)  # a memory export starts as zeroes
    assert direct_io(device, 0, length=MiB) == bytes(MiB)
    writes = 0
    for _ in range(48):
        length = rng.choice((4096, 8192, 65536, 256 * 1024))
        offset = rng.randrange(0, B_SIZE - length, 4096)
        data = rng.randbytes(length)
        direct_io(device, offset, data)
        model[offset:offset + length] = data
        assert direct_io(device, offset, length=length) == data, f"at {offset}"
        writes += 1
    for offset in range(0, B_SIZE, 4 * MiB):
        got = direct_io(device, offset, length=4 * MiB)
        assert got == model[offset:offset + 4 * MiB], f"B differs in [{offset}, +4 MiB)"
    return writes


def garbage(control: Path) -> list[dict[str, Any]]:
    """Lines that are no requests, on one connection; the replies."""
    lines = [b"\xff\xfe garbage", b"not json", b"[1, 2]", b'{"execute": "quit", "x": 1}',
             b"z" * (70 * 1024), b'{"execute": "qmp_capabilities"}',
             b'{"execute": "export-del", "arguments": {"id": 5}}',
             b'{"execute": "no-such-command"}']
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(control))
        with sock.makefile("rb") as reader:
            assert b'"QMP"' in reader.readline()
            sock.sendall(b"\n".join(lines) + b"\n")
            return [json.loads(reader.readline()) for _ in lines]


def test_exports_added_and_removed_while_fio_verifies_another() -> None:
    scratch = scratch_dir()
    image, control = scratch / "ctl-a.img", scratch / "ctl.sock"
    log_a = scratch / "ctl-a.inflight"
    make_file(image, 96 * MiB)
    mark = len(run("dmesg").stdout.splitlines())
    daemon = start_daemon(NAME_A, "--num-queues", "2", "--control", str(control),
                          "--inflight-log", str(log_a), "file", f"path={image}")
    fio = FioLoop(daemon.device)
    watcher = Watcher(control)
    watcher.start()
    device_b = ""
    try:
        device_a = daemon.device
        assert device_a.startswith("/dev/vd"), daemon.output()
        watcher.listening(control)
        fio.start()
        wait_for(lambda: requests(control, NAME_A) > 1000, "fio to get going", 120)
        before = requests(control, NAME_A)

        # B comes: its own /dev/vdY, which holds what is written to it
        added = ctl(control, "--json", '{"options": {"size": "32M"}}', "export-add",
                    f"id={NAME_B}", "backend=memory", "num-queues=2")
        assert added["id"] == NAME_B and added["size"] == B_SIZE
        assert added["attached"]["driver"] == "virtio_vdpa"
        device_b = added["attached"]["node"]
        assert device_b.startswith("/dev/vd") and device_b != device_a, added
        assert find_device_node(NAME_B) == device_b
        disk_b = os.path.basename(device_b)
        assert int(sysfs_block(disk_b, "size")) * 512 == B_SIZE
        assert sorted(p.name for p in Path("/sys/block", disk_b, "mq").iterdir()) == ["0", "1"]
        log_b = added["inflight-log"]
        assert os.path.exists(log_b)
        writes = check_b(device_b)
        exports = ctl(control, "query-exports")
        assert [e["id"] for e in exports] == [NAME_A, NAME_B]
        assert exports[0]["attached"]["node"] == device_a
        assert requests(control, NAME_B) >= 2 * writes

        # bad commands and garbage: error replies, and nothing changes
        assert "no export with id 'nosuch'" in ctl_fails(control, "export-del", "id=nosuch")
        assert "exists already" in ctl_fails(control, "--json", '{"options": {"size": "1M"}}',
                                             "export-add", f"id={NAME_A}", "backend=memory")
        assert "colour" in ctl_fails(control, "--json", '{"options": {"size": "1M", '
                                     '"colour": "blue"}}', "export-add", "id=pv-ctl-c",
                                     "backend=memory")
        assert "logical block size" in ctl_fails(control, "export-resize", f"id={NAME_A}",
                                                 "size=1000")
        with ControlClient(str(control), timeout=60) as client:
            for arguments in ({"id": "pv-ctl-c", "backend": "tape"},
                              {"id": "pv-ctl-c", "backend": "memory", "queue-size": 100,
                               "options": {"size": "1M"}},
                              {"id": "pv-ctl-c", "backend": "file",
                               "options": {"path": "/nonexistent.img"}},
                              {"backend": "memory", "options": {"size": "1M"}}):
                try:
                    client.execute("export-add", arguments)
                except CommandError as exc:
                    assert exc.error_class == "GenericError"
                else:
                    raise AssertionError(f"export-add {arguments} succeeded")
            try:
                client.execute("export-resize", {"id": NAME_B, "size": [1]})
            except CommandError as exc:
                assert "Invalid parameter type for 'size'" in exc.desc
            else:
                raise AssertionError("a list as size was accepted")
        replies = garbage(control)
        assert all("error" in r for r in replies[:5]) and "return" in replies[5], replies
        assert replies[6]["error"]["desc"] == \
            "Invalid parameter type for 'id', expected: string"
        assert replies[7]["error"]["class"] == "CommandNotFound"
        assert not Path("/dev/vduse/pv-ctl-c").exists()
        assert [e["id"] for e in ctl(control, "query-exports")] == [NAME_A, NAME_B]

        # B goes: vdpa device, VDUSE device, /dev/vdY and inflight log
        assert ctl(control, "export-del", f"id={NAME_B}") == {}
        assert_gone(NAME_B)
        wait_for(lambda: not os.path.exists(device_b), f"{device_b} to go", 30)
        assert not os.path.exists(log_b)
        assert [e["id"] for e in ctl(control, "query-exports")] == [NAME_A]

        after = requests(control, NAME_A)
        assert after > before, f"A served no request meanwhile ({before} -> {after})"
        assert fio.is_alive() and fio.error is None
        fio.stop()
        assert fio.error is None, f"the fio loop failed: {fio.error!r}"
        assert fio.runs, "fio did not run"
        for status, out in fio.runs:
            assert status == 0, f"fio failed on A:\n{out}"
        assert requests(control, NAME_A) > after

        # quit: exit 0 and nothing left
        proc = run(PYVDUSE, "ctl", str(control), "quit", check=False)
        assert (proc.returncode, json.loads(proc.stdout)) == (0, {}), proc.stderr
        assert daemon.wait() == 0, daemon.output()
    finally:
        fio.kill()
        if daemon.proc.poll() is None:
            daemon.stop()
        watch_status, watch_errors = watcher.finish()
    assert not daemon.pidfile.exists()
    assert not control.exists(), "control socket left behind"
    assert not log_a.exists(), "inflight log left behind"
    assert_gone(NAME_A)
    assert_gone(NAME_B)
    assert not os.path.exists(device_b)
    # the watcher saw B come and go, and was told when the daemon went away
    about_b = [(e["event"], e["data"]) for e in watcher.events if e["data"]["id"] == NAME_B]
    assert about_b == [("EXPORT_ADDED", {"id": NAME_B}), ("EXPORT_DELETED", {"id": NAME_B})], \
        watcher.events
    assert {e["event"] for e in watcher.events if e["data"]["id"] == NAME_A} == {
        "EXPORT_RESIZED"}
    assert watch_status == 1 and "closed the connection" in watch_errors, watch_errors
    kernel = "\n".join(run("dmesg").stdout.splitlines()[mark:])
    for bad in ("I/O error", "Buffer I/O", "is not a head"):
        assert bad not in kernel, f"kernel logged {bad!r}:\n{kernel[-3000:]}"
    print(f"fio runs on A: {len(fio.runs)}; B was {device_b}, A {daemon.device}")
