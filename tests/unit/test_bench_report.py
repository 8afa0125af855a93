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
    assert t["vs-qsd/randread-4k-qd1"]["value"] == pytest.approx(0.8)  # against aio=threads
    assert t["vs-qsd/randread-4k-qd1"]["met"] is False
    assert t["vs-qsd/randread-4k-qd1"]["verdict"] == "missed by 20%"
    assert t["vs-qsd/mixed-4k-qd16-1q1j"]["verdict"] == "met (+0%)"  # 1000 vs 1000
    assert t["vs-nbdkit-python/randread-4k-qd1"]["value"] == pytest.approx(2.5)
    assert t["vs-nbdkit-python/randread-4k-qd1"]["verdict"] == "met (+25%)"
    # scaling: pyvduse 1.8x from one queue to two, required 1.5x
    assert t["scaling"]["value"] == pytest.approx(1.8)
    assert t["scaling"]["met"] is True
    assert t["scaling"]["verdict"] == "met (+20%)"
    # RSS: 30 MiB against the smaller QSD (10 MiB) + 16 MiB
    assert t["rss"]["met"] is False
    assert t["rss"]["verdict"] == "missed by 4.0 MiB"
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-file / qsd-threads"] == 0.8
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-file / kernel-file"] is None
    assert res["targets_total"] == 2 * len(WORKLOADS) + 2


def test_missing_peers_are_not_measured_and_errors_are_listed() -> None:
    res = report.compute(raw([
        peer("pyvduse-file", {"randread-4k-qd1": 900.0}, rss=20 << 20),
        peer("qsd-threads", {}, errors=["1 queue(s): vdpa dev add qsd0: Invalid argument"]),
    ]), HOST)
    t = targets(res)
    assert t["vs-qsd/randread-4k-qd1"]["met"] is None
    assert t["vs-qsd/randread-4k-qd1"]["verdict"] == "not measured"
    assert t["rss"]["met"] is None
    md = report.markdown(res)
    assert "vdpa dev add qsd0: Invalid argument" in md
    assert f"0 of {2 * len(WORKLOADS) + 2} targets met" in md


RBD = ["randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32",
       "seqread-1m-qd8", "seqwrite-1m-qd8"]


def remote_peer(pid: str, iops: dict[str, float], *, group: str, server_cpu: float | None,
                rbd: bool = False, errors: list[str] | None = None) -> dict[str, Any]:
    entry = peer(pid, iops, errors=errors)
    entry["group"] = group
    if rbd:
        entry.update(remote=True, backing="rbd", workloads=list(RBD), size=256 << 20)
        entry["phases"] = entry["phases"][:1]
    else:
        entry.update(remote=False, workloads=list(WORKLOADS))
    if group == "kernel":
        entry["daemon"] = False
    for result in entry["results"].values():
        if group in ("kernel", "nbd"):
            result.pop("daemon_cpu_seconds")
            result.pop("daemon_cpu_percent")
        if group == "nbd":  # the kernel nbd client: nbdkit is both daemon and server
            result.update(daemon_cpu_seconds=server_cpu, daemon_cpu_percent=25.0)
        if server_cpu is not None:
            result.update(server_cpu_seconds=server_cpu, server_cpu_percent=25.0)
    return entry


def remote_run(kernel_rbd_errors: list[str] | None = None) -> dict[str, Any]:
    data = raw([
        peer("pyvduse-file", flat(1000.0), rss=20 << 20),
        remote_peer("nbdkit-file", flat(500.0), group="nbd", server_cpu=3.0),
        remote_peer("pyvduse-nbd", flat(600.0), group="pyvduse", server_cpu=3.0),
        remote_peer("pyvduse-rbd", dict.fromkeys(RBD, 300.0), group="pyvduse", server_cpu=6.0,
                    rbd=True),
        remote_peer("qsd-rbd", dict.fromkeys(RBD, 400.0), group="qsd", server_cpu=6.0,
                    rbd=True),
        remote_peer("kernel-rbd", {} if kernel_rbd_errors else dict.fromkeys(RBD, 250.0),
                    group="kernel", server_cpu=6.0, rbd=True, errors=kernel_rbd_errors),
    ])
    data["meta"].update(rbd_size=256 << 20, rbd_workloads=list(RBD), ceph="ceph version 16.2",
                        rbd={"cluster_start_seconds": 40.0, "image_fill_seconds": 9.5,
                             "image": "rbd/bench"})
    return data


