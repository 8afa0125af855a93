"""Data-path micro-benchmark: the device side of a split virtqueue, no kernel.

A mock driver (:mod:`pyvduse.testing`) lays out ``--batch`` virtio-blk requests
in a memfd-backed IOVA space once; every round it makes them all available,
the device side serves them with the production code (:meth:`QueueWorker.drain`:
``SplitQueue.pop`` -> ``BlkHandler.handle`` -> ``NullBackend`` -> ``push`` /
``publish`` / ``needs_interrupt``), and the driver collects the completions and
re-arms ``used_event``. Only the ``drain()`` calls are timed; the driver's work
between rounds is not.

Variants: 4 KiB reads with direct and indirect descriptors, 4 KiB writes, flushes.
The interrupt callback is a counter (a real one is one ioctl per batch).
Every popped head is marked in the worker's inflight record and cleared after
publish: in memory by default, in a real memory-mapped log file (as the daemon
keeps it) with ``--inflight-log``.

    python bench/datapath.py [--queue-size 256] [--batch 64] [--seconds 2] [--repeat 3]
                             [--variant NAME ...] [--json OUT [--label TEXT]] [--profile]
                             [--inflight-log] [--metrics]

``--metrics`` counts every request as the daemon does with ``--metrics`` or
``--control`` (:mod:`pyvduse.metrics`), to measure what counting costs.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import importlib.util
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyvduse
from pyvduse.backends.null import NullBackend
from pyvduse.blk.config import BlkConfig
from pyvduse.blk.handler import BlkHandler
from pyvduse.queue_worker import QueueWorker
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import SplitQueue

BLOCK = 4096
DISK_SIZE = 1 << 30


@dataclass(frozen=True)
class Variant:
    """One request shape: the request type, its data direction and the descriptor layout."""

    name: str
    req_type: int
    data: int  # bytes of data per request: data-in for reads, data-out for writes
    indirect: bool

    def descriptors(self) -> int:
        """Ring descriptors one request takes."""
        return 1 if self.indirect else (3 if self.data else 2)

    def expected_used_len(self) -> int:
        """What the device must report as written: data-in plus the status byte."""
        return (self.data if self.req_type == v.VIRTIO_BLK_T_IN else 0) + 1


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("read-4k", v.VIRTIO_BLK_T_IN, BLOCK, indirect=False),
        Variant("read-4k-indirect", v.VIRTIO_BLK_T_IN, BLOCK, indirect=True),
        Variant("write-4k", v.VIRTIO_BLK_T_OUT, BLOCK, indirect=False),
        Variant("flush", v.VIRTIO_BLK_T_FLUSH, 0, indirect=False),
    )
}


class Rig:
    """Driver memory, one ring of ``batch`` prepared requests and the device serving it."""

    def __init__(self, variant: Variant, queue_size: int, batch: int,
                 log_file: bool = False, native: bool = False, metrics: bool = False) -> None:
        if batch * variant.descriptors() > queue_size:
            raise SystemExit(f"{variant.name}: {batch} requests of {variant.descriptors()} "
                             f"descriptors do not fit a queue of {queue_size}")
        self.variant = variant
        self.batch = batch
        self.dmem = DriverMemory(size=(batch * (2 * BLOCK + 64) + 64 * queue_size + (1 << 20)))
        self.ring = MockSplitRing(self.dmem, queue_size)
        self.gmem = self.dmem.guest_memory()
        self.ring.set_used_event(0)
        self.queue = SplitQueue(self.gmem, queue_size, self.ring.desc_addr,
                                self.ring.avail_addr, self.ring.used_addr,
                                event_idx=True, indirect=True)
        backend = NullBackend(DISK_SIZE)
        self.handler = BlkHandler(backend, BlkConfig.for_backend(backend, queue_size=queue_size))
        plan = self.handler.native_plan() if native else None
        handle = self.handler.handle
        counted: dict[str, Any] = {}
        if metrics:
            from pyvduse.metrics import ExportMetrics

            self.metrics = ExportMetrics()
            self.handler.measure(self.metrics.requests)
            handle = self.handler.handle_measured
            counted["cells"] = self.metrics.queue_cells(0)
        self.interrupts = 0
        self._kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.log: Any = None
        self._log_dir: Any = None
        if log_file:  # a file-backed inflight log, as the daemon keeps by default
            from pyvduse.inflight import InflightLog

            self._log_dir = tempfile.TemporaryDirectory(prefix="datapath-")
            self.log = InflightLog.create(os.path.join(self._log_dir.name, "bench.inflight"), 1,
                                          queue_size, {"bench": True}, DISK_SIZE)
            self.worker = QueueWorker("bench", self.queue, handle, self._kick_fd,
                                      self._notify, log=self.log.queues[0], native=plan,
                                      **counted)
        else:
            self.worker = QueueWorker("bench", self.queue, handle, self._kick_fd,
                                      self._notify, native=plan, **counted)
        self.status: list[Buffer] = []
        self.heads: list[int] = []
        sectors = DISK_SIZE // 512
        for i in range(batch):
            sector = (i * 8 * 977) % sectors  # spread over the disk, 4 KiB aligned
            bufs = [self.dmem.buffer(v.virtio_blk_outhdr.pack(variant.req_type, 0, sector))]
            if variant.data:
                bufs.append(self.dmem.buffer(variant.data,
                                             writable=variant.req_type == v.VIRTIO_BLK_T_IN))
            status = self.dmem.buffer(b"\xee", writable=True)
            bufs.append(status)
            self.status.append(status)
            self.heads.append(self.ring.add_chain(bufs, indirect=variant.indirect,
                                                  publish=False))

    def _notify(self) -> None:
        self.interrupts += 1

    def submit(self) -> None:
        """Driver side: make every prepared request available (not timed)."""
        self.ring.publish(self.heads)

    def complete(self, check: bool) -> None:
        """Driver side: collect the completions and re-arm ``used_event`` (not timed)."""
        used = self.ring.take_used()
        if len(used) != self.batch:
            raise SystemExit(f"{self.variant.name}: {len(used)} completions, "
                             f"expected {self.batch}")
        if check:
            want = self.variant.expected_used_len()
            if sorted(used) != sorted((head, want) for head in self.heads):
                raise SystemExit(f"{self.variant.name}: wrong completions {used[:4]}...")
            for status in self.status:
                if self.dmem.read(status.addr, 1) != bytes([v.VIRTIO_BLK_S_OK]):
                    raise SystemExit(f"{self.variant.name}: a request did not complete OK")
                self.dmem.write(status.addr, b"\xee")

    def close(self) -> None:
        self.worker.close()
        os.close(self._kick_fd)
        self.queue.release()
        self.gmem.invalidate()
        self.dmem.close()
        if self.log is not None:
            self.log.remove()
            self._log_dir.cleanup()


def measure(rig: Rig, seconds: float, drain: Callable[[], None] | None = None
            ) -> tuple[float, float]:
    """Run rounds until ``seconds`` of device CPU time have passed.

    Returns the device side's (CPU seconds, wall seconds): the sums over the
    ``drain()`` calls of this thread's CPU time and of ``perf_counter``. CPU
    time is what "per core" means and is robust against other processes
    competing for the CPU; wall time includes any preemption.
    """
    drain = drain or rig.worker.drain
    wall_clock = time.perf_counter
    cpu_clock = time.thread_time
    cpu = wall = 0.0
    rounds = 0
    while cpu < seconds:
        rig.submit()
        start_cpu = cpu_clock()
        start_wall = wall_clock()
        drain()
        wall += wall_clock() - start_wall
        cpu += cpu_clock() - start_cpu
        rounds += 1
        rig.complete(check=rounds % 64 == 1)
    return cpu, wall


def run_variant(variant: Variant, args: argparse.Namespace) -> dict[str, object]:
    """Measure one variant ``args.repeat`` times; keep the best and the median."""
    rig = Rig(variant, args.queue_size, args.batch, args.inflight_log,
              getattr(args, "datapath", "python") == "native", getattr(args, "metrics", False))
    try:
        measure(rig, min(0.2, args.seconds))  # warm-up: faults the mappings in, fills caches
        rates = []
        wall_rates = []
        for _ in range(args.repeat):
            before = rig.worker.requests
            cpu, wall = measure(rig, args.seconds)
            rates.append((rig.worker.requests - before) / cpu)
            wall_rates.append((rig.worker.requests - before) / wall)
        best = max(rates)
        return {
            "ring_descriptors_per_request": variant.descriptors(),
            "indirect": variant.indirect,
            "req_per_s": round(best),
            "ns_per_req": round(1e9 / best, 1),
            "req_per_s_median": round(statistics.median(rates)),
            "req_per_s_runs": [round(rate) for rate in rates],
            "wall_req_per_s_best": round(max(wall_rates)),
            "interrupts_per_batch": round(rig.interrupts / (rig.worker.requests / args.batch), 3),
        }
    finally:
        rig.close()


def profile_variant(variant: Variant, args: argparse.Namespace) -> None:
    """Run one variant under cProfile (device side only) and print the top 25 functions."""
    rig = Rig(variant, args.queue_size, args.batch, args.inflight_log,
              getattr(args, "datapath", "python") == "native", getattr(args, "metrics", False))
    profiler = cProfile.Profile()

    def drain() -> None:
        profiler.enable()
        rig.worker.drain()
        profiler.disable()

    try:
        measure(rig, args.seconds, drain)
    finally:
        rig.close()
    print(f"\n== cProfile, {variant.name} (batch {args.batch}), device side only")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64,
                        help="requests made available per round (default 64)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="device CPU time measured per run (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; best is kept")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="run only these variants (repeatable)")
    parser.add_argument("--json", metavar="OUT",
                        help="also add the results to this JSON file (created if missing)")
    parser.add_argument("--label", default="", help="a note stored with the results")
    parser.add_argument("--profile", action="store_true",
                        help="run each variant under cProfile and print the top 25 functions")
    parser.add_argument("--datapath", choices=("python", "native"), default="python",
                        help="serve through the pure-Python path (default) or the compiled "
                             "one (pyvduse._fastpath)")
    parser.add_argument("--metrics", action="store_true",
                        help="count every request, as the daemon does with --metrics")
    parser.add_argument("--inflight-log", action="store_true",
                        help="mark the heads in a memory-mapped inflight log file, as the "
                             "daemon does, instead of the worker's in-memory record")
    args = parser.parse_args(argv)
    has_log = importlib.util.find_spec("pyvduse.inflight") is not None
    if args.inflight_log and not has_log:
        parser.error("--inflight-log: this pyvduse has no inflight log")
    chosen = [VARIANTS[name] for name in args.variant or VARIANTS]

    if args.profile:
        for variant in chosen:
            profile_variant(variant, args)
        return 0

    gc.collect()
    results = {}
    inflight_log = ("a file" if args.inflight_log else "memory") if has_log else \
        "none (this pyvduse predates it)"
    print(f"queue size {args.queue_size}, batch {args.batch}, {args.seconds:g} s x "
          f"{args.repeat} runs per variant, {args.datapath} data path, "
          f"{platform.python_implementation()} "
          f"{platform.python_version()}, single thread, inflight record in {inflight_log}, "
          f"metrics {'counted' if args.metrics else 'off'}")
    print("req/s per core: requests / CPU seconds of the drain() calls (best and median runs)")
    print(f"{'variant':<18} {'req/s (best)':>14} {'ns/req':>8} {'req/s (median)':>15} "
          f"{'req/s (wall)':>13}")
    for variant in chosen:
        result = run_variant(variant, args)
        results[variant.name] = result
        print(f"{variant.name:<18} {result['req_per_s']:>14,} {result['ns_per_req']:>8} "
              f"{result['req_per_s_median']:>15,} {result['wall_req_per_s_best']:>13,}")
    if args.json:
        run = {
            "label": args.label,
            "commit": _git_commit(),
            "date": datetime.date.today().isoformat(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "python_build": " ".join(platform.python_build()),
            "machine": platform.machine(),
            "cpu": _cpu_model(),
            "queue_size": args.queue_size,
            "batch": args.batch,
            "seconds_per_run": args.seconds,
            "runs": args.repeat,
            "clock": "thread CPU time around drain() (wall: perf_counter)",
            "inflight_record": inflight_log,
            "datapath": args.datapath,
            "metrics": args.metrics,
            "results": results,
        }
        report: dict[str, Any] = {"benchmark": "bench/datapath.py", "runs": []}
        if os.path.exists(args.json):  # add to the runs already there
            with open(args.json) as old:
                report = json.load(old)
        report["runs"].append(run)
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    return 0


def _git_commit() -> str:
    """The commit of the pyvduse measured (``-dirty`` with uncommitted changes), or ''."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=os.path.dirname(os.path.abspath(pyvduse.__file__)), capture_output=True,
            text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
