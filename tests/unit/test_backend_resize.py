"""Resizing backends: ``Backend.resize`` and ``can_resize``.

The contract (growing keeps the data and adds zeroes, a shrink that would
drop data is refused unless allowed, ``size()`` follows) for every built-in
backend that can resize: memory, null, a regular file (sparse growth, data
found with ``SEEK_DATA``), the thread pool passing it on; a read-only file
and a block device (a loop device, when the tests run as root) refuse. The
conformance suite's ``resize`` check runs for all of them in
test_conformance.py; here it is shown to catch broken backends. The rbd
backend's resizing is tested against its cluster in test_rbd_backend.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_conformance import Ram as ConformanceRam

from pyvduse.backends import Backend, FileBackend, MemoryBackend, NullBackend
from pyvduse.backends.base import check_new_size, shrink_refused
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.errors import BackendError
from pyvduse.testing.conformance import ConformanceError, check_backend

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def read_back(backend: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.read(offset, memoryview(buf))
    return bytes(buf)


def sparse_file(directory: Path, size: int) -> Path:
    path = directory / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def refused(call: Callable[[], None], code: int = errno.EINVAL) -> str:
    """Run ``call``, which must raise BackendError with errno ``code``; its message."""
    with pytest.raises(BackendError) as excinfo:
        call()
    assert excinfo.value.errno == code
    return str(excinfo.value)


# -- the interface ----------------------------------------------------------------------


class Plain(Backend):
    def size(self) -> int:
        return 4096

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))


class Resizing(Plain):
    def __init__(self) -> None:
        self.sizes: list[tuple[int, bool]] = []

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self.sizes.append((size, shrink))


def test_can_resize_is_inferred_from_the_class() -> None:
    assert not Plain().can_resize
    assert Resizing().can_resize
    with pytest.raises(NotImplementedError):
        Plain().resize(8192)
    # resizable (the size changes by itself) and can_resize are independent.
    assert not Plain.resizable and not Resizing.resizable


def test_size_checks_and_the_refusal_error() -> None:
    assert check_new_size("x", 512) == 512
    for bad in (0, -512, 1000, True):
        with pytest.raises(BackendError) as excinfo:
            check_new_size("backend 'x'", bad)
        assert excinfo.value.errno == errno.EINVAL
        assert str(excinfo.value) == (f"backend 'x': cannot resize to {bad!r} bytes: the size "
                                      "must be a positive multiple of 512")
    error = shrink_refused("backend 'x'", 4096, "data lies at offset 5000")
    assert error.errno == errno.EINVAL
    assert str(error) == ("backend 'x': shrinking to 4096 bytes would drop data (data lies at "
                          "offset 5000); resize with shrink=true to allow it")


# -- memory -----------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    backend = MemoryBackend(MiB)
    try:
        yield backend
    finally:
        backend.close()


def test_memory_grows_keeping_data_with_zeroes_after_it(memory: MemoryBackend) -> None:
    memory.write(MiB - 512, memoryview(b"t" * 512))
    memory.resize(4 * MiB)
    assert memory.size() == 4 * MiB
    assert read_back(memory, MiB - 512, 512) == b"t" * 512
    assert read_back(memory, MiB, 3 * MiB) == bytes(3 * MiB)
    memory.write(4 * MiB - 512, memoryview(b"e" * 512))  # the new end is usable
    assert read_back(memory, 4 * MiB - 512, 512) == b"e" * 512
    memory.resize(4 * MiB)  # the same size: nothing changes
    assert read_back(memory, 4 * MiB - 512, 512) == b"e" * 512


def test_memory_shrink_over_data_needs_permission(memory: MemoryBackend) -> None:
    memory.write(0, memoryview(b"a" * 512))
    memory.write(MiB - 1024, memoryview(b"\0" * 100 + b"z" + b"\0" * 411))
    message = refused(lambda: memory.resize(MiB // 2))
    assert message == ("backend 'memory': shrinking to 524288 bytes would drop data (data "
                       f"lies at offset {MiB - 1024 + 100}); resize with shrink=true to "
                       "allow it")
    assert memory.size() == MiB
    assert read_back(memory, MiB - 1024, 512)[100] == ord("z")
    memory.resize(MiB // 2, shrink=True)
    assert memory.size() == MiB // 2
    assert read_back(memory, 0, 512) == b"a" * 512


def test_memory_shrink_over_zeroes_is_allowed(memory: MemoryBackend) -> None:
    memory.write(0, memoryview(b"a" * 4096))
    memory.write(8192, memoryview(b"b" * 4096))
    memory.write_zeroes(8192, 4096, may_unmap=True)  # written, but zero again
    memory.resize(8192)
    assert memory.size() == 8192
    assert read_back(memory, 0, 4096) == b"a" * 4096


def test_memory_dropped_bytes_do_not_come_back(memory: MemoryBackend) -> None:
    # A size inside a page: the rest of that page stays mapped after the shrink.
    memory.write(0, memoryview(b"x" * (2 * PAGE)))
    memory.resize(PAGE + 512, shrink=True)
    assert memory.size() == PAGE + 512
    memory.resize(4 * PAGE)
    assert read_back(memory, 0, PAGE + 512) == b"x" * (PAGE + 512)
    assert read_back(memory, PAGE + 512, 3 * PAGE - 512) == bytes(3 * PAGE - 512)


def test_memory_refuses_bad_sizes(memory: MemoryBackend) -> None:
    refused(lambda: memory.resize(0))
    refused(lambda: memory.resize(1000))
    message = refused(lambda: memory.resize(1 << 70), errno.ENOMEM)
    assert message.startswith("backend 'memory': cannot map")
    assert memory.size() == MiB
    memory.write(0, memoryview(b"s" * 512))  # still usable
    assert read_back(memory, 0, 512) == b"s" * 512


def test_memory_requests_go_on_while_it_resizes(memory: MemoryBackend) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        data = bytes([n + 1]) * 4096
        try:
            while not stop.is_set():
                memory.write(n * 4096, memoryview(data))
                if read_back(memory, n * 4096, 4096) != data:
                    raise AssertionError(f"thread {n} read back other data")
                memory.discard(64 * 1024 + n * 4096, 4096)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(200):
            memory.resize((2 + round_ % 3) * MiB, shrink=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors


# -- null -------------------------------------------------------------------------------


def test_null_takes_any_size() -> None:
    backend = NullBackend(MiB)
    assert backend.can_resize
    backend.resize(1 << 40)
    assert backend.size() == 1 << 40
    assert read_back(backend, (1 << 40) - 512, 512) == bytes(512)
    backend.resize(512)  # nothing is stored: no shrink needs permission
    assert backend.size() == 512
    refused(lambda: backend.resize(100))
    assert backend.size() == 512


# -- file -------------------------------------------------------------------------------


@pytest.fixture
def file_backend(tmp_path: Path) -> Iterator[FileBackend]:
    backend = FileBackend(sparse_file(tmp_path, MiB))
    try:
        yield backend
    finally:
        backend.close()


def _seeks_holes(fd: int) -> bool:
    """True if the file system finds the holes of ``fd`` (a sparse file with data at 0)."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    except OSError:
        return False


