"""bench/report.py: ratios and targets of the side-by-side benchmark from a made-up run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import report  # bench/ is not a package

WORKLOADS = ["randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32",
             "seqread-1m-qd8", "seqwrite-1m-qd8", "mixed-4k-qd16-1q1j", "mixed-4k-qd16-2q2j"]


def peer(pid: str, iops: dict[str, float], rss: int | None = None,
         errors: list[str] | None = None) -> dict[str, Any]:
    results = {w: {"iops": v, "bw_bytes": v * 4096, "lat_mean_us": 100.0, "lat_p99_us": 300.0,
                   "daemon_cpu_seconds": 1.2, "daemon_cpu_percent": 10.0}
               for w, v in iops.items()}
    phases: list[dict[str, Any]] = [{"queues": 1, "command": f"{pid} serve"},
                                    {"queues": 2, "command": f"{pid} serve"}]
    if rss is not None:
        phases[0]["rss_peak"] = rss
    return {"id": pid, "label": pid.replace("-", " "), "group": pid.split("-")[0],
            "backing": "null" if pid.endswith("null") else "file", "daemon": True,
            "phases": phases, "results": results, "errors": errors or []}


def raw(peers: list[dict[str, Any]]) -> dict[str, Any]:
    meta = {"runtime": 10, "ramp": 2, "smoke": False, "guest_cpus": 2, "guest_mem_bytes": 4 << 30,
            "guest_kernel": "6.12", "qemu_storage_daemon": "7.2", "nbdkit": "1.32",
            "nbd_client": "3.24", "fio": "fio-3.33", "python": "3.11", "queue_size": 256,
            "fio_common": "--direct=1"}
    return {"meta": meta, "peers": peers,
            "workloads": [{"id": w, "label": w, "fio": f"--name={w}"} for w in WORKLOADS]}


HOST = {"date": "2026-01-01", "command": "bench/run", "machine": "test", "wall_seconds": 60}


def flat(v: float) -> dict[str, float]:
    return dict.fromkeys(WORKLOADS, v)


def targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in res["targets"]}


def test_ratios_use_the_better_qsd_and_report_margins() -> None:
    pyv = flat(1000.0) | {"mixed-4k-qd16-1q1j": 1000.0, "mixed-4k-qd16-2q2j": 1800.0}
    threads = flat(1250.0) | {"mixed-4k-qd16-1q1j": 1000.0, "mixed-4k-qd16-2q2j": 1500.0}
    uring = flat(800.0) | {"mixed-4k-qd16-1q1j": 1000.0, "mixed-4k-qd16-2q2j": 1600.0}
    res = report.compute(raw([
        peer("pyvduse-file", pyv, rss=30 << 20),
        peer("qsd-threads", threads, rss=10 << 20),
        peer("qsd-io_uring", uring, rss=12 << 20),
        peer("nbdkit-python", flat(400.0)),
    ]), HOST)
    t = targets(res)
    assert t["randread-qd1"]["value"] == pytest.approx(0.8)  # against aio=threads, the faster
    assert t["randread-qd1"]["met"] is False
    assert t["randread-qd1"]["verdict"] == "missed by 20%"
    assert t["randread-qd32"]["met"] is True  # 0.8x of the best QSD, required 0.8x
    assert t["seqread-1m"]["verdict"] == "missed by 11%"  # 0.8 / 0.9
    assert t["vs-nbdkit-python/randread-4k-qd1"]["value"] == pytest.approx(2.5)
    assert t["vs-nbdkit-python/randread-4k-qd1"]["verdict"] == "met (+25%)"
    # scaling: pyvduse 1.8x against the better QSD scaling 1.6x
    assert t["scaling"]["value"] == pytest.approx(1.8 / 1.6)
    assert t["scaling"]["met"] is True
    # RSS: 30 MiB against the smaller QSD (10 MiB) + 16 MiB
    assert t["rss"]["met"] is False
    assert t["rss"]["verdict"] == "missed by 4.0 MiB"
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-file / qsd-threads"] == 0.8
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-file / kernel-file"] is None
    assert res["targets_total"] == 5 + len(WORKLOADS) + 2


def test_missing_peers_are_not_measured_and_errors_are_listed() -> None:
    res = report.compute(raw([
        peer("pyvduse-file", {"randread-4k-qd1": 900.0}, rss=20 << 20),
        peer("qsd-threads", {}, errors=["1 queue(s): vdpa dev add qsd0: Invalid argument"]),
    ]), HOST)
    t = targets(res)
    assert t["randread-qd1"]["met"] is None
    assert t["randread-qd1"]["verdict"] == "not measured"
    assert t["rss"]["met"] is None
    md = report.markdown(res)
    assert "vdpa dev add qsd0: Invalid argument" in md
    assert "0 of 15 targets met" in md
