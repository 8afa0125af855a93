"""A real vhost-user-blk client (libblkio) against qemu-storage-daemon and pyvduse.

Each test runs against both servers over a fresh 64 MiB sparse file: ``qsd``
is the reference (QEMU's vhost-user-blk export), ``pyvduse`` the daemon's
vhost-user transport. libblkio plays a VM's virtio-blk driver
(``pyvduse.testing.blkio``). Data is compared byte for byte with patterns
that name their own offset (``vhost_user_servers.pattern``).

Nothing here is skipped: a missing libblkio (``scripts/setup-blkio``) or
qemu-storage-daemon (``scripts/setup-vm``) fails the tests.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vhost_user_servers import (
    BLOCK,
    CLIENT_TIMEOUT,
    SECTOR,
    SERVER_KINDS,
    Server,
    acknowledged_state,
    classify_sectors,
    describe_mismatch,
    pattern,
    start_server,
    start_writer,
)

from pyvduse.testing.blkio import (
    DRIVER_VHOST_USER,
    REQ_NO_UNMAP,
    BlkioClient,
    BlkioError,
    wait_all,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

MiB = 1 << 20
Serve = Callable[..., Server]


@pytest.fixture(params=SERVER_KINDS)
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    """Start servers of the parametrized kind (``serve(num_queues=2)``); stop them after.

    Teardown stops each with SIGTERM and checks that it exits 0 and removes
    its socket. Starting happens in the test, so a server that cannot start
    fails the test rather than erroring its setup.
    """
    kind: str = request.param
    servers: list[Server] = []

    def start(num_queues: int = 1, image: Path | None = None) -> Server:
        directory = tmp_path / f"{kind}{len(servers)}"
        server = start_server(kind, directory, num_queues=num_queues, image=image)
        servers.append(server)
        return server

    yield start
    problems = []
    for server in servers:
        status = server.stop()
        if status != 0:
            problems.append(f"exit status {status}\n{server.describe()}")
        elif server.socket.exists():
            problems.append(f"socket {server.socket} left behind\n{server.describe()}")
    assert not problems, "\n".join(problems)


def connect(server: Server, **kwargs: int) -> BlkioClient:
    """A libblkio client of ``server``'s socket, waiting at most CLIENT_TIMEOUT per request."""
    return BlkioClient(DRIVER_VHOST_USER, str(server.socket), timeout=CLIENT_TIMEOUT, **kwargs)


def check(client: BlkioClient, offset: int, want: bytes, what: str = "") -> None:
    """Read ``len(want)`` bytes at ``offset`` and compare, naming the first bad sector."""
    got = client.read(offset, len(want))
    problem = describe_mismatch(got, offset, want)
    assert not problem, f"{what}: {problem}" if what else problem


def assert_alive(server: Server) -> None:
    """The server still runs and serves a new client."""
    assert server.alive, server.describe()
    with connect(server) as client:
        client.write(0, pattern(0, BLOCK, 99))
        check(client, 0, pattern(0, BLOCK, 99), "a new client after the event")


# -- data ---------------------------------------------------------------------------------

# (offset, length): 4K-aligned, sector-sized, unaligned to 4K but 512-aligned, crossing a
# MiB boundary, multi-MiB, the last block; none overlaps another.
RANGES = [
    (0, BLOCK),
    (BLOCK, SECTOR),
    (3 * BLOCK + SECTOR, 3 * SECTOR),
    (MiB - SECTOR, 2 * BLOCK + SECTOR),
    (2 * MiB + 7 * SECTOR, 129 * SECTOR),
    (5 * MiB, 4 * MiB),
    (12 * MiB + SECTOR, 3 * MiB - SECTOR),
]


def test_write_then_read_back(serve: Serve) -> None:
    server = serve()
    with connect(server) as client:
        assert client.capacity == 64 * MiB
        ranges = [*RANGES, (client.capacity - BLOCK, BLOCK)]
        for seed, (offset, length) in enumerate(ranges, 1):
            data = pattern(offset, length, seed)
            client.write(offset, data)
            check(client, offset, data, f"right after writing {length} bytes at {offset}")
        for seed, (offset, length) in enumerate(ranges, 1):
            check(client, offset, pattern(offset, length, seed), "after all writes")
        check(client, 20 * MiB, bytes(MiB), "never written")