def test_remote_ratios_same_server_other_client() -> None:
    res = report.compute(remote_run(), HOST)
    row = res["ratios_iops"]["randread-4k-qd1"]
    assert row["pyvduse-nbd / nbdkit-file"] == pytest.approx(1.2)
    assert row["pyvduse-rbd / qsd-rbd"] == pytest.approx(0.75)
    assert row["pyvduse-rbd / kernel-rbd"] == pytest.approx(1.2)
    # the RBD peers do not run the mixed jobs: no ratio there, the nbd one only
    mixed = res["ratios_iops"]["mixed-4k-qd16-2q2j"]
    assert mixed["pyvduse-rbd / qsd-rbd"] is None
    assert mixed["pyvduse-nbd / nbdkit-file"] == pytest.approx(1.2)
    assert res["remote_ratio_columns"] == ["pyvduse-nbd / nbdkit-file", "pyvduse-rbd / qsd-rbd",
                                           "pyvduse-rbd / kernel-rbd"]
    # no scaling figure for peers that did not run both mixed jobs
    assert "qsd-rbd" not in res["scaling"] and "pyvduse-nbd" in res["scaling"]
    # CPU per I/O: 6 s of OSD time over 12 s at 300 IOPS
    rbd = res["peers"][3]["results"]["randread-4k-qd1"]
    assert rbd["server_cpu_us_per_io"] == pytest.approx(1e6 * 6 / (300 * 12))
    # the remote targets: nbd on every workload both ran, rbd on the RBD workloads
    t = targets(res)
    nbd = t["pyvduse-nbd/nbdkit-file/randread-4k-qd1"]
    assert nbd["value"] == pytest.approx(1.2) and nbd["met"] is True
    rbd_row = t["pyvduse-rbd/qsd-rbd/randread-4k-qd1"]
    assert rbd_row["value"] == pytest.approx(0.75) and rbd_row["verdict"] == "missed by 25%"
    assert "pyvduse-rbd/qsd-rbd/mixed-4k-qd16-2q2j" not in t
    assert res["targets_total"] == 2 * len(WORKLOADS) + 2 + len(WORKLOADS) + len(RBD)


def test_remote_section_in_the_report() -> None:
    res = report.compute(remote_run(), HOST)
    md = report.markdown(res)
    section = md.split("## Remote storage")[1].split("## Every figure")[0]
    assert ("| workload | pyvduse nbd/nbdkit file | pyvduse rbd/qsd rbd | pyvduse rbd/kernel rbd |"
            in section)
    assert "| randread-4k-qd1 | 1.20x | 0.75x | 1.20x |" in section
    assert "| mixed-4k-qd16-1q1j | 1.20x | n/a | n/a |" in section
    # client CPU: pyvduse's own; the kernel clients' is not measured; server CPU for all
    assert "| randread-4k-qd1 | nbdkit file | 500 | 2.0 | 100 | 300 | kernel | 25 | 500 |" \
        in section
    assert "| randread-4k-qd1 | pyvduse nbd | 600 | 2.3 | 100 | 300 | 10 | 25 | 583 |" in section
    assert "| randread-4k-qd1 | kernel rbd | 250 | 1.0 | 100 | 300 | kernel | 25 | 2,000 |" \
        in section
    assert "mixed-4k-qd16-1q1j | qsd rbd" not in section
    # the every-figure tables say why an RBD peer has no mixed figures, and it is no error
    figures = md.split("## Every figure")[1]
    assert "| qsd rbd | not run (the RBD peers run a subset of the workloads) |" in figures
    assert "## Errors" not in md
    assert "Ceph (RBD peers) | ceph version 16.2;" in md
    assert "(RBD peers: 256.0 MiB image)" in md


