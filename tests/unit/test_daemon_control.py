"""The daemon behind its control socket: ``pyvduse serve --control`` on the fake kernel.

``pyvduse serve --attach none --control SOCK ... memory size=..`` runs in-process
on a thread (its signal handlers left out; the tests stop it through its stop
event or ``quit``) with its devices on the fake VDUSE kernel and its inflight
logs in the test's directory, and is driven with
:class:`pyvduse.ctl.ControlClient` and ``pyvduse ctl`` (:func:`run_ctl`): every
command and its reply, every error reply (and that a failed command changes
nothing), events reaching other clients, and hostile clients (garbage, a
client leaving mid-line, one that never reads while events flow) while a
fake driver keeps doing I/O on the served export.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

import pyvduse.control as control_module
from pyvduse import cli
from pyvduse import export as export_module
from pyvduse import registry as registry_module
from pyvduse.backends.memory import MemoryBackend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.binding import AttachedDevice
from pyvduse.control import CommandError, ControlServer
from pyvduse.ctl import ControlClient, ControlError, run_ctl
from pyvduse.registry import ExportRegistry
from pyvduse.spec import ExportSpec
from pyvduse.testing import FakeVduse
from pyvduse.uapi import virtio as v

MiB = 1 << 20
NAME = "dc0"
SERVE_SIZE = 4 * MiB
OK = v.VIRTIO_BLK_S_OK
COMMANDS = ["export-add", "export-del", "export-resize", "qmp_capabilities", "capabilities",
            "query-commands", "query-exports", "query-stats", "quit"]


# -- the daemon on a thread -------------------------------------------------------------


class _Stop(cli.Signals):
    """The daemon's signals without their handlers (serve runs on a thread)."""

    made: ClassVar[list[_Stop]] = []

    def __init__(self) -> None:
        super().__init__()
        _Stop.made.append(self)

    def install(self) -> None:
        pass


