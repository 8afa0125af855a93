"""Turn the guest's raw.json into ratios, targets, results.json, results.md and chart.png.

Pure functions of the data (no VM, no subprocess), used by bench/host.py; the
chart needs matplotlib (the ``bench`` optional dependencies).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

PYVDUSE = "pyvduse-file"
PYVDUSE_NULL = "pyvduse-null"
PYVDUSE_NOLOG = "pyvduse-nolog"  # pyvduse file without its inflight log (test-only switch)
PYVDUSE_METRICS = "pyvduse-metrics"  # pyvduse file with --metrics (every request counted)
QSD_FILE = ("qsd-threads", "qsd-io_uring")
NBD_PYTHON = "nbdkit-python"
SCALING_FROM, SCALING_TO = "mixed-4k-qd16-1q1j", "mixed-4k-qd16-2q2j"
RSS_SLACK = 16 << 20

# The compiled data path's targets: pyvduse (file) at least as fast as QSD at its best
# on every workload; 1.5x from one queue to two on the mixed job; 2x nbdkit's Python
# plugin everywhere; as a client, 0.8x the kernel nbd client and 1.0x QSD's rbd driver.
QSD_RATIO = 1.0
SCALING_RATIO = 1.5
NBD_PYTHON_RATIO = 2.0
# (pyvduse peer, peer, ratio required, what the peer is) of the remote client targets
REMOTE_TARGETS = [
    ("pyvduse-nbd", "nbdkit-file", 0.8, "the kernel nbd client on the same nbdkit"),
    ("pyvduse-rbd", "qsd-rbd", 1.0, "QSD's rbd driver on the same image"),
]

# Ratio columns: pyvduse with a file backend against every peer on the file,
# pyvduse null against every null device.
RATIO_PEERS = [
    (PYVDUSE, PYVDUSE_NOLOG),
    (PYVDUSE, "qsd-threads"), (PYVDUSE, "qsd-io_uring"), (PYVDUSE, "nbdkit-file"),
    (PYVDUSE, NBD_PYTHON), (PYVDUSE, "kernel-file"),
    (PYVDUSE_NULL, "qsd-null"), (PYVDUSE_NULL, "nbdkit-null"), (PYVDUSE_NULL, "kernel-null_blk"),
]
# Remote storage: pyvduse as the client of the same server as its peer. pyvduse's
# nbd backend against the kernel nbd client, both on an nbdkit file instance of
# the same command; pyvduse's rbd backend against QSD's rbd driver and the kernel
# rbd client, all on the same image of the same Ceph cluster.
PYVDUSE_NBD, PYVDUSE_RBD = "pyvduse-nbd", "pyvduse-rbd"
REMOTE_RATIO_PEERS = [
    (PYVDUSE_NBD, "nbdkit-file"), (PYVDUSE_RBD, "qsd-rbd"), (PYVDUSE_RBD, "kernel-rbd"),
]


def mean_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One job's figures over several rounds: the mean of every number (nested ones too,
    e.g. per direction) present in every round; anything else from the first round.
    ``rounds_iops`` lists each round's IOPS."""

    def mean(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values]) if all(isinstance(v, dict) and k in v
                                                            for v in values) else first[k]
                    for k in first}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return sum(values) / len(values)
        return first

    if not rounds:
        raise ValueError("no rounds to combine")
    out: dict[str, Any] = mean(rounds)
    out.pop("round", None)
    out["rounds"] = len(rounds)
    out["rounds_iops"] = [r["iops"] for r in rounds]
    return out


def _iops_by_round(entry: dict[str, Any], workload: str) -> dict[int, float]:
    """IOPS of each round of ``workload`` (one round: the result itself)."""
    rounds = entry.get("rounds", {}).get(workload)
    if not rounds:
        return {1: float(entry["results"][workload]["iops"])}
    return {int(r.get("round", i + 1)): float(r["iops"]) for i, r in enumerate(rounds)}


