"""Shared fixtures: the CLI on the fake kernel, O_DIRECT dirs, loop devices, an HTTP server."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pyvduse import inflight, registry
from pyvduse.backends.base import Done
from pyvduse.export import BlkExport
from pyvduse.testing import FakeVduse

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LOOP_SIZE = 4 << 20


@pytest.fixture(autouse=True)
def _restore_pyvduse_logging() -> Iterator[None]:
    """Undo what ``cli.main`` does to the ``pyvduse`` logger (a handler on the stderr of
    the moment, no propagation): later tests' records must not go to a closed capture."""
    logger = logging.getLogger("pyvduse")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


# -- the command line on the fake kernel -------------------------------------------------


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeVduse:
    """Route the CLI's devices to an in-process fake kernel, their logs to ``tmp_path``."""
    fake = FakeVduse()
    original = BlkExport.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["kernel"] = fake
        original(self, *args, **kwargs)

    monkeypatch.setattr(BlkExport, "__init__", init)
    monkeypatch.setattr(registry, "LinuxVduse", lambda: fake)  # its check before backends
    monkeypatch.setattr(inflight, "DEFAULT_DIR", str(tmp_path / "run"))
    return fake


@pytest.fixture
def wait_for_file() -> Callable[[Path], None]:
    """A function waiting (up to 10 s) for a file to appear, e.g. a daemon's pidfile."""

    def wait(path: Path) -> None:
        deadline = time.monotonic() + 10
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear within 10 s")
            time.sleep(0.01)

    return wait


# -- O_DIRECT and loop devices ----------------------------------------------------------


def _supports_direct(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    probe.write_bytes(bytes(4096))
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        probe.unlink()


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system that accepts O_DIRECT (tmp_path, else the repo's build/)."""
    if _supports_direct(tmp_path):
        yield tmp_path
        return
    build = REPO / "build" / "test-backends-direct"
    build.mkdir(parents=True, exist_ok=True)
    if not _supports_direct(build):
        pytest.skip(f"neither {tmp_path} nor {build} accepts O_DIRECT")
    work = build / tmp_path.name
    work.mkdir(exist_ok=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 4 MiB loop block device over a sparse file; skipped unless root with a working losetup."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    image = tmp_path / "loop.img"
    with open(image, "wb") as f:
        f.truncate(LOOP_SIZE)
    result = subprocess.run(["losetup", "--find", "--show", str(image)],
                            capture_output=True, text=True, check=False)
    device = result.stdout.strip()
    if result.returncode != 0 or not device or not os.path.exists(device):
        pytest.skip(f"losetup failed: {result.stderr.strip() or 'no device node'}")
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# -- an HTTP server with Range support --------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 makes concurrent clients wait for a SYN retry


class ImageServer:
    """Serves ``image`` at :attr:`url` on 127.0.0.1, honouring single ``Range: bytes=a-b``.

    Knobs for error tests: ``ignore_range`` answers 200 with the whole image,
    ``status`` answers every GET with that error status, ``short`` cuts each
    206 body by that many bytes. ``ranges`` records each GET's range.
    """

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.ignore_range = False
        self.status = 0
        self.short = 0
        self.head_length = True
        self.ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server",
                                        kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/disk.img"
        self.running = True

    def stop(self) -> None:
        """Shut the server down and close its socket: further requests are refused."""
        if self.running:
            self.running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                if server.head_length:
                    self.send_header("Content-Length", str(len(server.image)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                if server.status:
                    self.send_error(server.status)
                    return
                match = _RANGE.fullmatch(self.headers.get("Range", ""))
                if server.ignore_range or match is None:
                    self._send(200, server.image, {})
                    return
                first, last = int(match.group(1)), int(match.group(2))
                with server._lock:
                    server.ranges.append((first, last))
                if first > last or first >= len(server.image):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(server.image)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                last = min(last, len(server.image) - 1)
                body = server.image[first:last + 1]
                if server.short:
                    body = body[:-server.short]
                self._send(206, body, {
                    "Content-Range": f"bytes {first}-{last}/{len(server.image)}"})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """A 1 MiB + 3 KiB image of random bytes served over HTTP with Range support."""
    server = ImageServer(os.urandom((1 << 20) + 3 * 1024))
    try:
        yield server
    finally:
        server.stop()


class Recorder:
    """``done`` callables for submitted requests (nbd, rbd tests), and what each was called with."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.results: dict[int, list[BaseException | None]] = {}

    def done(self, key: int) -> Done:
        self.results[key] = []

        def done(error: BaseException | None) -> None:
            with self.cond:
                self.results[key].append(error)
                self.cond.notify_all()

        return done

    def wait(self, timeout: float = 30.0) -> dict[int, BaseException | None]:
        with self.cond:
            assert self.cond.wait_for(lambda: all(self.results.values()), timeout), (
                f"done never called for {[k for k, r in self.results.items() if not r]}")
        time.sleep(0.01)  # a second call would come right after the first
        assert all(len(r) == 1 for r in self.results.values()), "done called twice"
        outcome = {key: r[0] for key, r in self.results.items()}
        self.results = {}
        return outcome
