"""A backend whose size changes while served: the new capacity reaches the config space, the
driver gets a config interrupt, and requests follow the new end."""

from __future__ import annotations

import logging
import os
import signal
import struct
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvduse import cli
from pyvduse import registry as registry_module
from pyvduse.backends.base import Backend
from pyvduse.blk import BlkConfig
from pyvduse.export import BlkExport
from pyvduse.testing import DriverMemory, FakeVduse
from pyvduse.uapi import virtio as v

MiB = 1 << 20


class GrowingRam(Backend):
    """A RAM disk whose size the test sets."""

    resizable = True

    def __init__(self, size: int) -> None:
        self.data = bytearray(64 * MiB)
        self.reported = size

    def size(self) -> int:
        return self.reported

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self.data[offset:offset + len(buf)] = buf


def capacity_in_config(fake: FakeVduse, name: str) -> int:
    (sectors,) = struct.unpack_from("<Q", fake.channels[name].config, 0)
    return int(sectors) << 9


@pytest.fixture
def running() -> Iterator[tuple[BlkExport, GrowingRam, FakeVduse]]:
    fake = FakeVduse(DriverMemory(size=16 * MiB))
    backend = GrowingRam(4 * MiB)
    export = BlkExport("rs0", backend, BlkConfig.for_backend(backend, logical_block_size=4096),
                       attach="none", kernel=fake)
    export.start()
    assert fake.channels["rs0"].start() == 0
    yield export, backend, fake
    export.stop()
    fake.memory.close()


def read_status(export: BlkExport, fake: FakeVduse, offset: int) -> int:
    """One 4 KiB read at ``offset`` through queue 0; its status byte."""
    memory, channel = fake.memory, fake.channels[export.name]
    header = memory.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_IN, 0, offset >> 9))
    data = memory.buffer(4096, writable=True)
    status = memory.buffer(b"\xff", writable=True)
    channel.rings[0].add_chain([header, data, status])
    channel.kick(0)
    channel.wait_used(0, 1)
    return memory.read(status.addr, 1)[0]


def test_growth_and_shrink_reach_the_driver(
        running: tuple[BlkExport, GrowingRam, FakeVduse],
        caplog: pytest.LogCaptureFixture) -> None:
    export, backend, fake = running
    channel = fake.channels["rs0"]
    assert export.refresh_size() is None and channel.config_irqs == 0  # nothing changed
    assert read_status(export, fake, 6 * MiB) == v.VIRTIO_BLK_S_IOERR  # beyond the end

    backend.reported = 8 * MiB + 1000  # rounded down to whole 4 KiB blocks
    with caplog.at_level(logging.INFO, logger="pyvduse"):
        assert export.refresh_size() == 8 * MiB
    assert capacity_in_config(fake, "rs0") == 8 * MiB and channel.config_irqs == 1
    assert export.model.config.capacity == 8 * MiB
    assert read_status(export, fake, 6 * MiB) == v.VIRTIO_BLK_S_OK
    assert "resized from 4194304 to 8388608 bytes" in caplog.text

    backend.reported = 2 * MiB
    assert export.refresh_size() == 2 * MiB
    assert capacity_in_config(fake, "rs0") == 2 * MiB and channel.config_irqs == 2
    assert read_status(export, fake, 2 * MiB) == v.VIRTIO_BLK_S_IOERR
    assert read_status(export, fake, 2 * MiB - 4096) == v.VIRTIO_BLK_S_OK


def test_a_size_without_a_whole_block_is_ignored(
        running: tuple[BlkExport, GrowingRam, FakeVduse],
        caplog: pytest.LogCaptureFixture) -> None:
    export, backend, fake = running
    backend.reported = 1000
    assert export.refresh_size() is None
    assert capacity_in_config(fake, "rs0") == 4 * MiB and fake.channels["rs0"].config_irqs == 0
    assert "no whole block; the device keeps its size" in caplog.text


def test_serve_follows_a_resizable_backend(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_kernel: FakeVduse,
        wait_for_file: Callable[[Path], None], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "SIZE_CHECK_INTERVAL", 0.1)
    size_file = tmp_path / "size"
    size_file.write_text(str(4 * MiB))
    script = tmp_path / "sized.py"
    script.write_text(textwrap.dedent(f"""
        from pyvduse.backends import Backend

        class Sized(Backend):
            resizable = True
            def size(self):
                with open({str(size_file)!r}) as f:
                    return int(f.read())
            def read(self, offset, buf):
                buf[:] = bytes(len(buf))
    """))
    pidfile = tmp_path / "pid"
    seen: dict[str, Any] = {}

    def drive() -> None:
        wait_for_file(pidfile)
        channel = fake_kernel.channels["rs1"]
        channel.start()
        size_file.write_text(str(12 * MiB))
        deadline = 100
        while channel.config_irqs == 0 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        seen["irqs"] = channel.config_irqs
        seen["capacity"] = capacity_in_config(fake_kernel, "rs1")
        os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        status = cli.main(["serve", "--name", "rs1", "--attach", "none", "--pidfile",
                           str(pidfile), "python", f"script={script}"])
    finally:
        driver.join()
    err = capsys.readouterr().err
    assert status == 0, err
    assert seen == {"irqs": 1, "capacity": 12 * MiB}, err
    assert "rs1: resized from 4194304 to 12582912 bytes" in err
