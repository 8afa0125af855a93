"""The nbd backend on the compiled data path: each queue's own connection, in C.

Real servers (nbdkit) and the scripted one of test_nbd_backend, on the fake kernel
with the device's queues served natively (as ``--datapath auto`` does for an nbd
export whose server allows several connections). Covered: bytes moved both ways on
two queues, flushes, the choice (no native target without NBD_FLAG_CAN_MULTI_CONN),
error replies reported by the Python client, the server killed with requests in
flight (served again by the Python client once it is back, then the native
connection comes back too), and a server that breaks the protocol on the native
connection (its requests go to the Python client; nothing is written twice or
anywhere else).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_nbd_backend as nbd_tests
from test_device import Rig, wait_until
from test_nbd_backend import (
    FAST,
    IOERR,
    OK,
    RESULT_OK,
    T_FLUSH,
    T_IN,
    T_OUT,
    ScriptedServer,
    Start,
    data,
    image,
)

from pyvduse import native
from pyvduse.backends.nbd import NbdBackend
from pyvduse.queue_worker import QueueWorker

# The NBD servers' fixtures (nbdkit and qemu-nbd, the scripted server).
sockdir = nbd_tests.sockdir
servers = nbd_tests.servers
scripted = nbd_tests.scripted

requires_native = pytest.mark.skipif(
    not native.available() and os.environ.get("PYVDUSE_REQUIRE_NATIVE") != "1",
    reason="the compiled data path is not built here")


def native_rig(backend: NbdBackend, name: str) -> Rig:
    """A started device whose queues the compiled data path serves."""
    rig = Rig(name=name, backend=backend)
    rig.dev.model.serve_natively()
    assert rig.dev.model.native is not None, "the nbd backend offered no native target"
    assert rig.ch.start() == RESULT_OK
    return rig


def workers(rig: Rig) -> list[QueueWorker]:
    return [rig.dev.workers[q] for q in sorted(rig.dev.workers)]


def fast_of(worker: QueueWorker) -> native.FastPath:
    ring = worker._native
    assert ring is not None, f"{worker.name}: not served natively"
    return ring.fast


def write_and_read_back(rig: Rig, seed: int) -> list[tuple[int, bytes]]:
    """Batches of writes, a flush and reads on both queues; every status OK and every
    byte read back as written. Returns (sector, payload) of each write."""
    written = []
    for q in (0, 1):
        reqs, sector = [], 2048 * q
        for n, size in enumerate([512, 4096, 4096, 65536, 8192, 4096, 131072, 1024]):
            payload = data(size, seed + 100 * q + n)
            reqs.append((T_OUT, sector, payload, 0))
            written.append((sector, payload))
            sector += size // 512
        writes = rig.batch(q, reqs)
        assert len(rig.ch.wait_used(q, len(writes))) == len(writes)
        assert [rig.status(w) for w in writes] == [OK] * len(writes)
        assert rig.run(q, T_FLUSH)[0] == OK
    for q in (0, 1):
        mine = written[8 * q:8 * q + 8]
        reads = rig.batch(q, [(T_IN, sector, b"", len(payload)) for sector, payload in mine])
        rig.ch.wait_used(q, len(reads))
        for req, (_, payload) in zip(reads, mine, strict=True):
            assert (rig.status(req), rig.data(req)) == (OK, payload)
    return written


@requires_native
def test_each_queue_serves_over_its_own_connection_in_c(servers: Start,
                                                        sockdir: Path) -> None:
    disk = image(sockdir)
    server = servers("nbdkit", "file", str(disk))
    backend = NbdBackend(server.url, **FAST)
    rig = native_rig(backend, "nn0")
    try:
        written = write_and_read_back(rig, 1)
        content = disk.read_bytes()
        for sector, payload in written:
            assert content[sector * 512:sector * 512 + len(payload)] == payload
        for worker in workers(rig):
            fast = fast_of(worker)
            assert fast.engine_error == "" and fast.engine_broken == ""
            # All but the first request of each queue (it taught the mapping) went out
            # in C: 8 writes, a flush and 8 reads.
            assert fast.staged >= 16
            assert fast.pending == 0
    finally:
        rig.close()
        backend.close()


def test_no_native_target_without_multi_conn(servers: Start) -> None:
    server = servers("nbdkit", "--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable")
    backend = NbdBackend(server.url, **FAST)
    try:
        assert backend.native_target() is None
        why = native.choose("auto", None, "e0") if native.available() else "python"
        assert why.startswith("python")
    finally:
        backend.close()


@requires_native
def test_error_replies_are_reported_by_the_python_client(servers: Start,
                                                         sockdir: Path) -> None:
    """A request the server fails goes back to the Python path, which asks again and
    reports the error; the native connection goes on."""
    trigger = sockdir / "fail"
    server = servers("nbdkit", "--filter=error", "memory", "1M", "error-rate=1",
                     f"error-file={trigger}")
    backend = NbdBackend(server.url, **FAST)
    rig = native_rig(backend, "nn1")
    try:
        assert rig.run(0, T_OUT, 8, b"a" * 4096)[0] == OK  # teaches the mapping
        fast = fast_of(workers(rig)[0])
        staged = fast.staged
        trigger.touch()
        assert rig.run(0, T_OUT, 8, b"d" * 4096)[0] == IOERR
        assert rig.run(0, T_IN, 8, b"", 4096)[0] == IOERR
        assert fast.staged == staged + 2  # tried in C first
        trigger.unlink()
        assert rig.run(0, T_OUT, 8, b"d" * 4096)[0] == OK
        assert rig.run(0, T_IN, 8, b"", 4096)[:2] == (OK, b"d" * 4096)
        assert fast.staged == staged + 4
        assert fast.engine_broken == ""
    finally:
        rig.close()
        backend.close()


@requires_native
def test_server_killed_mid_io_loses_nothing_and_the_native_connection_comes_back(
        servers: Start, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = image(sockdir)
    server = servers("nbdkit", "--filter=delay", "file", str(disk), "delay-write=1",
                     "delay-read=1")
    fast_argv = [arg for arg in server.argv if not arg.startswith(("--filter=delay", "delay-"))]
    caplog.set_level(logging.INFO, logger="pyvduse.native")
    backend = NbdBackend(server.url, **FAST)
    rig = native_rig(backend, "nn2")
    try:
        assert rig.run(0, T_OUT, 0, b"x" * 512)[0] == OK  # teaches the mapping
        fast = fast_of(workers(rig)[0])
        payloads = [data(65536, 50 + n) for n in range(8)]
        writes = rig.batch(0, [(T_OUT, 8 + 128 * n, payload, 0)
                               for n, payload in enumerate(payloads)])
        wait_until(lambda: fast.pending == 8, what="8 requests in the native connection")
        server.kill()
        time.sleep(0.2)
        assert not rig.ch.rings[0].used_idx() > 1  # nothing completed with the server gone
        assert backend.reconnections() == 0
        server.start(fast_argv)
        assert len(rig.ch.wait_used(0, len(writes), timeout=30)) == len(writes)
        assert [rig.status(w) for w in writes] == [OK] * len(writes)
        content = disk.read_bytes()
        for n, payload in enumerate(payloads):
            offset = (8 + 128 * n) * 512
            assert content[offset:offset + 65536] == payload
        # New requests go through the Python client until the queue has a new
        # connection (at most a second later); then through C again.
        staged = fast.staged
        deadline = time.monotonic() + 10
        while fast.staged == staged:
            assert time.monotonic() < deadline, "the native connection did not come back"
            assert rig.run(0, T_IN, 8, b"", 65536)[:2] == (OK, payloads[0])
            time.sleep(0.05)
        assert fast.engine_broken == ""
        # The backend's own connection and the queue's, each opened again once.
        assert backend.reconnections() == 2
    finally:
        rig.close()
        backend.close()
    assert "native NBD connection is gone" in caplog.text
    assert "native NBD connection is back" in caplog.text


@requires_native
@pytest.mark.parametrize(("how", "why"), [("handle", ", not in flight)"),
                                          ("magic", "(bad reply magic 0x12345678)")])
def test_a_protocol_violation_on_the_native_connection_loses_nothing(
        how: str, why: str, scripted: Callable[..., ScriptedServer],
        caplog: pytest.LogCaptureFixture) -> None:
    """The first reply on the first queue's own connection is spoiled (a handle not
    in flight, a bad magic): that connection is dropped, its request is served by the
    Python client, nothing else is written, and the queue gets a new connection."""
    server = scripted(multi_conn=True, sabotage=how, sabotage_connection=2)
    backend = NbdBackend(server.url, **FAST)
    rig = native_rig(backend, "nn3")
    try:
        fast = fast_of(workers(rig)[0])
        server.data[4096:8192] = data(4096, 7)
        before = bytes(server.data)
        assert rig.run(0, T_IN, 8, b"", 4096)[:2] == (OK, data(4096, 7))
        assert fast.staged == 1  # sent in C, answered with garbage, served again by Python
        assert bytes(server.data) == before
        assert rig.run(0, T_OUT, 16, b"w" * 4096)[0] == OK
        # Said at the queue's next turn in Python.
        assert "its native NBD connection is gone (" in caplog.text
        assert why in caplog.text
        assert bytes(server.data[8192:12288]) == b"w" * 4096
        # The Python client's connection, each queue's, and the replacement.
        wait_until(lambda: fast.engine_broken == "", what="a new native connection")
        assert server.connections >= 4
        assert rig.run(0, T_IN, 16, b"", 4096)[:2] == (OK, b"w" * 4096)
    finally:
        rig.close()
        backend.close()
