"""The rbd backend against a real one-node Ceph cluster.

``scripts/ceph-cluster`` starts the cluster (one monitor, manager and
memstore OSD, no authentication) once per test session in a temporary
directory, and stops it at the end. The Ceph packages are a test
requirement (``scripts/setup-vm`` installs them): without them every test
here fails, saying what to install. Each test makes its own images through
the Python binding. Covered: the conformance suite over plain, namespaced,
read-only and snapshot images (with and without librbd's cache), many
requests in flight, the whole device path, discard and write-zeroes
(native and emulated), resizing the image from the backend, errors from
librbd (I/O beyond an image that shrank, a client the cluster blocklisted),
close, and one-line errors for bad options, missing pools, images and
snapshots, an unreachable monitor and a pool whose data cannot be reached.

The device tests run on both data paths. On the native one the queues send their
reads, writes and flushes through librbd's C API on a handle of the native path's
own; the tests check that they did (requests staged with the engine), that the
backend's Python handle and the native one see each other's writes (discard and
write-zeroes stay on the Python handle), that a request librbd fails natively is
served again and reported by the Python path, and that ``cache=on`` keeps the
Python path with the reason.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import Recorder
from test_device import Rig, wait_until

from pyvduse import native
from pyvduse.backends import BACKENDS, open_backend
from pyvduse.backends import rbd as rbd_module
from pyvduse.backends.base import Done
from pyvduse.backends.rbd import ImageSpec, RbdBackend, import_librbd, parse_image_spec
from pyvduse.blk import BlkConfig
from pyvduse.errors import BackendError, ConfigError
from pyvduse.export import BlkExport
from pyvduse.testing import DriverMemory, FakeVduse
from pyvduse.testing.conformance import check_backend
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ceph-cluster"
PACKAGES = "ceph-mon ceph-osd ceph-mgr ceph-common python3-rbd python3-rados"
OK, IOERR = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR
T_IN, T_OUT, T_FLUSH = v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT, v.VIRTIO_BLK_T_FLUSH
T_DISCARD, T_WZ = v.VIRTIO_BLK_T_DISCARD, v.VIRTIO_BLK_T_WRITE_ZEROES
RESULT_OK = u.VDUSE_REQ_RESULT_OK
ALL_CHECKS = ["geometry", "capabilities", "reads", "round_trip", "vectored", "write_zeroes",
              "discard", "concurrency", "submit", "resize"]
READ_ONLY_CHECKS = ["geometry", "capabilities", "reads", "concurrency", "submit"]


def data(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def zeroes(offset: int, length: int) -> bytes:
    return bytes(length)


# -- the cluster ------------------------------------------------------------------------


class Cluster:
    """A running test cluster and a client connection for making and checking images."""

    def __init__(self, directory: Path, conf: Path) -> None:
        self.directory = directory
        self.conf = conf
        self.rados, self.rbd = import_librbd()
        self.client = self.rados.Rados(conffile=str(conf))
        self.client.connect(timeout=10)
        self.ioctx = self.client.open_ioctx("rbd")
        self._names = itertools.count()

    def close(self) -> None:
        self.ioctx.close()
        self.client.shutdown()

    def new_image(self, size: int = 8 * MiB, content: bytes = b"", order: int | None = None,
                  namespace: str = "", features: int | None = None) -> str:
        """Create an image (optionally holding ``content`` from offset 0, with only the
        ``features`` given, if given); its spec."""
        name = f"img{next(self._names)}"
        ioctx = self.ioctx
        if namespace:
            ioctx = self.client.open_ioctx("rbd")
            ioctx.set_namespace(namespace)
        try:
            self.rbd.RBD().create(ioctx, name, size, order=order, old_format=False,
                                  features=features)
            if content:
                with self.rbd.Image(ioctx, name) as image:
                    image.write(content, 0)
        finally:
            if namespace:
                ioctx.close()
        return f"rbd/{namespace}/{name}" if namespace else f"rbd/{name}"

    def image(self, spec: str, read_only: bool = True) -> Any:
        """The image of ``rbd/NAME`` opened through the test's own connection."""
        return self.rbd.Image(self.ioctx, spec.split("/")[-1], read_only=read_only)

    def read(self, spec: str, offset: int, length: int) -> bytes:
        with self.image(spec) as image:
            got: bytes = image.read(offset, length)
            return got

    def cli(self, *args: str) -> bytes:
        """Run the ``rbd`` command line tool against the cluster; its stdout."""
        done = subprocess.run(["rbd", "-c", str(self.conf), *args], capture_output=True,
                              timeout=60, check=False)
        assert done.returncode == 0, f"rbd {' '.join(args)}: {done.stderr.decode()}"
        return done.stdout

    def mon_command(self, **command: Any) -> str:
        ret, out, err = self.client.mon_command(json.dumps(command), b"", timeout=30)
        assert ret == 0, f"{command}: {err}"
        return str(out.decode())

    def backend(self, spec: str, **kwargs: Any) -> RbdBackend:
        return RbdBackend(spec, conf=str(self.conf), **kwargs)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A one-node cluster for the whole session, stopped (and its directory removed) at the end."""
    missing = [tool for tool in ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "rbd")
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the rbd tests need the Debian packages "
                    f"{PACKAGES} (scripts/setup-vm installs them)")
    try:
        import_librbd()
    except ConfigError as exc:
        pytest.fail(f"{exc} (scripts/setup-vm installs {PACKAGES})")
    top = Path(tempfile.mkdtemp(prefix="ceph"))  # short: admin sockets are Unix sockets
    directory = top / "cluster"
    try:
        started = subprocess.run([str(SCRIPT), str(directory)], capture_output=True,
                                 timeout=240, check=False)
        if started.returncode != 0:
            pytest.fail(f"scripts/ceph-cluster failed:\n{started.stderr.decode()}")
        conf = Path(started.stdout.decode().strip().splitlines()[-1])
        running = Cluster(directory, conf)
        try:
            yield running
        finally:
            running.close()
    finally:
        if directory.exists():
            stopped = subprocess.run([str(SCRIPT), "--stop", str(directory)],
                                     capture_output=True, timeout=120, check=False)
            assert stopped.returncode == 0, stopped.stderr.decode()
        shutil.rmtree(top, ignore_errors=True)


def uneven(view: memoryview, seed: int) -> list[memoryview]:
    """``view`` cut into a few pieces of random lengths (guest buffers need not be aligned)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(view)), min(3, len(view) - 1)))
    edges = [0, *cuts, len(view)]
    return [view[a:b] for a, b in itertools.pairwise(edges)]


