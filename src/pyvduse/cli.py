"""The ``pyvduse`` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import NoReturn

from pyvduse import __version__
from pyvduse.backends import BACKENDS, open_backend
from pyvduse.backends.options import parse_size
from pyvduse.backends.threads import DEFAULT_MIN_BYTES, ThreadPoolBackend
from pyvduse.blk.config import DEFAULT_QUEUE_SIZE, BlkConfig
from pyvduse.errors import PyvduseError
from pyvduse.export import BlkExport

log = logging.getLogger("pyvduse")

EXIT_USAGE = 2
SIZE_CHECK_INTERVAL = 2.0  # seconds between size checks of a resizable backend
DEFAULT_IO_THREADS = 2
DEFAULT_POLL_MAX_US = 256
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (a number with an optional k, m, g unit)") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyvduse``."""
    parser = _Parser(prog="pyvduse", description="Virtio devices in userspace through VDUSE.")
    parser.add_argument("--version", action="version", version=f"pyvduse {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    serve = commands.add_parser(
        "serve", help="serve a backend as a virtio-blk device",
        description="Serve BACKEND as a VDUSE virtio-blk device until SIGINT or SIGTERM.",
        epilog="backends: " + ", ".join(sorted(BACKENDS))
        + ". Examples: 'pyvduse serve --name vduse0 file path=/srv/disk.img', "
        "'pyvduse serve memory size=1G', "
        "'pyvduse serve python script=./my_backend.py key=value'.")
    serve.add_argument("--name", default="pyvduse0",
                       help="VDUSE and vdpa device name (default: %(default)s)")
    serve.add_argument("--num-queues", type=_positive_int, default=1, metavar="N",
                       help="number of request queues (default: %(default)s)")
    serve.add_argument("--queue-size", type=_positive_int, default=DEFAULT_QUEUE_SIZE,
                       metavar="N", help="entries per queue, a power of two (default: %(default)s)")
    serve.add_argument("--logical-block-size", type=_positive_int, metavar="N",
                       help="logical block size in bytes (default: the backend's preferred "
                       "block size, 512 for files and memory)")
    serve.add_argument("--serial", default="", help="serial number, up to 20 bytes")
    serve.add_argument("--readonly", action="store_true", help="export read-only")
    serve.add_argument("--attach", choices=("virtio", "vhost", "none"), default="virtio",
                       help="bind to virtio_vdpa (a /dev/vdX here), vhost_vdpa "
                       "(/dev/vhost-vdpa-N for a VM) or do not attach (default: %(default)s)")
    serve.add_argument("--queue-threads", type=_positive_int, default=1, metavar="N",
                       help="threads serving the queues, queue i on thread i %% N (default: "
                       "%(default)s; one thread batches all queues and spares the GIL "
                       "contention of several)")
    serve.add_argument("--poll-max-us", type=_non_negative_int, default=DEFAULT_POLL_MAX_US,
                       metavar="US",
                       help="let a queue thread whose rings ran dry watch them for up to US "
                       "microseconds before sleeping, adapting the time to the traffic (an idle "
                       "device does not poll): less latency per request for some CPU time "
                       "(default: %(default)s; 0: never poll)")
    serve.add_argument("--io-threads", type=_non_negative_int, default=DEFAULT_IO_THREADS,
                       metavar="N",
                       help="run the backend's large requests (and flushes, discards, "
                       "write-zeroes) on a pool of N threads, so several are in flight per "
                       "queue (default: %(default)s; 0: every request on its queue's thread; "
                       "no effect on asynchronous backends)")
    serve.add_argument("--io-threads-min", type=_size, default=DEFAULT_MIN_BYTES,
                       metavar="SIZE", help="smallest read or write sent to the --io-threads "
                       "pool; smaller ones stay on the queue's thread (default: 64k)")
    serve.add_argument("--pidfile", metavar="PATH",
                       help="write the pid here once the device is ready")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    serve.add_argument("backend", metavar="BACKEND", help="backend name")
    serve.add_argument("options", nargs="*", metavar="key=value", help="backend options")
    return parser


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    """Write the pid atomically while the block is active; remove the file on exit.

    Enter it only once the device is ready: the pidfile's existence means "serving".
    """
    if path is None:
        yield
        return
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as stream:
            stream.write(f"{os.getpid()}\n")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise PyvduseError(f"cannot write pidfile {path}: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class _StopSignal:
    """Turns SIGINT/SIGTERM into an event the main thread waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handler)

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum
        self.event.set()


def _refresh_size(export: BlkExport) -> None:
    """Follow a resizable backend's size; a failure is logged and tried again later."""
    try:
        export.refresh_size()
    except Exception as exc:  # the backend or the kernel refused: keep serving
        log.warning("%s: checking the backend's size failed: %s", export.name, exc)


def serve(args: argparse.Namespace) -> int:
    """Run ``pyvduse serve``; return the exit status."""
    stop = _StopSignal()
    stop.install()
    backend = open_backend(args.backend, args.options)
    if args.io_threads and backend.submit_min_bytes is None:
        backend = ThreadPoolBackend(backend, args.io_threads, args.io_threads_min)
    elif args.io_threads:
        log.info("the %s backend is asynchronous: --io-threads ignored", args.backend)
    try:
        config = BlkConfig.for_backend(
            backend,
            logical_block_size=args.logical_block_size or max(512, backend.preferred_block_size),
            num_queues=args.num_queues,
            queue_size=args.queue_size, serial=args.serial, readonly=args.readonly)
    except BaseException:
        backend.close()
        raise
    export = BlkExport(args.name, backend, config, attach=args.attach,
                       queue_threads=args.queue_threads, poll_max_ns=args.poll_max_us * 1000)
    try:
        attached = export.start()
    except BaseException:
        backend.close()  # start() undid the device; the backend (and its threads) is ours
        raise
    try:
        where = f" as {attached.dev_path}" if attached else " (not attached)"
        log.info("serving %s backend on %s%s: %d bytes, %d queue(s) of %d%s", args.backend,
                 args.name, where, config.capacity, config.num_queues, config.queue_size,
                 ", read-only" if config.readonly else "")
        next_size_check = time.monotonic() + SIZE_CHECK_INTERVAL
        with _pidfile(args.pidfile):
            while not stop.event.wait(0.5):
                if export.device.failed.is_set():
                    break
                if backend.resizable and time.monotonic() >= next_size_check:
                    next_size_check = time.monotonic() + SIZE_CHECK_INTERVAL
                    _refresh_size(export)
        if stop.received is not None:
            log.info("%s received, shutting down", signal.Signals(stop.received).name)
    finally:
        export.stop()
    if export.device.failed.is_set() and stop.received is None:
        raise PyvduseError(f"{args.name}: {export.device.failure}")
    log.info("%s stopped", args.name)
    return 0


def _setup_logging(level: str) -> None:
    """Send the library's log records to stderr, one ``pyvduse: ...`` line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "pyvduse: %(threadName)s %(name)s: %(message)s" if level == "debug"
        else "pyvduse: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, level.upper()))
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvduse`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return serve(args)
    except PyvduseError as exc:
        print(f"pyvduse: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
