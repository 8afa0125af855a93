"""The compiled data path against the pure-Python one: same rings in, same results out.

Two worlds are built from one seed: the same driver memory, ring, backing file
and request stream, one served by ``QueueWorker`` on the Python path, the other
with the native fast path (``pyvduse._fastpath``). After every batch the used
elements, the interrupts, every byte of driver memory, the backing file, the
inflight log and the ring positions must be identical. The streams mix valid
requests of every type and layout with hostile chains (random descriptors,
loops, out-of-range heads, buffers outside the mappings or against their rights)
and requests the native path must leave to Python (out of range, misaligned,
read-only, unknown types), so both halves of the native path's contract are
checked: what it serves, it serves as Python would; what it does not, it leaves
untouched.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvduse import native
from pyvduse.backends.base import Backend
from pyvduse.backends.file import FileBackend
from pyvduse.backends.memory import MemoryBackend
from pyvduse.backends.null import NullBackend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.blk import BlkConfig, BlkHandler
from pyvduse.inflight import QueueLog
from pyvduse.metrics import NATIVE_TYPES, TYPE_CELLS, ExportMetrics
from pyvduse.queue_worker import QueueThread, QueueWorker
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v
from pyvduse.uapi.vduse import VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO
from pyvduse.virtqueue import SplitQueue

NEXT, WRITE, INDIRECT = v.VRING_DESC_F_NEXT, v.VRING_DESC_F_WRITE, v.VRING_DESC_F_INDIRECT
QSIZE = 16
PAGE = 4096
MEM = 1 << 20
BASE = 0x10000
DISK = 256 << 10
TYPES = [v.VIRTIO_BLK_T_IN] * 4 + [v.VIRTIO_BLK_T_OUT] * 4 + [
    v.VIRTIO_BLK_T_FLUSH, v.VIRTIO_BLK_T_GET_ID, v.VIRTIO_BLK_T_DISCARD,
    v.VIRTIO_BLK_T_WRITE_ZEROES, 99]

requires_native = pytest.mark.skipif(
    not native.available() and os.environ.get("PYVDUSE_REQUIRE_NATIVE") != "1",
    reason=native.why_unavailable())


def test_the_native_path_is_built_where_it_is_required() -> None:
    """CI sets PYVDUSE_REQUIRE_NATIVE=1: there a missing extension is a failure, not a skip."""
    if os.environ.get("PYVDUSE_REQUIRE_NATIVE") == "1":
        assert native.available(), native.why_unavailable()


class World:
    """One mock driver, ring and backend, served by one data path."""

    def __init__(self, seed: int, use_native: bool, *, backend: str = "file",
                 readonly: bool = False, split: bool = False, io_threads: bool = False,
                 block_size: int = 512,
                 file_backend: Callable[[str], FileBackend] = FileBackend,
                 threaded: bool = False, poll_max_ns: int = 0, metrics: bool = False) -> None:
        rnd = random.Random(seed)
        self.dmem = DriverMemory(size=MEM, base=BASE)
        self.ring = MockSplitRing(self.dmem, QSIZE)
        self.data_start = self.dmem.alloc(0, PAGE)
        self.ro_page = BASE + MEM - PAGE
        self.wo_page = BASE + MEM - 2 * PAGE
        self.dmem.write(self.data_start, rnd.randbytes(BASE + MEM - self.data_start))
        entries = [(BASE, self.data_start - 1, 0, VDUSE_ACCESS_RW)]
        if split:
            entries += [(a, a + 8 * PAGE - 1, a - BASE, VDUSE_ACCESS_RW)
                        for a in range(self.data_start, self.wo_page, 8 * PAGE)]
        else:
            entries.append((self.data_start, self.wo_page - 1, self.data_start - BASE,
                            VDUSE_ACCESS_RW))
        entries += [(self.wo_page, self.ro_page - 1, self.wo_page - BASE, VDUSE_ACCESS_WO),
                    (self.ro_page, self.ro_page + PAGE - 1, self.ro_page - BASE,
                     VDUSE_ACCESS_RO)]
        self.dmem.set_entries(entries)
        self.gmem = self.dmem.guest_memory()
        self.file = tempfile.NamedTemporaryFile(prefix="pyvduse-native-")  # noqa: SIM115
        self.file.write(rnd.randbytes(DISK))
        self.file.flush()
        inner: Backend
        self.disk_fd = self.file.fileno()  # where the disk's bytes are (read by state())
        if backend == "file":
            inner = file_backend(self.file.name, readonly=readonly)
        elif backend == "memory":
            inner = MemoryBackend(DISK)
            inner.write(0, memoryview(os.pread(self.disk_fd, DISK, 0)))
            target = inner.native_target()
            assert target is not None
            self.disk_fd = target.fd
        else:
            inner = NullBackend(DISK)
        self.backend = ThreadPoolBackend(inner, 1, 8192) if io_threads else inner
        config = BlkConfig.for_backend(self.backend, logical_block_size=block_size,
                                       queue_size=QSIZE, readonly=readonly)
        config = replace(config, serial="native-parity")
        self.handler = BlkHandler(self.backend, config)
        self.queue = SplitQueue(self.gmem, QSIZE, self.ring.desc_addr, self.ring.avail_addr,
                                self.ring.used_addr, event_idx=True, indirect=True,
                                max_chain=QSIZE)
        self.log = QueueLog.in_memory(QSIZE)
        self.interrupts: list[int] = []
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        plan = self.handler.native_plan() if use_native else None
        if use_native:
            assert plan is not None
        #: threaded: served by a QueueThread, in the compiled loop if native (whose
        #: interrupts are eventfd writes: counted, as the Python ones are).
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irq_writes = 0
        notify: Any = lambda: self.interrupts.append(self.ring.used_idx())  # noqa: E731
        if threaded and use_native:
            notify = _EventfdInterrupt(self.irq_fd)
        #: metrics: every request counted (pyvduse.metrics), in state() as "counted".
        self.metrics = ExportMetrics() if metrics else None
        handle = self.handler.handle
        if self.metrics is not None:
            self.handler.measure(self.metrics.requests)
            handle = self.handler.handle_measured
        self.worker = QueueWorker("q", self.queue, handle, self.kick, notify,
                                  log=self.log, native=plan,
                                  cells=self.metrics.queue_cells(0) if self.metrics else None)
        self.thread: QueueThread | None = None
        if threaded:
            self.thread = QueueThread("q", [self.worker], poll_max_ns=poll_max_ns)
            self.thread.poll_ns = poll_max_ns  # as if the traffic had grown the window
            self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            assert self.thread.stop(inflight_timeout=10)
        os.close(self.irq_fd)
        self.worker.detach()
        self.backend.close()
        self.gmem.invalidate()
        self.dmem.close()
        os.close(self.kick)
        self.file.close()

    def observed_interrupts(self) -> list[int] | int:
        """The used index at each interrupt (Python path); threaded, only how many there
        were so far (the compiled loop's are eventfd writes)."""
        if self.thread is None:
            return list(self.interrupts)
        with contextlib.suppress(BlockingIOError):
            self.irq_writes += os.eventfd_read(self.irq_fd)
        return len(self.interrupts) + self.irq_writes

    def drain(self) -> None:
        """Serve everything available; async completions (io-threads) are waited for.

        Threaded: kick the queue's thread and wait until it took every available
        request and nothing is in flight. The compiled loop keeps its positions to
        itself while it runs (and holds the ring lock, even asleep): each wake-up
        makes it hand them back to Python, publishing and interrupting first."""
        if self.thread is not None:
            os.eventfd_write(self.kick, 1)
            deadline = time.monotonic() + 10
            worker = self.worker
            while True:
                worker._wake()
                # Between batches (the lock), so that no request is between pop and push.
                if worker.ring_lock.acquire(timeout=0.01):
                    try:
                        if (worker.queue.last_avail_idx == self.ring.avail_idx
                                and not worker.in_backend
                                and self.ring.used_idx() == worker.queue.used_idx):
                            return
                    finally:
                        worker.ring_lock.release()
                time.sleep(0.001)
                assert time.monotonic() < deadline, "the queue thread did not finish"
        self.worker.drain()
        deadline = time.monotonic() + 10
        while self.worker.in_backend and time.monotonic() < deadline:
            time.sleep(0.001)
            self.worker.drain()
        assert not self.worker.in_backend

    def counted(self) -> dict[str, Any] | None:
        """What the metrics counted, but for the time each request took."""
        if self.metrics is None:
            return None
        snapshot = self.metrics.snapshot()
        del snapshot["polls"]
        snapshot["latency"] = {kind: timed["buckets"][-1]
                               for kind, timed in snapshot["latency"].items()
                               if kind != "bounds-ns"}
        return snapshot

    def state(self) -> dict[str, Any]:
        """Everything the driver or a restarted daemon could observe."""
        self.file.seek(0)
        return {
            "counted": self.counted(),
            "used": self.ring.take_used(),
            "interrupts": self.observed_interrupts(),
            "memory": self.dmem.read(BASE, MEM),
            "file": os.pread(self.disk_fd, DISK, 0),
            "log": bytes(self.log.slots.cast("B")) + bytes(self.log.header.cast("B")),
            "positions": (self.queue.last_avail_idx, self.queue.used_idx),
            "bad": self.worker.bad_chains,
            "requests": self.worker.requests,
        }


def request_chain(world: World, rnd: random.Random) -> tuple[list[Buffer], bool]:
    """A virtio-blk request as a driver lays it out, often valid, sometimes not."""
    dmem = world.dmem
    req_type = rnd.choice(TYPES)
    sectors = DISK // 512
    sector = rnd.randrange(sectors - 128) & ~7  # mostly valid, sometimes not
    if rnd.random() < 0.3:
        sector = rnd.choice([rnd.randrange(sectors), sectors - 1, sectors, sectors + 8,
                             (1 << 63) // 256, 0xFFFF_FFFF_FFFF_FFFF])
    length = rnd.choice([512, 4096, 8192, 3 * 512])
    if rnd.random() < 0.2:
        length = rnd.choice([100, 0, 64 << 10])
    header = dmem.buffer(v.virtio_blk_outhdr.pack(req_type, 0, sector))
    status = dmem.buffer(1, writable=True)
    if rnd.random() < 0.05:
        status = Buffer(world.wo_page + rnd.randrange(PAGE), 1, True)
    pieces = rnd.choice([1, 1, 1, 2, 3]) if length else 0
    data: list[Buffer] = []
    for i in range(pieces):
        part = length // pieces if i < pieces - 1 else length - (length // pieces) * i
        if req_type == v.VIRTIO_BLK_T_OUT:
            data.append(dmem.buffer(rnd.randbytes(part)) if part else Buffer(0, 0))
        else:
            data.append(dmem.buffer(part, writable=True) if part else Buffer(0, 0, True))
    if req_type in (v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES):
        data = [dmem.buffer(v.virtio_blk_discard_write_zeroes.pack(
            rnd.randrange(sectors), rnd.choice([1, 8, 64]), 0))]
    if req_type == v.VIRTIO_BLK_T_GET_ID:
        data = [dmem.buffer(20, writable=True)]
    chain = [header, *data, status]
    if rnd.random() < 0.05:  # the header split in two
        chain[0:1] = [Buffer(header.addr, 8), Buffer(header.addr + 8, 8)]
    if rnd.random() < 0.05:  # a buffer in the read-only page, or unmapped
        index = rnd.randrange(len(chain))
        where = rnd.choice([world.ro_page + 8, 0xDEAD_0000, world.wo_page - 4])
        chain[index] = Buffer(where, chain[index].length, chain[index].writable)
    return chain, rnd.random() < 0.5


def hostile_head(world: World, rnd: random.Random) -> int:
    """Random descriptors in the ring's table (never one the mock driver holds)."""
    free = world.ring._free
    if not free:
        return rnd.randrange(QSIZE)
    head = free[rnd.randrange(len(free))]
    flags = rnd.choice([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, 8, NEXT | 0x10])
    addr = rnd.choice([world.data_start + rnd.randrange(MEM // 2), world.ro_page,
                       0xDEAD_0000, (1 << 64) - 8])
    length = rnd.choice([0, 1, 16, 48, 512, 1 << 31, 0xFFFF_FFFF])
    world.ring.write_desc(head, addr, length, flags, rnd.randrange(QSIZE + 2))
    return head


def play(world: World, seed: int, rounds: int, one_by_one: bool = False) -> list[dict[str, Any]]:
    """Run the request stream of ``seed``; return the state after every round.

    ``one_by_one``: each request is published and served alone (asynchronous requests
    in flight together may legitimately overlap and finish in any order)."""
    rnd = random.Random(seed)
    states = []
    for _ in range(rounds):
        heads = []
        for _ in range(rnd.randint(1, QSIZE // 2)):
            roll = rnd.random()
            try:
                if roll < 0.08:
                    heads.append(hostile_head(world, rnd))
                elif roll < 0.1:
                    heads.append(rnd.choice([QSIZE, 0xFFFF]))  # a head out of range
                else:
                    chain, indirect = request_chain(world, rnd)
                    heads.append(world.ring.add_chain(chain, indirect=indirect, publish=False))
            except MemoryError:
                break
        for batch in ([head] for head in heads) if one_by_one else [heads]:
            world.ring.publish(batch)
            world.drain()
        states.append(world.state())
    return states


@contextmanager
def worlds(seed: int, **options: Any) -> Iterator[tuple[World, World]]:
    pair = (World(seed, False, **options), World(seed, True, **options))
    try:
        yield pair
    finally:
        for world in pair:
            world.close()


def compare(seed: int, rounds: int = 6, **options: Any) -> int:
    """Play ``seed`` on both paths; assert identical states; return the native requests."""
    with worlds(seed, **options) as (python, compiled):
        expected = play(python, seed, rounds)
        got = play(compiled, seed, rounds)
        for round_, (want, have) in enumerate(zip(expected, got, strict=True)):
            for key in want:
                assert have[key] == want[key], f"seed {seed} round {round_}: {key} differs"
        return compiled.worker.native_served


@requires_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32),
       options=st.sampled_from([{}, {"split": True}, {"readonly": True}, {"backend": "null"},
                                {"backend": "memory"}, {"block_size": 4096}]))
def test_native_path_gives_what_the_python_path_gives(seed: int,
                                                      options: dict[str, Any]) -> None:
    compare(seed, **options)


@requires_native
@pytest.mark.parametrize("options", [{}, {"backend": "null"}, {"readonly": True},
                                     {"io_threads": True}, {"threaded": True},
                                     {"threaded": True, "io_threads": True}],
                         ids=["file", "null", "readonly", "io_uring", "loop", "loop-io_uring"])
def test_the_native_path_counts_requests_as_the_python_path_does(
        options: dict[str, Any]) -> None:
    """Metrics: for the same streams, what the compiled core counts in the queue's
    cells plus what the Python handler counts (the requests left to it) equals what
    the Python path alone counts: requests, bytes and latency counts by type, errors
    by status. The core must have counted a good part of them itself."""
    by_core = 0
    one_by_one = bool(options.get("io_threads") or options.get("threaded"))
    for seed in range(5):
        with worlds(seed, metrics=True, **options) as (python, compiled):
            expected = play(python, seed, 4, one_by_one)
            got = play(compiled, seed, 4, one_by_one)
            for round_, (want, have) in enumerate(zip(expected, got, strict=True)):
                for key in want:
                    assert have[key] == want[key], f"seed {seed} round {round_}: {key} differs"
            assert compiled.metrics is not None
            cells = compiled.metrics.queue_cells(0)
            by_core += sum(cells[kind * TYPE_CELLS] for kind in range(NATIVE_TYPES))
            counted = compiled.counted()
            assert counted is not None and sum(counted["requests"].values()) > 0
    assert by_core > 8, by_core


@requires_native
def test_native_path_serves_most_valid_requests() -> None:
    """Not a path that leaves everything to Python: about a third of these streams'
    requests are valid reads and writes, and it serves them (55 of 162 when written)."""
    served = sum(compare(seed, rounds=4) for seed in range(10))
    assert served > 40


@requires_native
def test_native_path_serves_a_plain_read_and_write_itself() -> None:
    with worlds(7) as (_, world):
        dmem = world.dmem
        # The first request in a mapping the native path was not shown yet goes through
        # Python, which maps it; from then on the native path knows it.
        world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_FLUSH, 0, 0)),
                              dmem.buffer(1, writable=True)])
        world.drain()
        world.ring.take_used()
        assert world.worker.native_served == 0
        payload = os.urandom(4096)
        out = [dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_OUT, 0, 8)),
               dmem.buffer(payload), dmem.buffer(1, writable=True)]
        data_in = dmem.buffer(4096, writable=True)
        status_in = dmem.buffer(1, writable=True)
        back = [dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 8)), data_in,
                status_in]
        world.ring.add_chain(out)
        world.ring.add_chain(back, indirect=True)
        world.drain()
        assert world.worker.native_served == 2
        assert [n for _, n in world.ring.take_used()] == [1, 4097]
        assert dmem.read(data_in.addr, 4096) == payload
        assert dmem.read(status_in.addr, 1) == b"\0"
        assert os.pread(world.file.fileno(), 4096, 8 * 512) == payload
        assert not any(world.log.slots)  # published, so cleared


