"""Metrics under the real kernel: the Prometheus endpoint's counters rise by exactly
the bytes of a known read and write made on ``/dev/vdX``, on both data paths."""

from __future__ import annotations

import mmap
import os
import re
import time
import urllib.request
from pathlib import Path

from conftest import Daemon, serving
from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def endpoint(daemon: Daemon) -> str:
    """The URL the daemon said it serves its metrics at (port 0 was asked for)."""
    found = re.search(r"metrics at (http://\S+/metrics)", daemon.output())
    assert found, daemon.output()
    return found.group(1)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, export: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"export": export, **labels}.items())))]


def settled(url: str) -> Samples:
    """Samples once the kernel's own reads (partition scan, udev's probes) are over:
    two scrapes a second apart that agree on every request count."""
    deadline = time.monotonic() + 60
    previous = scrape(url)
    while True:
        time.sleep(1)
        current = scrape(url)
        counts = [key for key in current if key[0] == "pyvduse_requests_total"]
        if all(current[key] == previous.get(key) for key in counts):
            return current
        assert time.monotonic() < deadline, "the device never went quiet"
        previous = current


def test_metrics_rise_by_the_bytes_of_a_known_read_and_write(backing_file: Path) -> None:
    for datapath in ("python", "auto"):  # the Python handler's counts, the C core's
        known_read_and_write(backing_file, datapath)


def known_read_and_write(backing_file: Path, datapath: str) -> None:
    name = f"pvmet{datapath[0]}"
    payload = os.urandom(128 * 1024)
    backing_file.write_bytes(os.urandom(8 * MiB))
    with serving(name, "--metrics", "127.0.0.1:0", "--datapath", datapath, "file",
                 f"path={backing_file}") as daemon:
        url = endpoint(daemon)
        before = settled(url)
        assert value(before, "pyvduse_export_size_bytes", name) == 8 * MiB

        def delta(after: Samples, metric: str, **labels: str) -> float:
            return (value(after, metric, name, **labels)
                    - value(before, metric, name, **labels))

        with mmap.mmap(-1, len(payload)) as buf, memoryview(buf) as view:
            fd = os.open(daemon.device, os.O_RDWR | os.O_DIRECT)
            try:
                assert os.preadv(fd, [view[:64 * 1024]], 1 * MiB) == 64 * 1024
                assert bytes(view[:64 * 1024]) == backing_file.read_bytes()[MiB:MiB + 65536]
                read = scrape(url)
                view[:] = payload
                assert os.pwritev(fd, [view], 2 * MiB) == len(payload)
                written = scrape(url)
                os.fsync(fd)
                flushed = scrape(url)
            finally:
                os.close(fd)
        assert backing_file.read_bytes()[2 * MiB:2 * MiB + len(payload)] == payload
        output = daemon.output()
    assert delta(read, "pyvduse_request_bytes_total", type="read") == 64 * 1024, output
    assert delta(read, "pyvduse_request_bytes_total", type="write") == 0
    assert delta(written, "pyvduse_request_bytes_total", type="write") == len(payload)
    assert delta(written, "pyvduse_request_bytes_total", type="read") == 64 * 1024
    assert delta(flushed, "pyvduse_requests_total", type="flush") >= 1
    for kind in ("read", "write", "flush"):
        requests = delta(flushed, "pyvduse_requests_total", type=kind)
        assert delta(flushed, "pyvduse_request_duration_seconds_count", type=kind) == requests
        assert delta(flushed, "pyvduse_request_duration_seconds_bucket", type=kind,
                     le="+Inf") == requests
    assert delta(flushed, "pyvduse_requests_total", type="read") >= 1
    assert delta(flushed, "pyvduse_requests_total", type="write") >= 1
    assert delta(flushed, "pyvduse_request_duration_seconds_sum", type="write") > 0
    for status in ("ioerr", "unsupp"):
        assert delta(flushed, "pyvduse_request_errors_total", status=status) == 0
    assert value(flushed, "pyvduse_requests_in_flight", name) == 0
