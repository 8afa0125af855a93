"""A conformance suite for storage backends, to run from a backend's own tests.

It checks what the device relies on, through the backend's public methods,
with requests shaped as the device sends them (block-aligned offsets and
lengths, buffers of any alignment and length, read-only write sources,
several threads)::

    from pyvduse.testing.conformance import check_backend

    def test_my_backend_conforms(tmp_path):
        check_backend(lambda: MyBackend(tmp_path / "disk.img", size=4 << 20))

``factory`` must return a new, independent backend on each call: every
check gets a fresh one and closes it at the end. For one pytest test per
check, parametrize over :data:`CHECKS`::

    @pytest.mark.parametrize("check", CHECKS, ids=str)
    def test_conformance(check):
        check.run(make_backend)

What is checked (each :class:`Check` says which backends it applies to):

``geometry``
    ``size()`` is a positive int, the same on every call, holding at least one
    block; ``preferred_block_size`` is a power of two from 512 to 65536; the
    device can be configured from the backend as ``pyvduse serve`` does.
``capabilities``
    the ``can_*`` properties are bools, and each one claimed is backed by a
    method the class defines (``can_write``: ``write`` or ``writev``, and so on).
``reads``
    reads at the first, a middle and the last block fill the whole buffer,
    are repeatable, match the ``initial`` content if given, and (after
    writing distinct data there, if the backend can) agree between ``read``,
    ``readv`` over uneven buffers and block-by-block reads.
``round_trip`` (writable)
    writes at the first, a middle and the last block read back (with
    ``stores_data``), neighbouring blocks keep their content, ``flush`` works.
``vectored`` (writable)
    ``writev`` from uneven, odd-length, empty and read-only buffers and
    ``readv`` into uneven buffers move exactly the bytes of one contiguous range.
``write_zeroes`` (writable)
    1, 3 and 300 blocks (at most the disk), with and without ``may_unmap``,
    read as zeroes afterwards, and neither neighbour changes.
``discard`` (backends defining ``discard``)
    discarding leaves neighbouring blocks alone, and discarded blocks can be
    written and read back.
``concurrency``
    threads doing disjoint reads (and writes, if writable) at the same time
    each see their own data: the threading contract of several queues.
``submit`` (asynchronous backends, :attr:`~pyvduse.backends.base.Backend.submit_min_bytes` set)
    many reads (and writes, then a flush, if writable) submitted at once over
    disjoint ranges each call ``done(None)`` exactly once within
    ``_SUBMIT_TIMEOUT`` seconds and move the right bytes.
``resize`` (backends with :attr:`~pyvduse.backends.base.Backend.can_resize`)
    growing by a few blocks keeps the content (and, if writable, the data
    just written to the last block) and the new space reads as zeroes, with
    ``size()`` following; if writable (with ``stores_data``), data written
    in the new space makes a shrink without ``shrink=True`` fail with
    ``OSError`` or ``BackendError`` and change neither the size nor the
    content; a shrink with it succeeds, and growing once more brings back
    zeroes, not the dropped data. The original size is restored at the end
    (also when the check fails, as far as the backend lets it), so storage
    that a factory reopens for every check keeps its size.

``stores_data=False`` is for backends that accept writes but keep nothing
(like ``null``): after a write, discard or write-zeroes, reads must return
the same bytes as before it. Behaviour after ``close()`` is not checked.

Failures raise :class:`ConformanceError` (an :class:`AssertionError`) whose
message names the check, the operation and the first differing byte.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pyvduse.backends.base import Backend
from pyvduse.blk.config import BlkConfig
from pyvduse.errors import BackendError

__all__ = ["CHECKS", "Check", "ConformanceError", "check_backend"]

BackendFactory = Callable[[], Backend]
#: The content a fresh backend must read as: bytes from offset 0, or ``f(offset, length)``.
Initial = bytes | bytearray | memoryview | Callable[[int, int], bytes]

_THREADS = 8
_ROUNDS = 20
_IN_FLIGHT = 32
_SUBMIT_TIMEOUT = 30.0


class ConformanceError(AssertionError):
    """A backend does not behave as the device needs; the message says where."""


# -- helpers ----------------------------------------------------------------------------


def _fail(message: str) -> ConformanceError:
    return ConformanceError(message)


def pattern(length: int, seed: int) -> bytes:
    """``length`` pseudo-random bytes, different for each ``seed``."""
    return random.Random(seed).randbytes(length)


def _first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)}, expected {len(want)}"
    index = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"byte {index} is {got[index]:#04x}, expected {want[index]:#04x}"


def _pieces(view: memoryview, sizes: Sequence[int]) -> list[memoryview]:
    """``view`` cut into consecutive views of ``sizes`` (capped), plus the rest."""
    out: list[memoryview] = []
    pos = 0
    for size in sizes:
        size = min(size, len(view) - pos)
        out.append(view[pos:pos + size])
        pos += size
    out.append(view[pos:])
    return out


class _Context:
    """One fresh backend under one check, with the geometry the device would use."""

    def __init__(self, check: str, backend: Backend, stores_data: bool,
                 initial: Initial | None) -> None:
        self.check = check
        self.backend = backend
        self.stores_data = stores_data
        self.initial = initial
        self.block = max(512, backend.preferred_block_size)
        size = backend.size()
        self.capacity = size - size % self.block
        self.blocks = self.capacity // self.block
        if self.blocks <= 0:
            raise self.fail(f"size() {size} holds no {self.block}-byte block")

    def fail(self, message: str) -> ConformanceError:
        return _fail(f"{self.check}: {message}")

    def expect_equal(self, got: bytes, want: bytes, what: str) -> None:
        if got != want:
            raise self.fail(f"{what}: {_first_difference(got, want)}")

    def read(self, offset: int, length: int, fill: int = 0xA5) -> bytes:
        """``read`` into a buffer pre-filled with ``fill``."""
        buf = bytearray([fill]) * length
        self.backend.read(offset, memoryview(buf))
        return bytes(buf)

    def read_checked(self, offset: int, length: int, what: str) -> bytes:
        """Read twice into differently pre-filled buffers: every byte must be written."""
        first = self.read(offset, length, 0x00)
        second = self.read(offset, length, 0xFF)
        if first != second:
            raise self.fail(f"{what}: read({offset}, {length}) leaves bytes of the buffer "
                            f"unwritten or is not repeatable: {_first_difference(second, first)}")
        return first

    def initial_bytes(self, offset: int, length: int) -> bytes | None:
        if self.initial is None:
            return None
        if callable(self.initial):
            return bytes(self.initial(offset, length))
        return bytes(self.initial[offset:offset + length])

    def after_write(self, before: bytes, data: bytes) -> bytes:
        """What a range holding ``before`` must read as once ``data`` was written there."""
        return data if self.stores_data else before

    def spots(self, count: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of up to ``count`` blocks: first, 6th, middle, last blocks."""
        seen: set[int] = set()
        for index in (0, 5, self.blocks // 2, self.blocks - count, self.blocks - 1):
            index = max(0, min(index, self.blocks - 1))
            if index in seen:
                continue
            seen.add(index)
            yield index * self.block, min(count, self.blocks - index) * self.block


# -- the checks -------------------------------------------------------------------------


def _check_geometry(ctx: _Context) -> None:
    backend = ctx.backend
    sizes = [backend.size() for _ in range(3)]
    if not all(isinstance(size, int) and not isinstance(size, bool) for size in sizes):
        raise ctx.fail(f"size() returned {sizes[0]!r}, not an int")
    if sizes[0] <= 0:
        raise ctx.fail(f"size() is {sizes[0]}, not positive")
    if len(set(sizes)) != 1:
        raise ctx.fail(f"size() changes between calls: {sizes}")
    block = backend.preferred_block_size
    if not isinstance(block, int) or block < 512 or block > 65536 or block & (block - 1):
        raise ctx.fail(f"preferred_block_size {block!r} is not a power of two from 512 to 65536")
    if sizes[0] < block:
        raise ctx.fail(f"size() {sizes[0]} holds no {block}-byte block")
    config = BlkConfig.for_backend(backend, logical_block_size=block)
    if config.capacity != ctx.capacity:
        raise ctx.fail(f"the device would export {config.capacity} bytes, not {ctx.capacity}")


def _defines(backend: Backend, *methods: str) -> bool:
    return any(getattr(type(backend), m) is not getattr(Backend, m) for m in methods)


def _check_capabilities(ctx: _Context) -> None:
    backend = ctx.backend
    caps = {name: getattr(backend, name)
            for name in ("can_write", "can_flush", "can_discard", "can_write_zeroes",
                         "can_resize")}
    for name, value in caps.items():
        if not isinstance(value, bool):
            raise ctx.fail(f"{name} is {value!r}, not a bool")
    if not _defines(backend, "read", "readv"):
        raise ctx.fail("the backend defines neither read nor readv")
    needs = {"can_write": ("write", "writev"), "can_flush": ("flush",),
             "can_discard": ("discard",), "can_resize": ("resize",)}
    for name, methods in needs.items():
        if caps[name] and not _defines(backend, *methods):
            raise ctx.fail(f"{name} is True but the backend defines none of {', '.join(methods)}")
    if caps["can_write_zeroes"] and not (caps["can_write"] or _defines(backend, "write_zeroes")):
        raise ctx.fail("can_write_zeroes is True but the backend can neither write nor "
                       "write zeroes")


def _check_reads(ctx: _Context) -> None:
    bs = ctx.block
    spots = list(ctx.spots(3))
    for offset, length in spots:
        want = ctx.initial_bytes(offset, length)
        if want is not None:
            got = ctx.read_checked(offset, length, f"read at {offset}")
            ctx.expect_equal(got, want, f"read at {offset} against the initial content")
    if ctx.backend.can_write and ctx.stores_data:
        # Distinct bytes everywhere, so reading the wrong place cannot go unnoticed.
        for n, (offset, length) in enumerate(spots):
            ctx.backend.write(offset, memoryview(pattern(length, 50 + n)))
    for offset, length in spots:
        data = ctx.read_checked(offset, length, f"read at {offset}")
        out = bytearray(length)
        ctx.backend.readv(offset, _pieces(memoryview(out), [1, bs - 1, 0, 7, bs + 3]))
        ctx.expect_equal(bytes(out), data, f"readv over uneven buffers at {offset}")
        blocks = b"".join(ctx.read(offset + pos, bs) for pos in range(0, length, bs))
        ctx.expect_equal(blocks, data, f"block-by-block reads at {offset}")


def _check_round_trip(ctx: _Context) -> None:
    bs = ctx.block
    last: tuple[int, bytes] = (0, b"")
    for n, (offset, length) in enumerate(ctx.spots(3)):
        before = ctx.read(offset, length)
        below = ctx.read(offset - bs, bs) if offset else b""
        above = ctx.read(offset + length, bs) if offset + length < ctx.capacity else b""
        data = pattern(length, n)
        ctx.backend.write(offset, memoryview(data))
        want = ctx.after_write(before, data)
        ctx.expect_equal(ctx.read_checked(offset, length, f"write at {offset}"), want,
                         f"read back the write at {offset}")
        if below:
            ctx.expect_equal(ctx.read(offset - bs, bs), below,
                             f"the block before a write at {offset}")
        if above:
            ctx.expect_equal(ctx.read(offset + length, bs), above,
                             f"the block after a write at {offset}+{length}")
        last = (offset, want)
    ctx.backend.flush()
    offset, want = last
    ctx.expect_equal(ctx.read(offset, len(want)), want, f"read at {offset} after flush")


def _check_vectored(ctx: _Context) -> None:
    bs = ctx.block
    for n, (offset, length) in enumerate(ctx.spots(4)):
        before = ctx.read(offset, length)
        data = pattern(length, 100 + n)
        # Read-only sources (guest memory can be mapped read-only), odd sizes, an empty view.
        source = memoryview(bytes(data))
        ctx.backend.writev(offset, _pieces(source, [1, bs - 1, 3, 0, 2 * bs - 17]))
        want = ctx.after_write(before, data)
        # An odd start address inside a larger buffer.
        raw = bytearray(length + 3)
        ctx.backend.readv(offset, _pieces(memoryview(raw)[3:], [bs, 5, 0, bs + 1]))
        ctx.expect_equal(bytes(raw[3:]), want, f"readv after writev at {offset}")
        ctx.expect_equal(ctx.read(offset, length), want, f"read after writev at {offset}")


def _check_write_zeroes(ctx: _Context) -> None:
    bs = ctx.block
    for n, (blocks, may_unmap) in enumerate(
            (b, u) for b in (1, 3, 300) for u in (False, True)):
        blocks = min(blocks, ctx.blocks)
        # The zeroed range, with one block of data on each side where there is room.
        start = 1 if ctx.blocks >= blocks + 2 else 0
        span = min(blocks + 2, ctx.blocks)
        data = pattern(span * bs, 200 + n)
        before = ctx.read(0, span * bs)
        ctx.backend.write(0, memoryview(data))
        written = ctx.after_write(before, data)
        ctx.backend.write_zeroes(start * bs, blocks * bs, may_unmap)
        want = bytearray(written)
        if ctx.stores_data:
            want[start * bs:(start + blocks) * bs] = bytes(blocks * bs)
        got = ctx.read_checked(0, span * bs, "write_zeroes")
        ctx.expect_equal(got, bytes(want),
                         f"write_zeroes of {blocks} block(s) at block {start} "
                         f"(may_unmap={may_unmap})")


def _check_discard(ctx: _Context) -> None:
    bs = ctx.block
    span = min(66, ctx.blocks)
    start, count = (1, span - 2) if span >= 3 else (0, span)
    data = pattern(span * bs, 300)
    before = ctx.read(0, span * bs)
    ctx.backend.write(0, memoryview(data))
    written = ctx.after_write(before, data)
    ctx.backend.discard(start * bs, count * bs)
    if start:
        ctx.expect_equal(ctx.read(0, bs), written[:bs], "the block before a discard")
        end = (start + count) * bs
        ctx.expect_equal(ctx.read(end, bs), written[end:end + bs], "the block after a discard")
    # Discarded blocks are undefined until written again.
    middle = start * bs
    length = min(count, 8) * bs
    before = ctx.read(middle, length)
    fresh = pattern(length, 301)
    ctx.backend.write(middle, memoryview(fresh))
    ctx.expect_equal(ctx.read_checked(middle, length, "write after discard"),
                     ctx.after_write(before, fresh), "read back a write after discard")


def _check_concurrency(ctx: _Context) -> None:
    backend = ctx.backend
    threads = min(_THREADS, ctx.blocks)
    chunk = min(16, ctx.blocks // threads) * ctx.block
    writable = backend.can_write
    expected = [ctx.read(n * chunk, chunk) for n in range(threads)]
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        offset = n * chunk
        want = expected[n]
        try:
            barrier.wait()
            for round_ in range(_ROUNDS):
                if writable:
                    data = pattern(chunk, 1000 * n + round_)
                    raw = bytearray(chunk + 1)
                    raw[1:] = data
                    backend.writev(offset, [memoryview(raw)[1:]])  # odd address
                    want = ctx.after_write(want, data)
                out = bytearray(chunk)
                backend.readv(offset, [memoryview(out)])
                if bytes(out) != want:
                    raise ctx.fail(f"thread {n}, round {round_}: read at {offset}: "
                                   f"{_first_difference(bytes(out), want)}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=worker, args=(n,), name=f"conformance-{n}")
               for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    failures = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if failures:
        raise failures[0]


class _Completions:
    """Counts ``done`` calls of submitted requests; remembers errors and double calls."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.lock = threading.Condition()
        self.calls: dict[int, int] = {}
        self.errors: list[str] = []

    def done_for(self, request: int) -> Callable[[BaseException | None], None]:
        self.calls[request] = 0

        def done(error: BaseException | None) -> None:
            with self.lock:
                self.calls[request] += 1
                if error is not None:
                    self.errors.append(f"request {request}: {type(error).__name__}: {error}")
                self.lock.notify_all()

        return done

    def wait(self, what: str) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: all(self.calls.values()), _SUBMIT_TIMEOUT):
                missing = sorted(r for r, n in self.calls.items() if not n)
                raise self.ctx.fail(f"{what}: done never called for requests {missing}")
            if self.errors:
                raise self.ctx.fail(f"{what}: {self.errors[0]}")
            twice = sorted(r for r, n in self.calls.items() if n > 1)
            if twice:
                raise self.ctx.fail(f"{what}: done called more than once for requests {twice}")
        self.calls.clear()


def _check_submit(ctx: _Context) -> None:
    backend = ctx.backend
    count = min(_IN_FLIGHT, ctx.blocks)
    chunk = max(1, min(8, ctx.blocks // count)) * ctx.block
    expected = [ctx.read(n * chunk, chunk) for n in range(count)]
    completions = _Completions(ctx)
    if backend.can_write:
        sources = [pattern(chunk, 7000 + n) for n in range(count)]
        for n, data in enumerate(sources):
            backend.submit_writev(n * chunk, [memoryview(data)], completions.done_for(n))
        completions.wait("submit_writev")
        expected = [ctx.after_write(want, data) for want, data in zip(expected, sources,
                                                                       strict=True)]
        backend.submit_flush(completions.done_for(0))
        completions.wait("submit_flush")
    outs = [bytearray([0xA5]) * chunk for _ in range(count)]
    for n, out in enumerate(outs):
        half = chunk // 2 + 1  # two uneven buffers
        view = memoryview(out)
        backend.submit_readv(n * chunk, [view[:half], view[half:]], completions.done_for(n))
    completions.wait("submit_readv")
    for n, out in enumerate(outs):
        ctx.expect_equal(bytes(out), expected[n], f"submit_readv at {n * chunk}")


#: Blocks added to the disk by the ``resize`` check.
_GROW_BLOCKS = 8


def _check_resize(ctx: _Context) -> None:
    backend = ctx.backend
    bs = ctx.block
    original = backend.size()
    # The first whole block past the original end, and the grown size.
    fresh = -(-original // bs) * bs
    grown = fresh + _GROW_BLOCKS * bs
    keeps_data = backend.can_write and ctx.stores_data

    def expect_size(want: int, what: str) -> None:
        got = backend.size()
        if got != want:
            raise ctx.fail(f"{what}: size() is {got}, expected {want}")

    def expect_kept(what: str) -> None:
        for offset, want in kept.items():
            ctx.expect_equal(ctx.read(offset, len(want)), want,
                             f"{what}: the content at {offset}")

    def expect_zeroes(what: str) -> None:
        got = ctx.read_checked(fresh, grown - fresh, what)
        ctx.expect_equal(got, bytes(len(got)), f"{what}: the new space")

    try:
        if keeps_data:
            backend.write(ctx.capacity - bs, memoryview(pattern(bs, 400)))
        kept = {offset: ctx.read(offset, length) for offset, length in ctx.spots(2)}
        what = f"grow from {original} to {grown} bytes"
        backend.resize(grown)
        expect_size(grown, what)
        expect_kept(what)
        expect_zeroes(what)
        if keeps_data:
            beyond = pattern(bs, 401)
            backend.write(grown - bs, memoryview(beyond))
            what = f"shrink from {grown} to {original} bytes over data without shrink=True"
            try:
                backend.resize(original)
            except (OSError, BackendError):
                pass
            else:
                raise ctx.fail(f"{what}: resize() did not refuse")
            expect_size(grown, what)
            expect_kept(what)
            ctx.expect_equal(ctx.read(grown - bs, bs), beyond,
                             f"{what}: the data beyond the old size")
        what = f"shrink from {grown} to {original} bytes with shrink=True"
        backend.resize(original, shrink=True)
        expect_size(original, what)
        expect_kept(what)
        what = "grow again after a shrink (the dropped data must not come back)"
        backend.resize(grown)
        expect_size(grown, what)
        expect_zeroes(what)
        backend.resize(original, shrink=True)
        expect_size(original, "shrink back to the original size")
    finally:
        try:
            if backend.size() != original:
                backend.resize(original, shrink=True)
        except Exception:
            pass  # best effort: the check's own failure says more


# -- the suite --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One conformance check; ``applies`` says which backends it is for."""

    name: str
    function: Callable[[_Context], None]
    applies: Callable[[Backend], bool]

    def __str__(self) -> str:
        return self.name

    def run(self, factory: BackendFactory, *, stores_data: bool = True,
            initial: Initial | None = None) -> bool:
        """Run this check on a fresh backend from ``factory``; False if it does not apply.

        The backend is closed afterwards, also when the check fails. An
        exception from the backend fails the check as a :class:`ConformanceError`
        (chained to the original).
        """
        backend = factory()
        try:
            if not self.applies(backend):
                return False
            self.function(_Context(self.name, backend, stores_data, initial))
            return True
        except ConformanceError:
            raise
        except Exception as exc:
            raise _fail(f"{self.name}: the backend raised {type(exc).__name__}: {exc}") from exc
        finally:
            backend.close()


def _always(backend: Backend) -> bool:
    return True


def _writable(backend: Backend) -> bool:
    return backend.can_write


def _writes_zeroes(backend: Backend) -> bool:
    return backend.can_write and backend.can_write_zeroes


def _discards(backend: Backend) -> bool:
    return backend.can_write and backend.can_discard


def _submits(backend: Backend) -> bool:
    return backend.submit_min_bytes is not None


def _resizes(backend: Backend) -> bool:
    return backend.can_resize


#: Every check, in the order :func:`check_backend` runs them.
CHECKS: tuple[Check, ...] = (
    Check("geometry", _check_geometry, _always),
    Check("capabilities", _check_capabilities, _always),
    Check("reads", _check_reads, _always),
    Check("round_trip", _check_round_trip, _writable),
    Check("vectored", _check_vectored, _writable),
    Check("write_zeroes", _check_write_zeroes, _writes_zeroes),
    Check("discard", _check_discard, _discards),
    Check("concurrency", _check_concurrency, _always),
    Check("submit", _check_submit, _submits),
    Check("resize", _check_resize, _resizes),
)


def check_backend(factory: BackendFactory, *, stores_data: bool = True,
                  initial: Initial | None = None) -> list[str]:
    """Run every check of :data:`CHECKS` that applies; return the names of those run.

    ``factory`` returns a new backend on each call (one per check).
    ``stores_data=False``: writes are accepted but reads keep returning the
    previous content (as ``null`` does). ``initial``: what a fresh backend
    reads as (bytes from offset 0, or ``f(offset, length) -> bytes``), for
    read-only backends above all; None leaves it unchecked. Raises
    :class:`ConformanceError` at the first failure.
    """
    return [check.name for check in CHECKS
            if check.run(factory, stores_data=stores_data, initial=initial)]