def feature_cost(peers: dict[str, Any], workloads: list[str], with_peer: str,
                 without_peer: str) -> list[dict[str, Any]]:
    """What a feature of pyvduse costs: the peer with it against the same command
    without it (the inflight log: pyvduse-file against pyvduse-nolog; metrics:
    pyvduse-metrics against pyvduse-file), per workload.

    Each row: IOPS of every round with and without, the ratio of their means and
    of each round's pair (the two ran one after the other), p99 latency and
    daemon CPU per I/O with and without. Empty unless both ran.
    """
    if with_peer not in peers or without_peer not in peers:
        return []
    rows = []
    for w in workloads:
        on, off = peers[with_peer]["results"].get(w), peers[without_peer]["results"].get(w)
        if on is None or off is None:
            continue
        with_it = _iops_by_round(peers[with_peer], w)
        without = _iops_by_round(peers[without_peer], w)
        pairs = [_ratio(with_it[n], without[n]) for n in sorted(with_it) if n in without]
        rows.append({
            "workload": w,
            "iops_with": [with_it[n] for n in sorted(with_it)],
            "iops_without": [without[n] for n in sorted(without)],
            "ratio": _ratio(float(on["iops"]), float(off["iops"])),
            "round_ratios": pairs,
            "p99_with_us": on.get("lat_p99_us"),
            "p99_without_us": off.get("lat_p99_us"),
            "cpu_us_per_io_with": on.get("daemon_cpu_us_per_io"),
            "cpu_us_per_io_without": off.get("daemon_cpu_us_per_io"),
        })
    return rows


def _get(peers: dict[str, Any], peer: str, workload: str, key: str = "iops") -> float | None:
    entry = peers.get(peer)
    if entry is None:
        return None
    result = entry["results"].get(workload)
    if result is None:
        return None
    value = result.get(key)
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rss_peak(entry: dict[str, Any], queues: int = 1) -> int | None:
    for phase in entry.get("phases", []):
        if phase.get("queues") == queues and "rss_peak" in phase:
            return int(phase["rss_peak"])
    return None


def cpu_us_per_io(result: dict[str, Any], seconds: float,
                  key: str = "daemon_cpu_seconds") -> float | None:
    cpu = result.get(key)
    if cpu is None or not result.get("iops"):
        return None
    return 1e6 * float(cpu) / (float(result["iops"]) * seconds)


def scheduled(entry: dict[str, Any], workload: str) -> bool:
    """Whether the peer was to run ``workload`` (the RBD peers run a subset)."""
    return workload in entry.get("workloads", [workload])


def _target(tid: str, what: str, value: float | None, required: float, detail: str,
            higher_is_better: bool = True, unit: str = "x") -> dict[str, Any]:
    """A target row; ``margin`` is how far past (>0) or short of (<0) the threshold."""
    row: dict[str, Any] = {"id": tid, "target": what, "value": value, "required": required,
                           "unit": unit, "detail": detail}
    if value is None:
        row.update(met=None, margin=None, verdict="not measured")
        return row
    if unit == "x":
        margin = value / required - 1
        row["margin"] = margin
        row["met"] = margin >= 0
        row["verdict"] = (f"met (+{margin:.0%})" if margin >= 0
                          else f"missed by {-margin:.0%}")
    else:  # bytes, lower is better: value <= required
        margin = required - value
        row["margin"] = margin
        row["met"] = margin >= 0
        mib = abs(margin) / 2**20
        row["verdict"] = (f"met ({mib:.1f} MiB to spare)" if margin >= 0
                          else f"missed by {mib:.1f} MiB")
    return row


