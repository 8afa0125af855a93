"""The example backends (examples/) behind the real virtio-blk request handler, and the error
contract for user code: whatever a backend method raises fails that request with IOERR."""

from __future__ import annotations

import errno
import itertools
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ImageServer

from pyvduse.backends import Backend, load_backend
from pyvduse.blk import BlkConfig, BlkHandler
from pyvduse.errors import ConfigError
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import SplitQueue

OK, IOERR = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR
T_IN, T_OUT, T_FLUSH = v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH
T_GET_ID, T_DISCARD = v.VIRTIO_BLK_T_GET_ID, v.VIRTIO_BLK_T_DISCARD
T_WZ = v.VIRTIO_BLK_T_WRITE_ZEROES
QUEUE_SIZE = 64


class Driver:
    """Plays the virtio driver: builds request chains in mock driver memory, hands each to
    :class:`BlkHandler` through a real split queue and returns the status and data."""

    def __init__(self, backend: Backend, **config: Any) -> None:
        self.config = BlkConfig.for_backend(backend, **config)
        self.handler = BlkHandler(backend, self.config)
        self.memory = DriverMemory(size=16 << 20)
        self.ring = MockSplitRing(self.memory, QUEUE_SIZE)
        self.guest = self.memory.guest_memory()
        self.queue = SplitQueue(self.guest, QUEUE_SIZE, self.ring.desc_addr,
                                self.ring.avail_addr, self.ring.used_addr,
                                event_idx=True, indirect=True)

    @staticmethod
    def _no_later_completion(head: int, written: int) -> None:
        raise AssertionError("a synchronous backend completed a request later")

    def close(self) -> None:
        self.queue.release()
        self.guest.invalidate()
        self.memory.close()

    def request(self, req_type: int, sector: int = 0, data: bytes = b"", in_len: int = 0,
                pieces: int = 1) -> tuple[int, bytes]:
        """One request with ``data`` (in ``pieces`` buffers) out and ``in_len`` bytes in."""
        header = self.memory.buffer(v.virtio_blk_outhdr.pack(req_type, 0, sector))
        cuts = [len(data) * i // pieces for i in range(pieces + 1)] if data else []
        outs = [self.memory.buffer(data[a:b]) for a, b in itertools.pairwise(cuts)]
        ins = [self.memory.buffer(bytes([0xEE]) * in_len, writable=True)] if in_len else []
        status = self.memory.buffer(1, writable=True)
        head = self.ring.add_chain([header, *outs, *ins, status])
        chain = self.queue.pop()
        written = self.handler.handle(chain, self._no_later_completion)
        self.queue.push(chain.head, written)
        self.queue.publish()
        assert self.ring.take_used() == [(head, written)]
        got = self.memory.read(ins[0].addr, in_len) if ins else b""
        return self.memory.read(status.addr, 1)[0], got

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        return self.request(T_IN, sector, in_len=length)

    def write(self, sector: int, data: bytes, pieces: int = 1) -> int:
        return self.request(T_OUT, sector, data, pieces=pieces)[0]

    def ranged(self, req_type: int, sector: int, count: int, flags: int = 0) -> int:
        body = v.virtio_blk_discard_write_zeroes.pack(sector, count, flags)
        return self.request(req_type, 0, body)[0]


def served(backend: Backend, **config: Any) -> Iterator[Driver]:
    driver = Driver(backend, **config)
    try:
        yield driver
    finally:
        driver.close()
        backend.close()


# -- examples/ramdisk.py ----------------------------------------------------------------


@pytest.fixture
def ramdisk() -> Iterator[Driver]:
    yield from served(load_backend(script=EXAMPLES / "ramdisk.py", options={"size": "1M"}),
                      serial="ram-1")


def test_ramdisk_offers_write_flush_discard(ramdisk: Driver) -> None:
    config = ramdisk.config
    assert (config.capacity, config.readonly) == (1 << 20, False)
    assert (config.flush, config.discard, config.write_zeroes) == (True, True, True)
    assert ramdisk.request(T_GET_ID, in_len=20) == (OK, b"ram-1" + bytes(15))


def test_ramdisk_requests(ramdisk: Driver) -> None:
    data = bytes(range(256)) * 32  # 8 KiB
    assert ramdisk.write(10, data, pieces=5) == OK
    assert ramdisk.read(10, len(data)) == (OK, data)
    assert ramdisk.read(8, 1024) == (OK, bytes(1024))  # untouched neighbours
    assert ramdisk.request(T_FLUSH)[0] == OK
    assert ramdisk.ranged(T_DISCARD, 12, 2) == OK
    assert ramdisk.read(10, 3 * 512) == (OK, data[:1024] + bytes(512))
    assert ramdisk.ranged(T_WZ, 10, 1, v.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) == OK
    assert ramdisk.read(10, 4096) == (OK, bytes(512) + data[512:1024] + bytes(1024)
                                      + data[2048:4096])
    last = (1 << 20) // 512 - 1
    assert ramdisk.write(last, b"\x5a" * 512) == OK
    assert ramdisk.read(last, 512) == (OK, b"\x5a" * 512)
    assert ramdisk.read(last, 1024)[0] == IOERR  # beyond the end: refused before the backend
    assert ramdisk.read(last, 512)[0] == OK  # and the device keeps serving


# -- user code that raises: the error contract ------------------------------------------

FAULTY = textwrap.dedent("""
    import errno
    from pyvduse.backends import Backend

    class Faulty(Backend):
        '''Sector 1: OSError; sector 2: a bug (KeyError); sector 3: BackendError.'''
        def __init__(self):
            self.data = bytearray(64 * 1024)
        def size(self):
            return len(self.data)
        def _maybe_fail(self, offset):
            if offset == 512:
                raise OSError(errno.ENOSPC, "no space left on the user's device")
            if offset == 1024:
                return {}["bug"]
            if offset == 1536:
                from pyvduse.errors import BackendError
                raise BackendError(errno.EIO, "backend says no")
        def read(self, offset, buf):
            self._maybe_fail(offset)
            buf[:] = self.data[offset:offset + len(buf)]
        def write(self, offset, buf):
            self._maybe_fail(offset)
            self.data[offset:offset + len(buf)] = buf
        def flush(self):
            raise RuntimeError("flush bug")
        def discard(self, offset, length):
            self._maybe_fail(offset)
""")


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[Driver]:
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    yield from served(load_backend(script=script))


@pytest.fixture
def slow_error_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """One error report per test however slow the machine: the interval outlasts it."""
    monkeypatch.setattr(BlkHandler, "ERROR_LOG_INTERVAL", 3600.0)


@pytest.mark.usefixtures("slow_error_log")
def test_user_exceptions_fail_one_request_with_ioerr(
        faulty: Driver, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        for sector in (1, 2, 3):
            assert faulty.read(sector, 512)[0] == IOERR
            assert faulty.write(sector, b"x" * 512) == IOERR
            assert faulty.ranged(T_DISCARD, sector, 1) == IOERR
            assert faulty.read(0, 512) == (OK, bytes(512))  # the device keeps serving
        assert faulty.request(T_FLUSH)[0] == IOERR
        assert faulty.write(4, b"y" * 512) == OK
        assert faulty.read(4, 512) == (OK, b"y" * 512)
    # The first failure is reported at once (a warning for OSError); later ones within the
    # interval are counted; a bug's traceback would be logged at ERROR once per interval.
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "no space left on the user's device" in caplog.records[0].getMessage()


@pytest.mark.usefixtures("slow_error_log")
def test_a_user_bug_is_logged_with_its_traceback(
        faulty: Driver, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvduse.blk.handler"):
        assert faulty.read(2, 512)[0] == IOERR
        assert faulty.read(2, 512)[0] == IOERR
    assert [r.levelno for r in caplog.records] == [logging.ERROR]  # once per interval
    assert "KeyError: 'bug'" in caplog.text
    assert "faulty.py" in caplog.text  # the traceback points into the user's file


# -- examples/http_disk.py --------------------------------------------------------------


def http_disk(server: ImageServer, **options: str) -> Backend:
    return load_backend(script=EXAMPLES / "http_disk.py", options={"url": server.url, **options})


def read(backend: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.read(offset, memoryview(buf))
    return bytes(buf)


def test_http_disk_is_read_only_and_sized_by_head(image_server: ImageServer) -> None:
    backend = http_disk(image_server)
    try:
        assert backend.size() == len(image_server.image)
        assert not (backend.can_write or backend.can_flush or backend.can_discard
                    or backend.can_write_zeroes)
        config = BlkConfig.for_backend(backend)
        assert config.readonly and not (config.discard or config.write_zeroes or config.flush)
    finally:
        backend.close()
    sized = http_disk(image_server, size="64k")
    assert sized.size() == 65536
    image_server.head_length = False
    with pytest.raises(ConfigError, match="gave no Content-Length; give size="):
        http_disk(image_server)


def test_http_disk_bytes_and_range_requests(image_server: ImageServer) -> None:
    image = image_server.image
    backend = http_disk(image_server, cache="0")
    assert read(backend, 0, 512) == image[:512]
    assert read(backend, 70_000, 5000) == image[70_000:75_000]
    assert read(backend, len(image) - 1024, 1024) == image[-1024:]
    assert image_server.ranges == [(0, 511), (70_000, 74_999), (len(image) - 1024,
                                                                len(image) - 1)]
    out = bytearray(3000)
    view = memoryview(out)
    backend.readv(1000, [view[:1], view[1:2000], view[2000:]])
    assert out == image[1000:4000]
    assert image_server.ranges[-1] == (1000, 3999)  # one GET for the whole vector


def test_http_disk_cache(image_server: ImageServer) -> None:
    image = image_server.image
    block = 64 * 1024
    backend = http_disk(image_server, cache="128k")  # two blocks
    assert read(backend, 100, 512) == image[100:612]
    assert image_server.ranges == [(0, block - 1)]
    assert read(backend, 4096, 8192) == image[4096:12288]  # cached
    assert read(backend, block - 512, 1024) == image[block - 512:block + 512]
    assert image_server.ranges[1:] == [(block, 2 * block - 1)]  # only the missing block
    assert read(backend, 3 * block, 2 * block) == image[3 * block:5 * block]  # one GET, two blocks
    assert image_server.ranges[2:] == [(3 * block, 5 * block - 1)]
    assert read(backend, 0, 512) == image[:512]  # evicted: fetched again
    assert len(image_server.ranges) == 4
    tail = len(image) - 3 * 1024
    assert read(backend, tail, 3 * 1024) == image[tail:]  # the short last block
    assert image_server.ranges[-1] == (tail - tail % block, len(image) - 1)


def test_http_disk_errors_are_oserrors(image_server: ImageServer) -> None:
    backend = http_disk(image_server, cache="0")
    image_server.status = 500
    with pytest.raises(OSError, match=r"bytes=0-511: HTTP 500") as excinfo:
        read(backend, 0, 512)
    assert excinfo.value.errno == errno.EIO
    image_server.status = 0
    assert read(backend, 0, 512) == image_server.image[:512]  # recovers by itself
    image_server.short = 10
    with pytest.raises(OSError, match="got 502 of 512 bytes"):
        read(backend, 512, 512)
    image_server.short = 0
    image_server.ignore_range = True
    with pytest.raises(OSError, match="does not honour Range requests"):
        read(backend, 512, 512)
    assert read(backend, 0, 512) == image_server.image[:512]  # 200 at offset 0 is usable
    image_server.ignore_range = False
    image_server.stop()
    with pytest.raises(OSError, match="Connection refused") as gone:
        read(backend, 0, 512)
    assert gone.value.errno == errno.EIO


def test_http_disk_behind_the_device(image_server: ImageServer) -> None:
    image = image_server.image
    for driver in served(http_disk(image_server, cache="0")):
        assert driver.config.readonly
        assert driver.read(3, 4096) == (OK, image[1536:1536 + 4096])
        assert driver.write(3, b"w" * 512) == IOERR  # read-only device
        image_server.stop()  # server gone: OSError in the backend, IOERR for the driver
        assert driver.read(3, 512)[0] == IOERR
        assert driver.read(0, 512)[0] == IOERR


@pytest.mark.parametrize(("options", "message"), [
    ({"url": "ftp://x/disk.img"}, "url=ftp://x/disk.img is not an http:// or https:// URL"),
    ({"size": "huge"}, "size=huge is not a size"),
    ({"cache": "lots"}, "cache=lots is not a size"),
    ({"timeout": "soon"}, "timeout=soon is not a number of seconds"),
    ({"timeout": "0"}, "timeout=0.0 must be positive"),
    ({"colour": "red"}, "unknown option for backend '.*http_disk.py': colour "
                        r"\(known: url, size, cache, timeout\)"),
])
def test_http_disk_option_errors(image_server: ImageServer, options: dict[str, str],
                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_backend(script=EXAMPLES / "http_disk.py",
                     options={"url": image_server.url, **options})


def test_http_disk_without_a_server(image_server: ImageServer) -> None:
    image_server.stop()
    with pytest.raises(ConfigError, match=r"^http_disk: HEAD http://127\.0\.0\.1:\d+/disk.img: "
                       ".*Connection refused"):
        http_disk(image_server)
    with pytest.raises(ConfigError, match="missing required option url="):
        load_backend(script=EXAMPLES / "http_disk.py")
