"""libblkio's virtio-blk-vhost-vdpa driver as the client of ``pyvduse serve --attach vhost``.

Runs in the VM guest. The daemon serves a file as ``/dev/vhost-vdpa-N`` and
:class:`pyvduse.testing.blkio.BlkioClient` plays the VMM: the same path as
QEMU's ``virtio-blk-vhost-vdpa`` blockdev or ``vhost-vdpa-device-pci``, with
its memory mapped through vhost-vdpa's IOTLB (``VDUSE_UPDATE_IOTLB``) and a
device reset at every close. Every byte read is checked against what was
written: each 512-byte sector of the data carries its own offset and the seed
of the write that put it there (:func:`pattern`), so a sector from the wrong
place or from another write is told apart from the right one.

Run as a script (``python test_vhost_vdpa_client.py writer DEVICE SEED IODEPTH
BLOCKS``) this file is the client that the open/close/kill test kills: it
writes 4 KiB blocks at random, IODEPTH in flight, reads each back once its
write completed, and reports each write on stdout (a pipe) before submitting
it (``S offset seed``) and once it completed (``A offset seed``), until it is
killed. It imports neither pytest nor the fixtures (pytest alone takes
seconds to import in the emulated guest).
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvduse.testing.blkio import (
    DRIVER_VHOST_VDPA,
    REQ_NO_UNMAP,
    BlkioClient,
    BlkioError,
    library_path,
)

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
BLOCK = 4096
DEVICE_SIZE = 64 * MiB
CLIENT_TIMEOUT = 30.0
"""Seconds a client waits for any one request: a hung daemon fails the test."""

CYCLES = 24
"""Open/close/kill cycles in a row, alternating a clean close and a SIGKILL."""
REGION_BLOCKS = 1024
"""The cycles write within the first REGION_BLOCKS blocks (4 MiB): many overwrites."""
KILL_AFTER_ACKS = 120
"""Acknowledged writes a killed client gets to make before the kill (always with more
in flight: it keeps its queue full)."""
WRITER_IODEPTH = 8

_MAGIC = b"PYVDVDPA"
_HEADER = struct.Struct("<8sQQ")  # magic, seed, absolute byte offset of the sector
_NOISE = random.Random(20261205).randbytes(1 << 16)


# -- data ---------------------------------------------------------------------------------


def pattern(offset: int, length: int, seed: int) -> bytes:
    """Data for ``[offset, offset + length)`` written with ``seed``; 0 means zeros.

    Every sector starts with a magic, the seed and its own absolute offset,
    followed by noise that depends on both.
    """
    assert offset % SECTOR == 0 and length % SECTOR == 0, (offset, length)
    if seed == 0:
        return bytes(length)
    out = bytearray(length)
    for pos in range(0, length, SECTOR):
        absolute = offset + pos
        start = (absolute // SECTOR * 8191 + seed * 131) % (len(_NOISE) - SECTOR)
        out[pos:pos + SECTOR] = _NOISE[start:start + SECTOR]
        _HEADER.pack_into(out, pos, _MAGIC, seed, absolute)
    return bytes(out)


def describe(got: bytes, offset: int, allowed: set[int]) -> str:
    """What ``got`` (read at ``offset``) holds, sector by sector, where it is not allowed.

    Empty when every sector is one of ``allowed`` seeds' (0: zeros) data for
    its own offset.
    """
    bad = []
    for pos in range(0, len(got), SECTOR):
        sector = got[pos:pos + SECTOR]
        if any(sector == pattern(offset + pos, SECTOR, seed) for seed in allowed):
            continue
        magic, seed, origin = _HEADER.unpack_from(sector)
        if sector == bytes(SECTOR):
            holds = "zeros"
        elif magic == _MAGIC:
            holds = f"seed {seed} for offset {origin}"
        else:
            holds = f"unknown bytes {sector[:16].hex()}"
        bad.append(f"byte {offset + pos}: {holds}")
    if not bad:
        return ""
    return (f"{len(bad)} of {len(got) // SECTOR} sectors wrong (allowed seeds "
            f"{sorted(allowed)}; 0 = zeros): {'; '.join(bad[:4])}")


def connect(device: str) -> BlkioClient:
    return BlkioClient(DRIVER_VHOST_VDPA, device, timeout=CLIENT_TIMEOUT)


def check_read(client: BlkioClient, offset: int, want: bytes, what: str) -> None:
    got = client.read(offset, len(want))
    assert got == want, f"{what}: {describe(got, offset, {_seed_of(want)})}"


def _seed_of(data: bytes) -> int:
    magic, seed, _ = _HEADER.unpack_from(data)
    return int(seed) if magic == _MAGIC else 0


def wait_tags(client: BlkioClient, tags: set[int]) -> dict[int, int]:
    """Reap until every tag in ``tags`` completed: ``{tag: ret}``."""
    results: dict[int, int] = {}
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while not tags <= results.keys():
        assert time.monotonic() < deadline, f"{len(tags - results.keys())} requests never completed"
        for completion in client.wait(1, CLIENT_TIMEOUT):
            results[completion.tag] = completion.ret
    return results


def alive(daemon: Any) -> None:
    """The daemon (a conftest ``Daemon``) is still running."""
    assert daemon.proc.poll() is None, (
        f"the daemon exited with {daemon.proc.returncode}:\n{daemon.output()}")


def make_file(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        stream.truncate(size)


def _serve_vhost(name: str, backing_file: Path) -> Any:
    """``conftest.serving`` of the file as /dev/vhost-vdpa-N (imported here: see the docstring)."""
    from conftest import serving

    make_file(backing_file, DEVICE_SIZE)
    return serving(name, "--attach", "vhost", "file", f"path={backing_file}")


def _check_vhost_node(name: str, device: str) -> None:
    assert re.fullmatch(r"/dev/vhost-vdpa-\d+", device), f"not a vhost-vdpa node: {device!r}"
    driver = Path("/sys/bus/vdpa/devices", name, "driver").resolve().name
    assert driver == "vhost_vdpa", driver
    library_path()  # raises (fails the test) when libblkio is missing


# -- I/O and commands ---------------------------------------------------------------------


def test_io_flush_discard_write_zeroes(backing_file: Path) -> None:
    """Byte-checked reads and writes of many sizes, many in flight, and every command."""
    with _serve_vhost("pv-vdpa-io", backing_file) as daemon:
        _check_vhost_node("pv-vdpa-io", daemon.device)
        with connect(daemon.device) as client:
            assert client.capacity == DEVICE_SIZE
            assert client.request_alignment == SECTOR
            assert not client.get_bool("read-only")
            queue_size = client.queue_size
            assert queue_size >= 64, queue_size

            # one request at a time, from a sector to 1 MiB, at unaligned-to-page offsets
            sizes = [512, 1024, 4 * KiB, 8 * KiB + 512, 60 * KiB, 64 * KiB, 128 * KiB,
                     256 * KiB + 3 * SECTOR, MiB]
            offset = SECTOR
            for i, size in enumerate(sizes):
                data = pattern(offset, size, 100 + i)
                client.write(offset, data)
                check_read(client, offset, data, f"{size}-byte read-back at {offset}")
                offset += size + 7 * SECTOR
            # everything written one at a time is still there, read in one request
            end = offset
            got = client.read(SECTOR, end - SECTOR)
            pos = SECTOR
            for i, size in enumerate(sizes):
                want = pattern(pos, size, 100 + i)
                assert got[pos - SECTOR:pos - SECTOR + size] == want, (
                    f"{size}-byte write at {pos}, read back in one request: "
                    f"{describe(got[pos - SECTOR:pos - SECTOR + size], pos, {100 + i})}")
                pos += size + 7 * SECTOR

            # a queue full of requests in flight at once: writes of mixed sizes, then reads
            depth = min(queue_size, 128)
            slot = 16 * KiB
            space = client.buffer(2 * depth * slot)
            base = 8 * MiB
            lengths = [(4 * KiB, 8 * KiB, 512, 16 * KiB)[i % 4] for i in range(depth)]
            tags = {}
            for i in range(depth):
                off, length = base + i * slot, lengths[i]
                view = space[i * slot:i * slot + length]
                view[:] = pattern(off, length, 200 + i)
                tags[client.submit_write(off, view)] = i
            results = wait_tags(client, set(tags))
            assert all(ret == 0 for ret in results.values()), results
            reads = {}
            for i in range(depth):
                off, length = base + i * slot, lengths[i]
                reads[client.submit_read(off, space[(depth + i) * slot:][:length])] = i
            results = wait_tags(client, set(reads))
            assert all(ret == 0 for ret in results.values()), results
            for i in range(depth):
                off, length = base + i * slot, lengths[i]
                got = bytes(space[(depth + i) * slot:][:length])
                assert got == pattern(off, length, 200 + i), (
                    f"request {i} of {depth} in flight: {describe(got, off, {200 + i})}")

            # scatter-gather: one request, several buffers
            parts = [space[0:4 * KiB], space[slot:slot + 512], space[2 * slot:2 * slot + 8 * KiB]]
            total = sum(p.nbytes for p in parts)
            data = pattern(12 * MiB, total, 300)
            pos = 0
            for part in parts:
                part[:] = data[pos:pos + part.nbytes]
                pos += part.nbytes
            assert set(wait_tags(client, {client.submit_writev(12 * MiB, parts)}).values()) == {0}
            check_read(client, 12 * MiB, data, "writev read back")
            outs = [space[3 * slot:3 * slot + 512], space[4 * slot:4 * slot + 12 * KiB]]
            tag = client.submit_readv(12 * MiB, outs)
            assert set(wait_tags(client, {tag}).values()) == {0}
            assert b"".join(bytes(o) for o in outs) == data[:512 + 12 * KiB], "readv"

            # flush
            client.flush()

            # discard: offered by the file backend; the range reads as zeros or as before
            assert client.get_uint64("max-discard-len") > 0, "discard not offered"
            start = 16 * MiB
            client.write(start, pattern(start, MiB, 400))
            client.discard(start + 64 * KiB, 512 * KiB)
            got = client.read(start, MiB)
            assert got[:64 * KiB] == pattern(start, 64 * KiB, 400), "before the discard"
            hole = start + 64 * KiB
            assert not describe(got[64 * KiB:576 * KiB], hole, {0, 400}), (
                describe(got[64 * KiB:576 * KiB], hole, {0, 400}))
            assert got[576 * KiB:] == pattern(start + 576 * KiB, MiB - 576 * KiB, 400), (
                "after the discard")

            # write-zeroes, with and without permission to deallocate
            assert client.get_uint64("max-write-zeroes-len") > 0, "write-zeroes not offered"
            start = 20 * MiB
            client.write(start, pattern(start, MiB, 500))
            client.write_zeroes(start + 4 * KiB, 64 * KiB)
            client.write_zeroes(start + 128 * KiB, 12 * KiB + 512, flags=REQ_NO_UNMAP)
            got = client.read(start, MiB)
            expect = bytearray(pattern(start, MiB, 500))
            expect[4 * KiB:68 * KiB] = bytes(64 * KiB)
            expect[128 * KiB:140 * KiB + 512] = bytes(12 * KiB + 512)
            assert got == bytes(expect), describe(got, start, {0, 500})

            # a request past the end fails; the device goes on serving
            try:
                client.read(DEVICE_SIZE, BLOCK)
            except BlkioError:
                pass
            else:
                raise AssertionError("a read past the end of the device succeeded")
            check_read(client, 16 * MiB, pattern(16 * MiB, 64 * KiB, 400), "after the error")
            client.flush()
        alive(daemon)

        # a second client (after the first one's close reset the device) sees it all
        with connect(daemon.device) as client:
            check_read(client, 8 * MiB, pattern(8 * MiB, 4 * KiB, 200), "after a reconnect")
            check_read(client, 12 * MiB, data, "writev after a reconnect")
        alive(daemon)
    image = backing_file.read_bytes() if backing_file.exists() else b""
    assert image[8 * MiB:8 * MiB + 4 * KiB] == pattern(8 * MiB, 4 * KiB, 200), "image file"


# -- open, I/O, close or SIGKILL, many times in a row ---------------------------------------


@dataclass
class Model:
    """What each block of the cycles' region may hold: seeds (0: zeros), one when exact."""

    allowed: dict[int, set[int]] = field(default_factory=dict)
    next_seed: int = 1000
    #: Blocks found holding a write that was in flight (not acknowledged) at a kill.
    landed: int = 0

    def seeds(self, block: int) -> set[int]:
        return self.allowed.get(block, {0})

    def seed(self) -> int:
        self.next_seed += 1
        return self.next_seed