def engine_fast(world: World) -> native.FastPath:
    """The world's compiled fast path object."""
    ring = world.worker._native
    assert ring is not None
    return ring.fast


def uring_required() -> bool:
    """CI (PYVDUSE_REQUIRE_NATIVE=1) requires the io_uring engine too: a kernel that
    refuses io_uring there is a failure, not a quiet fallback to the thread pool."""
    return os.environ.get("PYVDUSE_REQUIRE_NATIVE") == "1"


def engine_of(world: World) -> native.FastPath:
    ring = world.worker._native
    assert ring is not None
    if uring_required():
        assert ring.fast.asynchronous, ring.fast.engine_error
    elif not ring.fast.asynchronous:
        pytest.skip(f"no io_uring here: {ring.fast.engine_error}")
    return ring.fast


@requires_native
def test_large_requests_and_flushes_go_to_the_io_uring_small_ones_are_served_in_line() -> None:
    """With --io-threads, requests of io-threads-min bytes or more (8 KiB here) and
    flushes are asynchronous: the native path submits them to its io_uring."""
    with worlds(5, io_threads=True) as (_, world):
        fast = engine_of(world)
        dmem = world.dmem
        expected = bytearray(os.pread(world.file.fileno(), DISK, 0))
        for _ in range(3):
            for sector, size in ((0, 512), (16, 16384), (64, 4096), (128, 65536)):
                payload = os.urandom(size)
                expected[sector * 512:sector * 512 + size] = payload
                world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_OUT,
                                                                           0, sector)),
                                      dmem.buffer(payload), dmem.buffer(1, writable=True)])
                world.drain()
                assert [n for _, n in world.ring.take_used()] == [1]
        assert os.pread(world.file.fileno(), DISK, 0) == expected
        # All but the first (its buffers were in a mapping the native path learns then).
        assert world.worker.native_served == 3 * 4 - 1
        # A batch of large reads and a flush, submitted together, complete in any order.
        chains = {}
        for sector in range(0, 256, 32):
            data = dmem.buffer(16384, writable=True)
            status = dmem.buffer(1, writable=True)
            dmem.write(status.addr, b"\xff")
            head = world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(
                v.VIRTIO_BLK_T_IN, 0, sector)), data, status], indirect=True, publish=False)
            chains[head] = (sector, data, status)
        flush_status = dmem.buffer(1, writable=True)
        flush = world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(
            v.VIRTIO_BLK_T_FLUSH, 0, 0)), flush_status], indirect=True, publish=False)
        world.ring.publish([*chains, flush])
        world.drain()
        used = dict(world.ring.take_used())
        assert used == {**{head: 16385 for head in chains}, flush: 1}
        for sector, data, status in chains.values():
            assert dmem.read(data.addr, 16384) == expected[sector * 512:sector * 512 + 16384]
            assert dmem.read(status.addr, 1) == b"\0"
        assert dmem.read(flush_status.addr, 1) == b"\0"
        assert fast.pending == 0
        assert not any(world.log.slots)


