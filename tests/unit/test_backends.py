"""Storage backends: what is specific to each built-in backend.

The generic contract (round trips at the disk's edges, vectored I/O,
write-zeroes, discard, concurrency) is checked for every built-in backend by
the conformance suite, in test_conformance.py. Here: configured sizes, exact
capabilities, null's zeroes, byte-granular offsets, then memory and file
specifics. Block devices are covered through a loop device when the tests run
as root with ``losetup`` available (skipped otherwise); real disks are left to
the VM tests.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pyvduse.backends.file as file_module
from pyvduse.backends import (
    BACKENDS,
    Backend,
    FileBackend,
    MemoryBackend,
    NullBackend,
    open_backend,
)
from pyvduse.errors import BackendError, ConfigError

SIZE = 4 << 20
REPO = Path(__file__).resolve().parents[2]


def _sparse_file(directory: Path, size: int = SIZE) -> Path:
    path = directory / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- the backends under test ------------------------------------------------------------


@dataclass
class Case:
    backend: Backend
    stores: bool  # False: reads are always zero (null)
    caps: tuple[bool, bool, bool, bool]  # write, flush, discard, write_zeroes
    byte_offsets: bool  # accepts offsets/lengths that are not block multiples


CASES = ["null", "memory", "file", "file-direct", "blockdev"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    kind: str = request.param
    if kind == "null":
        made = Case(NullBackend(SIZE), False, (True, False, True, True), True)
    elif kind == "memory":
        made = Case(MemoryBackend(SIZE), True, (True, False, True, True), True)
    elif kind == "file":
        made = Case(FileBackend(_sparse_file(tmp_path)), True, (True, True, True, True), True)
    elif kind == "file-direct":
        directory = request.getfixturevalue("direct_dir")
        made = Case(FileBackend(_sparse_file(directory), direct=True), True,
                    (True, True, True, True), False)
    else:
        device = request.getfixturevalue("loop_device")
        made = Case(FileBackend(device), True, (True, True, True, True), True)
    try:
        yield made
    finally:
        made.backend.close()


def pattern(length: int, seed: int = 1) -> bytearray:
    return bytearray((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(length))


def read_back(backend: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.read(offset, memoryview(buf))
    return bytes(buf)


def expect(case: Case, data: bytes | bytearray) -> bytes:
    return bytes(data) if case.stores else bytes(len(data))


# -- conformance ------------------------------------------------------------------------


def test_size_and_block_size(case: Case) -> None:
    assert case.backend.size() == SIZE
    block = case.backend.preferred_block_size
    assert block >= 512 and block & (block - 1) == 0


def test_capabilities(case: Case) -> None:
    b = case.backend
    assert (b.can_write, b.can_flush, b.can_discard, b.can_write_zeroes) == case.caps


def test_registry_names() -> None:
    assert sorted(BACKENDS) == ["file", "memory", "nbd", "null", "python", "rbd"]
    for name, cls in BACKENDS.items():
        assert getattr(cls, "name", None) == name


BYTE_GRANULAR = [c for c in CASES if c != "file-direct"]  # O_DIRECT needs aligned ranges


@pytest.mark.parametrize("case", BYTE_GRANULAR, indirect=True)
def test_round_trip_at_byte_offsets(case: Case) -> None:
    assert case.byte_offsets
    b = case.backend
    bs = b.preferred_block_size
    for n, offset in enumerate([bs + 3, SIZE - 777]):
        length = min(1000, SIZE - offset)
        data = pattern(length, n)
        b.write(offset, memoryview(data))
        assert read_back(b, offset, length) == expect(case, data), offset
    b.flush()


def split(buf: bytearray, sizes: Sequence[int]) -> list[memoryview]:
    view, out, pos = memoryview(buf), [], 0
    for size in sizes:
        out.append(view[pos : pos + size])
        pos += size
    out.append(view[pos:])
    return out


@pytest.mark.parametrize("case", BYTE_GRANULAR, indirect=True)
def test_write_zeroes_unaligned_ends(case: Case) -> None:
    assert case.byte_offsets
    b = case.backend
    data = pattern(300_000, 6)
    b.write(1000, memoryview(data))
    b.write_zeroes(1000 + 123, 250_000, True)
    want = bytearray(expect(case, data))
    want[123 : 123 + 250_000] = bytes(250_000)
    assert read_back(b, 1000, len(data)) == bytes(want)


def test_open_backend_by_name(tmp_path: Path) -> None:
    image = _sparse_file(tmp_path, 1 << 20)
    for name, args in [("null", ["size=2M"]), ("memory", ["size=1M"]),
                       ("file", [f"path={image}", "readonly=on"])]:
        backend = open_backend(name, args)
        try:
            assert backend.name == name
        finally:
            backend.close()
    known = re.escape("(known: file, memory, nbd, null, python, rbd)")
    with pytest.raises(ConfigError, match=rf"^unknown backend 'disk' {known}$"):
        open_backend("disk", [])
    with pytest.raises(ConfigError, match="unknown option for backend 'file': colour"):
        open_backend("file", [f"path={image}", "colour=red"])
    with pytest.raises(ConfigError, match="backend 'memory': missing required option size="):
        open_backend("memory", [])
    assert open_backend("null", []).size() == 1 << 30
    with pytest.raises(ConfigError, match="positive multiple of 512"):
        open_backend("null", ["size=1000"])


# -- the Backend base class -------------------------------------------------------------


class VectoredOnly(Backend):
    """Defines readv/writev only: read, write and the default write_zeroes use them."""

    def __init__(self) -> None:
        self.data = bytearray(8192)
        self.calls: list[tuple[str, int, int]] = []

    def size(self) -> int:
        return len(self.data)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append(("readv", offset, len(bufs)))
        for buf in bufs:
            buf[:] = self.data[offset : offset + len(buf)]
            offset += len(buf)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append(("writev", offset, len(bufs)))
        for buf in bufs:
            self.data[offset : offset + len(buf)] = buf
            offset += len(buf)


def test_vectored_only_backend() -> None:
    b = VectoredOnly()
    assert b.can_write and b.can_write_zeroes and not (b.can_discard or b.can_flush)
    b.write(512, memoryview(b"x" * 1024))
    assert read_back(b, 512, 1024) == b"x" * 1024
    b.write_zeroes(1024, 512, may_unmap=False)
    assert read_back(b, 512, 1024) == b"x" * 512 + bytes(512)
    assert b.calls == [("writev", 512, 1), ("readv", 512, 1), ("writev", 1024, 1),
                       ("readv", 512, 1)]


def test_backend_without_read_or_write() -> None:
    class SizeOnly(Backend):
        def size(self) -> int:
            return 512

    b = SizeOnly()
    assert not (b.can_write or b.can_write_zeroes)
    with pytest.raises(NotImplementedError, match="SizeOnly defines neither read nor readv"):
        b.read(0, memoryview(bytearray(512)))
    with pytest.raises(NotImplementedError, match="SizeOnly defines neither write nor writev"):
        b.write(0, memoryview(bytes(512)))


# -- memory specifics -------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_sparse_and_gives_pages_back() -> None:
    mib = 1 << 20
    backend = MemoryBackend(256 * mib)  # mapped, but nothing committed yet
    try:
        start = _resident_bytes()
        backend.write(64 * mib, memoryview(b"x" * (32 * mib)))
        filled = _resident_bytes()
        assert filled - start >= 30 * mib
        backend.discard(64 * mib - 100, 32 * mib + 200)  # unaligned ends: sliced, rest dropped
        assert filled - _resident_bytes() >= 30 * mib
        assert read_back(backend, 64 * mib - 4096, 8192) == bytes(8192)
        assert read_back(backend, 96 * mib - 4096, 8192) == bytes(8192)
    finally:
        backend.close()


def test_memory_huge_size_maps_lazily() -> None:
    try:
        backend = MemoryBackend(1 << 40)
    except ConfigError as exc:  # strict overcommit (vm.overcommit_memory=2) refuses
        pytest.skip(str(exc))
    try:
        backend.write((1 << 40) - 512, memoryview(b"z" * 512))
        assert read_back(backend, (1 << 40) - 512, 512) == b"z" * 512
    finally:
        backend.close()


# -- file specifics ---------------------------------------------------------------------


@pytest.fixture
def file_backend(tmp_path: Path) -> Iterator[FileBackend]:
    backend = FileBackend(_sparse_file(tmp_path))
    try:
        yield backend
    finally:
        backend.close()


def test_file_discard_punches_hole(file_backend: FileBackend) -> None:
    mib = 1 << 20
    file_backend.write(0, memoryview(b"\xaa" * (2 * mib)))
    file_backend.flush()
    before = os.stat(file_backend.path).st_blocks
    file_backend.discard(0, mib)
    after = os.stat(file_backend.path).st_blocks
    if after >= before:
        pytest.skip("the file system of tmp_path does not punch holes")
    assert before - after >= mib // 512 // 2
    fd = os.open(file_backend.path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)
    assert file_backend.size() == SIZE  # KEEP_SIZE


def test_file_write_zeroes_may_unmap_punches(file_backend: FileBackend) -> None:
    file_backend.write(0, memoryview(b"\x55" * (1 << 20)))
    file_backend.flush()
    before = os.stat(file_backend.path).st_blocks
    file_backend.write_zeroes(0, 1 << 20, may_unmap=True)
    assert read_back(file_backend, 0, 1 << 20) == bytes(1 << 20)
    if before:
        assert os.stat(file_backend.path).st_blocks < before


class FallocateSpy:
    def __init__(self, err: int) -> None:
        self.calls: list[int] = []
        self.err = err

    def __call__(self, fd: int, mode: int, offset: int, length: int) -> None:
        self.calls.append(mode)
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.EINVAL])
def test_file_fallocate_unsupported_falls_back(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    spy = FallocateSpy(err)
    monkeypatch.setattr(file_module, "fallocate", spy)
    punch = file_module.FALLOC_FL_PUNCH_HOLE | file_module.FALLOC_FL_KEEP_SIZE
    zero = file_module.FALLOC_FL_ZERO_RANGE | file_module.FALLOC_FL_KEEP_SIZE
    data = pattern(3 << 20, 4)
    file_backend.write(0, memoryview(data))

    file_backend.write_zeroes(4096, 2 << 20, may_unmap=True)
    assert spy.calls == [punch, zero]
    want = bytearray(data)
    want[4096 : 4096 + (2 << 20)] = bytes(2 << 20)
    assert read_back(file_backend, 0, len(data)) == bytes(want)

    # Both methods are remembered as unsupported: no more fallocate calls.
    file_backend.write(0, memoryview(data))
    file_backend.write_zeroes(0, 512, may_unmap=False)
    file_backend.write_zeroes(512, 512, may_unmap=True)
    file_backend.discard(8192, 4096)  # advisory: silently succeeds
    assert spy.calls == [punch, zero]
    assert read_back(file_backend, 0, 1024) == bytes(1024)


def test_file_discard_unsupported_is_silent(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = FallocateSpy(errno.EOPNOTSUPP)
    monkeypatch.setattr(file_module, "fallocate", spy)
    file_backend.discard(0, 4096)
    file_backend.discard(0, 4096)
    assert len(spy.calls) == 1


def test_file_fallocate_real_error_propagates(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "fallocate", FallocateSpy(errno.EIO))
    with pytest.raises(OSError) as excinfo:
        file_backend.write_zeroes(0, 4096, may_unmap=False)
    assert excinfo.value.errno == errno.EIO


def limited(real: Callable[..., int], limit: int, calls: list[int]) -> Callable[..., int]:
    """Wrap os.preadv/os.pwritev so each call moves at most ``limit`` bytes."""

    def wrapper(fd: int, bufs: Sequence[memoryview], offset: int, *rest: Any) -> int:
        room, part = limit, []
        for buf in bufs:
            if not room:
                break
            part.append(buf[:room])
            room -= len(part[-1])
        calls.append(limit - room)
        return real(fd, part, offset, *rest)

    return wrapper


def test_file_short_reads_and_writes(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    writes: list[int] = []
    monkeypatch.setattr(os, "preadv", limited(os.preadv, 1000, reads))
    monkeypatch.setattr(os, "pwritev", limited(os.pwritev, 1000, writes))
    data = pattern(10_000, 11)
    file_backend.writev(512, split(data, [3, 1500, 2]))
    out = bytearray(len(data))
    file_backend.readv(512, split(out, [999, 1, 4000]))
    assert out == data
    assert len(writes) == 10 and len(reads) == 10


def test_file_short_single_buffer_reads_and_writes(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    writes: list[int] = []
    monkeypatch.setattr(os, "preadv", limited(os.preadv, 3000, reads))
    monkeypatch.setattr(os, "pwritev", limited(os.pwritev, 3000, writes))
    data = pattern(8192, 13)
    file_backend.writev(1024, [memoryview(data)])  # the one-buffer fast path, resumed
    out = bytearray(len(data))
    file_backend.readv(1024, [memoryview(out)])
    assert out == data
    assert writes == [3000, 3000, 2192] and reads == [3000, 3000, 2192]


def test_file_many_segments_split_at_iov_max(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "_IOV_MAX", 4)
    data = pattern(4096, 12)
    file_backend.writev(0, split(data, [100] * 30))
    out = bytearray(4096)
    file_backend.readv(0, split(out, [1] * 50))
    assert out == data


def test_file_read_past_end_is_eio(
    file_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "preadv", lambda *args: 0)
    with pytest.raises(BackendError) as excinfo:
        file_backend.read(0, memoryview(bytearray(512)))
    assert excinfo.value.errno == errno.EIO


def test_file_size_follows_resize(file_backend: FileBackend) -> None:
    os.truncate(file_backend.path, 2 * SIZE)
    assert file_backend.size() == 2 * SIZE


def test_file_readonly(tmp_path: Path) -> None:
    image = _sparse_file(tmp_path, 1 << 20)
    image.write_bytes(b"ro" * 512 + bytes((1 << 20) - 1024))
    backend = FileBackend(image, readonly=True)
    try:
        assert not (backend.can_write or backend.can_flush or backend.can_discard
                    or backend.can_write_zeroes)
        assert read_back(backend, 0, 1024) == b"ro" * 512
        calls: list[Callable[[], None]] = [
            lambda: backend.write(0, memoryview(bytes(512))),
            lambda: backend.discard(0, 512),
            lambda: backend.write_zeroes(0, 512, True),
        ]
        for call in calls:
            with pytest.raises(BackendError) as excinfo:
                call()
            assert excinfo.value.errno == errno.EROFS
    finally:
        backend.close()
    backend.close()  # idempotent


def test_file_open_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(ConfigError) as missing_info:
        FileBackend(missing)
    assert str(missing_info.value) == f"file backend: no such file: {missing}"
    with pytest.raises(ConfigError, match=r"^file backend: is a directory: "):
        FileBackend(tmp_path)
    with pytest.raises(ConfigError, match=r"^file backend: is a directory: "):
        FileBackend(tmp_path, readonly=True)
    with pytest.raises(ConfigError, match="not a regular file or block device: /dev/null"):
        FileBackend("/dev/null")

    image = _sparse_file(tmp_path, 4096)

    def denied(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)  # root would bypass a chmod
    with pytest.raises(ConfigError) as denied_info:
        FileBackend(image)
    assert str(denied_info.value).startswith(f"file backend: permission denied: {image}")


def test_file_direct_refused_by_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _sparse_file(tmp_path, 4096)
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(ConfigError, match="direct=on is not supported on the file system of"):
        FileBackend(image, direct=True)


# -- O_DIRECT ---------------------------------------------------------------------------


@pytest.fixture
def direct_backend(direct_dir: Path) -> Iterator[FileBackend]:
    backend = FileBackend(_sparse_file(direct_dir), direct=True)
    try:
        yield backend
    finally:
        backend.close()


def reference_read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_direct_unaligned_memory(direct_backend: FileBackend) -> None:
    bs = direct_backend.preferred_block_size
    raw = bytearray(4 * bs + 3)
    data = pattern(3 * bs, 21)
    raw[1 : 1 + 3 * bs] = data
    direct_backend.write(bs, memoryview(raw)[1 : 1 + 3 * bs])
    assert reference_read(direct_backend.path, bs, 3 * bs) == data
    out = bytearray(3 * bs + 5)
    direct_backend.read(bs, memoryview(out)[3 : 3 + 3 * bs])
    assert out[3 : 3 + 3 * bs] == data
    # Odd-length segments, read-only source views.
    ro = memoryview(bytes(data))
    direct_backend.writev(5 * bs, [ro[:7], ro[7 : bs + 100], ro[bs + 100 :]])
    assert reference_read(direct_backend.path, 5 * bs, 3 * bs) == data


def test_direct_bounce_path_forced(
    direct_backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path is refused (as O_DIRECT does for guest memory); bounce buffers serve it."""
    used: list[str] = []

    def only_mmap(real: Callable[..., int], what: str) -> Callable[..., int]:
        def wrapper(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
            if not all(type(buf.obj).__name__ == "mmap" for buf in bufs):
                raise OSError(errno.EINVAL, "Invalid argument")
            used.append(what)
            return real(fd, bufs, offset)
        return wrapper

    monkeypatch.setattr(os, "preadv", only_mmap(os.preadv, "read"))
    monkeypatch.setattr(os, "pwritev", only_mmap(os.pwritev, "write"))
    length = file_module.BOUNCE_SIZE * 2 + 4096  # three bounce chunks
    data = pattern(length, 22)
    direct_backend.writev(4096, split(data, [511, 1, 100_000]))
    assert used.count("write") == 3
    out = bytearray(length)
    direct_backend.readv(4096, split(out, [4096, 3, 2_000_001]))
    assert used.count("read") == 3
    assert out == data
    direct_backend.write_zeroes(4096, 8192, may_unmap=False)
    assert read_back(direct_backend, 4096, 8192) == bytes(8192)


# -- block device -----------------------------------------------------------------------


def test_blockdev_geometry_and_zeroing(loop_device: str) -> None:
    backend = FileBackend(loop_device)
    try:
        assert backend.is_block_device
        assert backend.size() == SIZE
        assert backend.preferred_block_size == 512
        backend.write(0, memoryview(b"\x77" * 65536))
        backend.write_zeroes(4096, 8192, may_unmap=False)
        backend.discard(32768, 32768)
        got = read_back(backend, 0, 32768)
        assert got == b"\x77" * 4096 + bytes(8192) + b"\x77" * (32768 - 12288)
        assert backend._blkzeroout.supported and backend._blkdiscard.supported
    finally:
        backend.close()
