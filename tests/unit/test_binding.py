"""Tests of pyvduse.binding against a simulated vdpa bus in a temporary sysfs tree.

The fake bus makes ``drivers_probe`` and each driver's ``unbind`` FIFOs, served by
one thread that reacts like the kernel: a probe binds the device to the driver
named in its ``driver_override`` and creates the child devices (virtioN/block/vdX
or vhost-vdpa-N) and their ``/dev`` nodes. Its ``dev_add`` honours
``drivers_autoprobe`` like ``VDPA_CMD_DEV_NEW`` does (binding immediately to the
first registered driver when it is 1), so skipping the autoprobe dance would bind
the wrong driver.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.binding import (
    AttachedDevice,
    BindingError,
    attach,
    detach,
    find_block_device,
    find_vhost_device,
)
from pyvduse.errors import PyvduseError
from pyvduse.netlink import NetlinkError


class FakeVdpaBus:
    """A vdpa bus in ``root/sys`` plus ``root/dev``; also the vdpa client (dev_add/dev_del)."""

    def __init__(
        self,
        root: Path,
        drivers: tuple[str, ...] = ("vhost_vdpa", "virtio_vdpa"),
        autoprobe: str = "1",
    ) -> None:
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        self.bus = self.sysfs / "bus" / "vdpa"
        (self.bus / "devices").mkdir(parents=True)
        (self.bus / "drivers").mkdir()
        self.dev.mkdir()
        (self.bus / "drivers_autoprobe").write_text(autoprobe + "\n")
        self.drivers = list(drivers)
        self.events: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        # knobs
        self.dev_add_error: BaseException | None = None
        self.dev_add_delay = 0.0
        self.dev_add_creates_device = True
        self.dev_del_error: BaseException | None = None
        self.ignore_autoprobe_off = False  # simulate another process flipping it back
        self.driver_probe_fails = False
        self.virtio_blk_loaded = True
        self.create_dev_nodes = True
        self.node_delay = 0.0
        self.has_driver_override = True
        self._next_index: dict[str, int] = {}  # per driver, like the kernel's IDAs
        # FIFOs opened O_RDWR: writers never block, the reader never sees EOF.
        self._fifos: dict[int, tuple[str, str | None]] = {}
        self._add_fifo(self.bus / "drivers_probe", "probe", None)
        for drv in drivers:
            (self.bus / "drivers" / drv).mkdir()
            self._add_fifo(self.bus / "drivers" / drv / "unbind", "unbind", drv)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _add_fifo(self, path: Path, kind: str, arg: str | None) -> None:
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._fifos[fd] = (kind, arg)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in [*self._fifos, self._stop_r, self._stop_w]:
            os.close(fd)

    # -- kernel side ---------------------------------------------------------

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([*self._fifos, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            # Read the probe FIFO first, then every unbind FIFO, and apply the
            # unbinds first: any unbind written before probe data we read is then
            # seen before that probe, as with the kernel's synchronous writes.
            probes = self._drain("probe")
            unbinds = self._drain("unbind")
            with self.lock:
                for drv, data in unbinds:
                    for name in self._device_names():
                        if name in data:
                            self._unbind(name, drv)
                for _, data in probes:
                    for name in self._device_names():
                        if name in data:
                            self._probe(name)

    def _drain(self, kind: str) -> list[tuple[str, str]]:
        out = []
        for fd, (k, arg) in self._fifos.items():
            if k != kind:
                continue
            try:
                data = os.read(fd, 4096).decode()
            except BlockingIOError:
                continue
            out.append((arg or "", data))
        return out

    def _device_names(self) -> list[str]:
        return sorted(p.name for p in (self.bus / "devices").iterdir())

    def _probe(self, name: str) -> None:
        dev_dir = self.bus / "devices" / name
        override = (dev_dir / "driver_override").read_text().strip()
        self.events.append(("probe", name, override))
        if (dev_dir / "driver").is_symlink():
            return  # already bound: probing is a no-op
        candidates = [override] if override not in ("", "(null)") else self.drivers
        for drv in candidates:
            if drv in self.drivers and not self.driver_probe_fails:
                self._bind(name, drv)
                return

    def _bind(self, name: str, drv: str) -> None:
        dev_dir = self.bus / "devices" / name
        os.symlink(f"../../../../bus/vdpa/drivers/{drv}", dev_dir / "driver")
        self.events.append(("bind", name, drv))
        idx = self._next_index.get(drv, 0)
        self._next_index[drv] = idx + 1
        if drv == "virtio_vdpa":
            vdir = dev_dir / f"virtio{idx}"
            vdir.mkdir()
            if not self.virtio_blk_loaded:
                return
            os.symlink("../../../../../bus/virtio/drivers/virtio_blk", vdir / "driver")
            disk = "vd" + "abcdefgh"[idx]
            (vdir / "block" / disk).mkdir(parents=True)
            (vdir / "block" / disk / "dev").write_text(f"253:{16 * idx}\n")
            self._make_node(disk)
        else:
            chardev = f"vhost-vdpa-{idx}"
            (dev_dir / chardev).mkdir()
            (dev_dir / chardev / "dev").write_text(f"240:{idx}\n")
            self._make_node(chardev)

    def _make_node(self, node: str) -> None:
        if not self.create_dev_nodes:
            return
        if self.node_delay:
            t = threading.Timer(self.node_delay, (self.dev / node).touch)
            t.daemon = True
            t.start()
        else:
            (self.dev / node).touch()

    def _unbind(self, name: str, drv: str) -> None:
        dev_dir = self.bus / "devices" / name
        link = dev_dir / "driver"
        if not link.is_symlink() or os.path.basename(os.readlink(link)) != drv:
            return
        self.events.append(("unbind", name, drv))
        link.unlink()
        for child in dev_dir.iterdir():
            if child.is_dir():
                self._remove_nodes(child)
                shutil.rmtree(child)

    def _remove_nodes(self, child: Path) -> None:
        for d in [child, *child.glob("block/*")]:
            if (d / "dev").exists():
                (self.dev / d.name).unlink(missing_ok=True)

    # -- client side (VdpaDeviceControl) --------------------------------------

    def dev_add(self, name: str, mgmtdev: str = "vduse") -> None:
        time.sleep(self.dev_add_delay)
        # the kernel's device_add (where autoprobe matters) is at the end of DEV_NEW
        autoprobe = (self.bus / "drivers_autoprobe").read_text().strip()
        with self.lock:
            self.events.append(("dev_add", name, mgmtdev, autoprobe))
            if self.dev_add_error is not None:
                if self.dev_add_creates_device:
                    (self.bus / "devices" / name).mkdir()
                raise self.dev_add_error
            dev_dir = self.bus / "devices" / name
            if dev_dir.exists():
                raise NetlinkError(errno.EEXIST, f"vdpa DEV_NEW {name}")
            dev_dir.mkdir()
            if self.has_driver_override:
                (dev_dir / "driver_override").write_text("(null)\n")
            if autoprobe != "0" or self.ignore_autoprobe_off:
                self._bind(name, self.drivers[0])

    def dev_del(self, name: str) -> None:
        with self.lock:
            self.events.append(("dev_del", name))
            if self.dev_del_error is not None:
                raise self.dev_del_error
            dev_dir = self.bus / "devices" / name
            if not dev_dir.exists():
                raise NetlinkError(errno.ENODEV, f"vdpa DEV_DEL {name}")
            for child in dev_dir.iterdir():
                if child.is_dir():
                    self._remove_nodes(child)
            shutil.rmtree(dev_dir)

    # -- helpers for assertions ---------------------------------------------

    def autoprobe(self) -> str:
        return (self.bus / "drivers_autoprobe").read_text().strip()

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[FakeVdpaBus]:
    fake = FakeVdpaBus(tmp_path)
    yield fake
    fake.close()


def no_modprobe(module: str) -> str | None:
    raise AssertionError(f"modprobe {module} must not be called")


def _attach(bus: FakeVdpaBus, name: str, driver: str, timeout: float = 5.0) -> AttachedDevice:
    return attach(
        name,
        driver,  # type: ignore[arg-type]
        bus,
        str(bus.sysfs),
        timeout,
        dev=str(bus.dev),
        modprobe=no_modprobe,
    )


# ---------------------------------------------------------------------------
# success paths
# ---------------------------------------------------------------------------


def test_attach_virtio_vdpa(bus: FakeVdpaBus) -> None:
    result = _attach(bus, "vduse-blk0", "virtio_vdpa")
    dev_dir = bus.bus / "devices" / "vduse-blk0"
    assert result == AttachedDevice(
        name="vduse-blk0",
        driver="virtio_vdpa",
        dev_path=str(bus.dev / "vda"),
        sysfs_block=str(dev_dir / "virtio0" / "block" / "vda"),
    )
    # autoprobe was off during DEV_NEW, the override was in place at probe time,
    # and autoprobe is restored afterwards
    assert bus.events == [
        ("dev_add", "vduse-blk0", "vduse", "0"),
        ("probe", "vduse-blk0", "virtio_vdpa"),
        ("bind", "vduse-blk0", "virtio_vdpa"),
    ]
    assert bus.autoprobe() == "1"
    assert (dev_dir / "driver_override").read_text() == "virtio_vdpa"
    assert find_block_device("vduse-blk0", str(bus.sysfs)) == "vda"
    assert find_vhost_device("vduse-blk0", str(bus.sysfs)) is None


def test_attach_vhost_vdpa(tmp_path: Path) -> None:
    # virtio_vdpa registered first: autoprobe would pick it
    fake = FakeVdpaBus(tmp_path, drivers=("virtio_vdpa", "vhost_vdpa"))
    try:
        result = _attach(fake, "vduse1", "vhost_vdpa")
        assert result == AttachedDevice("vduse1", "vhost_vdpa", str(fake.dev / "vhost-vdpa-0"))
        assert ("bind", "vduse1", "vhost_vdpa") in fake.events
        assert "dev_del" not in fake.kinds()
        assert find_vhost_device("vduse1", str(fake.sysfs)) == "vhost-vdpa-0"
        assert find_block_device("vduse1", str(fake.sysfs)) is None
        assert fake.autoprobe() == "1"
    finally:
        fake.close()


def test_attach_when_autoprobe_already_off(tmp_path: Path) -> None:
    fake = FakeVdpaBus(tmp_path, autoprobe="0")
    try:
        _attach(fake, "d0", "virtio_vdpa")
        assert fake.events[0] == ("dev_add", "d0", "vduse", "0")
        assert fake.autoprobe() == "0"
    finally:
        fake.close()


def test_attach_waits_for_slow_dev_node(bus: FakeVdpaBus) -> None:
    bus.node_delay = 0.3
    start = time.monotonic()
    result = _attach(bus, "d0", "virtio_vdpa")
    assert time.monotonic() - start >= 0.25
    assert result.dev_path == str(bus.dev / "vda")
    assert Path(result.dev_path).exists()


def test_attach_rebinds_if_bound_to_other_driver(bus: FakeVdpaBus) -> None:
    bus.ignore_autoprobe_off = True  # binds to vhost_vdpa inside dev_add anyway
    result = _attach(bus, "d0", "virtio_vdpa")
    assert result.driver == "virtio_vdpa"
    assert result.dev_path == str(bus.dev / "vda")
    assert [e for e in bus.events if e[0] in ("bind", "unbind")] == [
        ("bind", "d0", "vhost_vdpa"),
        ("unbind", "d0", "vhost_vdpa"),
        ("bind", "d0", "virtio_vdpa"),
    ]
    assert not (bus.dev / "vhost-vdpa-0").exists()


def test_concurrent_attaches_keep_autoprobe_consistent(bus: FakeVdpaBus) -> None:
    bus.dev_add_delay = 0.05  # widen the read-autoprobe/DEV_NEW window
    results: dict[str, AttachedDevice] = {}
    errors: list[BaseException] = []

    def worker(name: str, driver: str) -> None:
        time.sleep(0.01 * int(name[1:]))  # overlap each DEV_NEW with the previous one
        try:
            results[name] = _attach(bus, name, driver)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(f"d{i}", ("virtio_vdpa", "vhost_vdpa")[i % 2]))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert {n: r.driver for n, r in results.items()} == {
        "d0": "virtio_vdpa",
        "d1": "vhost_vdpa",
        "d2": "virtio_vdpa",
        "d3": "vhost_vdpa",
    }
    assert [e[3] for e in bus.events if e[0] == "dev_add"] == ["0"] * 4
    assert bus.autoprobe() == "1"
    assert len({r.dev_path for r in results.values()}) == 4


def test_modprobe_loads_missing_driver(tmp_path: Path) -> None:
    fake = FakeVdpaBus(tmp_path, drivers=("vhost_vdpa",))
    calls: list[str] = []

    def modprobe(module: str) -> str | None:
        calls.append(module)
        (fake.bus / "drivers" / module).mkdir()
        fake.drivers.append(module)
        return None

    try:
        result = attach(
            "d0", "virtio_vdpa", fake, str(fake.sysfs), 5.0, dev=str(fake.dev), modprobe=modprobe
        )
        assert calls == ["virtio_vdpa"]
        assert result.dev_path == str(fake.dev / "vda")
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# failure paths
# ---------------------------------------------------------------------------


def test_missing_driver_after_modprobe(tmp_path: Path) -> None:
    fake = FakeVdpaBus(tmp_path, drivers=("virtio_vdpa",))
    calls: list[str] = []

    def modprobe(module: str) -> str | None:
        calls.append(module)
        return "modprobe: FATAL: Module vhost_vdpa not found"

    try:
        with pytest.raises(BindingError) as info:
            attach("d0", "vhost_vdpa", fake, str(fake.sysfs), dev=str(fake.dev), modprobe=modprobe)
        exc = info.value
        assert calls == ["vhost_vdpa"]
        assert exc.errno == errno.ENOENT
        assert isinstance(exc, OSError)
        assert isinstance(exc, PyvduseError)
        text = str(exc)
        assert text.startswith("d0: vdpa bus driver vhost_vdpa is not available")
        assert "load module vhost_vdpa" in text
        assert "CONFIG_VHOST_VDPA" in text
        assert "Module vhost_vdpa not found" in text
        assert fake.events == []  # DEV_NEW never sent
        assert fake.autoprobe() == "1"
    finally:
        fake.close()


def test_no_vdpa_bus_at_all(tmp_path: Path) -> None:
    with pytest.raises(BindingError) as info:
        attach(
            "d0",
            "virtio_vdpa",
            FakeNoCallClient(),
            str(tmp_path),
            modprobe=lambda m: "modprobe not found",
        )
    assert info.value.errno == errno.ENOENT
    assert "virtio_vdpa" in str(info.value)


class FakeNoCallClient:
    def dev_add(self, name: str, mgmtdev: str = "vduse") -> None:
        raise AssertionError("dev_add must not be called")

    def dev_del(self, name: str) -> None:
        raise AssertionError("dev_del must not be called")


def test_dev_add_error_propagates_without_dev_del(bus: FakeVdpaBus) -> None:
    bus.dev_add_error = NetlinkError(errno.EINVAL, "vdpa DEV_NEW d0")
    bus.dev_add_creates_device = False
    with pytest.raises(NetlinkError) as info:
        _attach(bus, "d0", "virtio_vdpa")
    assert info.value.errno == errno.EINVAL
    assert bus.kinds() == ["dev_add"]
    assert bus.autoprobe() == "1"


def test_dev_add_timeout_cleans_up_maybe_created_device(bus: FakeVdpaBus) -> None:
    bus.dev_add_error = NetlinkError(errno.ETIMEDOUT, "vdpa DEV_NEW d0")
    with pytest.raises(NetlinkError) as info:
        _attach(bus, "d0", "virtio_vdpa")
    assert info.value.errno == errno.ETIMEDOUT
    assert bus.kinds() == ["dev_add", "dev_del"]
    assert not (bus.bus / "devices" / "d0").exists()
    assert bus.autoprobe() == "1"


def test_driver_does_not_bind_deletes_device(bus: FakeVdpaBus) -> None:
    bus.driver_probe_fails = True
    with pytest.raises(BindingError) as info:
        _attach(bus, "d0", "virtio_vdpa", timeout=0.3)
    assert info.value.errno == errno.ENODEV
    assert "did not bind to virtio_vdpa" in str(info.value)
    assert bus.kinds()[-1] == "dev_del"
    assert not (bus.bus / "devices" / "d0").exists()
    assert bus.autoprobe() == "1"


def test_no_block_device_reports_virtio_blk(bus: FakeVdpaBus) -> None:
    bus.virtio_blk_loaded = False
    start = time.monotonic()
    with pytest.raises(BindingError) as info:
        _attach(bus, "d0", "virtio_vdpa", timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 3
    assert info.value.errno == errno.ETIMEDOUT
    assert "virtio0 is not bound to a driver (is module virtio_blk loaded?)" in str(info.value)
    assert bus.kinds()[-1] == "dev_del"
    assert not (bus.bus / "devices" / "d0").exists()


def test_missing_dev_node(bus: FakeVdpaBus) -> None:
    bus.create_dev_nodes = False
    with pytest.raises(BindingError) as info:
        _attach(bus, "d0", "vhost_vdpa", timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT
    assert str(info.value) == (
        f"d0: {bus.dev / 'vhost-vdpa-0'} did not appear (is devtmpfs mounted and udev running?)"
    )
    assert bus.kinds()[-1] == "dev_del"


def test_missing_driver_override_attribute(bus: FakeVdpaBus) -> None:
    bus.has_driver_override = False
    with pytest.raises(BindingError) as info:
        _attach(bus, "d0", "virtio_vdpa")
    assert info.value.errno == errno.ENOENT
    assert "driver_override" in str(info.value)
    assert bus.kinds() == ["dev_add", "dev_del"]
    assert bus.autoprobe() == "1"


def test_failed_cleanup_is_noted(bus: FakeVdpaBus) -> None:
    bus.driver_probe_fails = True
    bus.dev_del_error = NetlinkError(errno.EBUSY, "vdpa DEV_DEL d0")
    with pytest.raises(BindingError) as info:
        _attach(bus, "d0", "virtio_vdpa", timeout=0.1)
    assert info.value.errno == errno.ENODEV  # the primary error, not the cleanup's
    notes = getattr(info.value, "__notes__", [])
    assert notes == ["cleanup dev_del('d0') also failed: vdpa DEV_DEL d0: Device or resource busy"]


def test_invalid_arguments(bus: FakeVdpaBus) -> None:
    for name in ("", "a/b", "..", "."):
        with pytest.raises(ValueError):
            _attach(bus, name, "virtio_vdpa")
        with pytest.raises(ValueError):
            find_block_device(name, str(bus.sysfs))
    with pytest.raises(ValueError):
        _attach(bus, "d0", "vfio_vdpa")
    with pytest.raises(ValueError):
        _attach(bus, "d0", "virtio_vdpa", timeout=0)
    assert bus.events == []


# ---------------------------------------------------------------------------
# detach / helpers
# ---------------------------------------------------------------------------


def test_detach(bus: FakeVdpaBus) -> None:
    _attach(bus, "d0", "virtio_vdpa")
    detach("d0", bus)
    assert bus.kinds()[-1] == "dev_del"
    assert not (bus.bus / "devices" / "d0").exists()
    assert not (bus.dev / "vda").exists()
    with pytest.raises(NetlinkError) as info:
        detach("d0", bus)
    assert info.value.errno == errno.ENODEV
    detach("d0", bus, missing_ok=True)
    bus.dev_del_error = NetlinkError(errno.EBUSY, "vdpa DEV_DEL d0")
    with pytest.raises(NetlinkError):
        detach("d0", bus, missing_ok=True)


def test_find_helpers_absent(tmp_path: Path) -> None:
    assert find_block_device("nothing", str(tmp_path)) is None
    assert find_vhost_device("nothing", str(tmp_path)) is None


def test_node_must_match_sysfs_dev_numbers(tmp_path: Path) -> None:
    from pyvduse.binding import _node_ready

    devnull = Path("/dev/null")
    if not devnull.exists():
        pytest.skip("no /dev/null")
    st = os.stat(devnull)
    sysdir = tmp_path / "vhost-vdpa-0"
    sysdir.mkdir()
    (sysdir / "dev").write_text(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}\n")
    assert _node_ready(devnull, sysdir)
    (sysdir / "dev").write_text(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev) + 1}\n")
    assert not _node_ready(devnull, sysdir)  # a stale node for another device
    assert not _node_ready(tmp_path / "missing", sysdir)
