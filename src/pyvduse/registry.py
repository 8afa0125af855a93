"""The export registry: the daemon's exports, added and removed at run time.

One :class:`ExportRegistry` per daemon owns every export: it builds one from
an :class:`~pyvduse.spec.ExportSpec` (:func:`build_export`), starts it
(creating or recovering its device), removes it, resizes it, reports on it,
and watches all of them from one place (:meth:`ExportRegistry.check`): a
device the kernel broke, an attachment removed behind the daemon's back, a
resizable backend whose size changed. What it sees goes out as events
(``emit(name, data)``, e.g. the control socket's), and so do the events the
backends report themselves (:meth:`pyvduse.backends.base.Backend.emit_event`,
such as ``BACKEND_CONNECTION_LOST``), with the export's ``id`` added.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvduse.backends import BACKENDS, open_backend
from pyvduse.backends.threads import ThreadPoolBackend
from pyvduse.binding import find_attached
from pyvduse.blk.config import BlkConfig
from pyvduse.errors import ConfigError, PyvduseError
from pyvduse.export import BlkExport, Export
from pyvduse.kernel import LinuxVduse, VduseKernel
from pyvduse.native import choose as choose_datapath
from pyvduse.spec import ExportSpec, default_datapath

log = logging.getLogger(__name__)

SIZE_CHECK_INTERVAL = 2.0
"""Seconds between size checks of a resizable backend."""

Emit = Callable[[str, dict[str, Any]], None]


def _no_events(event: str, data: dict[str, Any]) -> None:
    pass


def build_export(spec: ExportSpec, kernel: VduseKernel | None = None,
                 metrics: bool = False) -> Export:
    """Open the backend of ``spec`` and wrap it in a (not yet started) export; with
    ``metrics``, one that counts its requests (see :mod:`pyvduse.metrics`).

    Raises :class:`PyvduseError` with one clear line for a bad backend or
    option; nothing is left open then.
    """
    backend = open_backend(spec.backend, list(spec.backend_options))
    if spec.io_threads and backend.submit_min_bytes is None:
        backend = ThreadPoolBackend(backend, spec.io_threads, spec.io_threads_min)
    elif spec.io_threads:
        log.debug("the %s backend is asynchronous: io-threads ignored", spec.backend)
    try:
        config = BlkConfig.for_backend(
            backend,
            logical_block_size=spec.logical_block_size or max(512, backend.preferred_block_size),
            num_queues=spec.num_queues, queue_size=spec.queue_size, serial=spec.serial,
            readonly=spec.readonly)
        requested = spec.datapath or default_datapath()
        target = None if requested == "python" else backend.native_target()
        datapath = choose_datapath(requested, target, spec.id,
                                   backend.native_refusal)
        threads = spec.queue_threads or (spec.num_queues if datapath == "native" else 1)
        if spec.transport == "vhost-user":
            from pyvduse.vhost_user.export import VhostUserExport  # only when asked for
            assert spec.socket is not None
            export: Export = VhostUserExport(spec.id, backend, config, spec.socket,
                                             queue_threads=threads,
                                             poll_max_ns=spec.poll_max_us * 1000)
        else:
            export = BlkExport(spec.id, backend, config,
                               attach=spec.attach,  # type: ignore[arg-type]
                               kernel=kernel, queue_threads=threads,
                               poll_max_ns=spec.poll_max_us * 1000,
                               inflight_log=spec.inflight_log_path,
                               trust_used_index=spec.unsafe_no_log)
        export.datapath = datapath
        if datapath == "native":
            export.model.serve_natively()
        if metrics:
            export.model.collect_metrics()
        return export
    except BaseException:
        backend.close()
        raise


@dataclass
class _Entry:
    spec: ExportSpec
    export: Export
    started: float = field(default_factory=time.time)
    next_size_check: float = 0.0
    failure_reported: bool = False
    detached_reported: bool = False


class ExportRegistry:
    """The exports of one daemon, by id (the device name). Thread-safe.

    ``kernel`` is the VDUSE seam (a fake in tests); ``emit`` receives events. With
    ``metrics`` every export counts its requests (:meth:`stats` reports them).
    """

    def __init__(self, kernel: VduseKernel | None = None, emit: Emit | None = None,
                 metrics: bool = False) -> None:
        self._kernel = kernel
        self.emit: Emit = emit or _no_events
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # guards _entries
        self._changing: set[str] = set()  # ids being added or removed

    def __contains__(self, export_id: str) -> bool:
        return export_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, export_id: str) -> Export:
        """The export ``export_id``; :class:`ConfigError` if there is none."""
        entry = self._entries.get(export_id)
        if entry is None:
            raise ConfigError(f"no export with id {export_id!r}")
        return entry.export

    def add(self, spec: ExportSpec) -> Export:
        """Build and start the export of ``spec``; raise (leaving nothing) if it cannot be."""
        with self._lock:
            if spec.id in self._entries or spec.id in self._changing:
                raise ConfigError(f"an export with id {spec.id!r} exists already")
            self._changing.add(spec.id)
        try:
            if spec.transport == "vduse" and spec.backend in BACKENDS and getattr(
                    BACKENDS[spec.backend], "contacts_servers", False):
                # before the backend connects: no server hears of a device that cannot be
                check = getattr(self._kernel or LinuxVduse(), "check_available", None)
                if check is not None:
                    check()
            export = build_export(spec, self._kernel, self.metrics)
            export.backend.event_sink = self._backend_events(spec.id)
            try:
                export.start()
            except BaseException:
                export.backend.close()  # start() undid the device; the backend is ours
                raise
            with self._lock:
                self._entries[spec.id] = _Entry(
                    spec, export, next_size_check=time.monotonic() + SIZE_CHECK_INTERVAL)
        finally:
            with self._lock:
                self._changing.discard(spec.id)
        where = f" as {export.attached.dev_path}" if export.attached else " (not attached)"
        config = export.config
        log.info("%s %s backend on %s%s: %d bytes, %d queue(s) of %d%s, %s data path",
                 "recovered" if export.recovered else "serving", spec.backend, spec.id, where,
                 config.capacity, config.num_queues, config.queue_size,
                 ", read-only" if config.readonly else "", export.datapath)
        return export

    def _backend_events(self, export_id: str) -> Emit:
        """The event sink of export ``export_id``'s backend: its events, with ``id`` added
        (first, and always the export's), go to :attr:`emit`."""

        def sink(event: str, data: dict[str, Any]) -> None:
            self.emit(event, {"id": export_id,
                              **{key: value for key, value in data.items() if key != "id"}})

        return sink

    def remove(self, export_id: str) -> None:
        """Detach, destroy and forget export ``export_id`` (its log is removed)."""
        with self._lock:
            entry = self._entries.pop(export_id, None)
            if entry is None:
                raise ConfigError(f"no export with id {export_id!r}")
            self._changing.add(export_id)
        try:
            entry.export.stop()
        finally:
            with self._lock:
                self._changing.discard(export_id)
        log.info("%s: removed", export_id)

    def resize(self, export_id: str, size: int, *, shrink: bool = False) -> int:
        """Resize export ``export_id`` (see :meth:`BlkExport.resize`); return its capacity."""
        export = self.get(export_id)
        capacity = export.resize(size, shrink=shrink)
        self.emit("EXPORT_RESIZED", {"id": export_id, "size": capacity})
        return capacity

    def close(self) -> None:
        """Remove every export, newest first; errors are logged, the others still go."""
        for export_id in reversed(list(self._entries)):
            try:
                self.remove(export_id)
            except Exception as exc:  # keep removing the others
                log.error("%s: %s", export_id, exc)

    # -- reports ----------------------------------------------------------------------

    def describe(self, export_id: str) -> dict[str, Any]:
        """One export as data (``query-exports``)."""
        entry = self._entries.get(export_id)
        if entry is None:
            raise ConfigError(f"no export with id {export_id!r}")
        export = entry.export
        device = export.device
        config = export.config
        return {
            "id": export_id,
            "backend": entry.spec.backend,
            "size": config.capacity,
            "logical-block-size": config.logical_block_size,
            "num-queues": config.num_queues,
            "queue-size": config.queue_size,
            "readonly": config.readonly,
            "attached": (None if export.attached is None else
                         {"driver": export.attached.driver, "node": export.attached.dev_path}),
            "driver-ok": device.driver_ok.is_set(),
            "failed": device.failure or None,
            "recovered": export.recovered,
            "resubmitted": export.resubmitted,
            "inflight-log": export.inflight_log_path,
            "spec": entry.spec.summary(),
        }

    def ids(self) -> list[str]:
        """The exports' ids, oldest first."""
        return list(self._entries)

    def status(self, export_id: str) -> dict[str, Any]:
        """What a user needs to reach export ``export_id`` (the daemon's status line):
        its name, transport, the path to open (``/dev/vdX`` under ``virtio_vdpa``,
        ``/dev/vhost-vdpa-N`` under ``vhost_vdpa``, the socket for vhost-user, None
        when not attached), the driver bound, size in bytes, queues and data path."""
        entry = self._entries.get(export_id)
        if entry is None:
            raise ConfigError(f"no export with id {export_id!r}")
        export, spec = entry.export, entry.spec
        attached = export.attached if spec.transport == "vduse" else None
        return {
            "name": export_id,
            "transport": spec.transport,
            "path": (spec.socket if spec.transport == "vhost-user" else
                     attached.dev_path if attached is not None else None),
            "driver": attached.driver if attached is not None else None,
            "size": export.config.capacity,
            "queues": export.config.num_queues,
            "readonly": export.config.readonly,
            "datapath": export.datapath.split(" ", 1)[0],  # without the reason
        }

    def query(self) -> list[dict[str, Any]]:
        """Every export, oldest first."""
        return [self.describe(export_id) for export_id in list(self._entries)]

    def stats(self) -> dict[str, Any]:
        """Per export and per queue: requests served, in flight, malformed chains; per
        export also requests in flight, backend reconnections and, when the registry
        collects them, its ``metrics`` (:meth:`pyvduse.metrics.ExportMetrics.snapshot`;
        else None)."""
        exports = []
        for export_id, entry in list(self._entries.items()):
            device = entry.export.device
            queues = []
            for index in range(entry.export.config.num_queues):
                worker = device.workers.get(index)
                served = device.served.get(index, 0) + (worker.requests if worker else 0)
                queues.append({"index": index, "requests": served,
                               "inflight": worker.in_backend if worker else 0,
                               "bad-chains": worker.bad_chains if worker else 0,
                               "running": worker is not None and not worker.broken})
            collected = entry.export.model.metrics
            exports.append({"id": export_id, "uptime": round(time.time() - entry.started, 3),
                            "requests": sum(q["requests"] for q in queues),
                            "size": entry.export.config.capacity,
                            "inflight": sum(q["inflight"] for q in queues),
                            "reconnects": entry.export.backend.reconnections(),
                            "metrics": collected.snapshot() if collected is not None else None,
                            "queues": queues})
        return {"exports": exports}

    # -- watching -----------------------------------------------------------------------

    def check(self) -> None:
        """Look at every export once: failures, lost attachments, size changes.

        Call it periodically (the daemon does, twice a second). Never raises.
        """
        now = time.monotonic()
        for export_id, entry in list(self._entries.items()):
            export = entry.export
            if not self._serving(export_id, entry):
                continue  # removed meanwhile (export-del): it is detached and destroyed
            try:
                if export.device.failed.is_set() and not entry.failure_reported:
                    entry.failure_reported = True
                    self.emit("EXPORT_FAILED", {"id": export_id,
                                                "reason": export.device.failure})
                if (export.attached is not None and not entry.detached_reported
                        and find_attached(export_id) is None
                        and self._serving(export_id, entry)):
                    # (an export-del that began during the look detached it: no news)
                    entry.detached_reported = True
                    log.warning("%s: the vdpa device was removed by someone else", export_id)
                    self.emit("EXPORT_DETACHED", {"id": export_id})
                if export.backend.resizable and now >= entry.next_size_check:
                    entry.next_size_check = now + SIZE_CHECK_INTERVAL
                    capacity = export.refresh_size()
                    if capacity is not None:
                        self.emit("EXPORT_RESIZED", {"id": export_id, "size": capacity})
            except (PyvduseError, OSError) as exc:  # the backend or kernel refused: later
                log.warning("%s: checking the export failed: %s", export_id, exc)
            except Exception:
                log.exception("%s: checking the export failed", export_id)

    def _serving(self, export_id: str, entry: _Entry) -> bool:
        """Whether ``entry`` is still export ``export_id``: :meth:`remove` forgets an
        export before it detaches and destroys it."""
        with self._lock:
            return self._entries.get(export_id) is entry

    def troubles(self) -> list[str]:
        """What keeps the daemon from serving every export, one line each (failed
        exports, queue threads that died); empty while all is well. The daemon's
        systemd watchdog pings only then."""
        found = []
        for export_id, entry in list(self._entries.items()):
            device = entry.export.device
            if device.failed.is_set():
                found.append(f"{export_id}: {device.failure}")
            found += [f"{export_id}: queue thread {name} died"
                      for name in device.virtio.dead_threads()]
        return found

    def failed(self) -> list[str]:
        """Ids of exports whose device can no longer be served."""
        return [i for i, e in list(self._entries.items()) if e.export.device.failed.is_set()]