@dataclass
class Daemon:
    """A ``pyvduse serve`` running on a thread of the test process."""

    name: str
    sock: Path
    run_dir: Path  # where the inflight logs go
    fake: FakeVduse
    thread: threading.Thread
    stop: _Stop
    result: list[int | BaseException] = field(default_factory=list)

    def client(self, timeout: float = 10.0) -> ControlClient:
        """A client, not connected yet (``with`` connects and negotiates)."""
        return ControlClient(str(self.sock), timeout=timeout)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One command on a connection of its own."""
        with self.client() as client:
            return client.execute(command, arguments or {})

    def ctl(self, *words: str) -> tuple[int, str, str]:
        """``pyvduse ctl [OPTIONS] SOCK WORDS...`` in-process: (status, stdout, stderr).

        Options (words starting with ``--``, with their values) go before the socket.
        """
        options: list[str] = []
        rest = list(words)
        while rest and rest[0].startswith("--"):
            options.append(rest.pop(0))
            if options[-1] in ("--json", "--timeout"):
                options.append(rest.pop(0))
        args = cli.build_parser().parse_args(["ctl", *options, str(self.sock), *rest])
        out, err = io.StringIO(), io.StringIO()
        status = run_ctl(args, stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def logs(self) -> list[str]:
        return sorted(p.name for p in self.run_dir.glob("*")) if self.run_dir.exists() else []

    def wait(self, timeout: float = 30.0) -> int | BaseException:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not stop"
        return self.result[0]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for the control socket (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dc"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(fake_kernel: FakeVduse, tmp_path: Path, sockdir: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Daemon]]:
    """``serve(*args, name=NAME)``: start ``pyvduse serve --name NAME --attach none
    --control SOCK ARGS`` on a thread and wait for its control socket. Every daemon is
    stopped at the end, and must have destroyed its devices and removed its logs."""
    monkeypatch.setattr(cli, "Signals", _Stop)
    logger = logging.getLogger("pyvduse")  # cli.main sets it up for stderr: put it back
    saved = (list(logger.handlers), logger.propagate, logger.level)
    started: list[Daemon] = []

    def start(*args: str, name: str = NAME) -> Daemon:
        sock = sockdir / f"{name}.sock"
        argv = ["serve", "--name", name, "--attach", "none", "--control", str(sock), *args]
        result: list[int | BaseException] = []

        def run() -> None:
            try:
                result.append(cli.main(argv))
            except BaseException as exc:  # reported by the test
                result.append(exc)

        _Stop.made.clear()
        thread = threading.Thread(target=run, name=f"serve-{name}")
        thread.start()
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert thread.is_alive(), f"serve exited: {result}"
            assert time.monotonic() < deadline, "no control socket after 10 s"
            time.sleep(0.005)
        daemon = Daemon(name, sock, tmp_path / "run", fake_kernel, thread, _Stop.made[-1],
                        result)
        started.append(daemon)
        return daemon

    try:
        yield start
        for daemon in started:
            daemon.stop.stop()
            assert daemon.wait() == 0
        assert fake_kernel.devices == {}, "devices left behind"
        for daemon in started:
            assert daemon.logs() == [], "inflight logs left behind"
            assert not daemon.sock.exists(), "control socket left behind"
    finally:
        for daemon in started:
            daemon.stop.stop()
            daemon.thread.join(30)
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
        logger.setLevel(saved[2])


# -- a fake driver ----------------------------------------------------------------------


def pattern(length: int, seed: int) -> bytes:
    return bytes((i * 7 + seed * 131 + (i >> 8)) & 0xFF for i in range(length))


class Driver:
    """The virtio driver's side of an export on the fake kernel: brings the device up,
    then runs one request at a time on queue 0, with buffers allocated once (the fake
    driver memory is never freed, so a long run must reuse them)."""

    def __init__(self, fake: FakeVduse, name: str, block: int = 4096) -> None:
        self.channel = fake.channels[name]
        assert self.channel.start() == 0
        self.memory = fake.memory
        self.block = block
        self.header = self.memory.buffer(v.virtio_blk_outhdr.size)
        self.data_out = self.memory.buffer(block)
        self.data_in = self.memory.buffer(block, writable=True)
        self.status = self.memory.buffer(1, writable=True)
        self.ring = self.channel.rings[0]

    def request(self, req_type: int, sector: int, data: bytes = b"") -> tuple[int, bytes]:
        """One request of a block; its status byte and, for a read, the data read."""
        self.memory.write(self.header.addr, v.virtio_blk_outhdr.pack(req_type, 0, sector))
        self.memory.write(self.status.addr, b"\xff")
        if req_type == v.VIRTIO_BLK_T_OUT:
            self.memory.write(self.data_out.addr, data)
            chain = [self.header, self.data_out, self.status]
        else:
            chain = [self.header, self.data_in, self.status]
        head = self.ring.add_chain(chain)
        self.channel.kick(0)
        ((done, _),) = self.channel.wait_used(0, 1)
        assert done == head
        status = self.memory.read(self.status.addr, 1)[0]
        if req_type == v.VIRTIO_BLK_T_IN:
            return status, self.memory.read(self.data_in.addr, self.block)
        return status, b""

    def write(self, sector: int, data: bytes) -> int:
        return self.request(v.VIRTIO_BLK_T_OUT, sector, data)[0]

    def read(self, sector: int) -> tuple[int, bytes]:
        return self.request(v.VIRTIO_BLK_T_IN, sector)

    def write_and_check(self, sector: int, data: bytes) -> None:
        assert self.write(sector, data) == OK
        assert self.read(sector) == (OK, data)


class Load(threading.Thread):
    """Writes blocks and reads them back, one request at a time, until halted; any
    failure or wrong byte stops it and is kept in :attr:`error`."""

    def __init__(self, driver: Driver, blocks: int = 64) -> None:
        super().__init__(name="fake-driver-load", daemon=True)
        self.driver = driver
        self.blocks = blocks
        self.done = 0  # write + read-back pairs
        self.slowest = 0.0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        sectors = self.driver.block // 512
        try:
            while not self.halt.is_set():
                started = time.monotonic()
                n = self.done
                self.driver.write_and_check((n % self.blocks) * sectors,
                                            pattern(self.driver.block, n))
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.done += 1
        except BaseException as exc:
            self.error = exc

    def wait_for(self, more: int, timeout: float = 10.0) -> None:
        """Wait until ``more`` pairs beyond the current count completed."""
        target = self.done + more
        deadline = time.monotonic() + timeout
        while self.done < target:
            assert self.error is None, f"the load failed: {self.error!r}"
            assert time.monotonic() < deadline, f"I/O stalled at {self.done} pairs"
            time.sleep(0.005)

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the load did not stop"
        assert self.error is None, f"the load failed: {self.error!r}"
        assert self.slowest < 5.0, f"a request took {self.slowest:.2f} s"


def capacity(fake: FakeVduse, name: str) -> int:
    """The capacity in the device's config space (offset 0, 512-byte sectors), in bytes."""
    (sectors,) = struct.unpack_from("<Q", fake.channels[name].config, 0)
    return int(sectors) * 512