def _direct_file(path: str, readonly: bool = False) -> FileBackend:
    return FileBackend(path, readonly=readonly, direct=True)


@requires_native
@pytest.mark.parametrize("size", [512, 4096])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_a_batch_of_small_requests_goes_to_the_io_uring(size: int, direct: bool) -> None:
    """Where the probe says it pays (always for O_DIRECT; for a buffered file, if the
    io_uring reads the page cache in line), a run of FP_BATCH_MIN (4) requests or more
    stages the small ones too (one io_uring_enter for the batch): the batch's writes and
    reads (disjoint) all go through the io_uring. Either way every byte, status and
    used length is what the Python path gives (O_DIRECT requests the kernel refuses,
    e.g. unaligned buffers, come back to the Python path, which bounces them)."""
    options: dict[str, Any] = {"file_backend": _direct_file} if direct else {}
    with worlds(11, io_threads=True, **options) as (python, compiled):
        fast = engine_of(compiled)
        if direct:
            assert fast.batches_small
        # Warm up: the first request teaches the native path the mapping.
        for world in (python, compiled):
            world.ring.add_chain([world.dmem.buffer(v.virtio_blk_outhdr.pack(
                v.VIRTIO_BLK_T_FLUSH, 0, 0)), world.dmem.buffer(1, writable=True)])
            world.drain()
            world.ring.take_used()
        staged_before = fast.staged
        rnd = random.Random(size)
        sectors = rnd.sample(range(0, DISK // 512 - 16, 16), 8)
        payloads = {sector: rnd.randbytes(size) for sector in sectors[:4]}
        outcomes = []
        for world in (python, compiled):
            dmem = world.dmem
            heads = {}
            for sector, payload in payloads.items():
                status = dmem.buffer(1, writable=True)
                dmem.write(status.addr, b"\xff")
                head = world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(
                    v.VIRTIO_BLK_T_OUT, 0, sector)), dmem.buffer(payload), status],
                    indirect=True, publish=False)
                heads[head] = ("write", sector, None, status)
            for sector in sectors[4:]:
                data = dmem.buffer(size, writable=True)
                status = dmem.buffer(1, writable=True)
                dmem.write(status.addr, b"\xff")
                head = world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(
                    v.VIRTIO_BLK_T_IN, 0, sector)), data, status], indirect=True,
                    publish=False)
                heads[head] = ("read", sector, data, status)
            world.ring.publish(list(heads))
            world.drain()
            used = dict(world.ring.take_used())
            outcome = {}
            for head, (kind, sector, data, status) in heads.items():
                read = dmem.read(data.addr, size) if data is not None else b""
                outcome[(kind, sector)] = (used[head], dmem.read(status.addr, 1), read)
            outcomes.append((outcome, os.pread(world.file.fileno(), DISK, 0)))
            assert len(used) == len(heads)
        assert outcomes[0] == outcomes[1]
        assert fast.staged - staged_before == (8 if fast.batches_small else 0)
        if fast.batches_small and not direct:  # a buffered file: all served natively
            assert compiled.worker.native_served == 8  # the first flush was Python's
        assert fast.pending == 0
        assert not any(compiled.log.slots)


