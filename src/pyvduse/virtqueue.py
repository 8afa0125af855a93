"""Split virtqueue, device side (virtio 1.x section 2.7), over a :class:`GuestMemory`.

Pure ring logic: no file descriptors, no threads. The caller pops descriptor
chains, hands them to a device, pushes completions and asks whether the driver
wants an interrupt. Every index, length, flag and address that the driver
supplies is checked: a malformed chain raises :class:`ChainError` (the caller
completes it with length 0 and carries on); a malformed ring (the avail index
jumping by more than the ring size) raises :class:`RingError`, after which the
queue must be reset.

Byte order: rings are little-endian and this module reads them through native
``memoryview.cast`` views, so it requires a little-endian host (checked at import).
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass, field

from pyvduse.errors import MemoryAccessError, RingError
from pyvduse.memory import NO_HOT_REGION, GuestMemory, HotRegion
from pyvduse.uapi.virtio import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    vring_avail_size,
    vring_desc,
    vring_desc_table_size,
    vring_used_size,
)

if sys.byteorder != "little":  # pragma: no cover - every supported VDUSE host is LE
    raise ImportError("pyvduse's split ring needs a little-endian host")

MAX_QUEUE_SIZE = 32768  # virtio 1.x limit for split rings
MAX_CHAIN_BYTES = 0xFFFFFFFF  # the used element's length is a le32

_unpack_desc = vring_desc.unpack_from
_DESC_SIZE = vring_desc.size
# Flag bits a descriptor may not carry on pop's fast path (anything else: the general path).
_NOT_NEXT = ~VRING_DESC_F_NEXT
_NOT_WRITE = ~VRING_DESC_F_WRITE
_NOT_WRITE_NEXT = ~(VRING_DESC_F_WRITE | VRING_DESC_F_NEXT)
_NEXT_WRITE = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
# Indirect tables of two and three descriptors, read in one call each.
_unpack_desc2 = struct.Struct("<" + vring_desc.format.lstrip("<") * 2).unpack_from
_unpack_desc3 = struct.Struct("<" + vring_desc.format.lstrip("<") * 3).unpack_from

# A locked read-modify-write is a full barrier on every architecture CPython runs on;
# acquiring and releasing a lock gives the store->load ordering EVENT_IDX needs.
_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """Order every earlier store before every later load."""
    with _barrier_lock:
        pass


class _ReleasedMemory:
    """The driver memory of a released queue: every access is refused."""

    hot: HotRegion = NO_HOT_REGION

    def segments(self, addr: int, length: int, write: bool) -> list[memoryview]:
        raise MemoryAccessError("the queue was released")

    def contiguous(self, addr: int, length: int, write: bool) -> memoryview:
        raise MemoryAccessError("the queue was released")


_NO_MEMORY = _ReleasedMemory()


class ChainError(Exception):
    """A descriptor chain is malformed; ``head`` is valid, so the chain can be completed."""

    def __init__(self, head: int, reason: str) -> None:
        self.head = head
        self.reason = reason
        super().__init__(f"descriptor chain {head}: {reason}")


@dataclass(slots=True)
class Chain:
    """A popped descriptor chain: device-readable then device-writable buffers."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event``: did ``old..new`` (16-bit, wrapping) pass ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def is_valid_queue_size(size: int) -> bool:
    """Split rings need a power-of-two size in 1..32768."""
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


