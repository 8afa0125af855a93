"""The export option schema: one table behind the command line and the control socket.

Every export option is declared once, in :data:`EXPORT_OPTIONS`: its name
(``num-queues``), how a text value becomes a typed one, its default and its
help. ``pyvduse serve`` turns the table into command-line options
(:func:`add_export_options`), the control socket's ``export-add`` takes the
same names as JSON arguments (:func:`spec_from_arguments`), and both produce
an :class:`ExportSpec`, from which the registry builds an export.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pyvduse.backends.options import parse_size
from pyvduse.backends.threads import DEFAULT_MIN_BYTES
from pyvduse.blk.config import DEFAULT_QUEUE_SIZE
from pyvduse.errors import ConfigError
from pyvduse.inflight import default_path
from pyvduse.native import DATAPATHS

DEFAULT_IO_THREADS = 2
DEFAULT_POLL_MAX_US = 256
DATAPATH_ENV = "PYVDUSE_DATAPATH"
"""The default of ``--datapath`` when set (auto, native or python): lets a test suite, or a
host, run every export on one data path without changing each command line."""
UNSAFE_NO_LOG_ENV = "PYVDUSE_TEST_NO_INFLIGHT_LOG"
"""Set to 1 (tests only) to serve without an inflight log and to recover a device as if
its requests had completed in order: the loss that the log prevents becomes visible."""


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (decimal, or 0x.. / 0o..)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def positive_int(text: str) -> int:
    """A whole number > 0."""
    value = non_negative_int(text)
    if value == 0:
        raise ValueError(f"{text!r} must be positive")
    return value


def size(text: str) -> int:
    """A size: ``512``, ``4k``, ``1G``, ``2T``, ``1GiB``."""
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a size (a number with an optional k, m, g unit)") from None


def boolean(text: str) -> bool:
    """``on``/``off``, ``true``/``false``, ``yes``/``no``, ``1``/``0``."""
    lowered = text.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean (on or off)")


def _attach_mode(text: str) -> str:
    if text not in ("virtio", "vhost", "none"):
        raise ValueError(f"{text!r} is not one of virtio, vhost, none")
    return text


def _datapath(text: str) -> str:
    if text not in DATAPATHS:
        raise ValueError(f"{text!r} is not one of {', '.join(DATAPATHS)}")
    return text


def default_datapath() -> str:
    """``$PYVDUSE_DATAPATH`` if set (a bad value is a :class:`ConfigError`), else auto."""
    value = os.environ.get(DATAPATH_ENV, "") or "auto"
    try:
        return _datapath(value)
    except ValueError as exc:
        raise ConfigError(f"${DATAPATH_ENV}: {exc}") from None


def _text(text: str) -> str:
    return text


TRANSPORTS = ("vduse", "vhost-user")


def _transport(text: str) -> str:
    if text not in TRANSPORTS:
        raise ValueError(f"{text!r} is not one of {', '.join(TRANSPORTS)}")
    return text


@dataclass(frozen=True)
class Option:
    """One export option: ``--NAME`` on the command line, ``NAME`` in ``export-add``."""

    name: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    flag: bool = False  # a command-line switch without a value (e.g. --readonly)

    @property
    def attr(self) -> str:
        """The :class:`ExportSpec` field it sets."""
        return self.name.replace("-", "_")


EXPORT_OPTIONS: tuple[Option, ...] = (
    Option("transport", _transport, "vduse",
           "how the driver reaches the device: vduse (a kernel device, see --attach) or "
           "vhost-user (a vhost-user-blk socket for QEMU, Cloud Hypervisor, libblkio; "
           "needs --socket) (default: %(default)s)", "NAME"),
    Option("socket", _text, None,
           "with --transport vhost-user: the UNIX socket to listen on (a stale one is "
           "replaced; created with mode 0600)", "PATH"),
    Option("num-queues", positive_int, 1, "number of request queues (default: %(default)s)",
           "N"),
    Option("queue-size", positive_int, DEFAULT_QUEUE_SIZE,
           "entries per queue, a power of two (default: %(default)s)", "N"),
    Option("logical-block-size", positive_int, None,
           "logical block size in bytes (default: the backend's preferred block size, 512 "
           "for files and memory)", "N"),
    Option("serial", _text, "", "serial number, up to 20 bytes"),
    Option("readonly", boolean, False, "export read-only", flag=True),
    Option("attach", _attach_mode, "virtio",
           "bind to virtio_vdpa (a /dev/vdX here), vhost_vdpa (/dev/vhost-vdpa-N for a VM) "
           "or do not attach: virtio, vhost or none (default: %(default)s)", "MODE"),
    Option("queue-threads", positive_int, None,
           "threads serving the queues, queue i on thread i %% N (default: one per queue "
           "on the native data path, whose queues run in parallel; one on the Python "
           "path, where it batches all queues and spares the GIL contention of several)",
           "N"),
    Option("poll-max-us", non_negative_int, DEFAULT_POLL_MAX_US,
           "let a queue thread whose rings ran dry watch them for up to US microseconds "
           "before sleeping, adapting the time to the traffic (an idle device does not "
           "poll): less latency per request for some CPU time (default: %(default)s; 0: "
           "never poll)", "US"),
    Option("io-threads", non_negative_int, DEFAULT_IO_THREADS,
           "run the backend's large requests (and flushes, discards, write-zeroes) on a "
           "pool of N threads, so several are in flight per queue (default: %(default)s; 0: "
           "every request on its queue's thread; no effect on asynchronous backends)", "N"),
    Option("io-threads-min", size, DEFAULT_MIN_BYTES,
           "smallest read or write sent to the --io-threads pool; smaller ones stay on the "
           "queue's thread (default: 64k)", "SIZE"),
    Option("datapath", _datapath, None,
           "who serves the requests: native (the compiled data path: file, memory and null "
           "backends, and nbd when the server allows several connections), python (the "
           "reference path, any backend) or auto: native where it can, else python; the "
           "choice is logged at start (default: $PYVDUSE_DATAPATH, or auto)", "MODE"),
    Option("inflight-log", _text, None,
           "the file recording what the device has in flight, so that a daemon killed "
           "with SIGKILL can be restarted with the same options and lose nothing "
           "(default: /run/pyvduse/NAME.inflight)", "PATH"),
)


@dataclass(frozen=True)
class ExportSpec:
    """Everything needed to build one export (see :mod:`pyvduse.registry`)."""

    id: str
    backend: str
    backend_options: tuple[str, ...] = ()
    transport: str = "vduse"
    socket: str | None = None
    num_queues: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    logical_block_size: int | None = None
    serial: str = ""
    readonly: bool = False
    attach: str = "virtio"
    #: None: one per queue on the native data path, else one (see :func:`build_export`).
    queue_threads: int | None = None
    poll_max_us: int = DEFAULT_POLL_MAX_US
    io_threads: int = DEFAULT_IO_THREADS
    io_threads_min: int = DEFAULT_MIN_BYTES
    #: None: :func:`default_datapath` when the export is built.
    datapath: str | None = None
    inflight_log: str | None = None
    #: Test-only: no inflight log; recovery trusts the used index (see UNSAFE_NO_LOG_ENV).
    unsafe_no_log: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.transport == "vhost-user" and not self.socket:
            raise ConfigError("the vhost-user transport needs a socket path (--socket PATH)")
        if self.transport != "vhost-user" and self.socket:
            raise ConfigError("--socket is for the vhost-user transport "
                              "(--transport vhost-user)")

    @property
    def inflight_log_path(self) -> str | None:
        """Where the inflight log lives (None: nowhere: test-only, or over vhost-user,
        whose front-end keeps the requests in flight)."""
        if self.unsafe_no_log or self.transport == "vhost-user":
            return None
        return self.inflight_log or default_path(self.id)

    def summary(self) -> dict[str, Any]:
        """The spec as JSON-friendly data (``query-exports``)."""
        data = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)
                if f.name not in ("backend_options", "unsafe_no_log")}
        data["backend-options"] = list(self.backend_options)
        data["inflight-log"] = self.inflight_log_path
        return data


def _unsafe_no_log() -> bool:
    return os.environ.get(UNSAFE_NO_LOG_ENV, "") == "1"


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """Add every export option to ``parser`` (``--num-queues`` ...)."""
    for option in EXPORT_OPTIONS:
        if option.flag:
            parser.add_argument(f"--{option.name}", action="store_true", help=option.help)
            continue

        def convert(text: str, option: Option = option) -> Any:
            try:
                return option.convert(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = option.name  # argparse names the option in its errors
        parser.add_argument(f"--{option.name}", type=convert, default=option.default,
                            metavar=option.metavar, help=option.help)


def spec_from_namespace(export_id: str, args: argparse.Namespace) -> ExportSpec:
    """The spec of ``pyvduse serve``'s parsed command line."""
    values = {option.attr: getattr(args, option.attr) for option in EXPORT_OPTIONS}
    return ExportSpec(id=export_id, backend=args.backend,
                      backend_options=tuple(args.options), unsafe_no_log=_unsafe_no_log(),
                      **values)