@requires_native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32))
def test_with_the_io_uring_the_native_path_gives_what_the_python_path_gives(seed: int) -> None:
    """The same streams with asynchronous requests (the Python world's thread pool, the
    native world's io_uring), each request published and served alone: overlapping
    requests in flight together may finish in either order, on either path. Every
    observable must be identical, interrupts included."""
    with worlds(seed, io_threads=True) as (python, compiled):
        engine_of(compiled)
        expected = play(python, seed, 6, one_by_one=True)
        got = play(compiled, seed, 6, one_by_one=True)
        for round_, (want, have) in enumerate(zip(expected, got, strict=True)):
            for key in want:
                assert have[key] == want[key], f"seed {seed} round {round_}: {key} differs"


class _EventfdInterrupt:
    """A queue's interrupt as the compiled loop sends it: an eventfd write."""

    def __init__(self, fd: int) -> None:
        self.native_irq = native.NativeIrq(fd)

    def __call__(self) -> None:
        os.eventfd_write(self.native_irq.fd, 1)


@requires_native
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32),
       options=st.sampled_from([{}, {"io_threads": True}, {"backend": "null"},
                                {"backend": "memory", "io_threads": True}]))
def test_the_compiled_loop_gives_what_the_python_loop_gives(seed: int,
                                                            options: dict[str, Any]) -> None:
    """Queue threads this time, kicked like a driver does: one serves in Python
    (QueueThread's loop, drain), the other in the compiled loop (fastpath_loop.h:
    kick wait, batches, publish, log, EVENT_IDX interrupts by eventfd). Requests are
    served one at a time; every observable must be identical, the number of
    interrupts included."""
    with worlds(seed, threaded=True, **options) as (python, compiled):
        assert compiled.worker.loops_natively() and not python.worker.loops_natively()
        expected = play(python, seed, 4, one_by_one=True)
        got = play(compiled, seed, 4, one_by_one=True)
        for round_, (want, have) in enumerate(zip(expected, got, strict=True)):
            for key in want:
                assert have[key] == want[key], f"seed {seed} round {round_}: {key} differs"
        assert python.worker.loop_served == 0


