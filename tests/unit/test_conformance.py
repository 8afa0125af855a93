"""The backend conformance suite: every built-in backend and example through it, and the
suite itself failing on broken backends (each check can fail)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ImageServer

from pyvduse.backends import Backend, FileBackend, MemoryBackend, NullBackend, load_backend
from pyvduse.backends.base import Done, run_and_report
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.testing import conformance
from pyvduse.testing.conformance import CHECKS, Check, ConformanceError, check_backend

SIZE = 4 << 20
Factory = Callable[[], Backend]


def sparse(directory: Path, size: int = SIZE) -> Path:
    path = directory / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def zeroes(offset: int, length: int) -> bytes:
    return bytes(length)


# -- every built-in backend and both examples -------------------------------------------

SUBJECTS = ["null", "memory", "file", "file-direct", "file-readonly", "blockdev",
            "example-ramdisk", "example-http_disk", "example-http_disk-nocache",
            "file-thread-pool"]


class Subject:
    def __init__(self, factory: Factory, stores_data: bool = True,
                 initial: bytes | Callable[[int, int], bytes] | None = zeroes) -> None:
        self.factory = factory
        self.stores_data = stores_data
        self.initial = initial

    def run(self, check: Check) -> bool:
        return check.run(self.factory, stores_data=self.stores_data, initial=self.initial)


@pytest.fixture(params=SUBJECTS)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    kind: str = request.param
    if kind == "null":
        return Subject(lambda: NullBackend(SIZE), stores_data=False)
    if kind == "memory":
        return Subject(lambda: MemoryBackend(SIZE))
    if kind == "file":
        image = sparse(tmp_path)
        return Subject(lambda: FileBackend(image))
    if kind == "file-direct":
        image = sparse(request.getfixturevalue("direct_dir"))
        return Subject(lambda: FileBackend(image, direct=True))
    if kind == "file-thread-pool":
        image = sparse(tmp_path)
        return Subject(lambda: ThreadPoolBackend(FileBackend(image), threads=4, min_bytes=0))
    if kind == "file-readonly":
        content = bytes(range(256)) * (SIZE // 256)
        image = tmp_path / "ro.img"
        image.write_bytes(content)
        return Subject(lambda: FileBackend(image, readonly=True), initial=content)
    if kind == "blockdev":
        device = request.getfixturevalue("loop_device")
        return Subject(lambda: FileBackend(device))
    if kind == "example-ramdisk":
        return Subject(lambda: load_backend(script=EXAMPLES / "ramdisk.py",
                                            options={"size": "4M"}))
    server: ImageServer = request.getfixturevalue("image_server")
    cache = "0" if kind.endswith("nocache") else "256k"
    return Subject(lambda: load_backend(script=EXAMPLES / "http_disk.py",
                                        options={"url": server.url, "cache": cache}),
                   initial=server.image)


@pytest.mark.parametrize("check", CHECKS, ids=str)
def test_conformance(subject: Subject, check: Check) -> None:
    ran = subject.run(check)
    backend = subject.factory()
    try:
        writable = backend.can_write
        resizes = backend.can_resize
    finally:
        backend.close()
    if check.name in ("round_trip", "vectored", "write_zeroes", "discard"):
        assert ran == writable  # every writable built-in also discards and zeroes
    elif check.name == "submit":
        assert ran == isinstance(backend, ThreadPoolBackend)
    elif check.name == "resize":
        assert ran == resizes
    else:
        assert ran


def test_check_backend_runs_what_applies(tmp_path: Path) -> None:
    names = [check.name for check in CHECKS if check.name != "submit"]
    assert check_backend(lambda: MemoryBackend(1 << 20)) == names
    image = tmp_path / "ro.img"
    image.write_bytes(b"x" * 8192)
    assert check_backend(lambda: FileBackend(image, readonly=True), initial=b"x" * 8192) == [
        "geometry", "capabilities", "reads", "concurrency"]


@pytest.mark.parametrize("size", [512, 1536, 4096 + 100])
def test_tiny_disks(size: int) -> None:
    assert "concurrency" in check_backend(lambda: MemoryBackend(size - size % 512))


# -- the suite catches broken backends --------------------------------------------------


class Ram(Backend):
    """A correct RAM disk the broken variants below start from."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self.data[offset:offset + len(buf)] = buf

    def discard(self, offset: int, length: int) -> None:
        pass


class GrowingSize(Ram):
    def size(self) -> int:
        self.data += bytes(512)
        return len(self.data)


class OddBlockSize(Ram):
    @property
    def preferred_block_size(self) -> int:
        return 1000


class ClaimsFlushWithoutDefiningIt(Ram):
    @property
    def can_flush(self) -> bool:
        return True


class PartialRead(Ram):
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:-1] = self.data[offset:offset + len(buf) - 1]


class UnrepeatableRead(Ram):
    def read(self, offset: int, buf: memoryview) -> None:
        self.data[offset] ^= 1
        super().read(offset, buf)


class ReadvIgnoresPosition(Ram):
    def readv(self, offset: int, bufs: Any) -> None:
        for buf in bufs:
            self.read(offset, buf)


class WriteIgnoresOffset(Ram):
    def write(self, offset: int, buf: memoryview) -> None:
        super().write(0, buf)


class WriteSpills(Ram):
    def write(self, offset: int, buf: memoryview) -> None:
        super().write(offset, buf)
        end = offset + len(buf)
        self.data[end:end + 512] = b"\xff" * len(self.data[end:end + 512])


class NeedsWritableSource(Ram):
    """Fails on read-only sources (guest memory may be mapped read-only)."""

    def write(self, offset: int, buf: memoryview) -> None:
        buf[:0] = b""
        super().write(offset, buf)