def test_scatter_gather(serve: Serve) -> None:
    """writev/readv with several buffers per request (one descriptor each)."""
    server = serve()
    with connect(server) as client:
        offset, sizes = 7 * MiB + SECTOR, [SECTOR, BLOCK, 3 * SECTOR, 64 * 1024]
        total = sum(sizes)
        data = pattern(offset, total, 5)
        space = client.buffer(2 * total + 8 * BLOCK)
        bufs, pos, cursor = [], 0, 0
        for size in sizes:
            buf = space[cursor:cursor + size]
            buf[:] = data[pos:pos + size]
            bufs.append(buf)
            pos += size
            cursor += size + BLOCK  # a gap: the segments are not contiguous
        tag = client.submit_writev(offset, bufs)
        assert [tuple(c) for c in client.wait(1)] == [(tag, 0)]
        check(client, offset, data, "after writev")
        for buf in bufs:
            buf[:] = bytes(len(buf))
        tag = client.submit_readv(offset, bufs)
        assert [tuple(c) for c in client.wait(1)] == [(tag, 0)]
        assert b"".join(bytes(b) for b in bufs) == data


def test_queue_full_of_requests(serve: Serve) -> None:
    """queue-size writes submitted before any wait, then as many reads; all verified."""
    server = serve()
    with connect(server) as client:
        count = client.queue_size
        assert count >= 64
        source, target = client.buffer(count * BLOCK), client.buffer(count * BLOCK)
        offsets = [(i * 37 % count) * 3 * BLOCK for i in range(count)]
        tags = {}
        for i, offset in enumerate(offsets):
            source[i * BLOCK:(i + 1) * BLOCK] = pattern(offset, BLOCK, 7)
            tags[client.submit_write(offset, source[i * BLOCK:(i + 1) * BLOCK])] = i
        assert client.in_flight() == count
        assert wait_all(client, tags) == {tag: 0 for tag in tags}
        tags = {client.submit_read(offset, target[i * BLOCK:(i + 1) * BLOCK]): i
                for i, offset in enumerate(offsets)}
        assert wait_all(client, tags) == {tag: 0 for tag in tags}
        for i, offset in enumerate(offsets):
            problem = describe_mismatch(bytes(target[i * BLOCK:(i + 1) * BLOCK]), offset,
                                        pattern(offset, BLOCK, 7))
            assert not problem, problem


def test_flush(serve: Serve) -> None:
    server = serve()
    with connect(server) as client:
        client.flush()  # nothing written yet
        client.write(MiB, pattern(MiB, 64 * 1024, 3))
        client.flush()
        tags = [client.submit_flush() for _ in range(4)]
        assert wait_all(client, tags) == {tag: 0 for tag in tags}
        check(client, MiB, pattern(MiB, 64 * 1024, 3), "after flushes")


def test_discard(serve: Serve) -> None:
    server = serve()
    base, length = 4 * MiB, 2 * MiB
    hole_start, hole_length = base + 256 * 1024, MiB
    with connect(server) as client:
        client.write(base, pattern(base, length, 11))
        client.discard(hole_start, hole_length)
        got = client.read(hole_start, hole_length)
        kinds = classify_sectors(got, hole_start, [11])
        garbage = [hole_start + i * SECTOR for i, k in enumerate(kinds) if k == "garbage"]
        assert not garbage, f"discarded sectors hold garbage, first at {garbage[0]}"
        check(client, base, pattern(base, hole_start - base, 11), "before the discarded range")
        end = hole_start + hole_length
        check(client, end, pattern(end, base + length - end, 11), "after the discarded range")
        # the range is usable again
        client.write(hole_start, pattern(hole_start, BLOCK, 12))
        check(client, hole_start, pattern(hole_start, BLOCK, 12), "rewritten after discard")