# -- conformance ------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [None, False], ids=["cache-default", "cache-off"])
def test_conformance(cluster: Cluster, cache: bool | None) -> None:
    spec = cluster.new_image(4 * MiB)
    ran = check_backend(lambda: cluster.backend(spec, cache=cache), initial=zeroes)
    assert ran == ALL_CHECKS


def test_conformance_in_a_namespace(cluster: Cluster) -> None:
    cluster.rbd.RBD().namespace_create(cluster.ioctx, "tenant1")
    spec = cluster.new_image(2 * MiB, content=data(MiB, 1), namespace="tenant1")
    assert spec.startswith("rbd/tenant1/")
    ran = check_backend(lambda: cluster.backend(spec),
                        initial=lambda offset, length: (data(MiB, 1) + bytes(MiB))[
                            offset:offset + length])
    assert ran == ALL_CHECKS


def test_snapshots_and_readonly_images_are_read_only(cluster: Cluster) -> None:
    old = data(4 * MiB, 2)
    spec = cluster.new_image(4 * MiB, content=old)
    with cluster.image(spec, read_only=False) as image:
        image.create_snap("before")
        image.write(b"\xee" * MiB, 0)  # the image moves on; the snapshot keeps the old data

    def initial(offset: int, length: int) -> bytes:
        return old[offset:offset + length]

    ran = check_backend(lambda: cluster.backend(f"{spec}@before"), initial=initial)
    assert ran == READ_ONLY_CHECKS
    now = b"\xee" * MiB + old[MiB:]
    ran = check_backend(lambda: cluster.backend(spec, readonly=True),
                        initial=lambda offset, length: now[offset:offset + length])
    assert ran == READ_ONLY_CHECKS

    for backend in (cluster.backend(f"{spec}@before"), cluster.backend(spec, readonly=True)):
        try:
            assert backend.readonly
            assert (backend.can_write, backend.can_flush, backend.can_discard,
                    backend.can_write_zeroes, backend.can_resize) == (False,) * 5
            with pytest.raises(OSError) as write:
                backend.write(0, memoryview(bytes(512)))
            with pytest.raises(OSError) as discard:
                backend.discard(0, 512)
            with pytest.raises(OSError) as zero:
                backend.write_zeroes(0, 512, True)
            with pytest.raises(OSError) as resize:
                backend.resize(8 * MiB)
            for refused in (write, discard, zero, resize):
                assert refused.value.errno == errno.EROFS
            backend.flush()  # nothing to flush: succeeds
        finally:
            backend.close()
    assert cluster.read(spec, 0, 4 * MiB) == now