class SplitQueue:
    """Device side of one split virtqueue.

    ``last_avail_idx`` is the next avail-ring slot to consume and ``used_idx``
    the next used-ring slot to fill; both are free-running 16-bit counters and
    together are the queue's whole persistent state.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        max_chain: int = 0,
    ) -> None:
        if not is_valid_queue_size(size):
            raise RingError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        try:
            self._desc = memory.contiguous(desc_addr, vring_desc_table_size(size), write=False)
            avail = memory.contiguous(avail_addr, vring_avail_size(size), write=False)
            used = memory.contiguous(used_addr, vring_used_size(size), write=True)
        except MemoryAccessError as exc:
            raise RingError(f"cannot map the rings: {exc}") from exc
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise RingError("ring addresses are misaligned")
        self.memory = memory
        self.size = size
        #: Most descriptors an indirect table may hold: the queue size the device
        #: offered (``max_chain``, what its seg_max was derived from), never less
        #: than this ring's size (a front-end may pick a smaller ring than offered).
        self.max_indirect = max(size, max_chain)
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        # avail: flags, idx, ring[size], used_event  (u16 each)
        self._avail16 = avail.cast("H")
        # used: flags, idx (u16), ring[size] of {u32 id, u32 len}, avail_event (u16)
        self._used16 = used.cast("H")
        # used elements as one u64 each, ``id | len << 32`` (little-endian): one store per push
        self._used64 = used[4 : 4 + 8 * size].cast("Q")
        self._used_event_slot = 2 + size
        self._avail_event_slot = 2 + 4 * size
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = self._used16[1] if used_idx is None else used_idx & 0xFFFF
        #: The used index the driver was last told of (or chose not to be): interrupts
        #: are decided on what was published since (see :meth:`needs_interrupt`).
        self.signalled_used = self.used_idx
        self.broken = False

    # -- consuming ------------------------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's current avail index."""
        return self._avail16[1]

    def pending(self) -> int:
        """Number of chains the driver has made available and we have not popped.

        Raises :class:`RingError` (and marks the queue broken) if the driver
        moved its index by more than the ring size.
        """
        count = (self._avail16[1] - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            self.broken = True
            raise RingError(
                f"avail index moved from {self.last_avail_idx} to {self._avail16[1]}, "
                f"more than the queue size {self.size}")
        return count

    def pop(self) -> Chain:
        """Pop the next available chain (the caller checked :meth:`pending`).

        Raises :class:`ChainError` for a malformed chain whose head is valid (it is
        consumed; complete it) and :class:`RingError` for an out-of-range head
        (consumed too, but it cannot be completed).

        Fast path: most chains are well formed and lie in one mapping. If every
        buffer of the chain is non-empty, inside the memory's hot region (see
        :data:`pyvduse.memory.HotRegion`) and has only the NEXT and WRITE flags
        (or the head is one indirect descriptor whose table lies there), the
        chain is built here: buffers are sliced straight from the mapping's
        view, the table is read in place, and the checks that cannot fail on
        such a chain are folded into a few comparisons (rights and bounds: two
        per buffer; loops: the loop runs at most table-size times; the 4 GiB
        limit: once, at the end). On anything else, including every malformed
        chain, it gives up without side effects and :meth:`_walk` starts over
        with every check in order, so errors are exactly those of the general path.
        """
        last = self.last_avail_idx
        head = self._avail16[2 + (last & self._mask)]
        self.last_avail_idx = (last + 1) & 0xFFFF
        table_len = self.size
        if head >= table_len:
            raise RingError(
                f"avail ring names descriptor {head}, beyond the queue size {table_len}")
        hot_start, read_end, write_end, view = self.memory.hot
        table = self._desc
        base = 0  # byte offset of descriptor 0 in ``table``
        addr, length, flags, nxt = _unpack_desc(table, head * _DESC_SIZE)
        if flags & VRING_DESC_F_INDIRECT:
            # One indirect descriptor (its WRITE flag is ignored), negotiated, whose table
            # lies in the hot region and holds 1..size descriptors.
            if (flags & _NOT_WRITE != VRING_DESC_F_INDIRECT or not self.indirect
                    or addr < hot_start or addr + length > read_end):
                return self._walk(head)
            base = addr - hot_start
            if length == 3 * _DESC_SIZE and table_len >= 3:
                # What Linux writes for a request with one data buffer (header, data,
                # status; ``next`` = i + 1): read in one call, checked without a loop.
                a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = _unpack_desc3(view, base)
                if (f0 == VRING_DESC_F_NEXT and n0 == 1 and n1 == 2 and f2 == VRING_DESC_F_WRITE
                        and l0 and l1 and l2 and l0 + l1 + l2 <= MAX_CHAIN_BYTES
                        and hot_start <= a0 and a0 + l0 <= read_end
                        and hot_start <= a2 and a2 + l2 <= write_end):
                    a0 -= hot_start
                    a2 -= hot_start
                    if f1 == _NEXT_WRITE and hot_start <= a1 and a1 + l1 <= write_end:
                        a1 -= hot_start
                        return Chain(head, [view[a0:a0 + l0]],
                                     [view[a1:a1 + l1], view[a2:a2 + l2]])
                    if f1 == VRING_DESC_F_NEXT and hot_start <= a1 and a1 + l1 <= read_end:
                        a1 -= hot_start
                        return Chain(head, [view[a0:a0 + l0], view[a1:a1 + l1]],
                                     [view[a2:a2 + l2]])
            elif length == 2 * _DESC_SIZE and table_len >= 2:
                # Header and status only (flush, or a request without data).
                a0, l0, f0, n0, a1, l1, f1, _ = _unpack_desc2(view, base)
                if (f0 == VRING_DESC_F_NEXT and n0 == 1 and f1 == VRING_DESC_F_WRITE
                        and l0 and l1 and l0 + l1 <= MAX_CHAIN_BYTES
                        and hot_start <= a0 and a0 + l0 <= read_end
                        and hot_start <= a1 and a1 + l1 <= write_end):
                    a0 -= hot_start
                    a1 -= hot_start
                    return Chain(head, [view[a0:a0 + l0]], [view[a1:a1 + l1]])
            if not length or length % _DESC_SIZE or length > self.max_indirect * _DESC_SIZE:
                return self._walk(head)
            table = view
            table_len = length // _DESC_SIZE
            addr, length, flags, nxt = _unpack_desc(table, base)
        limit = table_len
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        total = 0
        while limit:  # a chain holds at most ``limit`` descriptors
            limit -= 1
            if flags & VRING_DESC_F_WRITE:
                if (flags & _NOT_WRITE_NEXT or not length
                        or addr < hot_start or addr + length > write_end):
                    break
                offset = addr - hot_start
                writable.append(view[offset:offset + length])
            else:
                if (writable or flags & _NOT_NEXT or not length
                        or addr < hot_start or addr + length > read_end):
                    break
                offset = addr - hot_start
                readable.append(view[offset:offset + length])
            total += length
            if not flags & VRING_DESC_F_NEXT:
                if total > MAX_CHAIN_BYTES:
                    break
                return Chain(head, readable, writable)
            if nxt >= table_len:
                break
            addr, length, flags, nxt = _unpack_desc(table, base + nxt * _DESC_SIZE)
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        """The general path of :meth:`pop`: every chain, every check, in order."""
        chain = Chain(head, [], [])
        readable = chain.readable
        writable = chain.writable
        memory = self.memory
        table = self._desc
        table_len = self.size
        index = head
        budget = self.size  # descriptors a chain may hold: catches loops
        in_indirect = False
        seen_writable = False
        total = 0
        while True:
            addr, length, flags, nxt = _unpack_desc(table, index * _DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor, INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise ChainError(head, "nested indirect descriptor")
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with the NEXT flag")
                if length == 0 or length % _DESC_SIZE:
                    raise ChainError(head, f"indirect table length {length} is not n * 16")
                if length // _DESC_SIZE > self.max_indirect:
                    # virtio 1.x 2.7.5.3.1: no chain may be longer than the queue size
                    # (the one the device offered: a driver sizes requests by seg_max).
                    raise ChainError(head, f"indirect table of {length // _DESC_SIZE} "
                                     f"descriptors exceeds the queue size "
                                     f"{self.max_indirect}")
                try:
                    table = memory.contiguous(addr, length, write=False)
                except MemoryAccessError as exc:
                    raise ChainError(head, f"indirect table: {exc}") from exc
                table_len = length // _DESC_SIZE
                budget = table_len
                index = 0
                in_indirect = True
                continue
            budget -= 1
            if budget < 0:
                raise ChainError(head, "descriptor chain loops or is longer than allowed")
            if flags & VRING_DESC_F_WRITE:
                seen_writable = True
                if length:
                    try:
                        writable += memory.segments(addr, length, True)
                    except MemoryAccessError as exc:
                        raise ChainError(head, str(exc)) from exc
            else:
                if seen_writable:
                    raise ChainError(head, "device-readable descriptor after a writable one")
                if length:
                    try:
                        readable += memory.segments(addr, length, False)
                    except MemoryAccessError as exc:
                        raise ChainError(head, str(exc)) from exc
            total += length
            if total > MAX_CHAIN_BYTES:
                raise ChainError(head, "chain describes more than 4 GiB")
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise ChainError(head, f"next index {nxt} beyond the table of {table_len}")
            index = nxt

    # -- completing -----------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Fill the next used element; visible to the driver after :meth:`publish`."""
        used_idx = self.used_idx
        # struct vring_used_elem {le32 id; le32 len}; ``written`` must fit in 32 bits
        # (the view refuses anything wider, as a 32-bit store would).
        self._used64[used_idx & self._mask] = head | written << 32
        self.used_idx = (used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every pushed element visible by storing the used index."""
        # Stores are not reordered with earlier stores on x86 and CPython's
        # bytecode boundaries do not reorder them either: elements land first.
        self._used16[1] = self.used_idx

    def needs_interrupt(self) -> bool:
        """After :meth:`publish`: does the driver want to be told? Resets the tracker."""
        if self.used_idx == self.signalled_used:
            return False
        if self.event_idx:
            full_barrier()
            old = self.signalled_used
            self.signalled_used = self.used_idx
            return vring_need_event(self._avail16[self._used_event_slot], self.used_idx, old)
        self.signalled_used = self.used_idx
        return not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT

    # -- kick suppression -----------------------------------------------------------

    def disable_kicks(self) -> None:
        """Ask the driver not to kick while we drain (a hint; kicks may still come)."""
        if not self.event_idx:
            self._used16[0] = VRING_USED_F_NO_NOTIFY

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; return True if work arrived meanwhile."""
        if self.event_idx:
            self._used16[self._avail_event_slot] = self.last_avail_idx
        else:
            self._used16[0] = 0
        full_barrier()
        return self._avail16[1] != self.last_avail_idx

    def chain_at(self, head: int) -> Chain:
        """The chain that starts at ``head``, walked again (to resubmit a request).

        Every check of :meth:`pop` applies; the ring positions do not move.
        Raises :class:`ChainError` (or :class:`RingError` for a head out of range).
        """
        if not 0 <= head < self.size:
            raise RingError(f"descriptor {head} is beyond the queue size {self.size}")
        return self._walk(head)

    def ring_buffers(self) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table, avail ring and used ring as mapped (for the native path).

        Views of the driver's memory: valid until :meth:`release`, which swaps
        these attributes for private buffers (a holder of the old views must
        stop using them first, see :class:`pyvduse.native.NativeRing`).
        """
        return self._desc, self._avail16, self._used16

    def used_head(self, index: int) -> int:
        """The head of the used element at ring index ``index`` (16-bit, wrapping)."""
        return int(self._used64[index & self._mask]) & 0xFFFFFFFF

    def release(self) -> None:
        """Let go of driver memory; idempotent.

        The ring views are swapped for private zeroed buffers before the old
        ones are released, so a thread still holding this queue (a completion
        arriving after a reset, a serving thread that was stuck in a backend)
        reads an empty ring and writes where no driver looks, instead of into
        memory the driver may have freed.
        """
        size = self.size
        old = (self._avail16, self._used16, self._used64, self._desc)
        self._avail16 = memoryview(bytearray(vring_avail_size(size))).cast("H")
        self._used16 = memoryview(bytearray(vring_used_size(size))).cast("H")
        self._used64 = memoryview(bytearray(8 * size)).cast("Q")
        self._desc = memoryview(bytearray(vring_desc_table_size(size)))
        self.last_avail_idx = self._avail16[1]
        self.used_idx = self.signalled_used = 0
        self.memory = _NO_MEMORY
        for view in old:
            view.release()