def image(path: Path, size: int, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(data)
    return path


def memory_export(export_id: str, size: str = "1M", **options: Any) -> dict[str, Any]:
    return {"id": export_id, "backend": "memory", "options": {"size": size},
            "attach": "none", **options}


# -- commands and their replies ---------------------------------------------------------


def test_query_exports_lists_the_serve_export_by_its_name(
        serve: Callable[..., Daemon]) -> None:
    daemon = serve("--num-queues", "2", "--serial", "s1", "memory", "size=4M")
    with daemon.client() as client:
        assert client.greeting is not None and "pyvduse" in client.greeting["QMP"]["version"]
        (export,) = client.execute("query-exports")
        assert client.execute("query-exports", id=NAME) == [export]
        names = [c["name"] for c in client.execute("query-commands")]
        assert names == sorted(COMMANDS)
    log = str(daemon.run_dir / f"{NAME}.inflight")
    assert {key: export[key] for key in ("id", "backend", "size", "logical-block-size",
                                         "num-queues", "queue-size", "readonly", "attached",
                                         "driver-ok", "failed", "recovered", "resubmitted",
                                         "inflight-log")} == {
        "id": NAME, "backend": "memory", "size": SERVE_SIZE, "logical-block-size": 512,
        "num-queues": 2, "queue-size": 256, "readonly": False, "attached": None,
        "driver-ok": False, "failed": None, "recovered": False, "resubmitted": 0,
        "inflight-log": log}
    assert export["spec"]["backend-options"] == ["size=4M"]
    assert export["spec"]["serial"] == "s1" and export["spec"]["attach"] == "none"
    assert daemon.logs() == [f"{NAME}.inflight"]
    Driver(daemon.fake, NAME)
    assert daemon.execute("query-exports")[0]["driver-ok"] is True
    # the same through pyvduse ctl
    status, out, err = daemon.ctl("query-exports", f"id={NAME}")
    assert (status, err) == (0, "")
    assert json.loads(out)[0]["id"] == NAME
    status, out, err = daemon.ctl("--human", "query-exports")
    assert status == 0, err
    header, row = out.splitlines()
    assert header.split()[:4] == ["id", "backend", "size", "logical-block-size"]
    assert row.split()[:4] == [NAME, "memory", str(SERVE_SIZE), "512"]


def test_export_add_memory_and_file_exports_with_options_as_object_and_list(
        serve: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = serve("memory", "size=4M")
    content = pattern(64 * 1024, 3)
    disk = image(tmp_path / "disk.img", 2 * MiB, content)
    fake = daemon.fake
    with daemon.client() as client:
        mem = client.execute("export-add", memory_export(
            "dc1", "2M", **{"num-queues": 2, "queue-size": 64, "serial": "mem1",
                            "io-threads": 0}))
        assert (mem["id"], mem["backend"], mem["size"], mem["num-queues"], mem["queue-size"],
                mem["readonly"]) == ("dc1", "memory", 2 * MiB, 2, 64, False)
        assert mem["spec"]["backend-options"] == ["size=2M"]
        assert mem["spec"]["serial"] == "mem1" and mem["spec"]["io-threads"] == 0
        # options as a list of key=value strings; export options as strings and booleans
        ro = client.execute("export-add", {
            "id": "dc2", "backend": "file", "options": [f"path={disk}"], "attach": "none",
            "readonly": True, "logical-block-size": "4096", "num-queues": "1"})
        assert (ro["backend"], ro["size"], ro["readonly"], ro["logical-block-size"]) == (
            "file", 2 * MiB, True, 4096)
        # a backend option as a boolean becomes on/off
        rw = client.execute("export-add", {
            "id": "dc3", "backend": "file", "options": {"path": str(disk), "direct": False},
            "attach": "none"})
        assert rw["spec"]["backend-options"] == [f"path={disk}", "direct=off"]
        assert rw["readonly"] is False
        assert [e["id"] for e in client.execute("query-exports")] == [NAME, "dc1", "dc2", "dc3"]
    assert sorted(fake.devices) == [NAME, "dc1", "dc2", "dc3"]
    assert fake.devices["dc1"].vq_num == 2
    assert fake.devices["dc2"].features & (1 << v.VIRTIO_BLK_F_RO)
    assert not fake.devices["dc3"].features & (1 << v.VIRTIO_BLK_F_RO)
    assert daemon.logs() == sorted(f"{n}.inflight" for n in (NAME, "dc1", "dc2", "dc3"))
    # the file export serves the file
    driver = Driver(fake, "dc2")
    assert driver.read(8) == (OK, content[4096:8192])
    assert driver.write(8, bytes(4096)) != OK  # read-only
    # pyvduse ctl: key=value pairs and --json together
    status, out, err = daemon.ctl("--json", '{"options": {"size": "1M"}}', "export-add",
                                  "id=dc4", "backend=memory", "attach=none", "num-queues=2")
    assert (status, err) == (0, "")
    added = json.loads(out)
    assert (added["id"], added["size"], added["num-queues"]) == ("dc4", MiB, 2)
    assert fake.devices["dc4"].vq_num == 2


def test_export_del_removes_the_device_and_its_log(serve: Callable[..., Daemon]) -> None:
    daemon = serve("memory", "size=4M")
    fake = daemon.fake
    with daemon.client() as client:
        client.execute("export-add", memory_export("dc1"))
        client.execute("export-add", memory_export("dc2"))
        driver = Driver(fake, "dc1")  # a running driver does not keep it
        driver.write_and_check(0, pattern(4096, 1))
        assert client.execute("export-del", id="dc1") == {}
        assert [e["id"] for e in client.execute("query-exports")] == [NAME, "dc2"]
        assert "dc1" not in fake.devices and fake.destroyed == ["dc1"]
        assert daemon.logs() == [f"{NAME}.inflight", "dc2.inflight"]
        # the id can be used again: a new device
        client.execute("export-add", memory_export("dc1", "2M"))
        assert client.execute("query-exports", id="dc1")[0]["size"] == 2 * MiB
    status, out, err = daemon.ctl("export-del", "id=dc2")
    assert (status, json.loads(out), err) == (0, {}, "")
    assert sorted(fake.devices) == [NAME, "dc1"] and fake.destroyed == ["dc1", "dc2"]
    assert daemon.logs() == [f"{NAME}.inflight", "dc1.inflight"]


def test_export_resize_grows_a_file_export_and_tells_the_driver(
        serve: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = serve("memory", "size=4M")
    fake = daemon.fake
    disk = image(tmp_path / "grow.img", MiB)
    daemon.execute("export-add", {"id": "dc1", "backend": "file",
                                  "options": {"path": str(disk)}, "attach": "none"})
    driver = Driver(fake, "dc1")
    channel = fake.channels["dc1"]
    assert capacity(fake, "dc1") == MiB and channel.config_irqs == 0
    assert driver.read(MiB // 512)[0] != OK  # beyond the end
    with daemon.client() as client:
        assert client.execute("export-resize", id="dc1", size="3M") == {"id": "dc1",
                                                                         "size": 3 * MiB}
        assert capacity(fake, "dc1") == 3 * MiB
        assert channel.config_irqs == 1
        assert os.path.getsize(disk) == 3 * MiB
        assert client.execute("query-exports", id="dc1")[0]["size"] == 3 * MiB
        # the grown space is served
        driver.write_and_check(5 * MiB // 1024, pattern(4096, 9))  # at 2.5 MiB
        # shrinking over that data is refused and leaves the size as it was
        with pytest.raises(CommandError) as refused:
            client.execute("export-resize", id="dc1", size=MiB)
        assert refused.value.error_class == "GenericError"
        assert "shrink=true" in refused.value.desc
        assert capacity(fake, "dc1") == 3 * MiB and os.path.getsize(disk) == 3 * MiB
        assert client.execute("query-exports", id="dc1")[0]["size"] == 3 * MiB
        assert driver.read(5 * MiB // 1024) == (OK, pattern(4096, 9))
        # ... unless asked for
        assert client.execute("export-resize", id="dc1", size=MiB, shrink=True) == {
            "id": "dc1", "size": MiB}
        assert capacity(fake, "dc1") == MiB and os.path.getsize(disk) == MiB
        assert driver.read(MiB // 512)[0] != OK
    irqs = channel.config_irqs
    status, out, err = daemon.ctl("export-resize", "id=dc1", f"size={2 * MiB}")
    assert (status, json.loads(out), err) == (0, {"id": "dc1", "size": 2 * MiB}, "")
    assert capacity(fake, "dc1") == 2 * MiB and channel.config_irqs == irqs + 1
    # the served export resizes too (memory)
    assert daemon.execute("export-resize", {"id": NAME, "size": 8 * MiB})["size"] == 8 * MiB
    assert capacity(fake, NAME) == 8 * MiB


def test_query_stats_counts_the_requests_a_driver_made(serve: Callable[..., Daemon]) -> None:
    daemon = serve("--num-queues", "2", "memory", "size=4M")
    daemon.execute("export-add", memory_export("dc1"))
    before = daemon.execute("query-stats")
    assert [(e["id"], e["requests"]) for e in before["exports"]] == [(NAME, 0), ("dc1", 0)]
    driver = Driver(daemon.fake, NAME)
    for n in range(10):
        driver.write_and_check(n * 8, pattern(4096, n))
    status, out, err = daemon.ctl("query-stats")
    assert status == 0, err
    served, other = json.loads(out)["exports"]
    assert served["id"] == NAME and served["requests"] == 20
    assert served["uptime"] > 0
    assert served["queues"] == [
        {"index": 0, "requests": 20, "inflight": 0, "bad-chains": 0, "running": True},
        {"index": 1, "requests": 0, "inflight": 0, "bad-chains": 0, "running": True}]
    assert other["id"] == "dc1" and other["requests"] == 0
    assert [q["running"] for q in other["queues"]] == [False]  # no driver there
    for n in range(5):
        driver.write_and_check(n * 8, pattern(4096, n + 100))
    assert daemon.execute("query-stats")["exports"][0]["requests"] == 30


def test_quit_stops_the_daemon_and_leaves_nothing(serve: Callable[..., Daemon]) -> None:
    daemon = serve("memory", "size=4M")
    fake = daemon.fake
    daemon.execute("export-add", memory_export("dc1"))
    driver = Driver(fake, NAME)
    driver.write_and_check(0, pattern(4096, 0))
    with daemon.client() as watcher:
        status, out, err = daemon.ctl("quit")
        assert (status, json.loads(out), err) == (0, {}, "")
        assert daemon.wait() == 0
        with pytest.raises(ControlError, match="closed the connection"):
            watcher.next_event(timeout=5)  # the daemon closed every connection
    assert fake.devices == {}
    assert sorted(fake.destroyed) == [NAME, "dc1"]
    assert daemon.logs() == []
    assert not daemon.sock.exists()
    status, _, err = daemon.ctl("query-exports")
    assert status == 1 and "cannot connect" in err


# -- error replies ----------------------------------------------------------------------

RESIZE = "export-resize"
ADD = "export-add"
MEM = {"backend": "memory", "options": {"size": "1M"}, "attach": "none"}

ERRORS: dict[str, tuple[str, dict[str, Any], str]] = {
    # unknown ids
    "del-unknown-id": ("export-del", {"id": "nosuch"}, "no export with id 'nosuch'"),
    "resize-unknown-id": (RESIZE, {"id": "nosuch", "size": MiB}, "no export with id 'nosuch'"),
    "query-unknown-id": ("query-exports", {"id": "nosuch"}, "no export with id 'nosuch'"),
    # adding
    "duplicate-id": (ADD, {"id": NAME, **MEM}, f"an export with id '{NAME}' exists already"),
    "missing-id": (ADD, MEM, "'id' (a string: the device name) is required"),
    "empty-id": (ADD, {"id": "", **MEM}, "'id' (a string: the device name) is required"),
    "missing-backend": (ADD, {"id": "x1", "options": {"size": "1M"}, "attach": "none"},
                        "'backend' (a string: file, memory, null, nbd, rbd, python) is required"),
    "unknown-backend": (ADD, {"id": "x1", "backend": "tape", "attach": "none"},
                        "unknown backend 'tape' (known: file, memory, nbd, null, python, rbd)"),
    "unknown-backend-option": (ADD, {**MEM, "id": "x1", "options": {"size": "1M",
                                                                    "colour": "blue"}},
                               "colour"),
    "bad-backend-option": (ADD, {**MEM, "id": "x1", "options": {"size": "lots"}}, "lots"),
    "missing-backend-option": (ADD, {**MEM, "id": "x1", "options": {}}, "size"),
    "missing-file": (ADD, {"id": "x1", "backend": "file", "attach": "none",
                           "options": {"path": "/nonexistent/disk.img"}},
                     "no such file: /nonexistent/disk.img"),
    "unknown-export-option": (ADD, {"id": "x1", **MEM, "colour": "blue"},
                              "unknown argument(s): colour"),
    "bad-export-option": (ADD, {"id": "x1", **MEM, "num-queues": "many"},
                          "'num-queues': 'many' is not a number"),
    "zero-queues": (ADD, {"id": "x1", **MEM, "num-queues": 0},
                    "'num-queues': '0' must be positive"),
    "bad-attach": (ADD, {"id": "x1", **MEM, "attach": "sideways"},
                   "'attach': 'sideways' is not one of virtio, vhost, none"),
    "bad-queue-size": (ADD, {"id": "x1", **MEM, "queue-size": 100}, "queue size 100"),
    "memory-size-not-a-block-multiple": (ADD, {**MEM, "id": "x1", "options": {"size": "1000"}},
                                         "multiple of 512"),
    # types
    "id-not-a-string": (ADD, {"id": 5, **MEM}, "'id' (a string: the device name) is required"),
    "export-option-a-list": (ADD, {"id": "x1", **MEM, "num-queues": [2]},
                             "'num-queues' must be a string, a number or a boolean"),
    "options-a-number": (ADD, {**MEM, "id": "x1", "options": 5},
                         "'options' must be an object of backend options"),
    "options-a-mixed-list": (ADD, {**MEM, "id": "x1", "options": ["size=1M", 5]},
                             "'options' must be an object of backend options"),
    "backend-option-a-list": (ADD, {**MEM, "id": "x1", "options": {"size": [1]}},
                              "backend option 'size' must be a string or a number"),
    "del-id-a-number": ("export-del", {"id": 5},
                        "Invalid parameter type for 'id', expected: string"),
    "del-missing-id": ("export-del", {}, "Parameter 'id' is missing"),
    "del-unexpected": ("export-del", {"id": NAME, "force": True},
                       "Parameter 'force' is unexpected"),
    "resize-missing-size": (RESIZE, {"id": NAME}, "Parameter 'size' is missing"),
    "resize-size-a-list": (RESIZE, {"id": NAME, "size": [MiB]},
                           "Invalid parameter type for 'size', expected: integer or string"),
    "resize-size-a-boolean": (RESIZE, {"id": NAME, "size": True},
                              "Invalid parameter type for 'size', expected: integer or string"),
    "resize-shrink-a-string": (RESIZE, {"id": NAME, "size": MiB, "shrink": "yes"},
                               "Invalid parameter type for 'shrink', expected: boolean"),
    "query-id-a-number": ("query-exports", {"id": 1},
                          "Invalid parameter type for 'id', expected: string"),
    "stats-unexpected": ("query-stats", {"id": NAME}, "Parameter 'id' is unexpected"),
    "quit-unexpected": ("quit", {"now": True}, "Parameter 'now' is unexpected"),
    # sizes
    "resize-not-a-block-multiple": (RESIZE, {"id": NAME, "size": 1000},
                                    f"{NAME}: size 1000 is not a positive multiple of the "
                                    "logical block size 512"),
    "resize-4k-blocks": (RESIZE, {"id": "ro4k", "size": 2 * MiB + 512},
                         "is not a positive multiple of the logical block size 4096"),
    "resize-zero": (RESIZE, {"id": NAME, "size": 0}, "'size' must be positive"),
    "resize-negative": (RESIZE, {"id": NAME, "size": -512}, "'size' must be positive"),
    "resize-not-a-size": (RESIZE, {"id": NAME, "size": "lots"}, "'size': 'lots' is not a size"),
    "resize-shrink-over-data": (RESIZE, {"id": NAME, "size": MiB}, "shrink=true"),
    # backends that cannot resize
    "resize-read-only-file": (RESIZE, {"id": "ro4k", "size": 4 * MiB},
                              "ro4k: the file backend cannot be resized"),
    "resize-python-backend": (RESIZE, {"id": "py", "size": 4 * MiB},
                              "py: the Fixed backend cannot be resized"),
}

FIXED_BACKEND = """
from pyvduse.backends import Backend

class Fixed(Backend):
    def size(self):
        return 1 << 20
    def read(self, offset, buf):
        buf[:] = bytes(len(buf))
"""


@pytest.mark.parametrize("case", ERRORS)
def test_every_error_is_a_reply_that_changes_nothing(
        serve: Callable[..., Daemon], tmp_path: Path, case: str) -> None:
    command, arguments, desc = ERRORS[case]
    daemon = serve("memory", "size=4M")
    fake = daemon.fake
    script = tmp_path / "fixed.py"
    script.write_text(textwrap.dedent(FIXED_BACKEND))
    disk = image(tmp_path / "ro.img", 2 * MiB)
    driver = Driver(fake, NAME)
    driver.write_and_check(3 * MiB // 512, pattern(4096, 5))  # data near the end
    with daemon.client() as client:
        client.execute(ADD, {"id": "ro4k", "backend": "file", "attach": "none",
                             "logical-block-size": 4096,
                             "options": {"path": str(disk), "readonly": "on"}})
        client.execute(ADD, {"id": "py", "backend": "python", "attach": "none",
                             "options": {"script": str(script)}})
        exports = client.execute("query-exports")
        devices = {name: spec.vq_num for name, spec in fake.devices.items()}
        logs = daemon.logs()
        irqs = fake.channels[NAME].config_irqs
        with pytest.raises(CommandError) as error:
            client.execute(command, arguments)
        assert error.value.error_class == "GenericError"
        assert desc in error.value.desc
        # nothing changed, and the connection and the device go on
        assert client.execute("query-exports") == exports
        assert {name: spec.vq_num for name, spec in fake.devices.items()} == devices
        assert daemon.logs() == logs
        assert capacity(fake, NAME) == SERVE_SIZE
        # a refused shrink announced the smaller size, then the old one again
        shrink = case == "resize-shrink-over-data"
        assert fake.channels[NAME].config_irqs == irqs + (2 if shrink else 0)
        assert os.path.getsize(disk) == 2 * MiB
    assert driver.read(3 * MiB // 512) == (OK, pattern(4096, 5))
    driver.write_and_check(0, pattern(4096, 6))
    assert fake.destroyed == []


def test_errors_through_pyvduse_ctl_and_unknown_commands(serve: Callable[..., Daemon]) -> None:
    daemon = serve("memory", "size=4M")
    status, out, err = daemon.ctl("export-del", "id=nosuch")
    assert (status, out) == (1, "")
    assert err == "pyvduse ctl: error: GenericError: no export with id 'nosuch'\n"
    status, out, err = daemon.ctl("export-resize", f"id={NAME}", "size=1000")
    assert status == 1 and "not a positive multiple of the logical block size 512" in err
    status, out, err = daemon.ctl("export-add", "id=x1", "backend=memory")
    assert status == 1 and "backend 'memory'" in err and "size" in err
    status, out, err = daemon.ctl("no-such-command")
    assert status == 1
    assert err == ("pyvduse ctl: error: CommandNotFound: The command no-such-command has "
                   "not been found\n")
    assert [e["id"] for e in daemon.execute("query-exports")] == [NAME]
    assert list(daemon.fake.devices) == [NAME]


# -- events -----------------------------------------------------------------------------


def test_events_reach_every_negotiated_client(serve: Callable[..., Daemon]) -> None:
    daemon = serve("memory", "size=4M")
    late = daemon.client()
    late.connect(negotiate=False)
    with daemon.client() as actor, daemon.client() as watcher, contextlib.closing(late):
        before = time.time()
        actor.execute(ADD, memory_export("dc1"))
        event = watcher.next_event(timeout=5)
        assert event is not None
        assert (event["event"], event["data"]) == ("EXPORT_ADDED", {"id": "dc1"})
        stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
        assert before - 1 <= stamp <= time.time() + 1
        # the client that caused it got it too, before its reply
        assert [e["event"] for e in actor.events] == ["EXPORT_ADDED"]
        actor.execute(RESIZE, id="dc1", size=2 * MiB)
        event = watcher.next_event(timeout=5)
        assert event is not None
        assert (event["event"], event["data"]) == ("EXPORT_RESIZED",
                                                   {"id": "dc1", "size": 2 * MiB})
        actor.execute("export-del", id="dc1")
        event = watcher.next_event(timeout=5)
        assert event is not None
        assert (event["event"], event["data"]) == ("EXPORT_DELETED", {"id": "dc1"})
        # a failed command is no event
        with pytest.raises(CommandError):
            actor.execute("export-del", id="dc1")
        with pytest.raises(CommandError):
            actor.execute(ADD, {"id": "dc2", **MEM, "queue-size": 100})
        assert watcher.next_event(timeout=0.3) is None
        # nothing reached the client that had not negotiated; it gets the next ones
        late.execute("qmp_capabilities")
        assert list(late.events) == []
        actor.execute(RESIZE, id=NAME, size=8 * MiB)
        for client in (watcher, late):
            event = client.next_event(timeout=5)
            assert event is not None
            assert (event["event"], event["data"]) == ("EXPORT_RESIZED",
                                                       {"id": NAME, "size": 8 * MiB})


NOTICING_BACKEND = """
from pyvduse.backends import Backend

class Noticing(Backend):
    def size(self):
        return 1 << 20
    def read(self, offset, buf):
        self.emit_event("BACKEND_NOTICE", {"offset": offset, "id": "spoofed"})
        buf[:] = bytes(len(buf))
"""


def test_a_backends_own_events_reach_clients_with_the_export_id(
        serve: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = serve("memory", "size=4M")
    script = tmp_path / "noticing.py"
    script.write_text(textwrap.dedent(NOTICING_BACKEND))
    with daemon.client() as watcher:
        # io-threads (the default, 2) wraps this synchronous backend in a thread pool,
        # which must hand the event sink on to it
        daemon.execute(ADD, {"id": "py1", "backend": "python", "attach": "none",
                             "io-threads": 2, "options": {"script": str(script)}})
        added = watcher.next_event(timeout=5)
        assert added is not None and added["event"] == "EXPORT_ADDED"
        driver = Driver(daemon.fake, "py1")
        assert driver.read(16) == (OK, bytes(4096))
        event = watcher.next_event(timeout=5)
        assert event is not None
        assert (event["event"], event["data"]) == ("BACKEND_NOTICE",
                                                   {"id": "py1", "offset": 8192})


def test_the_thread_pool_hands_the_event_sink_to_the_backend_it_wraps() -> None:
    inner = MemoryBackend(MiB)
    pool = ThreadPoolBackend(inner, 1)
    got: list[tuple[str, dict[str, Any]]] = []
    try:
        assert pool.event_sink is None
        pool.event_sink = lambda event, data: got.append((event, data))
        assert inner.event_sink is pool.event_sink
        inner.emit_event("BACKEND_NOTICE", {"n": 1})
        pool.emit_event("BACKEND_NOTICE", {"n": 2})
        assert got == [("BACKEND_NOTICE", {"n": 1}), ("BACKEND_NOTICE", {"n": 2})]
        pool.event_sink = None
        inner.emit_event("BACKEND_NOTICE")  # no sink: nowhere, no error
        assert inner.event_sink is None and len(got) == 2
    finally:
        pool.close()


class _NoVdpa:
    """Stands in for the netlink client: detaching needs no kernel here."""

    def __enter__(self) -> _NoVdpa:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def test_detached_behind_the_daemons_back_is_reported_but_not_an_export_del_under_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeVduse()
    events: list[tuple[str, dict[str, Any]]] = []
    registry = ExportRegistry(kernel=fake, emit=lambda event, data: events.append((event,
                                                                                    data)))
    monkeypatch.setattr(export_module, "VdpaClient", _NoVdpa)
    monkeypatch.setattr(export_module, "detach", lambda *args, **kwargs: None)
    kernel_view: dict[str, bool] = {}  # vdpa devices present, as sysfs would say
    racing: list[str] = []

    def find_attached(name: str) -> AttachedDevice | None:
        if name in racing:  # export-del, on another thread, got there during the look
            registry.remove(name)
            kernel_view[name] = False
        if kernel_view.get(name):
            return AttachedDevice(name, "virtio_vdpa", f"/dev/{name}")
        return None

    monkeypatch.setattr(registry_module, "find_attached", find_attached)
    try:
        for name in ("dt0", "dt1"):
            registry.add(ExportSpec(id=name, backend="memory", backend_options=("size=1M",),
                                    attach="none", inflight_log=str(tmp_path / name)))
            registry.get(name).attached = AttachedDevice(name, "virtio_vdpa", f"/dev/{name}")
            kernel_view[name] = True
        registry.check()
        assert events == []
        kernel_view["dt0"] = False  # 'vdpa dev del dt0' by someone else
        registry.check()
        registry.check()
        assert events == [("EXPORT_DETACHED", {"id": "dt0"})]  # once
        racing.append("dt1")
        registry.check()
        assert "dt1" not in registry
        assert events == [("EXPORT_DETACHED", {"id": "dt0"})]
    finally:
        registry.close()
        fake.memory.close()
    assert sorted(fake.destroyed) == ["dt0", "dt1"]


# -- hostile clients while the served export does I/O -----------------------------------


def raw_client(path: Path) -> tuple[socket.socket, io.BufferedReader]:
    """A connection that speaks bytes; returns it and a line reader over it (greeting read)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    reader = sock.makefile("rb")
    assert b'"QMP"' in reader.readline()
    return sock, reader


def test_hostile_clients_disturb_neither_io_nor_other_clients(
        serve: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A lower output limit than the default 1 MiB, so that a client that never reads
    # is dropped after a few hundred events.
    limit = 64 * 1024
    monkeypatch.setattr(control_module, "ControlServer",
                        functools.partial(ControlServer, max_output_bytes=limit))
    daemon = serve("memory", "size=4M")
    daemon.execute(ADD, memory_export("ev"))
    load = Load(Driver(daemon.fake, NAME))
    load.start()
    try:
        load.wait_for(20)

        # garbage: each line is answered with an error, and the connection goes on
        sock, reader = raw_client(daemon.sock)
        with sock, reader:
            lines = [b"\xff\xfe\x00garbage", b"not json", b"[1, 2]", b'{"execute": 5}',
                     b'{"execute": "quit", "extra": 1}', b"[" * 60000,
                     b"x" * (70 * 1024), b'{"execute": "query-exports"}', b"{}"]
            sock.sendall(b"\n".join(lines) + b"\n")
            replies = [json.loads(reader.readline()) for _ in lines]
            assert all(set(r) == {"error"} for r in replies), replies
            assert "JSON parse error" in replies[0]["error"]["desc"]
            assert replies[2]["error"]["desc"] == "QMP input must be a JSON object"
            assert replies[6]["error"]["desc"].startswith("request line longer than")
            assert replies[7]["error"]["class"] == "CommandNotFound"  # not negotiated yet
            sock.sendall(b'{"execute": "qmp_capabilities"}\n'
                         b'{"execute": "query-exports", "id": 7}\n')
            assert json.loads(reader.readline()) == {"return": {}}
            reply = json.loads(reader.readline())
            assert reply["id"] == 7 and [e["id"] for e in reply["return"]] == [NAME, "ev"]
        assert daemon.execute("query-stats")["exports"][0]["requests"] > 0

        # clients leaving in the middle of a line, of a long line, before the greeting
        for tail in (b'{"execute": "qmp_capabilities"}\n{"execute": "qui',
                     b"y" * (100 * 1024), b""):
            sock, reader = raw_client(daemon.sock)
            sock.sendall(tail)
            reader.close()
            sock.close()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(daemon.sock))
        silent.close()  # gone before the greeting could be read
        time.sleep(0.2)
        assert daemon.thread.is_alive()  # the half-sent quit did not run
        assert [e["id"] for e in daemon.execute("query-exports")] == [NAME, "ev"]

        # a client that never reads while events flow is dropped; nobody else notices
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(str(daemon.sock))
        deaf.sendall(b'{"execute": "qmp_capabilities"}\n')
        time.sleep(0.1)  # negotiated before the events start
        done_before = load.done
        sent = 0
        with daemon.client() as actor:  # it reads: it gets every event
            started = time.monotonic()
            while sent < 3000:
                actor.execute(RESIZE, id="ev", size=(1 + sent % 2) * MiB)
                sent += 1
            took = time.monotonic() - started
            assert len(actor.events) == sent
        deaf.settimeout(10)
        received = b""
        while chunk := deaf.recv(1 << 16):  # the daemon closed it: EOF after its backlog
            received += chunk
        deaf.close()
        assert b"EXPORT_RESIZED" in received
        assert received.count(b"EXPORT_RESIZED") < sent
        assert load.done > done_before, f"no I/O completed in {took:.1f} s of events"
        load.wait_for(20)
        assert daemon.thread.is_alive()
        assert [e["id"] for e in daemon.execute("query-exports")] == [NAME, "ev"]
    finally:
        load.finish()
    assert f"more than {limit} bytes of output not taken by the client" in \
        capsys.readouterr().err
    stats = daemon.execute("query-stats")["exports"][0]
    assert stats["requests"] == 2 * load.done  # a write and its read-back per pair
    assert stats["queues"][0]["bad-chains"] == 0