@requires_native
def test_the_compiled_loop_serves_and_interrupts_by_itself() -> None:
    """A kicked request is served, published and signalled by the C loop alone: the
    driver sees its completion and its interrupt while Python is never woken."""
    with worlds(13, threaded=True) as (_, world):
        dmem = world.dmem
        world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_FLUSH, 0, 0)),
                              dmem.buffer(1, writable=True)])
        world.drain()  # Python serves the first (and maps the memory for the native path)
        world.ring.take_used()
        interrupts = world.observed_interrupts()
        assert isinstance(interrupts, int)
        fast = engine_fast(world)

        def in_the_loop() -> bool:  # for 30 ms on end: no Python turn under way
            deadline = time.monotonic() + 10
            settled = 0
            while settled < 6:
                assert time.monotonic() < deadline, "the thread did not settle in the C loop"
                settled = settled + 1 if fast.position >= 0 else 0
                time.sleep(0.005)
            return True

        for round_ in range(1, 4):
            assert in_the_loop()
            data = dmem.buffer(4096, writable=True)
            world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0,
                                                                       8 * round_)),
                                  data, dmem.buffer(1, writable=True)])
            before = world.ring.used_idx()
            os.eventfd_write(world.kick, 1)
            deadline = time.monotonic() + 10
            while world.ring.used_idx() == before:
                assert time.monotonic() < deadline, "the C loop did not complete the request"
                time.sleep(0.001)
            assert world.ring.take_used()[0][1] == 4097
            assert dmem.read(data.addr, 4096) == os.pread(world.disk_fd, 4096, 8 * round_ * 512)
            deadline = time.monotonic() + 10
            while world.observed_interrupts() == interrupts + round_ - 1:
                assert time.monotonic() < deadline, "no interrupt from the C loop"
                time.sleep(0.001)
        assert world.observed_interrupts() == interrupts + 3
        assert world.worker.loop_served == 3  # counted live, as the loop went


