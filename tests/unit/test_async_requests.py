"""Requests an asynchronous backend completes later: many in flight per queue, completions
out of order and from other threads, resets that do not wait for them, IOTLB updates
that keep them, the
backend contract's failure cases, and ThreadPoolBackend over real backends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from test_device import Rig, pattern, thread_names, wait_until

import pyvduse.device as device_module
import pyvduse.queue_worker as queue_worker_module
from pyvduse.backends.base import AsynchronousBackend, Backend, Done
from pyvduse.backends.file import FileBackend
from pyvduse.backends.memory import MemoryBackend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.errors import BackendError
from pyvduse.testing.conformance import check_backend
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v

MiB = 1 << 20
OK, IOERR = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR
T_IN, T_OUT, T_FLUSH = v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH
RESULT_OK = u.VDUSE_REQ_RESULT_OK


class Held:
    """One request a :class:`GatedBackend` holds until the test finishes it."""

    def __init__(self, op: str, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self.op, self.offset, self.bufs, self.done = op, offset, list(bufs), done


class GatedBackend(Backend):
    """Takes every request asynchronously and holds it: the test decides when (and in which
    order, on which thread, with which outcome) each one finishes."""

    submit_min_bytes = 0

    def __init__(self, size: int = 4 * MiB) -> None:
        self.data = bytearray(size)
        self.held: list[Held] = []
        self.lock = threading.Lock()

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, buf: memoryview) -> None:
        raise AssertionError("a request that should be submitted came synchronously")

    def write(self, offset: int, buf: memoryview) -> None:
        raise AssertionError("a request that should be submitted came synchronously")

    def _hold(self, op: str, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        with self.lock:
            self.held.append(Held(op, offset, bufs, done))

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._hold("read", offset, bufs, done)

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._hold("write", offset, bufs, done)

    def submit_flush(self, done: Done) -> None:
        self._hold("flush", 0, [], done)

    def wait_held(self, count: int) -> list[Held]:
        wait_until(lambda: len(self.held) >= count, what=f"{count} held requests")
        with self.lock:
            taken, self.held = self.held[:count], self.held[count:]
        return taken

    @staticmethod
    def finish(held: Held, data: bytearray, error: BaseException | None = None) -> None:
        """Do the held request's work on ``data`` (unless it fails) and call its ``done``."""
        if error is None:
            offset = held.offset
            for buf in held.bufs:
                if held.op == "read":
                    buf[:] = data[offset:offset + len(buf)]
                else:
                    data[offset:offset + len(buf)] = buf
                offset += len(buf)
        held.done(error)


@pytest.fixture
def gated() -> Iterator[tuple[Rig, GatedBackend]]:
    backend = GatedBackend()
    rig = Rig(name="a0", backend=backend)
    assert rig.ch.start() == RESULT_OK
    yield rig, backend
    rig.close()
    assert thread_names("a0-") == []


def test_requests_in_flight_complete_out_of_order_from_other_threads(
        gated: tuple[Rig, GatedBackend]) -> None:
    rig, backend = gated
    block, count = 4096, 32
    writes = rig.batch(0, [(T_OUT, i * 8, pattern(block, i), 0) for i in range(count)])
    held = backend.wait_held(count)  # all 32 in the backend at once, none completed
    assert rig.ring(0).used_idx() == 0
    assert rig.dev.workers[0].inflight == count
    order = list(reversed(held))  # finish them last to first, each from its own thread
    for h in order:
        thread = threading.Thread(target=backend.finish, args=(h, backend.data))
        thread.start()
        thread.join()
    done = rig.ch.wait_used(0, count)
    heads = {req.head: req for req in writes}
    assert sorted(head for head, _ in done) == sorted(heads)
    assert all(written == 1 and rig.status(heads[head]) == OK for head, written in done)
    for i in range(count):
        assert backend.data[i * 4096:(i + 1) * 4096] == pattern(block, i)
    assert rig.dev.workers[0].inflight == 0

    reads = rig.batch(0, [(T_IN, i * 8, b"", block) for i in range(count)])
    held = backend.wait_held(count)
    for h in held[::3] + held[1::3] + held[2::3]:  # interleaved: neither order of arrival
        backend.finish(h, backend.data)
    rig.ch.wait_used(0, count)
    for i, req in enumerate(reads):
        assert (rig.status(req), rig.data(req)) == (OK, pattern(block, i))


def test_completions_in_several_batches_all_arrive_with_their_lengths(
        gated: tuple[Rig, GatedBackend]) -> None:
    rig, backend = gated
    backend.data[:MiB] = pattern(MiB, 5)
    reads = rig.batch(1, [(T_IN, i * 16, b"", 8192) for i in range(20)])
    held = backend.wait_held(20)
    for part in (held[10:], held[:10]):
        for h in part:
            backend.finish(h, backend.data)
        assert len(rig.ch.wait_used(1, len(part))) == len(part)
    for i, req in enumerate(reads):
        assert rig.status(req) == OK
        assert rig.data(req) == bytes(backend.data[i * 8192:(i + 1) * 8192])
    assert rig.dev.workers[1].requests == 20


