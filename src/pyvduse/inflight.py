"""The inflight log: what a device had popped but not completed, kept across a crash.

A VDUSE device outlives its daemon. When the daemon dies (SIGKILL, OOM, a
bug) the driver keeps waiting for the requests the daemon had taken from the
rings, and the rings alone cannot say which those were: the used index
counts completions, but completions come out of order. This module keeps,
in a small memory-mapped file that outlives the process, exactly the state a
new daemon needs to carry on:

* the device: the options it was created with (checked against the new
  command line), the kernel device it belongs to, the driver's features and
  the device status it acknowledged, its capacity;
* per queue, one 64-bit slot per descriptor head: 0 when the head is not in
  flight, else the sequence number of the pop that took it (so that requests
  are resubmitted in the order they were taken); the used index up to which
  completed heads have been cleared from the slots; and a count of avail
  entries that named no valid head (skipped, never completable).

The write order that keeps it right whenever the process dies (see
:meth:`QueueLog.recover` for the proof sketch):

1. pop a head from the avail ring, then at once mark its slot
   (:attr:`QueueLog.slots`) before the request goes anywhere;
2. complete: write used elements, publish the used index, *then* clear the
   slots of the heads just published and store the log's used index.

A new daemon then knows: heads popped = heads published + heads marked +
skipped entries, so the next avail entry to take is ``used->idx + marked +
skipped`` (16-bit), and the marked heads are resubmitted. Heads published
but not yet cleared (death between the two halves of step 2) are found in
the used ring between the log's used index and the ring's, and cleared.

File layout (little-endian, version 1): a 1024-byte header, then one area
per queue of 16 bytes (u16 cleared-up-to used index, u16 skipped count,
12 bytes reserved) followed by ``queue_size`` u64 slots. The header holds
the magic, version, geometry, a CRC32 over the creation options (a JSON
object), and the mutable device state, each field written with one store.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyvduse.errors import PyvduseError

MAGIC = b"PYVDUSEL"
VERSION = 1
HEADER_SIZE = 1024
QUEUE_HEADER_SIZE = 16
DEFAULT_DIR = "/run/pyvduse"

# magic, version, header size, queues, queue size, identity CRC, identity length
_fixed = struct.Struct("<8sIIIIII")
_STATUS_OFFSET = 32  # u8 device status the device acknowledged
_FEATURES_OFFSET = 40  # u64 features the driver accepted
_CAPACITY_OFFSET = 48  # u64 capacity in bytes
_KERNEL_ID_OFFSET = 56  # 64 bytes: which kernel device this log belongs to (NUL padded)
_KERNEL_ID_SIZE = 64
_IDENTITY_OFFSET = 128
_IDENTITY_MAX = HEADER_SIZE - _IDENTITY_OFFSET

_u8 = struct.Struct("<B")
_u64 = struct.Struct("<Q")


class InflightLogError(PyvduseError):
    """An inflight log is missing, corrupt, stale or does not fit the device."""


def default_path(name: str) -> str:
    """Where the log of device ``name`` lives unless told otherwise."""
    return os.path.join(DEFAULT_DIR, f"{name}.inflight")


def file_size(num_queues: int, queue_size: int) -> int:
    """Bytes of a log for ``num_queues`` queues of ``queue_size`` entries."""
    return HEADER_SIZE + num_queues * (QUEUE_HEADER_SIZE + 8 * queue_size)


@dataclass(frozen=True)
class Recovery:
    """What :meth:`QueueLog.recover` found for one queue."""

    last_avail_idx: int
    """The next avail entry to take."""
    heads: list[int]
    """Heads popped and never published, in the order they were popped."""
    cleared: int
    """Heads that were published but still marked (the process died in between)."""


class QueueLog:
    """The log area of one queue; its views are used directly on the data path.

    :attr:`slots` (u64 per head) and :attr:`header` (u16: ``[0]`` cleared-up-to
    used index, ``[1]`` skipped count) are memoryviews into the shared
    mapping: a store to them is in the file the moment it is made.
    """

    __slots__ = ("_raw", "header", "size", "slots")

    def __init__(self, area: memoryview, size: int) -> None:
        self._raw = area[QUEUE_HEADER_SIZE:QUEUE_HEADER_SIZE + 8 * size]
        self.header = area[:4].cast("H")
        self.slots = self._raw.cast("Q")
        self.size = size

    @classmethod
    def in_memory(cls, size: int) -> QueueLog:
        """A log area that no file keeps: for a device served without an inflight log."""
        return cls(memoryview(bytearray(QUEUE_HEADER_SIZE + 8 * size)), size)

    def clear(self) -> None:
        """Forget everything (the driver reset the queue, or starts it afresh)."""
        self._raw[:] = bytes(8 * self.size)
        self.header[0] = 0
        self.header[1] = 0

    def release(self) -> None:
        """Drop the views into the file's mapping."""
        for view in (self.header, self.slots, self._raw):
            view.release()

    def recover(self, ring_used_idx: int, ring_avail_idx: int,
                used_heads: list[int]) -> Recovery:
        """Work out the queue's positions and the requests to resubmit.

        ``ring_used_idx`` and ``ring_avail_idx`` are the indexes in the rings
        now; ``used_heads`` are the heads of the used elements from the log's
        used index (``header[0]``) up to ``ring_used_idx``, oldest first (see
        :meth:`unlogged_window`). Once everything checks out, clears those
        heads' slots (they were published: the process died before clearing
        them) and stores the log's used index; a log refused is left as it was.

        Why it is right: every head taken from the avail ring is marked before
        the next one is taken and before its request starts, and its mark is
        cleared only after it is published; an entry naming no head is counted
        as skipped. So at any instant, entries taken = published + marked
        (+ one just taken and not yet marked, which is then simply taken
        again, its request never having started) + skipped. Raises
        :class:`InflightLogError` if the log cannot describe these rings.
        """
        slots = self.slots
        size = self.size
        for head in used_heads:
            if head >= size:
                raise InflightLogError(
                    f"the used ring names head {head}, beyond the queue size {size}")
        published = set(used_heads)
        marked = sorted((slots[head], head) for head in range(size)
                        if slots[head] and head not in published)
        if len({seq for seq, _ in marked}) != len(marked):
            raise InflightLogError("two heads carry the same pop sequence number")
        last_avail = (ring_used_idx + len(marked) + self.header[1]) & 0xFFFF
        ahead = (ring_avail_idx - last_avail) & 0xFFFF
        if ahead > size:
            raise InflightLogError(
                f"it puts the next request at avail entry {last_avail}, but the driver's "
                f"avail index is {ring_avail_idx} (queue size {size})")
        for head in published:  # checked: now repair what the crash interrupted
            slots[head] = 0
        self.header[0] = ring_used_idx
        return Recovery(last_avail, [head for _, head in marked], len(used_heads))

    def unlogged_window(self, ring_used_idx: int) -> int:
        """How many used elements were published after the log's used index."""
        window = (ring_used_idx - self.header[0]) & 0xFFFF
        if window > self.size:
            raise InflightLogError(
                f"its used index {self.header[0]} is {window} entries behind the ring's "
                f"{ring_used_idx}, more than the queue size {self.size}")
        return window

    def next_sequence(self) -> int:
        """A sequence number larger than every one marked now."""
        slots = self.slots
        return max((slots[head] for head in range(self.size)), default=0) + 1