def test_write_zeroes(serve: Serve) -> None:
    server = serve()
    base, length = 9 * MiB, MiB
    with connect(server) as client:
        client.write(base, pattern(base, length, 13))
        client.write_zeroes(base + BLOCK, 64 * 1024)
        client.write_zeroes(base + 128 * 1024 + SECTOR, 3 * SECTOR, flags=REQ_NO_UNMAP)
        want = bytearray(pattern(base, length, 13))
        want[BLOCK:BLOCK + 64 * 1024] = bytes(64 * 1024)
        want[128 * 1024 + SECTOR:128 * 1024 + 4 * SECTOR] = bytes(3 * SECTOR)
        check(client, base, bytes(want), "after write-zeroes")


@pytest.mark.parametrize("op", ["read", "write", "discard", "write_zeroes"])
def test_out_of_range_fails_and_server_stays_up(serve: Serve, op: str) -> None:
    server = serve()
    with connect(server) as client:
        capacity = client.capacity
        client.write(capacity - BLOCK, pattern(capacity - BLOCK, BLOCK, 17))
        for offset, length in [(capacity, SECTOR), (capacity - SECTOR, 2 * SECTOR),
                               (capacity + MiB, BLOCK), (1 << 60, BLOCK)]:
            with pytest.raises(BlkioError):
                if op == "read":
                    client.read(offset, length)
                elif op == "write":
                    client.write(offset, pattern(0, length, 18))
                elif op == "discard":
                    client.discard(offset, length)
                else:
                    client.write_zeroes(offset, length)
        # the same client goes on, and the block before the end is intact
        check(client, capacity - BLOCK, pattern(capacity - BLOCK, BLOCK, 17),
              "the last block after failed requests past the end")
    assert_alive(server)


def test_disconnect_with_requests_in_flight(serve: Serve) -> None:
    """A client closes with writes and reads in flight; the next one sees every acked write."""
    server = serve()
    acked = [(i * 3 * BLOCK, BLOCK) for i in range(32)]
    pending = [(8 * MiB + i * 2 * BLOCK, 2 * BLOCK) for i in range(48)]
    with connect(server) as client:
        for offset, length in acked:
            client.write(offset, pattern(offset, length, 21))
        space = client.buffer(len(pending) * 2 * BLOCK * 2)
        for i, (offset, length) in enumerate(pending):
            view = space[i * length:(i + 1) * length]
            view[:] = pattern(offset, length, 22)
            client.submit_write(offset, view)
            client.submit_read(offset, space[(len(pending) + i) * length:][:length])
        client.wait(0)  # make sure the server has been told (kicked)
    with connect(server) as client:
        for offset, length in acked:
            check(client, offset, pattern(offset, length, 21), "acknowledged before the close")
        for offset, length in pending:
            kinds = classify_sectors(client.read(offset, length), offset, [22])
            assert "garbage" not in kinds, f"a write in flight at the close left garbage: {kinds}"
        offset = pending[0][0]
        client.write(offset, pattern(offset, BLOCK, 23))
        check(client, offset, pattern(offset, BLOCK, 23), "new I/O after the reconnect")
    assert_alive(server)