def test_resize_grows_and_shrinks_the_image(cluster: Cluster) -> None:
    first = data(MiB, 7)
    spec = cluster.new_image(4 * MiB, content=first)
    backend = cluster.backend(spec)

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        backend.read(offset, memoryview(buf))
        return bytes(buf)

    def image_size() -> int:
        """The size the cluster has for the image, through the test's own connection."""
        with cluster.image(spec) as image:
            return int(image.size())

    try:
        assert backend.can_resize and backend.resizable
        backend.write(3 * MiB, memoryview(b"\x33" * MiB))
        backend.resize(12 * MiB)
        assert backend.size() == image_size() == 12 * MiB
        assert read(0, MiB) == first
        assert read(3 * MiB, MiB) == b"\x33" * MiB
        assert read(4 * MiB, 8 * MiB) == bytes(8 * MiB)
        backend.write(12 * MiB - 512, memoryview(b"e" * 512))  # the new end is usable

        with pytest.raises(BackendError) as refused:  # any shrink must be allowed
            backend.resize(11 * MiB)
        assert refused.value.errno == errno.EINVAL
        assert str(refused.value) == (
            f"rbd {spec}: shrinking to {11 * MiB} bytes would drop data (the image has "
            f"{12 * MiB} bytes; whether any of those beyond {11 * MiB} hold data is not "
            "looked up); resize with shrink=true to allow it")
        assert backend.size() == 12 * MiB
        assert read(12 * MiB - 512, 512) == b"e" * 512

        backend.resize(2 * MiB, shrink=True)
        assert backend.size() == image_size() == 2 * MiB
        assert read(0, MiB) == first
        backend.resize(4 * MiB)
        assert read(2 * MiB, 2 * MiB) == bytes(2 * MiB)  # the dropped data stays dropped
        backend.resize(4 * MiB)  # the same size: nothing to do

        with pytest.raises(BackendError) as bad:
            backend.resize(4 * MiB + 100)
        assert bad.value.errno == errno.EINVAL
    finally:
        backend.close()
    with pytest.raises(OSError) as closed:
        backend.resize(8 * MiB)
    assert closed.value.errno == errno.EIO
    assert image_size() == 4 * MiB


def test_registered_and_built_from_options(cluster: Cluster) -> None:
    assert BACKENDS["rbd"] is RbdBackend
    spec = cluster.new_image(3 * MiB, order=20)
    backend = open_backend("rbd", [f"image={spec}", f"conf={cluster.conf}", "id=admin",
                                   "readonly=off", "timeout=5", "cache=off"])
    try:
        assert isinstance(backend, RbdBackend)
        assert backend.spec == ImageSpec("rbd", "", spec.split("/")[1])
        assert (backend.size(), backend.object_size, backend.timeout) == (3 * MiB, MiB, 5.0)
        assert (backend.can_write, backend.can_flush, backend.can_discard,
                backend.can_write_zeroes, backend.native_write_zeroes) == (True,) * 5
        assert backend.submit_min_bytes == 0 and backend.preferred_block_size == 512
        assert backend._cluster.conf_get("rbd_cache") == "false"
        # The open-time limits are gone once the image is open: requests may wait.
        assert backend._cluster.conf_get("rados_osd_op_timeout") == "0"
    finally:
        backend.close()
    # Without conf=, the monitors can come from mon-host= alone.
    mon_host = cluster.client.conf_get("mon_host")
    backend = open_backend("rbd", [f"image={spec}", f"mon-host={mon_host}", "readonly=on"])
    try:
        assert backend.size() == 3 * MiB and not backend.can_write
    finally:
        backend.close()
    # The spelling: pool= and a bare image name.
    pool, name = spec.split("/")
    backend = open_backend("rbd", [f"pool={pool}", f"image={name}", f"conf={cluster.conf}"])
    try:
        assert backend.spec == ImageSpec(pool, "", name) and backend.size() == 3 * MiB
    finally:
        backend.close()


# -- requests in flight -----------------------------------------------------------------


