"""The recovery benchmark's figures: medians, ranges and ratios, results.json, results.md.

Pure functions of the guest's recovery.json and the host's facts (no VM, no
subprocess), used by bench/recovery_host.py and unit-tested.
"""

from __future__ import annotations

import statistics
from typing import Any

PYVDUSE, QSD = "pyvduse", "qsd"
MEASURES = [
    ("pidfile_seconds", "restart → pidfile"),
    ("read_seconds", "restart → 4 KiB O_DIRECT read done"),
]


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count of ``values`` (None for each when there are none)."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def daemon_summary(record: dict[str, Any]) -> dict[str, Any]:
    """One daemon's kills reduced to spreads, and whether every check passed."""
    kills = record.get("kills", [])
    out: dict[str, Any] = {key: spread([float(k[key]) for k in kills]) for key, _ in MEASURES}
    out["inflight_at_kill"] = spread([float(k["inflight_at_kill"]) for k in kills])
    resubmitted = [float(k["resubmitted"]) for k in kills if k.get("resubmitted") is not None]
    out["resubmitted"] = spread(resubmitted)
    fio_runs = record.get("fio", [])
    out["fio_runs"] = len(fio_runs)
    out["fio_ok"] = bool(fio_runs) and all(run.get("ok") for run in fio_runs)
    out["same_device"] = bool(record.get("same_device"))
    out["ok"] = (not record.get("errors") and out["fio_ok"] and out["same_device"]
                 and bool(kills))
    return out


