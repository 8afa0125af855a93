"""Metrics: what the daemon counts of each export's requests, and where it shows them.

The daemon runs in-process on the fake kernel (the fixtures of
``test_daemon_control``), a fake driver makes requests of known types and sizes,
and the counts are read back from the control socket's ``query-stats`` and from
the Prometheus endpoint (``--metrics``), scraped over HTTP and parsed with
prometheus-client's own parser. Both data paths are run. That the compiled core
counts exactly as the Python path does, for every kind of chain, is held by
``test_native_path.py`` (``test_the_native_path_counts_requests_as_the_python_path_does``);
the real kernel's side is in ``tests/guest/test_metrics.py``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

# The in-process daemon and its fake driver (serve and sockdir are fixtures).
from test_daemon_control import Daemon, Driver, pattern, serve, sockdir  # noqa: F401

from pyvduse import metrics as metrics_module
from pyvduse.errors import ConfigError
from pyvduse.metrics import LATENCY_BOUNDS_NS, STATUSES, TYPES, RequestCounters
from pyvduse.prometheus import parse_address
from pyvduse.registry import build_export
from pyvduse.spec import ExportSpec
from pyvduse.testing import FakeVduse
from pyvduse.uapi import virtio as v

NAME = "dc0"  # test_daemon_control's export
OK, IOERR, UNSUPP = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR, v.VIRTIO_BLK_S_UNSUPP
SIZE_SECTORS = 4 * 1024 * 1024 // 512


def discard(driver: Driver, sector: int, sectors: int) -> int:
    """One discard request of one range; its status."""
    memory = driver.memory
    header = memory.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_DISCARD, 0, 0))
    ranges = memory.buffer(v.virtio_blk_discard_write_zeroes.pack(sector, sectors, 0))
    status = memory.buffer(1, writable=True)
    head = driver.ring.add_chain([header, ranges, status])
    driver.channel.kick(0)
    ((done, _),) = driver.channel.wait_used(0, 1)
    assert done == head
    return memory.read(status.addr, 1)[0]


def known_requests(driver: Driver) -> dict[str, Any]:
    """Make requests of every kind the tests count; return what must be counted."""
    for n in range(6):
        assert driver.write(n * 8, pattern(4096, n)) == OK
    for n in range(4):
        assert driver.read(n * 8) == (OK, pattern(4096, n))
    assert driver.request(v.VIRTIO_BLK_T_FLUSH, 0)[0] == OK
    assert driver.request(v.VIRTIO_BLK_T_GET_ID, 0)[0] == OK
    assert discard(driver, 64, 16) == OK
    assert driver.read(SIZE_SECTORS)[0] == IOERR  # beyond the end
    assert driver.request(99, 0)[0] == UNSUPP
    return {
        "requests": {"read": 5, "write": 6, "flush": 1, "discard": 1, "write-zeroes": 0,
                     "get-id": 1, "other": 1},
        "bytes": {"read": 4 * 4096, "write": 6 * 4096, "flush": 0, "discard": 16 * 512,
                  "write-zeroes": 0, "get-id": v.VIRTIO_BLK_ID_BYTES, "other": 0},
        "errors": {"ioerr": 1, "unsupp": 1},
    }


@pytest.mark.parametrize("options", [("--datapath", "python"), ("--datapath", "auto"),
                                     ("--datapath", "python", "--io-threads", "0"),
                                     ("--datapath", "auto", "--io-threads", "0")],
                         ids=["python", "auto", "python-sync", "auto-sync"])
def test_query_stats_counts_requests_by_type_bytes_status_and_latency(
        serve: Callable[..., Daemon], options: tuple[str, ...]) -> None:  # noqa: F811
    # With io-threads the memory backend's requests complete asynchronously (counted
    # when done); without, as the handler returns (counted from the chain).
    daemon = serve(*options, "memory", "size=4M")
    before = daemon.execute("query-stats")["exports"][0]
    assert before["metrics"]["requests"] == dict.fromkeys(TYPES, 0)
    want = known_requests(Driver(daemon.fake, NAME))
    export = daemon.execute("query-stats")["exports"][0]
    counted = export["metrics"]
    assert {key: counted[key] for key in want} == want
    assert export["inflight"] == 0 and export["reconnects"] == 0
    assert export["size"] == 4 * 1024 * 1024
    latency = counted["latency"]
    assert latency["bounds-ns"] == list(LATENCY_BOUNDS_NS)
    for kind in TYPES:
        timed = latency[kind]
        assert len(timed["buckets"]) == len(LATENCY_BOUNDS_NS) + 1
        assert timed["buckets"] == sorted(timed["buckets"])  # cumulative
        assert timed["buckets"][-1] == timed["count"] == want["requests"][kind]
        assert (timed["sum-ns"] > 0) == (timed["count"] > 0)
    # One request at a time: the queue thread slept between them.
    assert counted["polls"]["sleeps"] >= 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples[(name, tuple(sorted({"export": NAME, **labels}.items())))]


@pytest.mark.parametrize("datapath", ["python", "auto"])
def test_the_prometheus_endpoint_serves_the_same_numbers(
        serve: Callable[..., Daemon], datapath: str) -> None:  # noqa: F811
    port = free_port()
    daemon = serve("--metrics", f"127.0.0.1:{port}", "--datapath", datapath, "memory",
                   "size=4M")
    empty = scrape(port)
    assert sample(empty, "pyvduse_requests_total", type="write") == 0
    want = known_requests(Driver(daemon.fake, NAME))
    samples = scrape(port)
    for kind in TYPES:
        assert sample(samples, "pyvduse_requests_total", type=kind) == want["requests"][kind]
        assert sample(samples, "pyvduse_request_bytes_total", type=kind) == want["bytes"][kind]
        assert sample(samples, "pyvduse_request_duration_seconds_count",
                      type=kind) == want["requests"][kind]
        assert sample(samples, "pyvduse_request_duration_seconds_bucket", type=kind,
                      le="+Inf") == want["requests"][kind]
    for status in STATUSES:
        assert sample(samples, "pyvduse_request_errors_total",
                      status=status) == want["errors"][status]
    assert sample(samples, "pyvduse_request_duration_seconds_sum", type="write") > 0
    assert sample(samples, "pyvduse_request_duration_seconds_bucket", type="read",
                  le="10.0") == 5
    assert sample(samples, "pyvduse_requests_in_flight") == 0
    assert sample(samples, "pyvduse_backend_reconnects_total") == 0
    assert sample(samples, "pyvduse_export_size_bytes") == 4 * 1024 * 1024
    assert sample(samples, "pyvduse_queue_polls_total", result="sleep") >= 10
    assert query_stats_agree(daemon, samples)


def query_stats_agree(daemon: Daemon, samples: dict[Any, float]) -> bool:
    counted = daemon.execute("query-stats")["exports"][0]["metrics"]
    return all(sample(samples, "pyvduse_requests_total", type=kind) == counted["requests"][kind]
               for kind in TYPES)


def test_without_metrics_or_control_nothing_is_counted(fake_kernel: FakeVduse) -> None:
    export = build_export(ExportSpec(id="m0", backend="memory", backend_options=("size=1M",)),
                          fake_kernel)
    try:
        assert export.model.metrics is None
        assert export.model.handle == export.model.handler.handle
    finally:
        export.backend.close()
    counted = build_export(ExportSpec(id="m1", backend="memory", backend_options=("size=1M",)),
                           fake_kernel, metrics=True)
    try:
        assert counted.model.metrics is not None
        assert counted.model.handle == counted.model.handler.handle_measured
    finally:
        counted.backend.close()


def test_latency_buckets_include_their_upper_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    counters = RequestCounters(compiled=False)  # on the clock of the test
    for elapsed in (0, 5_000, 5_001, 10_000_000_000, 10_000_000_001):
        monkeypatch.setattr(metrics_module, "_now_ns", lambda e=elapsed: 1_000_000 + e)
        counters.record(0, OK, 512, 1_000_000)
    cells = counters.copy()
    buckets = cells[3: 3 + len(LATENCY_BOUNDS_NS) + 1]
    assert buckets[0] == 2  # 0 and exactly 5 µs
    assert buckets[1] == 1  # 5.001 µs
    assert buckets[-2] == 1 and buckets[-1] == 1  # 10 s, and over
    assert cells[0] == 5 and cells[1] == 5 * 512
    counters.record(0, IOERR, 512, 1_000_000)
    assert counters.copy()[1] == 5 * 512  # the bytes of failed requests are not counted


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9190", ("127.0.0.1", 9190)), (":0", ("127.0.0.1", 0)),
    ("0.0.0.0:9190", ("0.0.0.0", 9190)), ("[::1]:9190", ("::1", 9190)),
    ("localhost:80", ("localhost", 80))])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("9190", "expected HOST:PORT"), ("host:", "expected HOST:PORT"),
    ("host:70000", "expected HOST:PORT"), ("::1:9190", "in brackets"),
    ("[nope]:9190", "not an IPv6 address")])
def test_bad_metrics_addresses_are_refused(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_address(text)


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvduse", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_a_metrics_port_in_use_fails_before_any_device(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_serve("--name", "m2", "--metrics", f"127.0.0.1:{port}", "memory", "size=1M")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"pyvduse: error: --metrics 127.0.0.1:{port}: cannot listen: Address already in use")


def test_without_prometheus_client_metrics_says_what_to_install(tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "prometheus_client.py").write_text("raise ImportError('hidden by the test')\n")
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(hide)!r}); "
         "from pyvduse.cli import main; "
         "sys.exit(main(['serve', '--name', 'm3', '--metrics', ':0', 'memory', 'size=1M']))"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "--metrics needs the prometheus-client package: pip install 'pyvduse[metrics]'" in (
        done.stderr)


@pytest.mark.skipif(metrics_module._count_request is None, reason="no compiled module")
def test_the_compiled_counter_counts_as_the_python_one() -> None:
    python, compiled = RequestCounters(compiled=False), RequestCounters()
    assert compiled.record is not python.record
    cases = [(kind, status, nbytes, ago) for kind in range(len(TYPES))
             for status in (OK, IOERR, UNSUPP) for nbytes in (0, 4096)
             for ago in (3_500_000, 700_000_000)]  # mid-bucket: 2.5-5 ms, 0.5-1 s
    for kind, status, nbytes, ago in cases:
        for counters in (python, compiled):
            counters.record(kind, status, nbytes, time.monotonic_ns() - ago)
    got, want = compiled.copy(), python.copy()
    sums = {kind * metrics_module.TYPE_CELLS + 2 for kind in range(len(TYPES))}
    assert [c for i, c in enumerate(got) if i not in sums] == \
        [c for i, c in enumerate(want) if i not in sums]
    for i in sums:
        assert abs(got[i] - want[i]) < 0.2 * want[i]
    assert want[-2:] == [len(TYPES) * 4, len(TYPES) * 4]  # ioerr, unsupp


@pytest.mark.skipif(metrics_module._count_request is None, reason="no compiled module")
def test_the_compiled_core_has_the_same_cell_layout() -> None:
    from pyvduse import _fastpath  # type: ignore[attr-defined]

    assert _fastpath.LATENCY_BOUNDS_NS == LATENCY_BOUNDS_NS
    assert _fastpath.STAT_TYPE_CELLS == metrics_module.TYPE_CELLS
    assert _fastpath.STAT_POLL_HITS == metrics_module.POLL_HITS
    assert _fastpath.STAT_CELLS == metrics_module.QUEUE_CELLS