def spec_from_arguments(arguments: Mapping[str, Any]) -> ExportSpec:
    """The spec of an ``export-add`` command; :class:`ConfigError` names what is wrong.

    ``id`` and ``backend`` are required; ``options`` is an object of the
    backend's ``key: value`` options (or a list of ``key=value`` strings);
    every other key is an export option of :data:`EXPORT_OPTIONS`, its value
    a JSON string, number or boolean.
    """
    known = {option.name: option for option in EXPORT_OPTIONS}
    unknown = sorted(set(arguments) - set(known) - {"id", "backend", "options"})
    if unknown:
        raise ConfigError(f"unknown argument(s): {', '.join(unknown)}; known: id, backend, "
                          f"options, {', '.join(known)}")
    export_id, backend = arguments.get("id"), arguments.get("backend")
    if not isinstance(export_id, str) or not export_id:
        raise ConfigError("'id' (a string: the device name) is required")
    if not isinstance(backend, str) or not backend:
        raise ConfigError("'backend' (a string: file, memory, null, nbd, rbd, python) is "
                          "required")
    values: dict[str, Any] = {}
    for name, option in known.items():
        if name not in arguments:
            continue
        raw = arguments[name]
        if isinstance(raw, bool):
            raw = "on" if raw else "off"
        if not isinstance(raw, (str, int)):
            raise ConfigError(f"'{name}' must be a string, a number or a boolean")
        try:
            values[option.attr] = option.convert(str(raw))
        except ValueError as exc:
            raise ConfigError(f"'{name}': {exc}") from None
    return ExportSpec(id=export_id, backend=backend,
                      backend_options=_backend_options(arguments.get("options", {})),
                      unsafe_no_log=_unsafe_no_log(), **values)


def _backend_options(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, Mapping):
        items: list[str] = []
        for key, value in raw.items():
            if isinstance(value, bool):
                value = "on" if value else "off"
            if not isinstance(value, (str, int)):
                raise ConfigError(f"backend option '{key}' must be a string or a number")
            items.append(f"{key}={value}")
        return tuple(items)
    if isinstance(raw, Sequence) and not isinstance(raw, str) and all(
            isinstance(item, str) for item in raw):
        return tuple(raw)
    raise ConfigError("'options' must be an object of backend options (or key=value strings)")
