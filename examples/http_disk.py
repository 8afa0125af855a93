"""A read-only disk whose bytes live behind a URL, read with HTTP range requests.

Standard library only. Serve an image that any web server publishes::

    pyvduse serve python script=examples/http_disk.py url=http://server/disk.img

Options (strings from the command line, turned into types by :func:`create`):

``url=``
    (required) ``http://`` or ``https://`` address of the image.
``size=``
    the image size (``512``, ``4k``, ``1G`` ...); default: the
    ``Content-Length`` the server answers to a ``HEAD`` request.
``cache=``
    memory for recently read 64 KiB blocks (default ``4M``; ``0`` disables
    the cache, so that every read goes to the server).
``timeout=``
    seconds to wait for the server on each request (default ``30``).

Each read is one ``GET`` with ``Range: bytes=FIRST-LAST``, which the server
must answer with ``206 Partial Content`` and exactly those bytes. The class
defines only ``size``, ``read`` and ``readv``, so the device is read-only.

Errors: a request that goes wrong in any way (connection refused, timeout,
an HTTP error status, a short body, a server that ignores ``Range``) raises
:class:`OSError`; the device then fails that one request with an I/O error
and carries on, so the disk recovers by itself once the server is back.
Problems found while starting (no server, no size) are
:class:`~pyvduse.errors.ConfigError`, one line on the command line.
"""

from __future__ import annotations

import errno
import http.client
import re
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Sequence

from pyvduse.backends import Backend
from pyvduse.backends.options import parse_size
from pyvduse.errors import ConfigError

#: Granularity of the cache: reads fetch whole blocks when the cache is on.
CACHE_BLOCK = 64 * 1024
DEFAULT_CACHE = 4 << 20
DEFAULT_TIMEOUT = 30.0

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpDisk(Backend):
    """The resource at ``url`` as a read-only disk of ``size`` bytes.

    ``size=None`` asks the server (``HEAD``). ``cache_bytes`` of recently read
    :data:`CACHE_BLOCK`-byte blocks are kept (least recently used goes
    first); ``0`` turns the cache off. ``timeout`` is in seconds.

    Thread-safe: each request opens its own connection, and the cache is
    guarded by a lock. :attr:`requests` counts the ``GET`` requests made.
    """

    def __init__(self, url: str, size: int | None = None, *, cache_bytes: int = DEFAULT_CACHE,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"http_disk: url={url} is not an http:// or https:// URL")
        if timeout <= 0:
            raise ConfigError(f"http_disk: timeout={timeout} must be positive")
        self.url = url
        self.timeout = timeout
        self._size = self._content_length() if size is None else size
        if self._size <= 0:
            raise ConfigError(f"http_disk: {url} has size {self._size}: nothing to serve")
        self._cache_blocks = max(0, cache_bytes) // CACHE_BLOCK
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0

    def size(self) -> int:
        return self._size

    def read(self, offset: int, buf: memoryview) -> None:
        if not self._cache_blocks:
            buf[:] = self._fetch(offset, len(buf))
            return
        first = offset // CACHE_BLOCK
        last = (offset + len(buf) - 1) // CACHE_BLOCK
        blocks = self._cached(range(first, last + 1))
        for start, end in _missing_runs(blocks, first, last):
            base = start * CACHE_BLOCK
            data = self._fetch(base, min((end + 1) * CACHE_BLOCK, self._size) - base)
            fetched = {index: data[(index - start) * CACHE_BLOCK:(index - start + 1) * CACHE_BLOCK]
                       for index in range(start, end + 1)}
            blocks.update(fetched)
            self._remember(fetched)
        pos = 0
        for index in range(first, last + 1):
            block_start = index * CACHE_BLOCK
            lo = max(offset, block_start) - block_start
            hi = min(offset + len(buf), block_start + CACHE_BLOCK) - block_start
            buf[pos:pos + hi - lo] = blocks[index][lo:hi]
            pos += hi - lo

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Serve a multi-buffer request with one ranged read, then scatter it."""
        if len(bufs) == 1:
            self.read(offset, bufs[0])
            return
        data = bytearray(sum(len(buf) for buf in bufs))
        self.read(offset, memoryview(data))
        pos = 0
        for buf in bufs:
            buf[:] = data[pos:pos + len(buf)]
            pos += len(buf)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- HTTP ---------------------------------------------------------------------------

    def _content_length(self) -> int:
        request = urllib.request.Request(self.url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                length = response.headers.get("Content-Length")
        except (OSError, http.client.HTTPException) as exc:
            raise ConfigError(f"http_disk: HEAD {self.url}: {exc}") from None
        if length is None or not length.isdigit():
            raise ConfigError(f"http_disk: HEAD {self.url} gave no Content-Length; give size=")
        return int(length)

    def _fetch(self, offset: int, length: int) -> bytes:
        """GET ``length`` bytes at ``offset``; any failure is an :class:`OSError` (EIO)."""
        last = offset + length - 1
        what = f"GET {self.url} bytes={offset}-{last}"
        with self._lock:
            self.requests += 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-{last}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status: int = response.status
                content_range = response.headers.get("Content-Range")
                data: bytes = response.read(length)
        except urllib.error.HTTPError as exc:
            raise OSError(errno.EIO, f"{what}: HTTP {exc.code} {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise OSError(errno.EIO, f"{what}: {exc}") from exc
        if status == 206:
            match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
            if match is None or (int(match.group(1)), int(match.group(2))) != (offset, last):
                raise OSError(errno.EIO, f"{what}: answered Content-Range {content_range!r}")
        elif not (status == 200 and offset == 0):  # 200 is the whole resource: take its start
            raise OSError(errno.EIO, f"{what}: status {status}, not 206 "
                          "(the server does not honour Range requests)")
        if len(data) != length:
            raise OSError(errno.EIO, f"{what}: got {len(data)} of {length} bytes")
        return data

    # -- cache --------------------------------------------------------------------------

    def _cached(self, indexes: range) -> dict[int, bytes]:
        with self._lock:
            found = {}
            for index in indexes:
                block = self._cache.get(index)
                if block is not None:
                    self._cache.move_to_end(index)
                    found[index] = block
            return found

    def _remember(self, blocks: dict[int, bytes]) -> None:
        with self._lock:
            self._cache.update(blocks)
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)


def _missing_runs(blocks: dict[int, bytes], first: int, last: int) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` (inclusive) of block indexes in ``first..last`` not in ``blocks``."""
    runs: list[tuple[int, int]] = []
    for index in range(first, last + 1):
        if index in blocks:
            continue
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def create(url: str, size: str | None = None, cache: str = "4M",
           timeout: str = str(DEFAULT_TIMEOUT)) -> HttpDisk:
    """Build an :class:`HttpDisk` from the command line's string options.

    ``pyvduse serve python`` calls this module-level ``create`` with the
    ``key=value`` options as keyword arguments; unknown or missing ones are
    reported from this signature.
    """
    try:
        size_bytes = None if size is None else parse_size(size)
    except ValueError:
        raise ConfigError(f"http_disk: size={size} is not a size (e.g. 512, 4k, 1G)") from None
    try:
        cache_bytes = parse_size(cache)
    except ValueError:
        raise ConfigError(f"http_disk: cache={cache} is not a size (e.g. 0, 1M)") from None
    try:
        seconds = float(timeout)
    except ValueError:
        raise ConfigError(f"http_disk: timeout={timeout} is not a number of seconds") from None
    return HttpDisk(url, size_bytes, cache_bytes=cache_bytes, timeout=seconds)
