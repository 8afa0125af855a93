"""Crash recovery on the fake kernel: each kill point, out-of-order completions, and every
log or option that must be refused (the real-kernel proof is tests/guest/test_crash_recovery)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_async_requests import GatedBackend
from test_device import pattern

from pyvduse.blk import BlkConfig
from pyvduse.errors import ConfigError, PyvduseError
from pyvduse.export import BlkExport
from pyvduse.inflight import InflightLog, InflightLogError
from pyvduse.testing import DriverMemory, FakeVduse
from pyvduse.testing.fake_kernel import FakeChannel
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v

NAME = "rc0"
T_OUT = v.VIRTIO_BLK_T_OUT


class Driver:
    """The driver's side: requests it submitted and the completions it saw."""

    def __init__(self, channel: FakeChannel) -> None:
        self.ch = channel
        self.statuses: dict[int, Buffer] = {}
        self.completed: list[int] = []

    def write(self, count: int, first_sector: int = 0) -> list[int]:
        mem, ring = self.ch.memory, self.ch.rings[0]
        heads = []
        for i in range(count):
            header = mem.buffer(v.virtio_blk_outhdr.pack(T_OUT, 0, first_sector + 8 * i))
            status = mem.buffer(b"\xff", writable=True)
            head = ring.add_chain([header, mem.buffer(pattern(4096, first_sector + i)), status],
                                  indirect=True, publish=False)
            self.statuses[head] = status
            heads.append(head)
        ring.publish(heads)
        self.ch.kick(0)
        return heads

    def collect(self, count: int) -> None:
        self.completed += [head for head, _ in self.ch.wait_used(0, count)]


def export(fake: FakeVduse, backend: GatedBackend, log: Path, queue_size: int = 16
           ) -> BlkExport:
    config = BlkConfig.for_backend(backend, queue_size=queue_size)
    return BlkExport(NAME, backend, config, attach="none", kernel=fake, inflight_log=str(log))


def crash(fake: FakeVduse, dead: BlkExport) -> None:
    """What SIGKILL leaves behind: no more work from that process; device, rings, log stay."""
    fake.crash(NAME)
    dead.device.abandon()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[FakeVduse, GatedBackend, Path, Driver, BlkExport]]:
    fake = FakeVduse(DriverMemory(size=8 << 20))
    backend = GatedBackend()
    log = tmp_path / "rc0.inflight"
    first = export(fake, backend, log)
    first.start()
    assert fake.channels[NAME].start() == 0
    yield fake, backend, log, Driver(fake.channels[NAME]), first
    fake.memory.close()


def restart(fake: FakeVduse, backend: GatedBackend, log: Path) -> BlkExport:
    again = GatedBackend()
    again.data = backend.data  # the same storage
    second = export(fake, again, log)
    second.start()
    assert second.recovered
    return second


def finish_all(backend: GatedBackend, count: int) -> None:
    for held in backend.wait_held(count):
        backend.finish(held, backend.data)