@requires_native
@pytest.mark.parametrize("use_native", [False, True], ids=["python-loop", "compiled-loop"])
def test_polling_stops_after_a_deep_burst_and_resumes_after_a_shallow_one(
        use_native: bool) -> None:
    """Both loops poll after a burst of POLL_BURST_MAX (2) requests or fewer, and sleep
    until kicked after a deeper one (a deep driver needs the CPU, not the polling)."""
    world = World(17, use_native, threaded=True, poll_max_ns=10**9)
    try:
        dmem = world.dmem

        def add_reads(count: int) -> list[int]:
            heads = [world.ring.add_chain([
                dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 8 * i)),
                dmem.buffer(512, writable=True), dmem.buffer(1, writable=True)],
                publish=False) for i in range(count)]
            world.ring.publish(heads)  # no kick: only a polling thread sees them at once
            return heads

        done = 0

        def served(heads: list[int]) -> None:
            nonlocal done
            deadline = time.monotonic() + 10
            while world.ring.used_idx() < done + len(heads):
                assert time.monotonic() < deadline, "the requests were not served"
                time.sleep(0.001)
            done = world.ring.used_idx()
            assert sorted(head for head, _ in world.ring.take_used()) == sorted(heads)

        served(add_reads(1))  # polling: the thread is in its first window
        served(add_reads(1))  # a burst of one: polling goes on
        served(add_reads(4))  # a deep burst: the thread goes to sleep after it
        heads = add_reads(1)
        time.sleep(0.2)
        assert world.ring.used_idx() == done  # asleep: no polling after the deep burst
        os.eventfd_write(world.kick, 1)
        served(heads)  # kicked: a burst of one
        served(add_reads(1))  # polling again
    finally:
        world.close()


