"""The ``pyvduse`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pyvduse import __version__
from pyvduse.backends import BACKENDS, backend_help, backend_summary
from pyvduse.ctl import add_ctl_parser, run_ctl
from pyvduse.errors import PyvduseError
from pyvduse.host import (
    Signals,
    exit_with_parent,
    status_lines,
    wait_for_nodes,
    write_atomically,
    write_status,
)
from pyvduse.logs import LOG_FORMATS, setup_logging
from pyvduse.ratelimit import flush_all
from pyvduse.registry import ExportRegistry
from pyvduse.sdnotify import Notifier
from pyvduse.spec import add_export_options, spec_from_namespace

if TYPE_CHECKING:
    from pyvduse.control import ControlServer
    from pyvduse.prometheus import MetricsServer

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
    parser.add_argument("-V", "--version", action="version", version=f"pyvduse {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    serve = commands.add_parser(
        "serve", help="serve a backend as a virtio-blk device",
        description="Serve BACKEND as a VDUSE virtio-blk device until SIGINT or SIGTERM.",
        epilog="backends: " + ", ".join(sorted(BACKENDS))
        + ". Examples: 'pyvduse serve --name vduse0 file path=/srv/disk.img', "
        "'pyvduse serve memory size=1G', "
        "'pyvduse serve python script=./my_backend.py key=value'. "
        "'pyvduse serve BACKEND --help' describes a backend and its options.")
    serve.add_argument("--name", default="pyvduse0",
                       help="VDUSE and vdpa device name, and the export's id on the control "
                       "socket (default: %(default)s)")
    add_export_options(serve)
    serve.add_argument("--control", metavar="PATH",
                       help="serve a QMP-shaped control socket here (mode 0600; see "
                       "docs/control.md) to add, remove, resize and query exports")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (needs "
                       "pyvduse[metrics]; see docs/metrics.md). With this or --control, "
                       "every request is counted")
    serve.add_argument("--pidfile", metavar="PATH",
                       help="write the pid here once the device is ready")
    serve.add_argument("--status-file", metavar="PATH",
                       help="once ready, write the status (one JSON object per export: name, "
                       "transport, path, driver, size, queues, readonly, datapath) here "
                       "instead of on stdout; removed at exit")
    serve.add_argument("--exit-with-parent", action="store_true",
                       help="stop (cleanly, as on SIGTERM) when the process that started "
                       "pyvduse dies")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", default="auto", choices=LOG_FORMATS,
                       help="stderr's log lines: text (timestamp, level, message), journal "
                       "(<priority> prefix, no timestamp: systemd's journal), json (one "
                       "object per line); auto: journal under systemd, else text")
    serve.add_argument("backend", metavar="BACKEND", help="backend name")
    serve.add_argument("options", nargs="*", metavar="key=value", help="backend options")
    add_ctl_parser(commands)
    listing = commands.add_parser(
        "list", help="list the VDUSE devices on this host",
        description="List every VDUSE device on this host: name, driver, device node, size "
        "and the pid of the daemon serving it (none: left behind by a daemon that died).")
    listing.add_argument("--json", action="store_true", help="one JSON object per device")
    destroy = commands.add_parser(
        "destroy", help="remove a VDUSE device no daemon serves any more",
        description="Delete the vdpa device and the VDUSE device NAME, left behind by a "
        "daemon that was killed and will not be restarted. Refused while a process serves "
        "it, and while its block device is mounted or open (unless --force).")
    destroy.add_argument("device", metavar="NAME")
    completion = commands.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script for SHELL, generated from this parser: "
        "'source <(pyvduse completion bash)', or save it as "
        "/usr/share/bash-completion/completions/pyvduse.")
    completion.add_argument("shell", choices=("bash",), metavar="SHELL")
    commands.add_parser(
        "man", help="print the manual page (roff)",
        description="Print pyvduse(1) in roff, generated from this parser: "
        "'pyvduse man > pyvduse.1; man ./pyvduse.1'.")
    destroy.add_argument("--force", action="store_true",
                         help="remove it even while its block device is mounted or open "
                         "(its I/O then fails)")
    return parser


def run_list(args: argparse.Namespace) -> int:
    """``pyvduse list``: a table, or JSON lines with ``--json``."""
    from pyvduse.devices import list_devices

    devices = list_devices()
    if args.json:
        for info in devices:
            print(json.dumps(info.as_dict(), separators=(",", ":")))
        return 0
    rows = [("NAME", "DRIVER", "NODE", "SIZE", "SERVED BY")]
    rows += [(d.name, d.driver or "-", d.node or "-",
              "-" if d.size is None else str(d.size),
              ",".join(map(str, d.holders)) or "nobody") for d in devices]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    """``pyvduse destroy NAME``: what was done, one line each."""
    from pyvduse.devices import destroy_device

    for line in destroy_device(args.device, force=args.force):
        print(f"pyvduse: {line}")
    return 0


def _check_file_place(path: str | None, what: str) -> None:
    """Fail before any device exists if ``path``'s directory cannot take a file."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise PyvduseError(f"cannot write {what} {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PyvduseError(f"cannot write {what} {path}: {directory} is not writable")


@contextlib.contextmanager
def _removed_at_exit(path: str | None) -> Iterator[None]:
    """Remove ``path`` (if given) when the block ends."""
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    """Write the pid atomically while the block is active; remove the file on exit.

    Enter it only once the device is ready: the pidfile's existence means "serving".
    """
    if path is None:
        yield
        return
    write_atomically(path, f"{os.getpid()}\n", "pidfile")
    with _removed_at_exit(path):
        yield