class InflightLog:
    """An open inflight log file (see the module docstring).

    Build one with :meth:`create` (a new device) or :meth:`open` (a device
    that exists already: validated, never trusted blindly). :meth:`remove`
    deletes the file when the device is destroyed cleanly.
    """

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, num_queues: int,
                 queue_size: int, identity: dict[str, Any]) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.num_queues = num_queues
        self.queue_size = queue_size
        #: The options the device was created with (a JSON object).
        self.identity = identity
        view = memoryview(mapping)
        self._view = view
        self.queues: list[QueueLog] = []
        area = QUEUE_HEADER_SIZE + 8 * queue_size
        for index in range(num_queues):
            start = HEADER_SIZE + index * area
            self.queues.append(QueueLog(view[start:start + area], queue_size))

    # -- opening --------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, num_queues: int, queue_size: int,
               identity: Mapping[str, Any], capacity: int) -> InflightLog:
        """Write a fresh log for a device about to be created; replace any old file.

        The file is written whole under a temporary name and renamed into
        place, so a reader never sees half of it. The directory is created
        (mode 0700) if missing.
        """
        blob = json.dumps(dict(identity), sort_keys=True).encode()
        if len(blob) > _IDENTITY_MAX:
            raise InflightLogError(f"inflight log {path}: device options too long to record")
        size = file_size(num_queues, queue_size)
        header = bytearray(HEADER_SIZE)
        _fixed.pack_into(header, 0, MAGIC, VERSION, HEADER_SIZE, num_queues, queue_size,
                         zlib.crc32(blob), len(blob))
        _u64.pack_into(header, _CAPACITY_OFFSET, capacity)
        header[_IDENTITY_OFFSET:_IDENTITY_OFFSET + len(blob)] = blob
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            temp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, bytes(header))
                os.ftruncate(fd, size)
                os.fsync(fd)
                os.replace(temp, path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        except OSError as exc:
            raise InflightLogError(
                f"cannot write inflight log {path}: {exc.strerror or exc}") from None
        return cls(path, fd, mmap.mmap(fd, size), num_queues, queue_size, dict(identity))

    @classmethod
    def open(cls, path: str) -> InflightLog:
        """Open and validate an existing log; :class:`InflightLogError` says what is wrong."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InflightLogError(f"inflight log {path} does not exist") from None
        except OSError as exc:
            raise InflightLogError(
                f"cannot open inflight log {path}: {exc.strerror or exc}") from None
        try:
            log = cls._validate(path, fd)
        except BaseException:
            os.close(fd)
            raise
        status = log.status
        if status & 0x80 or status & ~0xCF:  # FAILED, or bits no device sets
            log.close()
            raise InflightLogError(f"inflight log {path} is corrupt (device status "
                                   f"{status:#x}); it cannot be trusted to recover the device")
        return log

    @classmethod
    def _validate(cls, path: str, fd: int) -> InflightLog:
        def corrupt(why: str) -> InflightLogError:
            return InflightLogError(f"inflight log {path} is corrupt ({why}); it cannot be "
                                    "trusted to recover the device")

        actual = os.fstat(fd).st_size
        if actual < HEADER_SIZE:
            raise corrupt(f"{actual} bytes, shorter than its header")
        header = os.pread(fd, HEADER_SIZE, 0)
        magic, version, header_size, queues, queue_size, crc, length = _fixed.unpack_from(header)
        if magic != MAGIC:
            raise corrupt("not a pyvduse inflight log")
        if version != VERSION:
            raise InflightLogError(f"inflight log {path} has version {version}; this pyvduse "
                                   f"reads version {VERSION}")
        if header_size != HEADER_SIZE or not 1 <= queues <= 0xFFFF or not (
                0 < queue_size <= 32768 and queue_size & (queue_size - 1) == 0):
            raise corrupt("bad geometry")
        if actual != file_size(queues, queue_size):
            raise corrupt(f"{actual} bytes, expected {file_size(queues, queue_size)}")
        if length > _IDENTITY_MAX:
            raise corrupt("bad options length")
        blob = header[_IDENTITY_OFFSET:_IDENTITY_OFFSET + length]
        if zlib.crc32(blob) != crc:
            raise corrupt("checksum mismatch")
        try:
            identity = json.loads(blob)
        except ValueError:
            raise corrupt("unreadable options") from None
        if not isinstance(identity, dict):
            raise corrupt("unreadable options")
        return cls(path, fd, mmap.mmap(fd, actual), queues, queue_size, identity)

    # -- device state ---------------------------------------------------------------

    @property
    def status(self) -> int:
        """The device status last acknowledged to the driver."""
        return self._view[_STATUS_OFFSET]

    @status.setter
    def status(self, value: int) -> None:
        self._view[_STATUS_OFFSET] = value

    @property
    def driver_features(self) -> int:
        """The features the driver accepted (valid with FEATURES_OK in :attr:`status`)."""
        return int(_u64.unpack_from(self._view, _FEATURES_OFFSET)[0])

    @driver_features.setter
    def driver_features(self, value: int) -> None:
        _u64.pack_into(self._view, _FEATURES_OFFSET, value)

    @property
    def capacity(self) -> int:
        """The device's capacity in bytes (updated on resize)."""
        return int(_u64.unpack_from(self._view, _CAPACITY_OFFSET)[0])

    @capacity.setter
    def capacity(self, value: int) -> None:
        _u64.pack_into(self._view, _CAPACITY_OFFSET, value)

    @property
    def kernel_id(self) -> str:
        """Which kernel device the log belongs to ("" until the device exists)."""
        raw = bytes(self._view[_KERNEL_ID_OFFSET:_KERNEL_ID_OFFSET + _KERNEL_ID_SIZE])
        return raw.rstrip(b"\0").decode(errors="replace")

    @kernel_id.setter
    def kernel_id(self, value: str) -> None:
        raw = value.encode()[:_KERNEL_ID_SIZE]
        self._view[_KERNEL_ID_OFFSET:_KERNEL_ID_OFFSET + _KERNEL_ID_SIZE] = raw.ljust(
            _KERNEL_ID_SIZE, b"\0")

    def reset(self) -> None:
        """The driver reset the device: no status, no features, nothing in flight."""
        self.status = 0
        self.driver_features = 0
        for queue in self.queues:
            queue.clear()

    def mismatches(self, identity: Mapping[str, Any], capacity: int) -> list[str]:
        """How the device the log describes differs from ``identity`` (empty: it does not)."""
        differences = []
        for key in sorted(set(self.identity) | set(identity)):
            old, new = self.identity.get(key), identity.get(key)
            if old != new:
                differences.append(f"{key} {old!r} (asked: {new!r})")
        if capacity != self.capacity:
            differences.append(f"size {self.capacity} bytes (asked: {capacity})")
        return differences

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close the file (its contents stay); idempotent."""
        if self._fd < 0:
            return
        for queue in self.queues:
            queue.release()
        self.queues = []
        self._view.release()
        with contextlib.suppress(BufferError):  # a view still held elsewhere keeps it mapped
            self._map.close()
        os.close(self._fd)
        self._fd = -1

    def remove(self) -> None:
        """Close and delete the file: the device is gone and nothing is in flight."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