SPACE = REGION_BLOCKS * BLOCK + 2 * 16 * 4 * BLOCK
"""Bytes of request buffers a cycle's client maps (one region: the region's size and more)."""


def verify_region(client: BlkioClient, space: memoryview, model: Model, what: str) -> list[int]:
    """Read the whole region (64 KiB requests, all in flight) and check every block.

    Returns the blocks that may hold more than one thing (a write in flight
    at a kill): the caller rewrites them.
    """
    chunk = 64 * KiB
    per = chunk // BLOCK
    tags = {client.submit_read(i * chunk, space[i * chunk:(i + 1) * chunk]): i
            for i in range(REGION_BLOCKS * BLOCK // chunk)}
    results = wait_tags(client, set(tags))
    failed = {tags[t]: ret for t, ret in results.items() if ret != 0}
    assert not failed, f"{what}: reads failed: {failed}"
    ambiguous = []
    for block in range(REGION_BLOCKS):
        got = bytes(space[block * BLOCK:(block + 1) * BLOCK])
        allowed = model.seeds(block)
        if len(allowed) == 1:
            (seed,) = allowed
            if got == pattern(block * BLOCK, BLOCK, seed):
                continue
        problem = describe(got, block * BLOCK, allowed)
        assert not problem, f"{what}: block {block} (chunk {block // per}): {problem}"
        if len(allowed) > 1:
            ambiguous.append(block)
            if got == pattern(block * BLOCK, BLOCK, max(allowed)):
                model.landed += 1  # a write not acknowledged reached the device
    return ambiguous


def clean_cycle(client: BlkioClient, space: memoryview, model: Model, rng: random.Random,
                cycle: int) -> int:
    """Byte-checked writes of 1-4 blocks, 16 in flight, then their read-back: the writes."""
    space = space[REGION_BLOCKS * BLOCK:]
    writes = 0
    for _ in range(6):
        batch: list[tuple[int, int, int]] = []  # first block, blocks, seed
        taken: set[int] = set()
        while len(batch) < 16:
            count = rng.randint(1, 4)
            first = rng.randrange(REGION_BLOCKS - count)
            blocks = set(range(first, first + count))
            if blocks & taken:
                continue
            taken |= blocks
            batch.append((first, count, model.seed()))
        tags = {}
        for i, (first, count, seed) in enumerate(batch):
            view = space[i * 4 * BLOCK:][:count * BLOCK]
            view[:] = pattern(first * BLOCK, count * BLOCK, seed)
            tags[client.submit_write(first * BLOCK, view)] = i
        results = wait_tags(client, set(tags))
        assert all(r == 0 for r in results.values()), f"cycle {cycle}: writes failed {results}"
        for first, count, seed in batch:
            for block in range(first, first + count):
                model.allowed[block] = {seed}
        writes += len(batch)
        reads = {}
        for i, (first, count, _seed) in enumerate(batch):
            view = space[(16 + i) * 4 * BLOCK:][:count * BLOCK]
            reads[client.submit_read(first * BLOCK, view)] = i
        results = wait_tags(client, set(reads))
        assert all(r == 0 for r in results.values()), f"cycle {cycle}: reads failed {results}"
        for i, (first, count, seed) in enumerate(batch):
            got = bytes(space[(16 + i) * 4 * BLOCK:][:count * BLOCK])
            assert got == pattern(first * BLOCK, count * BLOCK, seed), (
                f"cycle {cycle}: read-back of {count} block(s) at block {first}: "
                f"{describe(got, first * BLOCK, {seed})}")
    return writes


def settle(client: BlkioClient, model: Model, blocks: list[int]) -> None:
    """Rewrite blocks the model is unsure of, so that it is exact again."""
    for block in blocks:
        seed = model.seed()
        client.write(block * BLOCK, pattern(block * BLOCK, BLOCK, seed))
        model.allowed[block] = {seed}


def kill_cycle(device: str, model: Model, cycle: int, delay: float) -> tuple[int, int]:
    """Run the writer in a child, SIGKILL it mid-I/O; fold its report into ``model``.

    Returns (acknowledged writes, writes not acknowledged at the kill).
    """
    seed_base = model.next_seed
    writer = subprocess.Popen(
        [sys.executable, __file__, "writer", device, str(seed_base), str(WRITER_IODEPTH),
         str(REGION_BLOCKS)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None and writer.stderr is not None
    lines: list[str] = []
    buffered = b""
    acks = 0
    outstanding: set[bytes] = set()  # writes reported submitted and not yet completed
    deadline = time.monotonic() + 60
    try:
        # The daemon completes a batch of requests at once, so the writer works in
        # rounds: a round of writes, then their read-back. Kill it after enough
        # acknowledgements, while a round of writes is in flight (a few ms after
        # their submission reports, a different moment every cycle).
        while acks < KILL_AFTER_ACKS or len(outstanding) < WRITER_IODEPTH // 2:
            assert time.monotonic() < deadline, (
                f"cycle {cycle}: the writer acknowledged only {acks} writes in 60 s")
            ready, _, _ = select.select([writer.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(writer.stdout.fileno(), 65536)
            if not chunk:
                writer.wait(10)
                raise AssertionError(
                    f"cycle {cycle}: the writer died ({writer.returncode}) before the kill: "
                    f"{writer.stderr.read().decode(errors='replace')}")
            buffered += chunk
            *complete, buffered = buffered.split(b"\n")
            for line in complete:
                lines.append(line.decode())
                if line.startswith(b"A "):
                    acks += 1
                    outstanding.discard(line[2:])
                elif line.startswith(b"S "):
                    outstanding.add(line[2:])
        time.sleep(delay)
    finally:
        writer.send_signal(signal.SIGKILL)
        rest, errors = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, (
        f"cycle {cycle}: writer exit {writer.returncode}: {errors.decode(errors='replace')}")
    lines += (buffered + rest).decode(errors="replace").splitlines()
    # fold the report in: the last acknowledged write of a block, or any write to it
    # submitted after that one and never acknowledged (in flight at the kill)
    acked: dict[int, int] = {}
    submitted: dict[int, set[int]] = {}
    top = seed_base
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("S", "A"):
            continue  # a torn last line
        block, seed = int(parts[1]) // BLOCK, int(parts[2])
        top = max(top, seed)
        if parts[0] == "S":
            submitted.setdefault(block, set()).add(seed)
        else:
            acked[block] = seed
            submitted[block] = {s for s in submitted.get(block, set()) if s > seed}
    in_flight = 0
    for block in acked.keys() | submitted.keys():
        pending = submitted.get(block, set())
        in_flight += len(pending)
        base = {acked[block]} if block in acked else model.seeds(block)
        model.allowed[block] = base | pending
    model.next_seed = top + 1
    total_acks = sum(1 for line in lines if line.startswith("A "))
    return total_acks, in_flight


def test_open_close_kill_cycles(backing_file: Path) -> None:
    """Clients open, write and check, and close or die, one after the other; nothing is lost."""
    rng = random.Random(5)
    model = Model()
    with _serve_vhost("pv-vdpa-cyc", backing_file) as daemon:
        _check_vhost_node("pv-vdpa-cyc", daemon.device)
        started = time.monotonic()
        report = []
        killed_in_flight = 0
        for cycle in range(CYCLES):
            if cycle % 2 == 0:
                with connect(daemon.device) as client:
                    assert client.capacity == DEVICE_SIZE
                    space = client.buffer(SPACE)
                    settle(client, model,
                           verify_region(client, space, model, f"cycle {cycle} start"))
                    writes = clean_cycle(client, space, model, rng, cycle)
                    verify_region(client, space, model, f"cycle {cycle} end")
                report.append(f"{cycle}: close after {writes} writes")
            else:
                acks, in_flight = kill_cycle(daemon.device, model, cycle,
                                             rng.uniform(0, 0.006))
                assert acks >= KILL_AFTER_ACKS
                report.append(f"{cycle}: SIGKILL after {acks} acks, {in_flight} in flight")
                killed_in_flight += in_flight > 0
            alive(daemon)
        # a last client sees every acknowledged write of all of them
        with connect(daemon.device) as client:
            space = client.buffer(SPACE)
            settle(client, model, verify_region(client, space, model, "final check"))
            verify_region(client, space, model, "final check, settled")
        alive(daemon)
        elapsed = time.monotonic() - started
        print(f"{CYCLES} cycles in {elapsed:.1f} s; {model.landed} writes not acknowledged "
              "before a kill were found on the device: " + "; ".join(report))
        assert killed_in_flight >= CYCLES // 4, (
            f"only {killed_in_flight} of {CYCLES // 2} clients were killed with writes in flight")
        output = daemon.output()
        resets = output.count("reset by the driver")
        assert resets >= CYCLES + 1, f"{resets} resets logged for {CYCLES + 1} clients:\n{output}"
        assert "Traceback" not in output and "ERROR" not in output, output
    written = sum(1 for seeds in model.allowed.values() if seeds != {0})
    assert written > REGION_BLOCKS // 2, f"only {written} blocks of the region were written"


# -- the killed client ---------------------------------------------------------------------


def _writer(device: str, seed_base: int, iodepth: int, blocks: int) -> None:
    """Write blocks of :func:`pattern` at random, ``iodepth`` in flight, for ever.

    Each block has at most one request in flight; every write gets a new
    seed and, once it completed, is read back and checked (exit 1 on a
    mismatch or a failed request). Reports ``S block-offset seed`` before a
    write is submitted and ``A block-offset seed`` once it completed.
    """
    out = sys.stdout.fileno()
    rng = random.Random(seed_base)
    with connect(device) as client:
        space = client.buffer(2 * iodepth * BLOCK)
        pending: dict[int, tuple[str, int, int, int]] = {}  # tag -> (kind, slot, offset, seed)
        busy: set[int] = set()
        free = list(range(iodepth))
        seed = seed_base
        while True:
            while free:
                slot = free.pop()
                offset = rng.randrange(blocks) * BLOCK
                while offset in busy:
                    offset = rng.randrange(blocks) * BLOCK
                seed += 1
                view = space[slot * BLOCK:(slot + 1) * BLOCK]
                view[:] = pattern(offset, BLOCK, seed)
                os.write(out, f"S {offset} {seed}\n".encode())
                pending[client.submit_write(offset, view)] = ("w", slot, offset, seed)
                busy.add(offset)
            for tag, ret in client.wait(1, CLIENT_TIMEOUT):
                kind, slot, offset, done = pending.pop(tag)
                if ret != 0:
                    os.write(2, f"{kind} at {offset} failed: {os.strerror(-ret)}\n".encode())
                    sys.exit(1)
                if kind == "w":
                    os.write(out, f"A {offset} {done}\n".encode())
                    view = space[(iodepth + slot) * BLOCK:(iodepth + slot + 1) * BLOCK]
                    pending[client.submit_read(offset, view)] = ("r", slot, offset, done)
                    continue
                got = bytes(space[(iodepth + slot) * BLOCK:(iodepth + slot + 1) * BLOCK])
                if got != pattern(offset, BLOCK, done):
                    os.write(2, f"read-back at {offset}: {describe(got, offset, {done})}\n"
                             .encode())
                    sys.exit(1)
                busy.discard(offset)
                free.append(slot)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "writer":
        _writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(f"usage: {sys.argv[0]} writer DEVICE SEED_BASE IODEPTH BLOCKS")