def compute(raw: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    """results.json: the raw records, each daemon's summary and the ratios pyvduse / QSD."""
    daemons = raw["daemons"]
    summaries = {d["id"]: daemon_summary(d) for d in daemons}
    ratios: dict[str, dict[str, float | None]] = {}
    if PYVDUSE in summaries and QSD in summaries:
        for key, _ in MEASURES:
            p, q = summaries[PYVDUSE][key], summaries[QSD][key]
            ratios[key] = {stat: ratio(p[stat], q[stat]) for stat in ("median", "min", "max")}
    return {
        "host": host,
        "guest": raw["meta"],
        "daemons": daemons,
        "summary": summaries,
        "ratios": ratios,
        "ok": bool(daemons) and all(s["ok"] for s in summaries.values()),
    }


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _n(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g}"


def spread_cell(s: dict[str, Any], seconds: bool = True) -> str:
    """``median (min to max)``: seconds with 2 decimals, counts as they are."""
    if not s["n"]:
        return "n/a"
    if seconds:
        return f"{s['median']:.2f} s ({s['min']:.2f} to {s['max']:.2f})"
    return f"{s['median']:g} ({s['min']:g} to {s['max']:g})"


def markdown(res: dict[str, Any]) -> str:
    host, guest = res["host"], res["guest"]
    out: list[str] = []
    add = out.append
    add(f"# pyvduse crash recovery benchmark, {host['date']}\n")
    add("Every figure below was measured in **one** boot of an emulated (QEMU TCG) guest: "
        "absolute times are far above real hardware; compare the daemons with each other.\n")
    add("| | |\n|---|---|")
    for k, v in [
        ("command", f"`{host['command']}`"),
        ("date", host["date"]),
        ("machine kind", host["machine"]),
        ("guest", f"QEMU TCG, {guest['guest_cpus']} vCPU, "
                  f"{guest['guest_mem_bytes'] / 2**30:.1f} GiB, kernel {guest['guest_kernel']}"),
        ("QEMU (guest emulator)", host.get("qemu", "?")),
        ("qemu-storage-daemon", guest["qemu_storage_daemon"]),
        ("fio", guest["fio"]),
        ("pyvduse", f"{host.get('pyvduse_commit', '?')}, Python {guest['python']}"),
        ("device", f"{guest['size'] >> 20} MiB file on the guest's tmpfs, {guest['queues']} "
                   f"queues of {guest['queue_size']}"),
        ("load", f"`{guest['load']}`"),
        ("kills", f"{guest['kills']} per daemon, each {guest['settle']:g} s after the last "
                  "recovery, once `/sys/block/vdX/inflight` is non-zero"),
        ("full run took", f"{host.get('wall_seconds', 0) / 60:.1f} min (VM boot to power-off)"),
    ]:
        add(f"| {k} | {v} |")
    others = host.get("host_cpu_used_by_others")
    if others is not None:
        add(f"\nOther work on the host used {others:.2f} of its {host.get('host_cpus', 2)} "
            "cores on average during the run (QEMU needs both for the 2 vCPUs).")
    if host.get("concurrent_guests"):
        add(f"\n**Warning:** another QEMU guest ran on the host during this run "
            f"({host['concurrent_guests']}); figures are noisier than usual.")
    add("")
    add("## Recovery time\n")
    add("From the restart (the moment the same command line is spawned again, after "
        "SIGKILL) to (a) the pidfile existing and (b) the completion of a 4 KiB O_DIRECT "
        f"read at offset {guest['read_offset']} issued at the restart (it waits in the "
        "rings behind the requests in flight until the new daemon serves them). Median "
        "(min to max).\n")
    labels = {d["id"]: d.get("label", d["id"]) for d in res["daemons"]}
    add("| daemon | kills | " + " | ".join(label for _, label in MEASURES)
        + " | requests in flight at the kill | resubmitted | fio ended without error | "
        "same /dev/vdX |")
    add("|---|---:|" + "---:|" * len(MEASURES) + "---:|---:|---|---|")
    for did, s in res["summary"].items():
        add(f"| {labels[did]} | {s[MEASURES[0][0]]['n']} | "
            + " | ".join(spread_cell(s[key]) for key, _ in MEASURES)
            + f" | {spread_cell(s['inflight_at_kill'], False)} | "
            f"{spread_cell(s['resubmitted'], False) if s['resubmitted']['n'] else 'not reported'}"
            f" | {'yes' if s['fio_ok'] else 'NO'} ({s['fio_runs']} run(s)) | "
            f"{'yes' if s['same_device'] else 'NO'} |")
    base = guest.get("startup_baseline")
    if base:
        add(f"\nFor scale, in the same guest with no load (median of 3): the interpreter "
            f"alone (`python -c pass`) starts in {base['python_seconds']:.2f} s, "
            f"`pyvduse serve --help` (the interpreter and the daemon's imports, no device) "
            f"takes {base['pyvduse_help_seconds']:.2f} s.")
    if res["ratios"]:
        add("")
        add("| pyvduse / QSD | median | min | max |\n|---|---:|---:|---:|")
        for key, label in MEASURES:
            r = res["ratios"][key]
            add(f"| {label} | {_x(r['median'])} | {_x(r['min'])} | {_x(r['max'])} |")
    add("")
    add("## Every kill\n")
    add("| daemon | kill | in flight | restart → pidfile | restart → read | resubmitted |")
    add("|---|---:|---:|---:|---:|---:|")
    for d in res["daemons"]:
        for k in d.get("kills", []):
            add(f"| {labels[d['id']]} | {k['kill']} | {k['inflight_at_kill']} | "
                f"{_s(k['pidfile_seconds'])} | {_s(k['read_seconds'])} | "
                f"{_n(k.get('resubmitted'))} |")
    add("")
    add("## Commands\n")
    for d in res["daemons"]:
        add(f"* {labels[d['id']]}: `{d.get('command', '?')}`")
        for run in d.get("fio", []):
            add(f"  * load: `{run['fio']}` — exit {run.get('exit', '?')}, "
                f"{run.get('write_ios', 0):,} writes")
    errors = [(labels[d["id"]], e) for d in res["daemons"] for e in d.get("errors", [])]
    if errors:
        add("\n## Errors\n")
        for label, e in errors:
            add(f"* {label}: {e}")
    add("")
    return "\n".join(out)