def test_out_of_order_completions_are_each_served_once(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    heads = driver.write(6)
    held = backend.wait_held(6)
    for index in (4, 1):  # two complete, out of order
        backend.finish(held[index], backend.data)
    driver.collect(2)
    crash(fake, first)
    second = restart(fake, backend, log)
    assert second.resubmitted == 4
    finish_all(second.backend, 4)  # type: ignore[arg-type]
    driver.collect(4)
    assert sorted(driver.completed) == sorted(heads)  # each exactly once
    for i in range(6):
        assert backend.data[i * 4096:(i + 1) * 4096] == pattern(4096, i)
    later = driver.write(2, first_sector=48)  # and the device goes on normally
    finish_all(second.backend, 2)  # type: ignore[arg-type]
    driver.collect(2)
    assert driver.completed[-2:] == later or sorted(driver.completed[-2:]) == sorted(later)
    second.stop()
    assert not log.exists()


def test_killed_between_pop_and_log(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    heads = driver.write(4)
    backend.wait_held(4)
    crash(fake, first)
    on_disk = InflightLog.open(str(log))
    slots = on_disk.queues[0].slots
    newest = max(range(16), key=lambda h: slots[h])
    slots[newest] = 0  # the last head was taken but its mark never written
    on_disk.close()
    second = restart(fake, backend, log)
    assert second.resubmitted == 3  # and the fourth is taken from the ring again
    finish_all(second.backend, 4)  # type: ignore[arg-type]
    driver.collect(4)
    assert sorted(driver.completed) == sorted(heads)
    second.stop()


def test_killed_between_publish_and_clearing_the_log(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    heads = driver.write(3)
    held = backend.wait_held(3)
    backend.finish(held[2], backend.data)
    driver.collect(1)
    crash(fake, first)
    on_disk = InflightLog.open(str(log))
    queue = on_disk.queues[0]
    queue.slots[driver.completed[0]] = 99  # published, but its mark not yet cleared
    queue.header[0] = 0
    on_disk.close()
    second = restart(fake, backend, log)
    assert second.resubmitted == 2  # the published one is not served again
    finish_all(second.backend, 2)  # type: ignore[arg-type]
    driver.collect(2)
    assert sorted(driver.completed) == sorted(heads)
    second.stop()


def test_killed_between_completion_and_publish(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    heads = driver.write(2)
    backend.wait_held(2)
    crash(fake, first)
    ring = fake.channels[NAME].rings[0]
    # the dead daemon had written a used element, and died before storing the used index
    ring.memory.write(ring.used_addr + 4, struct.pack("<II", heads[0], 1))
    assert ring.used_idx() == 0
    second = restart(fake, backend, log)
    assert second.resubmitted == 2
    finish_all(second.backend, 2)  # type: ignore[arg-type]
    driver.collect(2)
    assert sorted(driver.completed) == sorted(heads)
    second.stop()


def test_a_status_message_sent_again_after_the_restart_is_idempotent(
        rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    crash(fake, first)
    second = restart(fake, backend, log)
    channel = fake.channels[NAME]
    workers = dict(second.device.workers)
    assert channel.set_status(0xF) == 0  # DRIVER_OK again: the queues are not started twice
    assert second.device.workers == workers
    driver.write(1)
    finish_all(second.backend, 1)  # type: ignore[arg-type]
    driver.collect(1)
    second.stop()


def test_a_missing_log_is_refused(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, _driver, first = rig
    crash(fake, first)
    os.unlink(log)
    with pytest.raises(PyvduseError, match=r"exists but its inflight log .* does not"):
        export(fake, backend, log).start()
    assert fake.device_exists(NAME)


@pytest.mark.parametrize("damage", ["magic", "options", "size", "status"])
def test_a_corrupt_log_is_refused(rig: tuple, damage: str) -> None:  # type: ignore[type-arg]
    fake, backend, log, _driver, first = rig
    crash(fake, first)
    raw = bytearray(log.read_bytes())
    if damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "options":
        raw[130] ^= 0x01
    elif damage == "status":
        raw[32] = 0x80
    else:
        raw = raw[:-8]
    log.write_bytes(bytes(raw))
    with pytest.raises(InflightLogError, match="corrupt"):
        export(fake, backend, log).start()
    assert fake.device_exists(NAME)


def test_a_log_that_cannot_describe_the_rings_is_refused(
        rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, driver, first = rig
    driver.write(2)
    backend.wait_held(2)
    crash(fake, first)
    on_disk = InflightLog.open(str(log))
    for head in range(16):
        on_disk.queues[0].slots[head] = head + 1  # 16 marked, only 2 ever made available
    on_disk.close()
    before = log.read_bytes()
    with pytest.raises(PyvduseError, match=r"cannot recover the device.*avail index"):
        export(fake, backend, log).start()
    assert fake.device_exists(NAME)
    assert log.read_bytes() == before  # refused, not repaired half-way


def test_a_stale_log_is_refused(rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, _driver, first = rig
    crash(fake, first)
    on_disk = InflightLog.open(str(log))
    on_disk.kernel_id = "another/device"
    on_disk.close()
    with pytest.raises(PyvduseError, match="is stale"):
        export(fake, backend, log).start()


def test_other_options_are_refused_and_touch_nothing(
        rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, _driver, first = rig
    crash(fake, first)
    before = log.read_bytes()
    with pytest.raises(ConfigError, match=r"other options: queue_size 16 \(asked: 32\)"):
        export(fake, backend, log, queue_size=32).start()
    assert log.read_bytes() == before
    restart(fake, backend, log).stop()  # the right options still work


def test_a_device_another_process_serves_is_refused(
        rig: tuple) -> None:  # type: ignore[type-arg]
    fake, backend, log, _driver, first = rig
    with pytest.raises(PyvduseError, match="exists and another process serves it"):
        export(fake, backend, log).start()
    first.stop()