class ZeroesNothing(Ram):
    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        pass


class ZeroesTooMuch(Ram):
    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.data[offset:offset + length + 512] = bytes(length + 512)


class DiscardSpills(Ram):
    def discard(self, offset: int, length: int) -> None:
        self.data[offset - 512:offset + length] = bytes(length + 512)


class DiscardBreaksWrites(Ram):
    def __init__(self) -> None:
        super().__init__()
        self.discarded = False

    def discard(self, offset: int, length: int) -> None:
        self.discarded = True

    def write(self, offset: int, buf: memoryview) -> None:
        if not self.discarded:
            super().write(offset, buf)


class SharedScratch(Ram):
    """Not thread-safe: one scratch position shared by every thread."""

    def write(self, offset: int, buf: memoryview) -> None:
        self.position = offset
        time.sleep(0.0005)
        super().write(self.position, buf)


class FlushFails(Ram):
    def flush(self) -> None:
        raise OSError(5, "flush failed")


class AsyncRam(Ram):
    """A correct asynchronous RAM disk: completes every request on a thread of its own."""

    submit_min_bytes = 0

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        threading.Thread(target=run_and_report, args=(done, self.readv, offset, bufs)).start()

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        threading.Thread(target=run_and_report, args=(done, self.writev, offset, bufs)).start()


class NeverDone(AsyncRam):
    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        if offset:  # forgets every read but the first
            super().submit_readv(offset, bufs, done)


class DoneTwice(AsyncRam):
    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self.writev(offset, bufs)
        done(None)
        done(None)


class DoneBeforeData(AsyncRam):
    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        done(None)


class DoneWithError(AsyncRam):
    def submit_flush(self, done: Done) -> None:
        done(OSError(5, "flush lost"))


BROKEN: list[tuple[Callable[[], Backend], str, str]] = [
    (GrowingSize, "geometry", "changes between calls"),
    (OddBlockSize, "geometry", "preferred_block_size 1000"),
    (lambda: Ram(100), "geometry", "holds no 512-byte block"),
    (ClaimsFlushWithoutDefiningIt, "capabilities", "can_flush is True"),
    (PartialRead, "reads", "unwritten"),
    (UnrepeatableRead, "reads", "not repeatable"),
    (ReadvIgnoresPosition, "reads", "readv over uneven buffers"),
    (WriteIgnoresOffset, "round_trip", "read back the write at"),
    (WriteSpills, "round_trip", "the block after a write"),
    (NeedsWritableSource, "reads", "raised TypeError: cannot modify read-only"),
    (ZeroesNothing, "write_zeroes", "write_zeroes of 1 block"),
    (ZeroesTooMuch, "write_zeroes", "write_zeroes of 1 block"),
    (DiscardSpills, "discard", "the block before a discard"),
    (DiscardBreaksWrites, "discard", "read back a write after discard"),
    (SharedScratch, "concurrency", "thread"),
    (FlushFails, "round_trip", "raised OSError: .*flush failed"),
    (NeverDone, "submit", r"submit_readv: done never called for requests \[0\]"),
    (DoneTwice, "submit", "submit_writev: done called more than once"),
    (DoneBeforeData, "submit", "submit_readv at 0: byte 0"),
    (DoneWithError, "submit", "submit_flush: request 0: OSError: .*flush lost"),
]


@pytest.mark.parametrize(("factory", "check", "message"), BROKEN,
                         ids=[f"{check}-{i}" for i, (_, check, _) in enumerate(BROKEN)])
def test_suite_catches(factory: Callable[[], Backend], check: str, message: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conformance, "_SUBMIT_TIMEOUT", 0.5)
    with pytest.raises(ConformanceError, match=rf"^{check}: .*{message}"):
        check_backend(factory)


def test_the_unbroken_ram_disk_passes() -> None:  # neither resizes
    assert check_backend(Ram) == [check.name for check in CHECKS
                                  if check.name not in ("submit", "resize")]
    assert check_backend(AsyncRam) == [check.name for check in CHECKS if check.name != "resize"]
    assert issubclass(ConformanceError, AssertionError)  # pytest reports it as a failed assert


def test_stores_data_must_match_the_backend() -> None:
    with pytest.raises(ConformanceError, match=r"^round_trip: read back the write at 0"):
        check_backend(lambda: MemoryBackend(1 << 20), stores_data=False)
    with pytest.raises(ConformanceError, match=r"^round_trip: read back the write at 0"):
        check_backend(lambda: NullBackend(1 << 20), stores_data=True)


def test_initial_content_is_checked() -> None:
    with pytest.raises(ConformanceError, match=r"^reads: read at 0 against the initial content: "
                       r"byte 0 is 0x00, expected 0x01"):
        check_backend(lambda: MemoryBackend(1 << 20), initial=b"\x01" * (1 << 20))
    with pytest.raises(ConformanceError, match=r"^reads: read at 2560 against the initial"):
        check_backend(lambda: MemoryBackend(1 << 20),
                      initial=lambda offset, length: bytes(length) if offset < 2560 else b"x")


def test_each_check_closes_its_backend_even_on_failure() -> None:
    made: list[Ram] = []
    closed: list[Ram] = []
    lock = threading.Lock()

    class Tracked(WriteIgnoresOffset):
        def __init__(self) -> None:
            super().__init__()
            with lock:
                made.append(self)

        def close(self) -> None:
            closed.append(self)

    with pytest.raises(ConformanceError):
        check_backend(Tracked)
    assert len(made) == 4 and closed == made  # geometry, capabilities, reads, round_trip