def compute(raw: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    """results.json: everything measured plus the ratios and the targets."""
    meta = raw["meta"]
    seconds = float(meta["runtime"]) + float(meta["ramp"])
    workloads = [w["id"] for w in raw["workloads"]]
    peers = {p["id"]: p for p in raw["peers"]}
    for entry in peers.values():
        for result in entry["results"].values():
            if "server_cpu_seconds" not in result and entry["group"] == "nbd":
                # runs before the server CPU was recorded: nbdkit is the daemon
                for k in ("cpu_seconds", "cpu_percent"):
                    if f"daemon_{k}" in result:
                        result[f"server_{k}"] = result[f"daemon_{k}"]
            result["daemon_cpu_us_per_io"] = cpu_us_per_io(result, seconds)
            result["server_cpu_us_per_io"] = cpu_us_per_io(result, seconds,
                                                           "server_cpu_seconds")

    ratios: dict[str, dict[str, float | None]] = {}
    for w in workloads:
        ratios[w] = {f"{a} / {b}": _ratio(_get(peers, a, w), _get(peers, b, w))
                     for a, b in RATIO_PEERS + REMOTE_RATIO_PEERS}

    def qsd_best(w: str) -> tuple[str | None, float | None]:
        best = [(v, q) for q in QSD_FILE if (v := _get(peers, q, w)) is not None]
        if not best:
            return None, None
        v, q = max(best)
        return q, v

    targets = []
    for w in workloads:
        q, qv = qsd_best(w)
        pv = _get(peers, PYVDUSE, w)
        targets.append(_target(f"vs-qsd/{w}", f"{w}: pyvduse file >= {QSD_RATIO:.1f}x QSD",
                               _ratio(pv, qv), QSD_RATIO,
                               f"pyvduse {_fmt(pv)} IOPS vs {q or 'QSD'} {_fmt(qv)} IOPS"))
    for w in workloads:
        pv, nv = _get(peers, PYVDUSE, w), _get(peers, NBD_PYTHON, w)
        targets.append(_target(f"vs-nbdkit-python/{w}",
                               f"{w}: pyvduse >= 2x nbdkit Python plugin + kernel nbd",
                               _ratio(pv, nv), NBD_PYTHON_RATIO,
                               f"pyvduse {_fmt(pv)} IOPS vs {_fmt(nv)} IOPS"))

    def scaling(peer: str) -> float | None:
        return _ratio(_get(peers, peer, SCALING_TO), _get(peers, peer, SCALING_FROM))

    qsd_scaling = [(s, q) for q in QSD_FILE if (s := scaling(q)) is not None]
    p_scaling = scaling(PYVDUSE)
    q_s, q_name = max(qsd_scaling) if qsd_scaling else (None, None)
    one_queue = _fmt(_get(peers, PYVDUSE, SCALING_FROM))
    two_queues = _fmt(_get(peers, PYVDUSE, SCALING_TO))
    targets.append(_target(
        "scaling", f"2 queues + 2 jobs vs 1 queue + 1 job (mixed 70/30 QD16): pyvduse "
        f"scales >= {SCALING_RATIO:.1f}x", p_scaling, SCALING_RATIO,
        f"pyvduse scales {_ratio_cell(p_scaling)} ({one_queue} -> {two_queues} IOPS), "
        f"{q_name or 'QSD'} {_ratio_cell(q_s)}"))
    for mine, other, required, what in REMOTE_TARGETS:
        if mine not in peers and other not in peers:
            continue  # a run without remote peers
        for w in workloads:
            if not all(scheduled(peers[p], w) for p in (mine, other) if p in peers):
                continue
            mv, ov = _get(peers, mine, w), _get(peers, other, w)
            targets.append(_target(f"{mine}/{other}/{w}",
                                   f"{w}: {mine} >= {required:.1f}x {what}",
                                   _ratio(mv, ov), required,
                                   f"{mine} {_fmt(mv)} IOPS vs {other} {_fmt(ov)} IOPS"))

    p_rss = rss_peak(peers[PYVDUSE]) if PYVDUSE in peers else None
    qsd_rss = [(r, q) for q in QSD_FILE if q in peers and (r := rss_peak(peers[q])) is not None]
    q_rss, q_rss_name = min(qsd_rss) if qsd_rss else (None, None)
    targets.append(_target(
        "rss", "daemon peak RSS, one 1 GiB file-backed device: pyvduse <= QSD + 16 MiB",
        float(p_rss) if p_rss is not None and q_rss is not None else None,
        float(q_rss + RSS_SLACK) if q_rss is not None else 0.0,
        f"pyvduse {_mib(p_rss)} vs {q_rss_name or 'QSD'} {_mib(q_rss)}",
        unit="bytes"))

    return {
        "host": host,
        "guest": meta,
        "workloads": raw["workloads"],
        "peers": raw["peers"],
        "ratios_iops": ratios,
        "remote_ratio_columns": [f"{a} / {b}" for a, b in REMOTE_RATIO_PEERS
                                 if a in peers and b in peers],
        "scaling": {p["id"]: scaling(p["id"]) for p in raw["peers"]
                    if scheduled(p, SCALING_FROM) and scheduled(p, SCALING_TO)},
        "log_cost": feature_cost(peers, workloads, PYVDUSE, PYVDUSE_NOLOG),
        "metrics_cost": feature_cost(peers, workloads, PYVDUSE_METRICS, PYVDUSE),
        "targets": targets,
        "targets_met": sum(1 for t in targets if t["met"]),
        "targets_total": len(targets),
    }


# ----------------------------------------------------------------- markdown

def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def _ratio_cell(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3f}x"


def markdown(res: dict[str, Any]) -> str:
    host, guest = res["host"], res["guest"]
    peers = res["peers"]
    labels = {p["id"]: p["label"] for p in peers}
    wl = {w["id"]: w for w in res["workloads"]}
    rbd = any(p.get("remote") for p in peers)
    out: list[str] = []
    add = out.append
    title = "pyvduse side-by-side benchmark" + (" (smoke run)" if guest.get("smoke") else "")
    add(f"# {title}, {host['date']}\n")
    add("Every figure below was measured in **one** boot of an emulated (QEMU TCG) guest: "
        "absolute numbers are far below real hardware and only the **ratios taken in the same "
        "run** mean anything.\n")
    add("| | |\n|---|---|")
    for k, v in [
        ("command", f"`{host['command']}`"),
        ("date", host["date"]),
        ("machine kind", host["machine"]),
        ("guest", f"QEMU TCG, {guest['guest_cpus']} vCPU, "
                  f"{guest['guest_mem_bytes'] / 2**30:.1f} GiB, kernel {guest['guest_kernel']}"),
        ("QEMU (guest emulator)", host.get("qemu", "?")),
        ("qemu-storage-daemon", guest["qemu_storage_daemon"]),
        ("nbdkit / nbd-client", f"{guest['nbdkit']} / {guest['nbd_client']}"),
        ("fio", guest["fio"]),
        ("pyvduse", f"{host.get('pyvduse_commit', '?')}, Python {guest['python']}"),
        ("fio jobs", f"{guest['fio_common']}, runtime {guest['runtime']:g} s after "
                     f"{guest['ramp']:g} s ramp, 1 GiB device, queue size {guest['queue_size']}"
                     + (f" (RBD peers: {_mib(guest['rbd_size'])} image)" if rbd else "")),
        *([("Ceph (RBD peers)", _ceph_cell(guest))] if rbd else []),
        ("full run took", f"{host.get('wall_seconds', 0) / 60:.1f} min (VM boot to power-off)"),
    ]:
        add(f"| {k} | {v} |")
    others = host.get("host_cpu_used_by_others")
    if others is not None:
        add(f"\nOther work on the host used {others:.2f} of its "
            f"{host.get('host_cpus', 2)} cores on average during the run "
            f"(QEMU needs both for the 2 vCPUs): the more, the noisier the figures.")
    if host.get("concurrent_guests"):
        add(f"\n**Warning:** another QEMU guest ran on the host during this run "
            f"({host['concurrent_guests']}); figures are noisier than usual.")
    add("")

    add("## Targets\n")
    if not {PYVDUSE, NBD_PYTHON, *QSD_FILE} & set(labels):
        add(f"None measured: this run had none of {PYVDUSE}, {', '.join(QSD_FILE)} and "
            f"{NBD_PYTHON}.\n")
    else:
        targets_md(res, add)

    # the columns whose two peers both ran (all of them in a full run)
    cols = [f"{a} / {b}" for a, b in RATIO_PEERS if a in labels and b in labels]
    if cols:
        add("## Ratios pyvduse / peer (IOPS, same run)\n")
        add("| workload | " + " | ".join(_column(c, labels) for c in cols) + " |")
        add("|---" * (len(cols) + 1) + "|")
        for w, row in res["ratios_iops"].items():
            add(f"| {wl[w]['label']} | "
                + " | ".join(_ratio_cell(row.get(c)) for c in cols) + " |")
        add("")
    if res["scaling"]:
        add("Scaling, IOPS of the mixed job on 2 queues + 2 jobs / on 1 queue + 1 job: "
            + ", ".join(f"{labels[p]} {_ratio_cell(s)}" for p, s in res["scaling"].items())
            + ".\n")

    remote_md(res, add)
    feature_costs_md(res, add)

    add("## Every figure\n")
    add("IOPS and MiB/s: reads + writes. Latency: fio's total latency (submission to "
        "completion); for the mixed jobs the mean is over all I/Os and p99 is the slower "
        "direction's. Daemon CPU: utime + stime of the server process (all threads) during "
        "the job, as % of one vCPU over ramp + runtime, and per I/O; the kernel's own work "
        "(virtio/nbd drivers, the nbd socket) is not in it and the kernel rows have no daemon.\n")
    for w in res["workloads"]:
        add(f"### {w['label']}\n")
        add(f"`fio {w['fio']}`\n")
        add("| peer | IOPS | MiB/s | mean lat µs | p99 lat µs | daemon CPU % | "
            "daemon CPU µs/IO |\n|---|---:|---:|---:|---:|---:|---:|")
        for p in peers:
            r = p["results"].get(w["id"])
            if r is None and not scheduled(p, w["id"]):
                add(f"| {p['label']} | not run ({_not_scheduled(p)}) | | | | | |")
                continue
            if r is None:
                err = "; ".join(e for e in p["errors"] if e.startswith(w["id"])
                                or "queue(s)" in e) or "not run"
                add(f"| {p['label']} | {err} | | | | | |")
                continue
            add(f"| {p['label']} | {_fmt(r['iops'])} | {_fmt(r['bw_bytes'] / 2**20, 1)} | "
                f"{_fmt(r['lat_mean_us'])} | {_fmt(r['lat_p99_us'])} | "
                f"{_fmt(r.get('daemon_cpu_percent'))} | "
                f"{_fmt(r.get('daemon_cpu_us_per_io'))} |")
        add("")

    add("## Daemons: memory and start-up\n")
    add("Peak RSS = VmHWM of the server process at the end of the phase (1 GiB device): "
        "the 1-queue phase ran the seven other workloads (1 MiB requests included), the "
        "2-queue phase only the mixed 4K job."
        + (" The RBD peers' device is the smaller image and their phases ran only their "
           "workloads; pyvduse nbd's figure is pyvduse's, without its nbdkit." if rbd else "")
        + "\n")
    add("| peer | RSS after start (1 queue) | peak RSS, 1 queue | peak RSS, 2 queues | "
        "start-up s (1 q / 2 q) |\n|---|---:|---:|---:|---:|")
    for p in peers:
        if not p["daemon"]:
            continue
        ph = {x["queues"]: x for x in p["phases"]}
        one, two = ph.get(1, {}), ph.get(2, {})
        add(f"| {p['label']} | {_mib(one.get('rss_at_start', one.get('pid_rss_at_start')))} | "
            f"{_mib(one.get('rss_peak'))} | {_mib(two.get('rss_peak'))} | "
            f"{one.get('start_seconds', 'n/a')} / {two.get('start_seconds', 'n/a')} |")
    add("")

    add("## Peers\n")
    add("| peer | command (1 queue) |\n|---|---|")
    for p in peers:
        cmd = p["phases"][0]["command"] if p["phases"] else ""
        add(f"| {p['label']} (`{p['id']}`) | `{cmd}` |")
    errors = [(p["label"], e) for p in peers for e in p["errors"]]
    if errors:
        add("\n## Errors\n")
        for label, e in errors:
            add(f"* {label}: {e}")
    add("")
    return "\n".join(out)


def targets_md(res: dict[str, Any], add: Any) -> None:
    add("QSD = the better of `aio=threads` and `aio=io_uring` for that figure "
        "(higher IOPS, higher scaling, lower RSS).\n")
    add("| target | measured | required | result | detail |\n|---|---|---|---|---|")
    for t in res["targets"]:
        if t["unit"] == "x":
            meas, req = _ratio_cell(t["value"]), f">= {t['required']:.1f}x"
        else:
            meas, req = _mib(t["value"]), f"<= {_mib(t['required'])}"
        mark = {True: "✅", False: "❌", None: "⚠️"}[t["met"]]
        add(f"| {t['target']} | {meas} | {req} | {mark} {t['verdict']} | {t['detail']} |")
    add(f"\n{res['targets_met']} of {res['targets_total']} targets met.\n")


#: The feature_cost() tables: (result key, title, "with ..." column, what was compared).
FEATURE_COSTS = [
    ("log_cost", "the inflight log", "the log",
     "pyvduse file (the inflight log in `/run/pyvduse`, the default) against the same command "
     "with `PYVDUSE_TEST_NO_INFLIGHT_LOG=1` (no log, no crash recovery)"),
    ("metrics_cost", "metrics", "metrics",
     "pyvduse file with `--metrics 127.0.0.1:0` (every request counted: type, bytes, status, "
     "latency histogram) against the same command without it (nothing counted)"),
]


def feature_costs_md(res: dict[str, Any], add: Any) -> None:
    """Each feature's cost table, for the features whose both peers ran."""
    rounds = res["guest"].get("rounds", 1)
    for key, title, short, compared in FEATURE_COSTS:
        cost_md(res, add, res.get(key) or [], title, short,
                f"{compared}, on the same file, taking turns job by job, {rounds} round(s).")


def cost_md(res: dict[str, Any], add: Any, rows: list[dict[str, Any]], title: str,
            short: str, intro: str) -> None:
    """A :func:`feature_cost` table; nothing without rows."""
    if not rows:
        return
    wl = {w["id"]: w["label"] for w in res["workloads"]}
    add(f"## Cost of {title}\n")
    add(f"{intro} IOPS of each round; ratio with / without of the means, and of each "
        "round's pair.\n")
    add(f"| workload | IOPS with {short} | IOPS without | with / without | per round | "
        "p99 µs with / without | daemon CPU µs/IO with / without |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        add(f"| {wl.get(r['workload'], r['workload'])} | "
            f"{', '.join(_fmt(v) for v in r['iops_with'])} | "
            f"{', '.join(_fmt(v) for v in r['iops_without'])} | {_ratio_cell(r['ratio'])} | "
            f"{', '.join(_ratio_cell(v) for v in r['round_ratios'])} | "
            f"{_fmt(r['p99_with_us'])} / {_fmt(r['p99_without_us'])} | "
            f"{_fmt(r['cpu_us_per_io_with'], 1)} / {_fmt(r['cpu_us_per_io_without'], 1)} |")
    add("")


def _column(col: str, labels: dict[str, str]) -> str:
    return "/".join(labels.get(x.strip(), x.strip()) for x in col.split("/"))


def _not_scheduled(entry: dict[str, Any]) -> str:
    return "the RBD peers run a subset of the workloads" if entry.get("remote") else \
        "not among this peer's workloads"


def _ceph_cell(guest: dict[str, Any]) -> str:
    info = guest.get("rbd") or {}
    text = (f"{guest.get('ceph') or '?'}; one-node cluster in the guest (scripts/ceph-cluster: "
            f"one monitor, manager and OSD, memstore), image `{info.get('image', 'rbd/bench')}` "
            f"of {_mib(guest.get('rbd_size'))}, features `layering`, filled with data; "
            f"client caches off")
    if info:
        text += (f"; cluster up in {info['cluster_start_seconds']:g} s, image filled in "
                 f"{info['image_fill_seconds']:g} s")
    return text


def remote_md(res: dict[str, Any], add: Any) -> None:
    """The remote storage section: pyvduse as the client of an NBD server or a Ceph
    cluster against the other clients of the same server; nothing when no such pair ran."""
    cols = res.get("remote_ratio_columns") or []
    if not cols:
        return
    ids = {x.strip() for c in cols for x in c.split("/")}
    peers = [p for p in res["peers"] if p["id"] in ids]
    labels = {p["id"]: p["label"] for p in res["peers"]}
    guest = res["guest"]
    ran = [w for w in res["workloads"] if any(scheduled(p, w["id"]) for p in peers)]
    add("## Remote storage: pyvduse as a client (IOPS, same run)\n")
    add("The same server, a different client. **pyvduse nbd**: pyvduse's `nbd` backend "
        "against its own nbdkit `file` instance (the same nbdkit command as nbdkit file's, "
        "on the same backing file), against the kernel nbd client (nbdkit file). "
        "**pyvduse rbd**, **QSD rbd** (QEMU's `rbd` driver) and **kernel rbd** (the kernel "
        "client, `rbd map`): the same image of one Ceph cluster in the guest, client caches "
        "off (pyvduse `cache=off`, QSD `cache.direct=on`); they run after every other peer, "
        "in a phase of their own with the cluster started for it, "
        + (f"on {', '.join(guest['rbd_workloads'])} only."
           if guest.get("rbd_workloads") is not None else "on every workload.") + "\n")
    add("| workload | " + " | ".join(_column(c, labels) for c in cols) + " |")
    add("|---" * (len(cols) + 1) + "|")
    for w in ran:
        row = res["ratios_iops"][w["id"]]
        add(f"| {w['label']} | " + " | ".join(_ratio_cell(row.get(c)) for c in cols) + " |")
    add("")
    add("Client CPU: utime + stime of the process that turns block requests into NBD or RBD "
        "requests (pyvduse, QSD) during the job, as % of one vCPU over ramp + runtime; the "
        "kernel clients' work (and the kernel's virtio/VDUSE and socket work for every peer) "
        "is not measured. Server CPU: the same for the server, nbdkit or the Ceph OSD "
        "(`ceph-osd`; the monitor and manager are not counted). Per I/O: client + server "
        "CPU, where measured, divided by the I/Os.\n")
    add("| workload | peer | IOPS | MiB/s | mean lat µs | p99 lat µs | client CPU % | "
        "server CPU % | client + server CPU µs/IO |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in ran:
        for p in peers:
            if not scheduled(p, w["id"]):
                continue
            r = p["results"].get(w["id"])
            if r is None:
                add(f"| {w['label']} | {p['label']} | failed | | | | | | |")
                continue
            client = None if p["group"] in ("nbd", "kernel") else r.get("daemon_cpu_percent")
            client_us = (None if p["group"] in ("nbd", "kernel")
                         else r.get("daemon_cpu_us_per_io"))
            parts = [v for v in (client_us, r.get("server_cpu_us_per_io")) if v is not None]
            add(f"| {w['label']} | {p['label']} | {_fmt(r['iops'])} | "
                f"{_fmt(r['bw_bytes'] / 2**20, 1)} | {_fmt(r['lat_mean_us'])} | "
                f"{_fmt(r['lat_p99_us'])} | "
                f"{'kernel' if p['group'] in ('nbd', 'kernel') else _fmt(client)} | "
                f"{_fmt(r.get('server_cpu_percent'))} | "
                f"{_fmt(sum(parts)) if parts else 'n/a'} |")
    add("")


# -------------------------------------------------------------------- chart

COLORS = {"pyvduse": "#d62728", "qsd": "#1f77b4", "nbd": "#2ca02c", "kernel": "#7f7f7f"}
SHADES = {"qsd-io_uring": "#6baed6", "nbdkit-python": "#ff7f0e", "kernel-brd": "#b0b0b0",
          "kernel-null_blk": "#b0b0b0"}


def by_label(peer: str) -> str:
    """Short name of a ratio's other peer in a chart panel's subtitle."""
    return {"nbdkit-file": "kernel nbd", "qsd-rbd": "QSD rbd",
            "kernel-rbd": "kernel rbd"}.get(peer, peer)


def _short(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = res["peers"]
    workloads = res["workloads"]
    panels = len(workloads) + 1
    ncols = 3
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(19, max(5.0, 0.4 * len(peers)) * nrows),
                             squeeze=False)
    names = [p["label"] for p in peers]
    colors = [SHADES.get(p["id"], COLORS.get(p["group"], "#333333")) for p in peers]
    sections = ["null" if p["backing"] in ("null", "ram") else
                "rbd" if p["backing"] == "rbd" else "file" for p in peers]
    hatches = [{"null": "//", "rbd": ".."}.get(x, "") for x in sections]
    ypos = list(range(len(peers)))[::-1]

    def bars(ax: Any, values: list[float | None], title: str, fmt: Any, xlabel: str,
             missing: list[str]) -> None:
        vals = [v or 0.0 for v in values]
        present = [v for v in vals if v > 0]
        log = bool(present) and max(present) / min(present) > 25
        for y, v, c, h in zip(ypos, vals, colors, hatches, strict=True):
            ax.barh(y, v if v > 0 else (min(present) / 10 if log and present else 0),
                    color=c if v > 0 else "none", hatch=h, edgecolor="white" if h else c)
        if log:
            ax.set_xscale("log")
        top = max(present) if present else 1
        ax.set_xlim(min(present) / 3 if log else 0, top * (4 if log else 1.3))
        for y, v, gone in zip(ypos, vals, missing, strict=True):
            ax.text(v if v > 0 else (ax.get_xlim()[0] * 1.1 if log else 0), y,
                    f" {fmt(v)}" if v > 0 else f" {gone}", va="center", fontsize=9)
        # a rule between the file-backed peers, the null / RAM devices and RBD
        for y, (a, b) in zip(ypos, itertools.pairwise(sections), strict=False):
            if a != b:
                ax.axhline(y - 0.5, color="black", linewidth=0.8, alpha=0.5)
        ax.set_yticks(ypos)
        ax.set_yticklabels(names, fontsize=9.5)
        for tick, p in zip(ax.get_yticklabels(), peers, strict=True):
            if p["group"] == "pyvduse":
                tick.set_fontweight("bold")
        ax.set_title(title, fontsize=11.5, loc="left")
        ax.set_xlabel(xlabel + (" (log scale)" if log else ""), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8.5)

    flat = axes.ravel()
    for ax, w in zip(flat, workloads, strict=False):
        vals = [p["results"].get(w["id"], {}).get("iops") for p in peers]
        ratio = None
        by = {p["id"]: v for p, v in zip(peers, vals, strict=True)}
        qsd = [by[q] for q in QSD_FILE if by.get(q)]
        if by.get(PYVDUSE) and qsd:
            ratio = by[PYVDUSE] / max(qsd)
        sub = f"\npyvduse / best QSD = {ratio:.2f}x" if ratio is not None else ""
        lines: dict[str, list[str]] = {}
        for a, b in REMOTE_RATIO_PEERS:
            if by.get(a) and by.get(b):
                lines.setdefault(a, []).append(f"{by_label(b)} = {by[a] / by[b]:.2f}x")
        for a, parts in lines.items():
            sub += f"\npyvduse {a.split('-')[1]} / " + ", / ".join(parts)
        missing = ["failed / not run" if scheduled(p, w["id"]) else
                   "not run (RBD subset)" if p.get("remote") else "not run" for p in peers]
        bars(ax, vals, f"{w['label']}{sub}", _short, "IOPS", missing)
    rss_ax = flat[len(workloads)]
    rss = [rss_peak(p) if p["daemon"] else None for p in peers]
    bars(rss_ax, [r / 2**20 if r else None for r in rss],
         "Daemon peak RSS, 1 queue, 1 GiB device\n(kernel peers: no daemon"
         + ("; RBD: 256 MiB image" if "rbd" in sections else "") + ")",
         lambda v: f"{v:.1f} MiB", "MiB",
         ["failed / not run" if p["daemon"] else "no daemon" for p in peers])
    for ax in flat[panels:]:
        ax.axis("off")
    host, guest = res["host"], res["guest"]
    fig.suptitle(
        f"pyvduse vs qemu-storage-daemon, nbdkit + kernel nbd and the kernel itself: "
        f"IOPS per workload ({host['date']})\n"
        f"fio libaio direct=1, {guest['runtime']:g} s per job, in one QEMU TCG guest "
        f"({guest['guest_cpus']} vCPU, kernel {guest['guest_kernel']}): compare ratios, "
        f"not absolute figures.  Hatched = null/RAM device"
        + ("; dotted = Ceph RBD image." if "rbd" in sections else "."),
        fontsize=13, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