def test_remote_peer_failures_are_listed() -> None:
    res = report.compute(remote_run(["start with 1 queue(s): rbd map: No such device"]), HOST)
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-rbd / kernel-rbd"] is None
    md = report.markdown(res)
    assert "| randread-4k-qd1 | kernel rbd | failed |" in md
    assert "* kernel rbd: start with 1 queue(s): rbd map: No such device" in md


def test_no_remote_section_without_remote_pairs() -> None:
    res = report.compute(raw([peer("pyvduse-file", flat(1000.0)),
                              peer("nbdkit-file", flat(500.0))]), HOST)
    assert res["remote_ratio_columns"] == []
    assert "Remote storage" not in report.markdown(res)


def test_older_runs_count_nbdkit_as_the_server() -> None:
    """raw.json of runs before the server CPU was measured: nbdkit is the daemon."""
    nbdkit_file = peer("nbdkit-file", flat(500.0)) | {"group": "nbd"}
    res = report.compute(raw([nbdkit_file, peer("pyvduse-nbd", flat(500.0))]), HOST)
    nbdkit = res["peers"][0]["results"]["randread-4k-qd1"]
    assert nbdkit["server_cpu_percent"] == 10.0
    assert "server_cpu_percent" not in res["peers"][1]["results"]["randread-4k-qd1"]