def _log_info_signal(signum: int, registry: ExportRegistry) -> None:
    """SIGUSR1: every export's statistics; SIGHUP, SIGUSR2: only noted."""
    name = signal.Signals(signum).name
    if signum != signal.SIGUSR1:
        log.info("%s received: nothing to reload (exports change through the control "
                 "socket); ignored", name)
        return
    for export in registry.stats()["exports"]:
        queues = ", ".join(f"vq{q['index']} {q['requests']} ({q['inflight']} in flight)"
                           for q in export["queues"])
        log.info("%s: %s: %d requests served in %.0f s: %s", name, export["id"],
                 export["requests"], export["uptime"], queues)


def _status_summary(statuses: list[dict[str, Any]]) -> str:
    """systemd's STATUS= line: each export and where it is."""
    return "serving " + ", ".join(
        f"{s['name']} on {s['path'] or 'no device node'}" for s in statuses)


def serve(args: argparse.Namespace) -> int:
    """Run ``pyvduse serve``; return the exit status."""
    signals = Signals()
    signals.install()
    notifier = Notifier.from_environ()
    if args.exit_with_parent:
        exit_with_parent()
    _check_file_place(args.pidfile, "pidfile")
    _check_file_place(args.status_file, "status file")
    spec = spec_from_namespace(args.name, args)
    control: ControlServer | None = None  # imported only when asked for: a quicker start
    metrics: MetricsServer | None = None

    def emit(event: str, data: dict[str, Any]) -> None:
        if control is not None:
            control.emit(event, data)

    registry = ExportRegistry(emit=emit, metrics=bool(args.metrics or args.control))
    try:
        if args.metrics:  # before any device: a port in use fails with nothing to undo
            from pyvduse.prometheus import MetricsServer

            metrics = MetricsServer(args.metrics, registry)
            log.info("metrics at %s", metrics.start())
        registry.add(spec)
        if args.control:
            from pyvduse.commands import daemon_commands
            from pyvduse.control import ControlServer

            control = ControlServer(args.control, daemon_commands(registry, signals.stop),
                                    version=__version__)
            control.start()
        statuses = [registry.status(export_id) for export_id in registry.ids()]
        missing = wait_for_nodes(s["path"] for s in statuses if s["transport"] == "vduse")
        if missing:
            log.warning("%s did not appear within 10 s; reporting ready all the same",
                        ", ".join(missing))
        with _pidfile(args.pidfile), _removed_at_exit(args.status_file):
            write_status(status_lines(statuses), args.status_file)
            notifier.ready(_status_summary(statuses))
            interval = min(CHECK_INTERVAL, notifier.watchdog_interval or CHECK_INTERVAL)
            while not signals.stopping:
                signals.wake.wait(interval)
                signals.wake.clear()
                for signum in signals.take_info():
                    _log_info_signal(signum, registry)
                if signals.stopping:
                    break
                registry.check()
                flush_all()  # counts of suppressed log lines nothing else reported
                if control is None and registry.failed():
                    break
                if notifier.watchdog_due() and not registry.troubles():
                    notifier.watchdog()  # only while every export is served
            notifier.stopping()
        if signals.stop_signal:
            log.info("%s received, shutting down", signal.Signals(signals.stop_signal).name)
        failed = registry.failed() if control is None else []
        failure = registry.get(failed[0]).device.failure if failed else ""
    finally:
        if control is not None:
            control.close()
        registry.close()
        if metrics is not None:
            metrics.close()
    if failure and not signals.stopping:
        raise PyvduseError(f"{args.name}: {failure}")
    log.info("stopped")
    return 0


def _backend_asked_about(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The backend of ``pyvduse serve ... BACKEND ... --help``, if that was asked."""
    if "serve" not in argv or not {"-h", "--help"} & set(argv):
        return None
    rest = [arg for arg in argv if arg not in ("-h", "--help")]
    try:
        with contextlib.redirect_stderr(None):
            known, _ = parser.parse_known_args(rest)
    except SystemExit:  # no backend given (or bad syntax): the serve help says it
        return None
    backend = getattr(known, "backend", None)
    return backend if backend in BACKENDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvduse`` console script."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    backend = _backend_asked_about(parser, words)
    if backend is not None:
        sys.stdout.write(backend_help(backend))
        return 0
    args = parser.parse_args(words)
    used = setup_logging(log, getattr(args, "log_level", "warning"),
                         getattr(args, "log_format", "auto"))
    try:
        if args.command == "ctl":
            return run_ctl(args)
        if args.command == "list":
            return run_list(args)
        if args.command == "destroy":
            return run_destroy(args)
        if args.command in ("completion", "man"):
            from pyvduse.cliref import bash_completion, manpage

            names = sorted(BACKENDS)
            sys.stdout.write(bash_completion(parser, names) if args.command == "completion"
                             else manpage(parser, {n: backend_summary(n) for n in names}))
            return 0
        return serve(args)
    except PyvduseError as exc:
        priority = "<3>" if used == "journal" else ""  # the journal's "error"
        print(f"{priority}pyvduse: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # a bug: still one line (the traceback with --log-level debug)
        log.debug("unexpected error", exc_info=True)
        print(f"pyvduse: error: unexpected {type(exc).__name__}: {exc} (please report it; "
              "--log-level debug shows where)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