def test_many_requests_in_flight_move_the_exact_bytes(cluster: Cluster) -> None:
    size = 16 * MiB
    spec = cluster.new_image(size, order=20)  # 1 MiB objects: requests cross objects
    backend = cluster.backend(spec)
    rec = Recorder()
    rng = random.Random(1)
    spans, at = [], 0
    while True:
        length = rng.choice([512, 4096, 3 * 512, 64 << 10, 200 << 10, 1536 << 10])
        if at + length > size:
            break
        spans.append((at, length))
        at += length + rng.choice([0, 512, 8192])
    try:
        sources = [data(length, n) for n, (_, length) in enumerate(spans)]
        for n, ((offset, _), source) in enumerate(zip(spans, sources, strict=True)):
            raw = bytes(1) + source  # odd-address, uneven, read-only pieces
            backend.submit_writev(offset, uneven(memoryview(raw)[1:], n), rec.done(n))
        assert set(rec.wait().values()) == {None}
        backend.submit_flush(rec.done(0))
        assert rec.wait() == {0: None}
        content = cluster.read(spec, 0, size)
        for (offset, length), source in zip(spans, sources, strict=True):
            assert content[offset:offset + length] == source
        outs = [bytearray(b"\xa5") * length for _, length in spans]
        for n, ((offset, _), out) in enumerate(zip(spans, outs, strict=True)):
            backend.submit_readv(offset, uneven(memoryview(out), n + 7), rec.done(n))
        assert set(rec.wait().values()) == {None}
        assert outs == [bytearray(s) for s in sources]
    finally:
        backend.close()
    assert len(spans) > 20


def test_close_waits_for_requests_in_flight_then_refuses_new_ones(cluster: Cluster) -> None:
    spec = cluster.new_image(8 * MiB)
    backend = cluster.backend(spec)
    rec = Recorder()
    source = data(8 * MiB, 3)
    for n in range(8):
        backend.submit_writev(n * MiB, [memoryview(source)[n * MiB:(n + 1) * MiB]], rec.done(n))
    backend.close()  # librbd finishes (and flushes) what is in flight first
    assert rec.wait(timeout=0) == dict.fromkeys(range(8))
    backend.close()  # idempotent
    for submit in (lambda done: backend.submit_readv(0, [memoryview(bytearray(512))], done),
                   lambda done: backend.submit_writev(0, [memoryview(bytes(512))], done),
                   backend.submit_flush,
                   lambda done: backend.submit_discard(0, 512, done),
                   lambda done: backend.submit_write_zeroes(0, 512, False, done)):
        called: list[BaseException | None] = []
        with pytest.raises(OSError, match="closed") as excinfo:
            submit(called.append)
        assert excinfo.value.errno == errno.EIO and called == []
    assert cluster.read(spec, 0, 8 * MiB) == source


