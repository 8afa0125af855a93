"""The stream socket helpers: ReceiveBuffer against a socket pair fed in awkward pieces."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from pyvduse.backends.socket_io import ReceiveBuffer, advance, send_all, slice_views

HEADER = struct.Struct(">IQ")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def feed(sock: socket.socket, data: bytes, pieces: list[int]) -> threading.Thread:
    """Send ``data`` from another thread in pieces of the given sizes (the rest at the end)."""
    def run() -> None:
        pos = 0
        for size in pieces:
            sock.sendall(data[pos:pos + size])
            pos += size
        sock.sendall(data[pos:])
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def records(count: int, seed: int,
            longest: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """``count`` records of a header (length, tag) and a payload of at most ``longest``."""
    rng = random.Random(seed)
    stream = bytearray()
    expected = []
    for tag in range(count):
        length = rng.choice([n for n in (0, 1, 7, 512, 4096, 65536, 300_000) if n <= longest])
        payload = rng.randbytes(length)
        stream += HEADER.pack(length, tag) + payload
        expected.append((length, tag, payload))
    return bytes(stream), expected


@pytest.mark.parametrize("piece", [1, 3, 4096, 1 << 20])
def test_records_survive_any_segmentation(pair: tuple[socket.socket, socket.socket],
                                          piece: int) -> None:
    reader, writer = pair
    # byte-sized pieces cost a system call each: short payloads for those
    stream, expected = records(60, seed=piece, longest=300_000 if piece > 3 else 4096)
    thread = feed(writer, stream, [piece] * (len(stream) // piece))
    buffer = ReceiveBuffer(reader, size=4096)
    for length, tag, payload in expected:
        assert buffer.unpack(HEADER) == (length, tag)
        out = bytearray(length)
        # split the destination in two views at an odd place: scatter reads
        cut = length // 3
        buffer.read_into([memoryview(out)[:cut], memoryview(out)[cut:]])
        assert out == payload, f"record {tag}"
    thread.join()
    assert buffer.buffered == 0


def test_take_and_compaction(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    buffer = ReceiveBuffer(reader, size=16)
    writer.sendall(b"0123456789abcdef")
    assert buffer.take(10) == b"0123456789"
    writer.sendall(b"ghijklmnop")  # 6 left + 10 new: fits only after moving to the front
    assert buffer.take(16) == b"abcdefghijklmnop"
    assert buffer.buffered == 0


def test_request_larger_than_the_buffer_is_refused(
        pair: tuple[socket.socket, socket.socket]) -> None:
    buffer = ReceiveBuffer(pair[0], size=8)
    with pytest.raises(ValueError, match="do not fit"):
        buffer.take(9)


def test_end_of_stream_in_a_header_and_in_a_payload(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    buffer = ReceiveBuffer(reader)
    writer.sendall(HEADER.pack(5, 1) + b"ab")
    writer.shutdown(socket.SHUT_WR)
    assert buffer.unpack(HEADER) == (5, 1)
    with pytest.raises(EOFError):
        buffer.read_into([memoryview(bytearray(5))])
    with pytest.raises(EOFError):
        buffer.unpack(HEADER)


def test_send_all_and_views_helpers(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    parts = [b"ab", memoryview(b""), memoryview(b"cdef"), b"g"]
    send_all(writer, parts)
    assert reader.recv(16) == b"abcdefg"
    views = [memoryview(b"abc"), memoryview(b"defg")]
    assert [bytes(v) for v in advance(list(views), 4)] == [b"efg"]
    assert [bytes(v) for v in advance(list(views), 3)] == [b"defg"]
    assert [bytes(v) for v in slice_views(views, 2, 3)] == [b"c", b"de"]
    assert slice_views(views, 7, 0) == []


def test_before_receive_runs_only_when_the_buffered_bytes_are_used_up(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    calls: list[int] = []
    buffer = ReceiveBuffer(reader, before_receive=lambda: calls.append(buffer.buffered))
    writer.sendall(HEADER.pack(0, 1) + HEADER.pack(0, 2))
    assert buffer.unpack(HEADER) == (0, 1)
    assert calls == [0]  # nothing buffered yet: before the first receive
    assert buffer.unpack(HEADER) == (0, 2)
    assert calls == [0]  # the second record came with the first receive
    writer.sendall(HEADER.pack(0, 3))
    assert buffer.unpack(HEADER) == (0, 3)
    assert calls == [0, 0]
