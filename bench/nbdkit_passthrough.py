"""nbdkit Python plugin: pass a file through, as a Python developer would write it.

    nbdkit -U SOCKET python bench/nbdkit_passthrough.py file=PATH

The peer "nbdkit + Python plugin + kernel nbd" of the benchmark (bench/run):
what one uses today to put a Python-written block device under /dev. It does
what pyvduse's ``file`` backend does: ``os.preadv``/``os.pwritev`` straight into
nbdkit's buffers (API version 2 passes them as buffer objects, no copies), and
flush = ``fdatasync``. Requests run in parallel (THREAD_MODEL_PARALLEL): the
GIL is released around each system call, as in pyvduse's per-queue threads.

This file is loaded by nbdkit's embedded interpreter, not by the project's
Python, so it imports nothing but ``nbdkit`` and the standard library.
"""

from __future__ import annotations

import os
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin

API_VERSION = 2

_path: str | None = None


def config(key: str, value: str) -> None:
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (want file=PATH)")
    _path = os.path.abspath(value)


def config_complete() -> None:
    if _path is None:
        raise RuntimeError("file=PATH is required")


def thread_model() -> Any:
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly: bool) -> int:  # the name nbdkit calls
    assert _path is not None
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd: int) -> None:
    os.close(fd)


def get_size(fd: int) -> int:
    return os.fstat(fd).st_size


def can_write(fd: int) -> bool:
    return True


def can_flush(fd: int) -> bool:
    return True


def can_multi_conn(fd: int) -> bool:
    return True  # one file, flush = fdatasync: visible to every connection


def pread(fd: int, buf: memoryview, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError("read past the end of the file")
        done += n


def pwrite(fd: int, buf: memoryview, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd: int, flags: int) -> None:
    os.fdatasync(fd)