def test_chart_with_remote_peers(tmp_path: Path) -> None:
    res = report.compute(remote_run(), HOST)
    report.chart(res, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_a_run_of_the_remote_peers_only() -> None:
    """bench/run --peers pyvduse-nbd,nbdkit-file,...: no target, no empty ratio table."""
    data = remote_run()
    data["peers"] = data["peers"][1:]  # without pyvduse-file
    md = report.markdown(report.compute(data, HOST))
    assert "None measured: this run had none of pyvduse-file" in md
    assert "## Ratios pyvduse / peer" not in md
    assert "| randread-4k-qd1 | 1.20x | 0.75x | 1.20x |" in md


def rounds_entry(pid: str, per_round: dict[str, list[float]]) -> dict[str, Any]:
    """A peer that ran every job in several rounds, as bench/guest_bench.py records it."""
    entry = peer(pid, {})
    for w, values in per_round.items():
        done = []
        for n, iops in enumerate(values, 1):
            done.append({"iops": iops, "bw_bytes": iops * 4096, "lat_mean_us": 100.0 * n,
                         "lat_p99_us": 300.0, "daemon_cpu_seconds": 1.2,
                         "daemon_cpu_percent": 10.0, "round": n, "queues": 1,
                         "dirs": {"read": {"iops": iops, "ios": 10 * n}}})
        entry.setdefault("rounds", {})[w] = done
        entry["results"][w] = report.mean_of_rounds(done)
    return entry


def test_mean_of_rounds() -> None:
    rounds = [{"iops": 100.0, "lat_p99_us": 300, "queues": 1, "round": 1, "flag": True,
               "dirs": {"write": {"iops": 100.0, "ios": 10}}, "name": "a"},
              {"iops": 200.0, "lat_p99_us": 500, "queues": 1, "round": 2, "flag": False,
               "dirs": {"write": {"iops": 200.0, "ios": 30}}, "name": "b"}]
    m = report.mean_of_rounds(rounds)
    assert m["iops"] == 150.0
    assert m["lat_p99_us"] == 400.0
    assert m["queues"] == 1
    assert m["dirs"] == {"write": {"iops": 150.0, "ios": 20.0}}
    assert m["flag"] is True and m["name"] == "a"  # not numbers: the first round's
    assert "round" not in m
    assert m["rounds"] == 2 and m["rounds_iops"] == [100.0, 200.0]
    assert report.mean_of_rounds(rounds[:1])["iops"] == 100.0
    with pytest.raises(ValueError):
        report.mean_of_rounds([])


def test_log_cost_pairs_the_rounds() -> None:
    data = raw([rounds_entry("pyvduse-file", {"randread-4k-qd1": [900.0, 1100.0],
                                              "randwrite-4k-qd32": [800.0, 1000.0]}),
                rounds_entry("pyvduse-nolog", {"randread-4k-qd1": [1000.0, 1000.0],
                                               "randwrite-4k-qd32": [1000.0]})])
    data["meta"]["rounds"] = 2
    res = report.compute(data, HOST)
    rows = {r["workload"]: r for r in res["log_cost"]}
    assert list(rows) == ["randread-4k-qd1", "randwrite-4k-qd32"]  # the others did not run
    read = rows["randread-4k-qd1"]
    assert read["iops_with"] == [900.0, 1100.0] and read["iops_without"] == [1000.0, 1000.0]
    assert read["ratio"] == pytest.approx(1.0)
    assert read["round_ratios"] == [pytest.approx(0.9), pytest.approx(1.1)]
    write = rows["randwrite-4k-qd32"]  # round 2 of the run without the log failed
    assert write["ratio"] == pytest.approx(0.9)
    assert write["round_ratios"] == [pytest.approx(0.8)]
    assert res["ratios_iops"]["randread-4k-qd1"]["pyvduse-file / pyvduse-nolog"] == \
        pytest.approx(1.0)
    md = report.markdown(res)
    section = md.split("## Cost of the inflight log")[1].split("## Every figure")[0]
    assert "2 round(s)" in section
    assert "| randread-4k-qd1 | 900, 1,100 | 1,000, 1,000 | 1.00x | 0.90x, 1.10x | " \
           "300 / 300 | 100.0 / 100.0 |" in section
    assert "| randwrite-4k-qd32 | 800, 900 |" not in section
    assert "| randwrite-4k-qd32 | 800, 1,000 | 1,000 | 0.90x | 0.80x |" in section


def test_no_log_cost_without_both_peers() -> None:
    res = report.compute(raw([peer("pyvduse-file", flat(1000.0))]), HOST)
    assert res["log_cost"] == []
    assert "Cost of the inflight log" not in report.markdown(res)
    one_round = report.compute(raw([peer("pyvduse-file", flat(1000.0)),
                                    peer("pyvduse-nolog", flat(800.0))]), HOST)
    assert one_round["log_cost"][0]["round_ratios"] == [pytest.approx(1.25)]


def test_metrics_cost_is_the_metrics_peer_against_pyvduse_file() -> None:
    data = raw([rounds_entry("pyvduse-file", {"randread-4k-qd1": [1000.0, 1000.0]}),
                rounds_entry("pyvduse-metrics", {"randread-4k-qd1": [950.0, 970.0]})])
    data["meta"]["rounds"] = 2
    res = report.compute(data, HOST)
    (row,) = res["metrics_cost"]
    assert row["iops_with"] == [950.0, 970.0] and row["iops_without"] == [1000.0, 1000.0]
    assert row["ratio"] == pytest.approx(0.96)
    assert row["round_ratios"] == [pytest.approx(0.95), pytest.approx(0.97)]
    assert res["log_cost"] == []
    md = report.markdown(res)
    section = md.split("## Cost of metrics")[1].split("## ")[0]
    assert "`--metrics 127.0.0.1:0`" in section and "2 round(s)" in section
    assert "| randread-4k-qd1 | 950, 970 | 1,000, 1,000 | 0.96x | 0.95x, 0.97x |" in section
    assert "Cost of the inflight log" not in md