def test_file_grows_sparse_keeping_data(file_backend: FileBackend) -> None:
    assert file_backend.can_resize
    file_backend.write(MiB - 512, memoryview(b"f" * 512))
    file_backend.flush()
    blocks = os.stat(file_backend.path).st_blocks
    file_backend.resize(64 * MiB)
    assert file_backend.size() == 64 * MiB == os.stat(file_backend.path).st_size
    assert os.stat(file_backend.path).st_blocks == blocks  # a hole, nothing allocated
    assert read_back(file_backend, MiB - 512, 512) == b"f" * 512
    assert read_back(file_backend, MiB, MiB) == bytes(MiB)
    assert read_back(file_backend, 64 * MiB - 512, 512) == bytes(512)


def test_file_shrink_over_data_needs_permission(file_backend: FileBackend) -> None:
    file_backend.write(0, memoryview(b"a" * 4096))
    file_backend.write(MiB - 4096, memoryview(b"d" * 4096))
    message = refused(lambda: file_backend.resize(MiB // 2))
    assert message.startswith(f"file backend: {file_backend.path}: shrinking to 524288 bytes "
                              "would drop data (")
    assert message.endswith("); resize with shrink=true to allow it")
    assert file_backend.size() == MiB
    assert read_back(file_backend, MiB - 4096, 4096) == b"d" * 4096
    file_backend.resize(MiB // 2, shrink=True)
    assert file_backend.size() == MiB // 2 == os.stat(file_backend.path).st_size
    assert read_back(file_backend, 0, 4096) == b"a" * 4096
    file_backend.resize(MiB)
    assert read_back(file_backend, MiB - 4096, 4096) == bytes(4096)  # gone for good


def test_file_shrink_over_a_hole_is_allowed(file_backend: FileBackend) -> None:
    file_backend.write(0, memoryview(b"a" * 4096))
    file_backend.flush()
    if not _seeks_holes(file_backend._fd):
        pytest.skip("the file system of the test directory does not report holes")
    file_backend.resize(64 * 1024)
    assert file_backend.size() == 64 * 1024
    assert read_back(file_backend, 0, 4096) == b"a" * 4096


def test_file_without_seek_data_refuses_every_shrink(
        file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if whence == os.SEEK_DATA:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    message = refused(lambda: file_backend.resize(64 * 1024))  # only a hole there
    assert "the file system cannot tell where data lies: SEEK_DATA: Invalid argument" in message
    assert file_backend.size() == MiB
    file_backend.resize(64 * 1024, shrink=True)
    assert file_backend.size() == 64 * 1024
    file_backend.resize(MiB)  # growing needs no SEEK_DATA


def test_file_refuses_bad_sizes(file_backend: FileBackend) -> None:
    refused(lambda: file_backend.resize(0))
    refused(lambda: file_backend.resize(MiB + 100))
    assert file_backend.size() == MiB


def test_file_direct_resizes(direct_dir: Path) -> None:
    backend = FileBackend(sparse_file(direct_dir, MiB), direct=True)
    try:
        backend.resize(2 * MiB)
        assert backend.size() == 2 * MiB
        assert read_back(backend, MiB, MiB) == bytes(MiB)
    finally:
        backend.close()


def test_read_only_file_refuses(tmp_path: Path) -> None:
    backend = FileBackend(sparse_file(tmp_path, MiB), readonly=True)
    try:
        assert not backend.can_resize
        message = refused(lambda: backend.resize(2 * MiB), errno.EROFS)
        assert message.endswith("is open read-only")
        assert backend.size() == MiB
    finally:
        backend.close()


def test_block_device_refuses(loop_device: str) -> None:
    backend = FileBackend(loop_device)
    try:
        size = backend.size()
        assert not backend.can_resize
        message = refused(lambda: backend.resize(2 * size, shrink=True), errno.EOPNOTSUPP)
        assert message == (f"file backend: {loop_device} is a block device: the size of a "
                           "block device is not pyvduse's to change")
        assert backend.size() == size
    finally:
        backend.close()


# -- the thread pool --------------------------------------------------------------------


def test_thread_pool_passes_resize_on(tmp_path: Path) -> None:
    inner = Resizing()
    pool = ThreadPoolBackend(inner, threads=1)
    try:
        assert pool.can_resize
        pool.resize(8192)
        pool.resize(1024, shrink=True)
        assert inner.sizes == [(8192, False), (1024, True)]
    finally:
        pool.close()
    for backend, can in ((Plain(), False), (MemoryBackend(MiB), True),
                         (FileBackend(sparse_file(tmp_path, MiB), readonly=True), False)):
        pool = ThreadPoolBackend(backend, threads=1)
        try:
            assert pool.can_resize is can
        finally:
            pool.close()


def test_thread_pool_over_memory_keeps_the_contract() -> None:
    pool = ThreadPoolBackend(MemoryBackend(MiB), threads=2, min_bytes=0)
    try:
        pool.write(MiB - 512, memoryview(b"p" * 512))
        refused(lambda: pool.resize(4096))
        pool.resize(2 * MiB)
        assert pool.size() == 2 * MiB
        assert read_back(pool, MiB - 512, 1024) == b"p" * 512 + bytes(512)
    finally:
        pool.close()


# -- the conformance check --------------------------------------------------------------


class Ram(ConformanceRam):
    """A correct resizable RAM disk the broken variants below start from."""

    def __init__(self, size: int = 64 * 1024) -> None:
        super().__init__(size)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        if size < len(self.data) and not shrink and any(self.data[size:]):
            raise shrink_refused("ram", size, "data")
        self._set_size(size)

    def _set_size(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data += bytes(size - len(self.data))


class ReadOnlyRam(Ram):
    @property
    def can_write(self) -> bool:
        return False


class GrowsDirty(Ram):
    def _set_size(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data += b"\xee" * (size - len(self.data))


class GrowLosesData(Ram):
    def _set_size(self, size: int) -> None:
        self.data = bytearray(size)


class SizeStaysTheSame(Ram):
    def resize(self, size: int, *, shrink: bool = False) -> None:
        pass


class ShrinksWithoutAsking(Ram):
    def resize(self, size: int, *, shrink: bool = False) -> None:
        self._set_size(size)


class RefusesAfterShrinking(Ram):
    def resize(self, size: int, *, shrink: bool = False) -> None:
        had_data = size < len(self.data) and any(self.data[size:])
        self._set_size(size)
        if had_data and not shrink:
            raise OSError(errno.EINVAL, "too late")


class RefusesWithTheWrongException(Ram):
    def resize(self, size: int, *, shrink: bool = False) -> None:
        if size < len(self.data) and not shrink:
            raise ValueError("shrink=True needed")
        self._set_size(size)


class KeepsDroppedData(Ram):
    """Shrinks only its size: growing again brings the old bytes back."""

    def __init__(self) -> None:
        super().__init__()
        self.length = len(self.data)

    def size(self) -> int:
        return self.length

    def resize(self, size: int, *, shrink: bool = False) -> None:
        if size < self.length and not shrink and any(self.data[size:self.length]):
            raise shrink_refused("ram", size, "data")
        if size > len(self.data):
            self.data += bytes(size - len(self.data))
        self.length = size


class ClaimsResizeWithoutDefiningIt(Plain):
    @property
    def can_resize(self) -> bool:
        return True


BROKEN: list[tuple[Callable[[], Backend], str, str]] = [
    (GrowsDirty, "resize", r"grow from 65536 to 69632 bytes: the new space: byte 0 is 0xee"),
    (GrowLosesData, "resize", r"grow from 65536 to 69632 bytes: the content at \d+"),
    (SizeStaysTheSame, "resize", r"grow from 65536 to 69632 bytes: size\(\) is 65536, "
                                 r"expected 69632"),
    (ShrinksWithoutAsking, "resize", r"over data without shrink=True: resize\(\) did not "
                                     r"refuse"),
    (RefusesAfterShrinking, "resize", r"over data without shrink=True: size\(\) is 65536, "
                                      r"expected 69632"),
    (RefusesWithTheWrongException, "resize", r"the backend raised ValueError"),
    (KeepsDroppedData, "resize", r"grow again after a shrink \(the dropped data must not "
                                 r"come back\): the new space"),
    (ClaimsResizeWithoutDefiningIt, "capabilities", r"can_resize is True but the backend "
                                                    r"defines none of resize"),
]


@pytest.mark.parametrize(("factory", "check", "message"), BROKEN,
                         ids=[getattr(factory, "__name__", "") for factory, _, _ in BROKEN])
def test_conformance_catches_broken_resizing(factory: Callable[[], Backend], check: str,
                                             message: str) -> None:
    with pytest.raises(ConformanceError, match=rf"^{check}: .*{message}"):
        check_backend(factory)


def test_conformance_runs_resize_for_correct_backends(tmp_path: Path) -> None:
    assert check_backend(Ram)[-1] == "resize"
    assert check_backend(ReadOnlyRam)[-1] == "resize"  # grows and shrinks, writes nothing
    assert "resize" in check_backend(lambda: NullBackend(MiB), stores_data=False)
    assert "resize" not in check_backend(Plain)


def test_conformance_restores_the_size_of_shared_storage(tmp_path: Path) -> None:
    image = sparse_file(tmp_path, MiB + 512)
    ran = check_backend(lambda: FileBackend(image))
    assert "resize" in ran
    assert image.stat().st_size == MiB + 512

    class FailsToShrinkBack(Ram):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def resize(self, size: int, *, shrink: bool = False) -> None:
            self.calls += 1
            if self.calls == 3:  # the shrink with shrink=True "succeeds" doing nothing
                return
            super().resize(size, shrink=shrink)

    made: list[FailsToShrinkBack] = []

    def factory() -> Backend:
        made.append(FailsToShrinkBack())
        return made[-1]

    with pytest.raises(ConformanceError, match=r"^resize: shrink from 69632 to 65536 bytes "
                                               r"with shrink=True: size\(\) is 69632"):
        check_backend(factory)
    assert made[-1].size() == 64 * 1024  # put back by the check on its way out