def test_a_failing_completion_is_logged_and_the_backend_goes_on(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    spec = cluster.new_image(MiB)
    backend = cluster.backend(spec)
    try:
        def broken(error: BaseException | None) -> None:
            raise RuntimeError("bug in a completion")

        with caplog.at_level(logging.ERROR, logger="pyvduse.backends.rbd"):
            backend.submit_readv(0, [memoryview(bytearray(4096))], broken)
            backend.submit_flush(broken)
            wait_until(lambda: caplog.text.count("a request's completion failed") == 2,
                       what="two logged completion failures")
        assert "bug in a completion" in caplog.text
        backend.write(0, memoryview(b"x" * 512))
        out = bytearray(512)
        backend.read(0, memoryview(out))
        assert out == b"x" * 512
    finally:
        backend.close()


# -- discard and write-zeroes -----------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native", "zero-data"])
@pytest.mark.parametrize("may_unmap", [False, True])
def test_write_zeroes_reads_back_as_zeroes(cluster: Cluster, native: bool,
                                           may_unmap: bool) -> None:
    size = 12 * MiB
    spec = cluster.new_image(size, content=b"\xff" * size, order=20)
    backend = cluster.backend(spec)
    try:
        assert backend.native_write_zeroes
        backend.native_write_zeroes = native
        # Inside one object, a whole object, and a range over several objects and the
        # 4 MiB pieces of the emulation.
        ranges = [(512, 4096), (MiB, MiB), (3 * MiB - 512, 9 * MiB)]
        rec = Recorder()
        for n, (offset, length) in enumerate(ranges):
            backend.submit_write_zeroes(offset, length, may_unmap, rec.done(n))
        assert set(rec.wait().values()) == {None}
        backend.flush()
        want = bytearray(b"\xff" * size)
        for offset, length in ranges:
            want[offset:offset + length] = bytes(length)
        out = bytearray(size)
        backend.read(0, memoryview(out))
        assert out == want
        assert cluster.read(spec, 0, size) == want
    finally:
        backend.close()


def test_discarded_objects_read_back_as_zeroes(cluster: Cluster) -> None:
    spec = cluster.new_image(8 * MiB, content=data(8 * MiB, 4), order=20)
    backend = cluster.backend(spec)
    try:
        backend.discard(2 * MiB, 3 * MiB)  # three whole objects
        backend.flush()
        want = data(8 * MiB, 4)
        want = want[:2 * MiB] + bytes(3 * MiB) + want[5 * MiB:]
        out = bytearray(8 * MiB)
        backend.read(0, memoryview(out))
        assert out == want
        assert cluster.read(spec, 0, 8 * MiB) == want
    finally:
        backend.close()


# -- the whole device path --------------------------------------------------------------

requires_native = pytest.mark.skipif(
    not native.available() and os.environ.get("PYVDUSE_REQUIRE_NATIVE") != "1",
    reason="the compiled data path is not built here")
DATAPATHS = [pytest.param("python"), pytest.param("native", marks=requires_native)]


def device_rig(backend: RbdBackend, name: str, datapath: str) -> Rig:
    """A started device over ``backend``, its queues served by ``datapath``."""
    rig = Rig(name=name, backend=backend)
    if datapath == "native":
        rig.dev.model.serve_natively()
        assert rig.dev.model.native is not None, backend.native_refusal
    assert rig.ch.start() == RESULT_OK
    return rig


def staged(rig: Rig) -> list[int]:
    """Requests each queue handed to librbd natively (0s on the Python path)."""
    rings = [rig.dev.workers[q]._native for q in sorted(rig.dev.workers)]
    return [ring.fast.staged if ring is not None else 0 for ring in rings]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_device_over_rbd_matches_the_image(cluster: Cluster, datapath: str) -> None:
    size = 8 * MiB
    spec = cluster.new_image(size, order=20)
    backend = cluster.backend(spec)
    rig = device_rig(backend, "rbd0", datapath)
    try:
        sizes = [512, 4096, 8192, 65536, 3 * 4096, 128 << 10]
        expected: list[tuple[int, bytes]] = []
        for q in (0, 1):
            reqs, written, sector = [], [], q * 4096
            for n, length in enumerate(sizes * 3):
                payload = data(length, 100 * q + n)
                reqs.append((T_OUT, sector, payload, 0))
                written.append((sector * 512, payload))
                sector += length // 512
            writes = rig.batch(q, reqs)
            assert len(rig.ch.wait_used(q, len(writes))) == len(writes)
            assert [rig.status(w) for w in writes] == [OK] * len(writes)
            assert rig.run(q, T_FLUSH)[0] == OK
            reads = rig.batch(q, [(T_IN, offset // 512, b"", len(payload))
                                  for offset, payload in written])
            rig.ch.wait_used(q, len(reads))
            for req, (_, payload) in zip(reads, written, strict=True):
                assert (rig.status(req), rig.data(req)) == (OK, payload)
            expected += written
        # Write-zeroes and discard reach the image too.
        zero = v.virtio_blk_discard_write_zeroes.pack(1, 6, 0)
        assert rig.run(0, T_WZ, 0, zero)[0] == OK
        discard = v.virtio_blk_discard_write_zeroes.pack(4 * 2048, 2048, 0)  # object 4
        assert rig.run(1, T_DISCARD, 0, discard)[0] == OK
        assert rig.run(1, T_FLUSH)[0] == OK
        exported = cluster.cli("export", spec, "-")
        assert len(exported) == size
        want = bytearray(size)
        for offset, payload in expected:
            want[offset:offset + len(payload)] = payload
        want[512:7 * 512] = bytes(6 * 512)
        want[4 * MiB:5 * MiB] = bytes(MiB)
        assert exported == want
        sent = staged(rig)
        if datapath == "native":  # every read, write and flush: 18 + 1 + 18 per queue
            assert sent == [37, 38], sent  # plus the flush after the discard
        else:
            assert sent == [0, 0]
    finally:
        rig.close()
        backend.close()


@requires_native
@pytest.mark.parametrize("features", [None, 1], ids=["default-features", "no-exclusive-lock"])
def test_the_native_and_python_handles_see_each_others_writes(
        cluster: Cluster, features: int | None, tmp_path: Path) -> None:
    # With the exclusive lock (a default feature) librbd keeps two handles coherent as
    # the lock moves; without it only the backend's flushes and cache drops do.
    spec = cluster.new_image(4 * MiB, order=20, features=features)
    # The Python handle with librbd's cache on (its default), caching reads as well.
    conf = tmp_path / "ceph.conf"
    conf.write_text(cluster.conf.read_text() + "\n[client]\nrbd cache policy = writeback\n")
    backend = RbdBackend(spec, conf=str(conf))
    rig = device_rig(backend, "rbd2", "native")
    try:
        backend.flush()  # from now on the Python handle's cache holds writes back
        out = bytearray(4096)
        for n in range(3):  # both ways, several times (the exclusive lock moves each time)
            native_data, python_data = data(4096, 2 * n), data(4096, 2 * n + 1)
            assert rig.run(n % 2, T_OUT, 8, native_data)[0] == OK
            backend.read(8 * 512, memoryview(out))
            assert out == native_data
            backend.write(16 * 512, python_data)
            assert rig.run(1 - n % 2, T_IN, 16, b"", 4096)[:2] == (OK, python_data)
        # Write-zeroes and discard take the Python handle; native reads see them at once.
        assert rig.run(0, T_OUT, 0, data(MiB, 9))[0] == OK
        zero = v.virtio_blk_discard_write_zeroes.pack(0, 8, 0)
        assert rig.run(0, T_WZ, 0, zero)[0] == OK
        assert rig.run(1, T_IN, 0, b"", 8192)[:2] == (OK, bytes(4096) + data(MiB, 9)[4096:8192])
        assert rig.run(0, T_OUT, 2 * 2048, data(MiB, 10))[0] == OK
        discard = v.virtio_blk_discard_write_zeroes.pack(2 * 2048, 2048, 0)  # object 2
        assert rig.run(1, T_DISCARD, 0, discard)[0] == OK
        assert rig.run(0, T_IN, 2 * 2048, b"", 4096)[:2] == (OK, bytes(4096))
        assert sum(staged(rig)) == 3 + 3 + 1 + 1 + 1 + 1
    finally:
        rig.close()
        backend.close()


@requires_native
def test_cache_on_keeps_the_python_path_and_says_why(cluster: Cluster) -> None:
    spec = cluster.new_image(MiB)
    backend = cluster.backend(spec, cache=True)
    try:
        assert backend.native_target() is None
        why = backend.native_refusal
        assert why.startswith("cache=on keeps the Python path"), why
        assert native.choose("auto", None, "e0", why) == (
            f"python (its backend has no native target ({why}))")
        with pytest.raises(ConfigError, match="e0: --datapath native: its backend has no "
                                              "native target \\(cache=on"):
            native.choose("native", None, "e0", why)
    finally:
        backend.close()


# -- errors from librbd -----------------------------------------------------------------


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_io_beyond_an_image_that_shrank_fails_and_the_device_reports_ioerr(
        cluster: Cluster, datapath: str) -> None:
    spec = cluster.new_image(8 * MiB, order=20)
    backend = cluster.backend(spec)
    rig = device_rig(backend, "rbd1", datapath)
    try:
        assert rig.run(0, T_OUT, 7 * 2048, b"d" * 4096)[0] == OK  # at 7 MiB
        cluster.cli("resize", "--allow-shrink", "--size", "4M", spec)

        def read_fails() -> bool:
            rec = Recorder()
            try:
                backend.submit_readv(6 * MiB, [memoryview(bytearray(4096))], rec.done(0))
            except OSError as exc:  # librbd may refuse at once...
                error: BaseException | None = exc
            else:
                error = rec.wait()[0]  # ...or fail the completion
            return isinstance(error, OSError) and error.errno == errno.EINVAL

        wait_until(read_fails, timeout=10, what="librbd to see the shrink")
        before = staged(rig)
        # Natively, librbd fails them; the Python path serves them again and reports it.
        assert rig.run(0, T_IN, 6 * 2048, b"", 4096)[0] == IOERR
        assert rig.run(1, T_OUT, 6 * 2048, b"e" * 4096, 0)[0] == IOERR
        assert rig.run(0, T_IN, 0, b"", 4096)[:2] == (OK, bytes(4096))  # the rest works
        assert rig.run(1, T_OUT, 8, b"f" * 4096)[0] == OK
        if datapath == "native":
            assert [after - was for after, was in zip(staged(rig), before, strict=True)] \
                == [2, 2]
    finally:
        rig.close()
        backend.close()


def test_a_blocklisted_client_gets_errors(cluster: Cluster) -> None:
    spec = cluster.new_image(4 * MiB)
    backend = cluster.backend(spec, cache=False)  # writes go to the OSD, not to a cache

    def outcome(submit: Callable[[Done], None]) -> BaseException | None:
        rec = Recorder()
        try:
            submit(rec.done(0))
        except OSError as exc:
            return exc
        return rec.wait()[0]

    def read(done: Done) -> None:
        backend.submit_readv(0, [memoryview(bytearray(4096))], done)

    def write(done: Done) -> None:
        backend.submit_writev(0, [memoryview(b"b" * 4096)], done)

    try:
        assert outcome(write) is None and outcome(read) is None
        addr = backend._cluster.get_addrs()
        cluster.mon_command(prefix="osd blocklist", blocklistop="add", addr=addr)
        try:
            # The OSD refuses the client once it has the new OSD map.
            wait_until(lambda: outcome(read) is not None, timeout=10,
                       what="the OSD to refuse the blocklisted client")
            for submit in (read, write):
                error = outcome(submit)
                assert isinstance(error, OSError) and error.errno == errno.ESHUTDOWN, error
                assert error.strerror.startswith(f"rbd {spec}: read" if submit is read
                                                else f"rbd {spec}: write")
        finally:
            cluster.mon_command(prefix="osd blocklist", blocklistop="rm", addr=addr)
    finally:
        backend.close()


# -- configuration errors ---------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ([], "backend 'rbd': missing required option image="),
    (["image=img0", "conf=/nonexistent/c.conf"], "cannot open rbd/img0: no configuration"),
    (["pool=p", "namespace=ns", "image=img@s", "conf=/nonexistent/c.conf"],
     "cannot open p/ns/img@s: no configuration"),
    (["pool=rbd", "image=rbd/img"], "image=rbd/img names a pool while pool=rbd is given"),
    (["namespace=ns", "image=img"], "backend 'rbd': namespace= needs pool="),
    (["image=a/b/c/d"], "bad image=a/b/c/d: too many /"),
    (["image=rbd//img"], "bad image=rbd//img: empty pool, namespace or image name"),
    (["image=/img"], "empty pool"),
    (["image=rbd/img@"], "bad image=rbd/img@: one non-empty snapshot name may follow @"),
    (["image=rbd/img@a@b"], "one non-empty snapshot name may follow @"),
    (["image=rbd/my img"], "blanks or control characters"),
    (["image=rbd/img", "timeout=0"], "option timeout=0: not a number of seconds (more than 0)"),
    (["image=rbd/img", "timeout=nan"], "option timeout=nan: not a number of seconds"),
    (["image=rbd/img", "timeout=soon"], "option timeout=soon"),
    (["image=rbd/img", "readonly=maybe"], "option readonly=maybe: not a boolean (use on or off)"),
    (["image=rbd/img", "cache=sometimes"], "option cache=sometimes: not a boolean"),
    (["image=rbd/img", "id="], "option id= has an empty value"),
    (["image=rbd/img", "colour=red"],
     "unknown option for backend 'rbd': colour (known: pool, namespace, image, conf, id, "
     "keyring, mon-host, "
     "readonly, timeout, cache)"),
    (["image=rbd/img", "conf=/nonexistent/ceph.conf"],
     "backend 'rbd': cannot open rbd/img: no configuration file /nonexistent/ceph.conf"),
    (["image=rbd/img", "keyring=/nonexistent/keyring", "mon-host=127.0.0.1"],
     "backend 'rbd': cannot open rbd/img: no keyring file /nonexistent/keyring"),
])
def test_bad_options_are_one_line_config_errors(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        open_backend("rbd", args)
    text = str(excinfo.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(("text", "expected"), [
    ("rbd/img0", ImageSpec("rbd", "", "img0")),
    ("pool/ns/img", ImageSpec("pool", "ns", "img")),
    ("rbd/img0@snap1", ImageSpec("rbd", "", "img0", "snap1")),
    ("p/n/i@s", ImageSpec("p", "n", "i", "s")),
])
def test_image_specs(text: str, expected: ImageSpec) -> None:
    assert parse_image_spec(text) == expected
    assert str(expected) == text


def test_missing_pool_image_and_snapshot_name_the_image(cluster: Cluster) -> None:
    spec = cluster.new_image(MiB)
    name = spec.split("/")[1]
    cases = {
        "nopool/img": "backend 'rbd': cannot open nopool/img: no pool 'nopool'",
        "rbd/nosuch": "backend 'rbd': cannot open rbd/nosuch: no image 'nosuch' in pool 'rbd'",
        "rbd/nons/img": "backend 'rbd': cannot open rbd/nons/img: no image 'img' in pool "
                        "'rbd', namespace 'nons'",
        f"{spec}@nosnap": f"backend 'rbd': cannot open {spec}@nosnap: the image has no "
                          "snapshot 'nosnap'",
        "rbd/nosuch@snap": "backend 'rbd': cannot open rbd/nosuch@snap: no image 'nosuch'",
    }
    for image, message in cases.items():
        with pytest.raises(ConfigError) as excinfo:
            open_backend("rbd", [f"image={image}", f"conf={cluster.conf}", "timeout=5"])
        assert str(excinfo.value).startswith(message), (image, str(excinfo.value))
        assert "\n" not in str(excinfo.value)
    backend = open_backend("rbd", [f"image=rbd/{name}", f"conf={cluster.conf}"])
    backend.close()


def test_an_unreachable_monitor_fails_within_the_timeout(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as excinfo:
        open_backend("rbd", ["image=rbd/img0", f"conf={cluster.conf}", "mon-host=127.0.0.1:1",
                             "timeout=2"])
    elapsed = time.monotonic() - started
    text = str(excinfo.value)
    assert text.startswith("backend 'rbd': cannot open rbd/img0: connecting: no answer "
                           "within 2 s"), text
    assert "\n" not in text
    assert elapsed < 6, elapsed


def test_a_pool_whose_data_cannot_be_reached_fails_within_the_timeout(
        cluster: Cluster) -> None:
    # Two replicas required on a one-OSD cluster: the pool's placement groups never
    # become active, so opening an image there waits for OSDs that cannot answer.
    cluster.mon_command(prefix="osd pool create", pool="stuck", pg_num=1, pgp_num=1)
    cluster.mon_command(prefix="osd pool set", pool="stuck", var="size", val="2")
    cluster.mon_command(prefix="osd pool set", pool="stuck", var="min_size", val="2")
    started = time.monotonic()
    with pytest.raises(ConfigError) as excinfo:
        open_backend("rbd", ["image=stuck/img", f"conf={cluster.conf}", "timeout=2"])
    elapsed = time.monotonic() - started
    text = str(excinfo.value)
    assert text.startswith("backend 'rbd': cannot open stuck/img: opening the image: no "
                           "answer within 2 s"), text
    assert elapsed < 10, elapsed


def test_a_missing_binding_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> ModuleType:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(rbd_module.importlib, "import_module", no_module)
    path = list(rbd_module.sys.path)
    with pytest.raises(ConfigError) as excinfo:
        open_backend("rbd", ["image=rbd/img0"])
    assert str(excinfo.value) == ("backend 'rbd': the rbd backend needs Debian's python3-rbd "
                                  "(apt-get install python3-rbd): No module named 'rados'")
    assert rbd_module.sys.path == path  # the extra search path is gone again


def test_a_resize_in_the_cluster_reaches_the_driver(cluster: Cluster) -> None:
    spec = cluster.new_image(4 * MiB)
    backend = cluster.backend(spec)
    assert backend.resizable
    fake = FakeVduse(DriverMemory(size=8 * MiB))
    export = BlkExport("rbdrs", backend, BlkConfig.for_backend(backend), attach="none",
                       kernel=fake)
    export.start()
    try:
        assert fake.channels["rbdrs"].start() == 0
        assert export.refresh_size() is None
        cluster.cli("resize", "--size", "10M", spec)
        wait_until(lambda: backend.size() == 10 * MiB, timeout=10, what="librbd to see it")
        assert export.refresh_size() == 10 * MiB
        assert int.from_bytes(fake.channels["rbdrs"].config[:8], "little") == 10 * MiB >> 9
        assert fake.channels["rbdrs"].config_irqs == 1
    finally:
        export.stop()  # closes the backend
        fake.memory.close()
    assert backend.size() == 10 * MiB  # the last size seen, once closed