def test_a_failed_completion_is_an_io_error(gated: tuple[Rig, GatedBackend],
                                            caplog: pytest.LogCaptureFixture) -> None:
    rig, backend = gated
    req = rig.batch(0, [(T_IN, 0, b"", 4096)])[0]
    (held,) = backend.wait_held(1)
    backend.finish(held, backend.data, BackendError(5, "remote said no"))
    assert rig.ch.wait_used(0, 1) == [(req.head, 1)]
    assert rig.status(req) == IOERR
    assert "remote said no" in caplog.text


def test_done_called_twice_completes_once_and_is_logged(
        gated: tuple[Rig, GatedBackend], caplog: pytest.LogCaptureFixture) -> None:
    rig, backend = gated
    req = rig.batch(0, [(T_FLUSH, 0, b"", 0)])[0]
    (held,) = backend.wait_held(1)
    held.done(None)
    held.done(None)
    assert rig.ch.wait_used(0, 1) == [(req.head, 1)]
    second = rig.batch(0, [(T_FLUSH, 0, b"", 0)])[0]  # the queue goes on normally
    backend.wait_held(1)[0].done(None)
    assert rig.ch.wait_used(0, 1) == [(second.head, 1)]
    assert "more than once" in caplog.text
    assert rig.dev.workers[0].inflight == 0


def test_reset_is_answered_at_once_and_later_completions_are_dropped(
        gated: tuple[Rig, GatedBackend]) -> None:
    rig, backend = gated
    rig.batch(0, [(T_IN, i * 8, b"", 4096) for i in range(4)])
    held = backend.wait_held(4)
    request_id = rig.ch.send_nowait(u.VDUSE_SET_STATUS, u.vduse_dev_status.pack(0))
    # the kernel gives a control message 30 s: a backend that never answers must not
    # make the reset wait for it
    response = rig.ch.wait_response(request_id, timeout=2.0)
    assert u.vduse_dev_response_header.unpack_from(response)[1] == RESULT_OK
    assert thread_names("a0-vq") == []
    ring = rig.ring(0)
    for h in held:  # the backend finishes later: nothing reaches the reset rings
        backend.finish(h, backend.data)
    assert ring.used_idx() == 0
    assert rig.ch.start() == RESULT_OK  # and the device comes back normally
    req = rig.batch(0, [(T_OUT, 0, pattern(4096, 1), 0)])[0]
    backend.finish(backend.wait_held(1)[0], backend.data)
    assert rig.ch.wait_used(0, 1) == [(req.head, 1)]


def test_update_iotlb_does_not_wait_and_requests_in_flight_complete_into_the_new_rings(
        gated: tuple[Rig, GatedBackend]) -> None:
    rig, backend = gated
    writes = rig.batch(1, [(T_OUT, i * 8, pattern(4096, i), 0) for i in range(3)])
    held = backend.wait_held(3)
    old_queue = rig.dev.workers[1].queue
    # answered while the backend still has all three (it never answers before this returns)
    response = rig.ch.send(u.VDUSE_UPDATE_IOTLB, u.vduse_iova_range.pack(0, 2**64 - 1),
                           timeout=2.0)
    assert u.vduse_dev_response_header.unpack_from(response)[1] == RESULT_OK
    assert rig.dev.workers[1].queue is not old_queue
    assert rig.dev.workers[1].inflight == 3
    for h in held:
        backend.finish(h, backend.data)
    assert sorted(head for head, _ in rig.ch.wait_used(1, 3)) == sorted(w.head for w in writes)
    queue = rig.dev.workers[1].queue
    assert (queue.last_avail_idx, queue.used_idx) == (3, 3)


def test_destroy_waits_a_bounded_time_for_a_stuck_request(
        gated: tuple[Rig, GatedBackend], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_worker_module, "_STUCK_LOG_INTERVAL", 0.05)
    monkeypatch.setattr(device_module, "DESTROY_INFLIGHT_TIMEOUT", 0.5)
    rig, backend = gated
    rig.batch(0, [(T_FLUSH, 0, b"", 0)])
    (held,) = backend.wait_held(1)
    started = time.monotonic()
    rig.dev.destroy()  # the request never finishes
    assert time.monotonic() - started < 3.0
    assert "still waiting for 1 request" in caplog.text
    assert "will be dropped" in caplog.text
    held.done(None)  # far too late: dropped, harmlessly


class RaisingSubmit(GatedBackend):
    """``submit_readv`` raises (before or after calling ``done``)."""

    call_done_first = False

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        if self.call_done_first:
            done(None)
        raise OSError(5, "cannot send")


