"""Helpers for byte ranges spread over several memoryviews (a descriptor chain's buffers)."""

from __future__ import annotations


def total_length(segments: list[memoryview]) -> int:
    """Sum of the segments' lengths."""
    return sum(map(len, segments))


def split_front(segments: list[memoryview], count: int) -> tuple[bytes, list[memoryview]]:
    """Return the first ``count`` bytes (copied) and views of the rest.

    The caller checked that the segments hold at least ``count`` bytes.
    """
    first = segments[0]
    if len(first) >= count:
        rest = segments[1:]
        if len(first) > count:
            rest.insert(0, first[count:])
        return bytes(first[:count]), rest
    head = bytearray()
    index = 0
    while len(head) < count:
        need = count - len(head)
        segment = segments[index]
        if len(segment) > need:
            head += segment[:need]
            return bytes(head), [segment[need:], *segments[index + 1:]]
        head += segment
        index += 1
    return bytes(head), segments[index:]


def split_back(segments: list[memoryview]) -> tuple[memoryview, list[memoryview]]:
    """Return a view of the very last byte and views of everything before it.

    The caller checked that the segments hold at least one byte (empty views are never stored).
    """
    last = segments[-1]
    if len(last) == 1:
        return last, segments[:-1]
    return last[-1:], [*segments[:-1], last[:-1]]


def fill(segments: list[memoryview], data: bytes) -> int:
    """Copy ``data`` into the segments (as much as fits); return the number of bytes copied."""
    done = 0
    for segment in segments:
        if done >= len(data):
            break
        take = min(len(segment), len(data) - done)
        segment[:take] = data[done:done + take]
        done += take
    return done