def test_client_killed_mid_io(serve: Serve) -> None:
    """SIGKILL a client writing at queue depth 8; a new client finds every acked write."""
    server = serve()
    writer = start_writer(DRIVER_VHOST_USER, server.socket)
    assert writer.stdout is not None
    lines: list[str] = []
    buffered = b""
    acks = 0
    deadline = time.monotonic() + 15
    try:
        while acks < 300:
            assert time.monotonic() < deadline, (
                f"the writer acknowledged only {acks} writes in 15 s\n{server.describe()}")
            ready, _, _ = select.select([writer.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(writer.stdout.fileno(), 65536)
            assert chunk, (f"the writer died: {writer.wait()} "
                           f"{writer.stderr.read().decode() if writer.stderr else ''}"
                           f"\n{server.describe()}")
            buffered += chunk
            *complete, buffered_tail = buffered.split(b"\n")
            buffered = buffered_tail
            for line in complete:
                lines.append(line.decode())
                acks += line.startswith(b"A ")
    finally:
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=10)
    lines += (buffered + rest).decode().splitlines()
    assert writer.returncode == -signal.SIGKILL
    acknowledged, possible = acknowledged_state(lines)
    assert len(acknowledged) >= 250
    with connect(server) as client:
        for offset in sorted(set(acknowledged) | set(possible)):
            allowed = set(possible.get(offset, set()))
            if offset in acknowledged:
                allowed.add(acknowledged[offset])
            # per sector: the acknowledged write or one in flight at the kill (a write
            # that was not acknowledged may be torn); zeros only if nothing was acknowledged
            acceptable = {f"seed {seed}" for seed in allowed}
            if offset not in acknowledged:
                acceptable.add("zero")
            kinds = classify_sectors(client.read(offset, BLOCK), offset, allowed)
            assert set(kinds) <= acceptable, (
                f"block {offset}: acknowledged seed {acknowledged.get(offset)}, in flight "
                f"{sorted(possible.get(offset, set()))}, sectors hold {kinds}")
        client.write(0, pattern(0, 8 * BLOCK, 31))
        check(client, 0, pattern(0, 8 * BLOCK, 31), "new I/O after the kill")
    assert_alive(server)


def test_two_queues(serve: Serve) -> None:
    server = serve(num_queues=2)
    with connect(server, num_queues=2) as client:
        assert client.get_int("max-queues") == 2
        space = client.buffer(64 * BLOCK)
        tags: list[dict[int, int]] = [{}, {}]
        for i in range(32):
            queue = i % 2
            offset = (16 * MiB if queue else 0) + i * BLOCK
            view = space[i * BLOCK:(i + 1) * BLOCK]
            view[:] = pattern(offset, BLOCK, 40 + queue)
            tags[queue][client.submit_write(offset, view, queue=queue)] = offset
        for queue in (0, 1):
            assert client.in_flight(queue) == 16
        for queue in (1, 0):
            assert wait_all(client, tags[queue], queue=queue) == {tag: 0 for tag in tags[queue]}
        # each queue reads what the other one wrote
        for i in range(32):
            queue = i % 2
            offset = (16 * MiB if queue else 0) + i * BLOCK
            got = client.read(offset, BLOCK, queue=1 - queue)
            problem = describe_mismatch(got, offset, pattern(offset, BLOCK, 40 + queue))
            assert not problem, f"queue {1 - queue} reading queue {queue}'s write: {problem}"
        client.flush(queue=1)
        client.discard(16 * MiB, MiB, queue=1)
        client.write_zeroes(0, 4 * BLOCK, queue=0)
        check(client, 0, bytes(4 * BLOCK), "write-zeroes on queue 0")


def test_image_holds_what_the_client_wrote(serve: Serve) -> None:
    server = serve()
    with connect(server) as client:
        for seed, (offset, length) in enumerate(RANGES, 51):
            client.write(offset, pattern(offset, length, seed))
        client.write_zeroes(RANGES[-1][0], BLOCK)
        client.flush()
    assert server.stop() == 0, server.describe()
    assert not server.socket.exists(), f"socket left behind\n{server.describe()}"
    image = server.image.read_bytes()
    assert len(image) == 64 * MiB
    for seed, (offset, length) in enumerate(RANGES, 51):
        want = bytearray(pattern(offset, length, seed))
        if offset == RANGES[-1][0]:
            want[:BLOCK] = bytes(BLOCK)
        problem = describe_mismatch(image[offset:offset + length], offset, bytes(want))
        assert not problem, f"image file: {problem}"
    assert image[20 * MiB:21 * MiB] == bytes(MiB)


@pytest.mark.parametrize(("rw", "bs", "iodepth", "wait_mode"), [
    ("randwrite", BLOCK, 8, "block"),
    ("read", MiB, 2, "loop"),
])
def test_load_generator(serve: Serve, rw: str, bs: int, iodepth: int, wait_mode: str) -> None:
    """bench/blkio_load.c builds and runs a short load without a failed request."""
    from blkio_load import run_load

    server = serve()
    result = run_load(DRIVER_VHOST_USER, server.socket, rw, bs, iodepth, 0.3, wait_mode,
                      timeout=30)
    assert result["errors"] == 0, result
    assert result["completions"] > iodepth, result
    assert (result["rw"], result["bs"], result["iodepth"], result["mode"]) == (
        rw, bs, iodepth, wait_mode)
    assert_alive(server)
