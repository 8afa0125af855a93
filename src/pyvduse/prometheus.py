"""The Prometheus endpoint: ``pyvduse serve --metrics HOST:PORT``.

Serves ``/metrics`` over HTTP with the optional ``prometheus-client`` package
(``pip install 'pyvduse[metrics]'``). Nothing is done per request here: at each
scrape a collector turns :meth:`pyvduse.registry.ExportRegistry.stats` (the
counts of :mod:`pyvduse.metrics`) into metric families, every one labelled
with the ``export`` it concerns:

=====================================  =========  ==========================================
``pyvduse_requests_total``             counter    requests answered, by ``type``
``pyvduse_request_bytes_total``        counter    data bytes of those that succeeded, by
                                                  ``type`` (discard and write-zeroes: the
                                                  range)
``pyvduse_request_errors_total``       counter    requests answered with an error, by
                                                  ``status`` (``ioerr``, ``unsupp``)
``pyvduse_request_duration_seconds``   histogram  from taking a request to answering it,
                                                  by ``type``
``pyvduse_requests_in_flight``         gauge      requests started and not yet answered
``pyvduse_backend_reconnects_total``   counter    connections the backend opened again
``pyvduse_queue_polls_total``          counter    times a queue thread found work by
                                                  polling (``result="hit"``) or went to
                                                  sleep until woken (``result="sleep"``)
``pyvduse_export_size_bytes``          gauge      the device's size
=====================================  =========  ==========================================
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyvduse.errors import ConfigError
from pyvduse.metrics import LATENCY_BOUNDS_NS, STATUSES, TYPES

if TYPE_CHECKING:
    from pyvduse.registry import ExportRegistry

log = logging.getLogger(__name__)

__all__ = ["MetricsServer", "parse_address"]

_MISSING = ("--metrics needs the prometheus-client package: pip install 'pyvduse[metrics]' "
            "(Debian: apt install python3-prometheus-client)")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; an empty host is 127.0.0.1) as
    ``(host, port)``; :class:`ConfigError` with the reason otherwise. Port 0 picks
    a free one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--metrics {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"--metrics {text!r}: write an IPv6 address in brackets, "
                          f"e.g. [::1]:9190")
    return host or "127.0.0.1", int(port_text)


class MetricsServer:
    """The HTTP endpoint over ``registry``'s exports, on ``address`` (``HOST:PORT``).

    :meth:`start` binds it (raising :class:`ConfigError` when the package is
    missing or the address cannot be had) and serves on a thread of its own;
    :meth:`close` stops it.
    """

    def __init__(self, address: str, registry: ExportRegistry) -> None:
        self.host, self.port = parse_address(address)
        self.registry = registry
        self._server: Any = None

    def start(self) -> str:
        """Serve; return the URL scraped (with the port picked when 0 was asked for)."""
        try:
            from prometheus_client import start_http_server
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise ConfigError(_MISSING) from None
        collectors = CollectorRegistry(auto_describe=False)
        collectors.register(_ExportCollector(self.registry))
        try:
            self._server, _thread = start_http_server(self.port, self.host, collectors)
        except OSError as exc:
            raise ConfigError(f"--metrics {self.host}:{self.port}: cannot listen: "
                              f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _ExportCollector:
    """Reads the registry at each scrape (prometheus-client's custom collector)."""

    def __init__(self, registry: ExportRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily("pyvduse_requests", "Requests answered, by type.",
                                       labels=["export", "type"])
        sizes = CounterMetricFamily("pyvduse_request_bytes", "Data bytes of the requests "
                                    "that succeeded, by type.", labels=["export", "type"])
        errors = CounterMetricFamily("pyvduse_request_errors", "Requests answered with an "
                                     "error, by virtio-blk status.", labels=["export", "status"])
        latency = HistogramMetricFamily("pyvduse_request_duration_seconds", "Time from "
                                        "taking a request to answering it, by type.",
                                        labels=["export", "type"])
        inflight = GaugeMetricFamily("pyvduse_requests_in_flight", "Requests started and "
                                     "not yet answered.", labels=["export"])
        reconnects = CounterMetricFamily("pyvduse_backend_reconnects", "Connections the "
                                         "backend opened again after losing one.",
                                         labels=["export"])
        polls = CounterMetricFamily("pyvduse_queue_polls", "Times a queue thread found work "
                                    "by polling (hit) or slept until woken (sleep).",
                                    labels=["export", "result"])
        size = GaugeMetricFamily("pyvduse_export_size_bytes", "The device's size.",
                                 labels=["export"])
        bounds = [str(bound / 1e9) for bound in LATENCY_BOUNDS_NS] + ["+Inf"]
        for export in self.registry.stats()["exports"]:
            name = export["id"]
            inflight.add_metric([name], export["inflight"])
            reconnects.add_metric([name], export["reconnects"])
            size.add_metric([name], export["size"])
            counted = export["metrics"]
            if counted is None:
                continue
            for kind in TYPES:
                requests.add_metric([name, kind], counted["requests"][kind])
                sizes.add_metric([name, kind], counted["bytes"][kind])
                timed = counted["latency"][kind]
                latency.add_metric([name, kind], list(zip(bounds, timed["buckets"],
                                                          strict=True)),
                                   timed["sum-ns"] / 1e9)
            for status in STATUSES:
                errors.add_metric([name, status], counted["errors"][status])
            for result, key in (("hit", "hits"), ("sleep", "sleeps")):
                polls.add_metric([name, result], counted["polls"][key])
        yield from (requests, sizes, errors, latency, inflight, reconnects, polls, size)