@pytest.mark.parametrize("call_done_first", [False, True])
def test_submit_raising_fails_the_request_once(call_done_first: bool,
                                               caplog: pytest.LogCaptureFixture) -> None:
    backend = RaisingSubmit()
    backend.call_done_first = call_done_first
    rig = Rig(name="r0", backend=backend)
    try:
        assert rig.ch.start() == RESULT_OK
        req = rig.batch(0, [(T_IN, 0, b"", 4096)])[0]
        assert rig.ch.wait_used(0, 1) == [(req.head, 4097 if call_done_first else 1)]
        assert rig.status(req) == (OK if call_done_first else IOERR)
        assert ("raised after completing" if call_done_first else "cannot send") in caplog.text
        second = rig.batch(0, [(T_FLUSH, 0, b"", 0)])[0]
        backend.wait_held(1)[0].done(None)
        assert rig.ch.wait_used(0, 1, timeout=2) == [(second.head, 1)]
    finally:
        rig.close()


# -- ThreadPoolBackend ----------------------------------------------------------------------


@pytest.mark.parametrize("min_bytes", [0, 8192])
def test_thread_pool_over_a_file_end_to_end(tmp_path: Path, min_bytes: int) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    pool = ThreadPoolBackend(FileBackend(image), threads=3, min_bytes=min_bytes)
    rig = Rig(name="p0", backend=pool)
    try:
        assert rig.ch.start() == RESULT_OK
        sizes = [512, 4096, 8192, 65536, 3 * 4096]
        offsets, at = [], 0
        for size in sizes * 4:
            offsets.append((at, size))
            at += size
        for q in (0, 1):
            writes = rig.batch(q, [(T_OUT, (at >> 9) + q * 2048, pattern(size, at), 0)
                                   for at, size in offsets])
            assert sorted(h for h, _ in rig.ch.wait_used(q, len(writes))) == sorted(
                w.head for w in writes)
            assert all(rig.status(w) == OK for w in writes)
            rig.run(q, T_FLUSH)
        data = image.read_bytes()
        for q in (0, 1):
            for at, size in offsets:
                assert data[at + q * MiB:at + q * MiB + size] == pattern(size, at)
            reads = rig.batch(q, [(T_IN, (at >> 9) + q * 2048, b"", size) for at, size in offsets])
            rig.ch.wait_used(q, len(reads))
            for req, (at, size) in zip(reads, offsets, strict=True):
                assert (rig.status(req), rig.data(req)) == (OK, pattern(size, at))
    finally:
        rig.close()
        pool.close()
    assert thread_names("io-") == []  # close() stopped the pool


def test_thread_pool_passes_the_backend_through() -> None:
    inner = MemoryBackend(MiB)
    pool = ThreadPoolBackend(inner, threads=2, min_bytes=0)
    try:
        assert (pool.size(), pool.preferred_block_size) == (inner.size(), 512)
        assert (pool.can_write, pool.can_discard, pool.can_write_zeroes) == (
            inner.can_write, inner.can_discard, inner.can_write_zeroes)
    finally:
        pool.close()


@pytest.mark.parametrize("make", [
    lambda path: MemoryBackend(MiB),
    lambda path: FileBackend(path),
    lambda path: FileBackend(path, readonly=True),
], ids=["memory", "file", "file-readonly"])
def test_thread_pool_conforms(tmp_path: Path, make: Callable[[Path], Backend]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    ran = check_backend(lambda: ThreadPoolBackend(make(image), threads=4, min_bytes=0))
    assert "submit" in ran and "concurrency" in ran


def test_thread_pool_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadPoolBackend(MemoryBackend(MiB), threads=0)
    with pytest.raises(ValueError, match="negative"):
        ThreadPoolBackend(MemoryBackend(MiB), threads=1, min_bytes=-1)


def test_thread_pool_logs_a_failing_done(caplog: pytest.LogCaptureFixture) -> None:
    pool = ThreadPoolBackend(MemoryBackend(MiB), threads=1)
    finished = threading.Event()

    def bad_done(error: BaseException | None) -> None:
        finished.set()
        raise RuntimeError("completion bug")

    try:
        with caplog.at_level(logging.ERROR):
            pool.submit_flush(bad_done)
            assert finished.wait(5)
            wait_until(lambda: "completion failed" in caplog.text, what="the log")
        done = threading.Event()
        pool.submit_flush(lambda error: done.set())  # the thread survived
        assert done.wait(5)
    finally:
        pool.close()


class OnlyReads(AsynchronousBackend):
    """An asynchronous backend defining submit_readv alone: read-only, reads wait."""

    def size(self) -> int:
        return MiB

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        def work() -> None:
            if offset >= MiB // 2:
                done(OSError(5, "far half unreadable"))
                return
            for buf in bufs:
                buf[:] = bytes([offset >> 12 & 0xFF]) * len(buf)
            done(None)

        threading.Thread(target=work).start()


def test_asynchronous_backend_waits_and_infers_what_it_can_do() -> None:
    backend = OnlyReads()
    assert backend.submit_min_bytes == 0
    assert (backend.can_write, backend.can_flush, backend.can_discard,
            backend.can_write_zeroes) == (False, False, False, False)
    buf = bytearray(4096)
    backend.read(3 * 4096, memoryview(buf))
    assert buf == b"\x03" * 4096
    with pytest.raises(OSError, match="far half unreadable"):
        backend.readv(MiB // 2, [memoryview(buf)])