class _FailingNativeReads(FileBackend):
    """A file backend whose native target cannot read (opened write-only): every read the
    io_uring does fails, while the Python path's reads succeed."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__(path, readonly=readonly)
        self.write_only = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def native_target(self) -> native.NativeTarget:
        return native.NativeTarget.file(self.write_only)

    def close(self) -> None:
        os.close(self.write_only)
        super().close()


@requires_native
@pytest.mark.parametrize("threaded", [False, True], ids=["drain", "compiled-loop"])
def test_a_failed_io_uring_request_is_served_again_by_the_python_path(threaded: bool) -> None:
    with worlds(9, io_threads=True, file_backend=_FailingNativeReads,
                threaded=threaded) as (_, world):
        engine_of(world)
        dmem = world.dmem
        expected = os.pread(world.file.fileno(), DISK, 0)
        for sector in (0, 64, 128):
            data = dmem.buffer(16384, writable=True)
            status = dmem.buffer(1, writable=True)
            world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0,
                                                                       sector)), data, status])
            world.drain()
            assert [n for _, n in world.ring.take_used()] == [16385]
            assert dmem.read(data.addr, 16384) == expected[sector * 512:sector * 512 + 16384]
            assert dmem.read(status.addr, 1) == b"\0"
        assert world.worker.native_served == 2  # taken natively, then redone by Python
        assert not any(world.log.slots)


@requires_native
def test_resize_reaches_the_native_path() -> None:
    with worlds(3) as (_, world):
        dmem = world.dmem
        last = DISK // 512 - 8

        def read_last() -> int:
            status = dmem.buffer(1, writable=True)
            world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0,
                                                                       last)),
                                  dmem.buffer(4096, writable=True), status])
            world.drain()
            world.ring.take_used()
            return dmem.read(status.addr, 1)[0]

        assert read_last() == v.VIRTIO_BLK_S_OK
        world.handler.set_capacity(DISK - 8192)
        assert read_last() == v.VIRTIO_BLK_S_IOERR


def test_choose() -> None:
    from pyvduse.errors import ConfigError

    target = native.NativeTarget.null()
    assert native.choose("python", target, "d") == "python"
    assert native.choose("auto", None, "d").startswith("python (")
    with pytest.raises(ConfigError, match="--datapath native"):
        native.choose("native", None, "d")
    with pytest.raises(ConfigError, match="unknown data path"):
        native.choose("fast", target, "d")
    if native.available():
        from pyvduse import _fastpath  # type: ignore[attr-defined]

        assert (native.TARGET_NULL, native.TARGET_FD) == (_fastpath.TARGET_NULL,
                                                          _fastpath.TARGET_FD)
        assert native.choose("auto", target, "d") == "native"
        assert native.choose("native", target, "d") == "native"


def test_a_backend_that_overrides_a_data_method_is_not_served_natively(tmp_path: Any) -> None:
    class Logged(FileBackend):
        def readv(self, offset: int, bufs: Any) -> None:
            super().readv(offset, bufs)

    path = tmp_path / "disk"
    path.write_bytes(bytes(4096))
    plain, logged = FileBackend(str(path)), Logged(str(path))
    pool = ThreadPoolBackend(plain, 1)
    try:
        assert plain.native_target() is not None
        assert logged.native_target() is None
        assert pool.native_target() == plain.native_target()
    finally:
        pool.close()  # closes plain too
        logged.close()


def test_unpacked_used_element_layout() -> None:
    # The native path stores used elements as two u32 at 4 + 8 * slot: the spec's layout.
    assert v.vring_used_elem.size == 8
    assert struct.calcsize("<HH") == 4


@requires_native
def test_the_native_path_forgets_mappings_when_the_memory_changes() -> None:
    """After an invalidation (a mapping may have gone) nothing learned before is used."""
    with worlds(11) as (_, world):
        dmem = world.dmem

        def read() -> None:
            world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 0)),
                                  dmem.buffer(512, writable=True), dmem.buffer(1, writable=True)])
            world.drain()
            world.ring.take_used()

        read()
        read()
        native_ring = world.worker._native
        assert native_ring is not None
        assert world.worker.native_served == 1 and native_ring.fast.mappings >= 2
        world.gmem.invalidate()  # what UPDATE_IOTLB or a vhost-user region removal does
        read()  # Python maps the data again, the native path learns it anew
        assert world.worker.native_served == 1
        read()
        assert world.worker.native_served == 2


def test_memories_count_their_generations() -> None:
    from pyvduse.vhost_user.memory import VhostUserMemory

    memory = VhostUserMemory()
    before = native.generation(memory)
    memory.close()
    assert native.generation(memory) == before + 1
    dmem = DriverMemory(size=1 << 20)
    try:
        iotlb = dmem.guest_memory()
        iotlb.invalidate()
        assert native.generation(iotlb) == 1
    finally:
        dmem.close()


class _PipeTarget(FileBackend):
    """A file backend whose native target is a pipe: an io_uring read of it waits until
    the test writes the data, so a request stays in flight as long as the test wants."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__(path, readonly=readonly)
        self.pipe_read, self.pipe_write = os.pipe2(os.O_CLOEXEC)

    def native_target(self) -> native.NativeTarget:
        return native.NativeTarget.file(self.pipe_read)

    def close(self) -> None:
        os.close(self.pipe_read)
        os.close(self.pipe_write)
        super().close()


