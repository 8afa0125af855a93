"""The ``pyvduse`` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from pyvduse import __version__
from pyvduse.backends import BACKENDS
from pyvduse.ctl import add_ctl_parser, run_ctl
from pyvduse.errors import PyvduseError
from pyvduse.ratelimit import flush_all
from pyvduse.registry import ExportRegistry
from pyvduse.spec import add_export_options, spec_from_namespace

if TYPE_CHECKING:
    from pyvduse.control import ControlServer

log = logging.getLogger("pyvduse")

EXIT_USAGE = 2
EXIT_FAILURE = 1
CHECK_INTERVAL = 0.5  # seconds between looks at the exports (failures, sizes)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
                       help="VDUSE and vdpa device name, and the export's id on the control "
                       "socket (default: %(default)s)")
    add_export_options(serve)
    serve.add_argument("--control", metavar="PATH",
                       help="serve a QMP-shaped control socket here (mode 0600; see "
                       "docs/control.md) to add, remove, resize and query exports")
    serve.add_argument("--pidfile", metavar="PATH",
                       help="write the pid here once the device is ready")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    serve.add_argument("backend", metavar="BACKEND", help="backend name")
    serve.add_argument("options", nargs="*", metavar="key=value", help="backend options")
    add_ctl_parser(commands)
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


def serve(args: argparse.Namespace) -> int:
    """Run ``pyvduse serve``; return the exit status."""
    stop = _StopSignal()
    stop.install()
    spec = spec_from_namespace(args.name, args)
    control: ControlServer | None = None  # imported only when asked for: a quicker start

    def emit(event: str, data: dict[str, Any]) -> None:
        if control is not None:
            control.emit(event, data)

    registry = ExportRegistry(emit=emit)
    try:
        registry.add(spec)
        if args.control:
            from pyvduse.commands import daemon_commands
            from pyvduse.control import ControlServer

            control = ControlServer(args.control, daemon_commands(registry, stop.event.set),
                                    version=__version__)
            control.start()
        with _pidfile(args.pidfile):
            while not stop.event.wait(CHECK_INTERVAL):
                registry.check()
                flush_all()  # counts of suppressed log lines nothing else reported
                if control is None and registry.failed():
                    break
        if stop.received is not None:
            log.info("%s received, shutting down", signal.Signals(stop.received).name)
        failed = registry.failed() if control is None else []
        failure = registry.get(failed[0]).device.failure if failed else ""
    finally:
        if control is not None:
            control.close()
        registry.close()
    if failure and stop.received is None:
        raise PyvduseError(f"{args.name}: {failure}")
    log.info("stopped")
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
        if args.command == "ctl":
            return run_ctl(args)
        return serve(args)
    except PyvduseError as exc:
        print(f"pyvduse: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