@requires_native
def test_stopping_a_queue_waits_for_its_io_uring_requests() -> None:
    """A request in the io_uring is in flight like one in a backend: the queue's stop
    waits for it (woken by the ring's eventfd) and completes it into the ring."""
    with worlds(11, io_threads=True, file_backend=_PipeTarget) as (_, world):
        engine_of(world)
        dmem = world.dmem
        world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_FLUSH, 0, 0)),
                              dmem.buffer(1, writable=True)])
        world.drain()  # served by Python, which maps the memory for the native path
        world.ring.take_used()
        data = dmem.buffer(16384, writable=True)
        status = dmem.buffer(1, writable=True)
        world.ring.add_chain([dmem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, 0)),
                              data, status])
        world.worker.drain()
        assert world.worker.in_backend == 1 and world.worker.inflight == 0
        assert world.ring.take_used() == []
        assert any(world.log.slots)  # marked while in flight
        payload = os.urandom(16384)
        backend = world.backend.backend
        assert isinstance(backend, _PipeTarget)
        feeder = threading.Timer(0.3, os.write, (backend.pipe_write, payload))
        feeder.start()
        started = time.monotonic()
        assert QueueThread("stop", [world.worker]).stop(inflight_timeout=10)
        assert 0.2 < time.monotonic() - started < 5
        feeder.join()
        assert [n for _, n in world.ring.take_used()] == [16385]
        assert dmem.read(data.addr, 16384) == payload
        assert dmem.read(status.addr, 1) == b"\0"
        assert world.worker.in_backend == 0
        assert not any(world.log.slots)
