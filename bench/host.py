"""Host side of the side-by-side benchmark; started by bench/run (see there).

Waits until no other QEMU guest runs, boots ONE guest with scripts/vm-run that
runs bench/guest_bench.py, then writes results.json, results.md and chart.png
from the guest's raw.json. ``--report-only RAW`` redoes the report from an
earlier run's raw folder without booting anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # bench/ is not a package

REPO = Path(__file__).resolve().parent.parent
VM_MEMORY = "4G"  # 1 GiB backing file + 1 GiB brd + fio's copy on the guest's tmpfs;
# the Ceph cluster of the RBD peers runs after those are gone


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def qemu_guests(exclude_under: int | None = None) -> list[int]:
    """PIDs of running qemu-system-* processes (not descendants of ``exclude_under``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if not comm.startswith("qemu-system"):
            continue
        pid = int(d.name)
        if exclude_under is not None and _descends(pid, exclude_under):
            continue
        pids.append(pid)
    return pids


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
    return False


def wait_for_idle_host(max_wait: float) -> None:
    """Never run two guests at once: wait for any other QEMU to finish."""
    deadline = time.monotonic() + max_wait
    shown = False
    while pids := qemu_guests():
        if not shown:
            say(f"another QEMU guest is running (pid {', '.join(map(str, pids))}); waiting")
            shown = True
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: a QEMU guest still runs after {max_wait:.0f} s; giving up")
        time.sleep(5)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def host_facts(argv: list[str], pyvduse_commit: str | None) -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "bench"])
    if pyvduse_commit:
        src = _first_line(["git", "-C", str(REPO), "rev-parse", "--short=12", pyvduse_commit])
        source = f"src/pyvduse of commit {src} (bench/ of {commit}"
        source += ", with uncommitted changes)" if dirty != "?" else ")"
    else:
        source = f"working tree at {commit}"
        source += " with uncommitted changes in src/ or bench/" if dirty != "?" else ""
    return {
        "date": datetime.date.today().isoformat(),
        "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["bench/run", *(a.replace(f"{REPO}/", "") for a in argv)]),
        "machine": (f"the project's `python` machine kind: {os.cpu_count()} vCPU {cpu}, "
                    f"{mem:.0f} GiB, Debian {_debian()}, host kernel {platform.release()} "
                    f"(no VDUSE); the benchmark runs in a 2 vCPU QEMU TCG guest on it"),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "pyvduse_commit": source,
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }


def _debian() -> str:
    try:
        return Path("/etc/debian_version").read_text().strip()
    except OSError:
        return "?"


def _busy_ticks() -> int:
    """Busy CPU time of the whole host (every core), in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _tree_ticks(root: int) -> dict[int, int]:
    """utime + stime of ``root`` and its live descendants, by pid."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        if not _descends(pid, root):
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[pid] = int(fields[11]) + int(fields[12])
    return out


class HostWatch:
    """Other QEMU guests and the CPU used by everything but our guest, during the run."""

    def __init__(self, launcher: subprocess.Popen[bytes]) -> None:
        self.launcher = launcher
        self.seen: set[int] = set()
        self.busy0 = _busy_ticks()
        self.ours: dict[int, int] = {}  # last seen CPU ticks of our launcher's processes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        self.seen.update(qemu_guests(exclude_under=self.launcher.pid))
        self.ours.update(_tree_ticks(self.launcher.pid))

    def _run(self) -> None:
        self._sample()
        while not self.stop.wait(5):
            self._sample()

    def finish(self, wall: float) -> float:
        """Cores used on average by everything but our guest (our processes all
        started after busy0 was read; the last seconds of those that already
        exited are missed, a few hundredths of a core over a full run)."""
        self.stop.set()
        self.thread.join(timeout=30)
        ours = sum(self.ours.values())
        others = (_busy_ticks() - self.busy0 - ours) / os.sysconf("SC_CLK_TCK")
        return max(0.0, others / wall) if wall > 0 else 0.0


def boot_guest(args: argparse.Namespace, raw_dir: Path, host: dict[str, Any]) -> int:
    guest_cmd = [".venv/bin/python", "bench/guest_bench.py",
                 "--runtime", f"{args.runtime:g}", "--ramp", f"{args.ramp:g}"]
    if args.smoke:
        guest_cmd.append("--smoke")
    if args.peers:
        guest_cmd += ["--peers", args.peers]
    if args.workloads:
        guest_cmd += ["--workloads", args.workloads]
    if args.rbd_workloads:
        guest_cmd += ["--rbd-workloads", args.rbd_workloads]
    if args.rounds != 1:
        guest_cmd += ["--rounds", str(args.rounds)]
    if args.pyvduse_args:
        guest_cmd += ["--pyvduse-args", args.pyvduse_args]
    if args.perf:
        guest_cmd.append("--perf")
    return run_guest(args, raw_dir, guest_cmd, host, say)


def run_guest(args: argparse.Namespace, raw_dir: Path, guest_cmd: list[str],
              facts: dict[str, Any], report: Callable[[str], None],
              memory: str = VM_MEMORY) -> int:
    """Boot the guest once with ``guest_cmd`` (vm-run, writing into ``raw_dir``).

    ``args`` gives ``commit`` (serve that commit's sources, or the work tree),
    ``timeout`` and ``max_wait`` (for an idle host first). Records in ``facts``
    the wall time, the host's CPU used by anything else and concurrent guests;
    ``report`` gets the progress lines; ``memory`` is the guest's (vm-run --memory).
    Returns vm-run's exit status.
    """
    env_args = commit_sources(args.commit, raw_dir) if args.commit else []
    cmd = [str(REPO / "scripts" / "vm-run"), "--memory", memory, "--cpus", "2",
           "--timeout", args.timeout, *env_args, "--outdir", str(raw_dir), "--", *guest_cmd]
    wait_for_idle_host(args.max_wait)
    report(f"booting the guest; progress: tail -f {raw_dir / 'console.log'}")
    t = time.monotonic()
    with open(raw_dir.parent / f"{raw_dir.name}.vm-run.out", "wb") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        watch = HostWatch(launcher)
        try:
            rc = launcher.wait()
        except KeyboardInterrupt:
            launcher.terminate()  # vm-run kills its guest on SIGTERM
            launcher.wait()
            raise
        finally:
            wall = time.monotonic() - t
            others = watch.finish(wall)
    facts["wall_seconds"] = round(wall, 1)
    facts["host_cpus"] = os.cpu_count()
    facts["host_cpu_used_by_others"] = round(others, 2)
    facts["vm_run_exit"] = rc
    facts["concurrent_guests"] = sorted(watch.seen)
    facts["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if watch.seen:
        report(f"warning: other QEMU guests ran during the benchmark (pid {sorted(watch.seen)})")
    report(f"guest finished with exit {rc} after {wall / 60:.1f} min")
    return rc


def commit_sources(commit: str, raw_dir: Path) -> list[str]:
    """Extract src/pyvduse of ``commit`` under ``raw_dir``, byte-compiled; return the
    vm-run arguments that make the guest serve it (PYTHONPATH comes before the venv's
    editable install of the working tree).

    Compiled here, with the interpreter the guest runs, because the guest cannot
    keep bytecode (its view of the repo is read-only, and it runs with
    PYTHONDONTWRITEBYTECODE): else every daemon start there compiles pyvduse again,
    as scripts/vm-run avoids for the working tree's src/.
    """
    src = raw_dir / "pyvduse-src"
    subprocess.run(["rm", "-rf", str(src)], check=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src/pyvduse"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # The compiled data path of that commit too (from 2026-12-05 on it has one): else
    # --datapath auto would serve its sources on the Python path.
    build_files = {name: subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{name}"],
                                        capture_output=True) for name in ("setup.py",
                                                                          "pyproject.toml")}
    if all(done.returncode == 0 for done in build_files.values()):
        for name, done in build_files.items():
            (src / name).write_bytes(done.stdout)
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "setup.py", "-q", "build_ext",
                        "--inplace"], check=True, cwd=src, env=env, capture_output=True)
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "compileall", "-q",
                    str(src / "src")], check=True, env=env, capture_output=True)
    return ["--env", f"PYTHONPATH={src / 'src'}"]


def write_report(raw_dir: Path, out: Path, host: dict[str, Any]) -> dict[str, Any]:
    raw = json.loads((raw_dir / "raw.json").read_text())
    res = report.compute(raw, host)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = report.markdown(res)
    (out / "results.md").write_text(md)
    report.chart(res, out / "chart.png")
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="every peer, 3 workloads (the RBD peers: 1), 1 s each: checks that "
                        "every peer still runs (~5 min); writes to build/bench-smoke unless --out")
    p.add_argument("--runtime", type=float, help="fio seconds per job (default 10; smoke 1)")
    p.add_argument("--ramp", type=float, help="fio ramp seconds per job (default 2; smoke 0)")
    p.add_argument("--out", type=Path,
                   help="where results.{json,md} and chart.png go "
                        "(default docs/benchmarks/DATE; smoke: build/bench-smoke)")
    p.add_argument("--raw", type=Path,
                   help="vm-run output folder with the guest's raw.json and fio output "
                        "(default build/bench/<name of --out>)")
    p.add_argument("--peers", help="comma-separated peer ids, started in this order (default: "
                   "all but pyvduse-nolog)")
    p.add_argument("--workloads", help="comma-separated workload ids (default: all)")
    p.add_argument("--pyvduse-args", default="", metavar="ARGS",
                   help="extra 'pyvduse serve' options for every pyvduse peer, e.g. "
                        "'--poll-max-us 0' (they appear in the report's commands)")
    p.add_argument("--perf", action="store_true",
                   help="profile each daemon with perf during each job (the guest's "
                        "OUT/perf/PEER-JOB.perf.txt); perf perturbs the figures, so use "
                        "such a run for profiles only")
    p.add_argument("--rbd-workloads", metavar="IDS",
                   help="comma-separated workload ids the RBD peers (pyvduse-rbd, qsd-rbd, "
                        "kernel-rbd) run, or 'all' (default: the 4K QD1/QD32 and 1M jobs; "
                        "with --workloads: those)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every job this many times, the peers alternating; the report "
                        "gives the mean and each round (default 1)")
    p.add_argument("--commit", metavar="REV",
                   help="benchmark src/pyvduse as committed in REV (e.g. HEAD) instead of the "
                        "working tree (which may hold someone's uncommitted changes)")
    p.add_argument("--timeout", default="45m", help="vm-run timeout (default %(default)s)")
    p.add_argument("--max-wait", type=float, default=3600,
                   help="seconds to wait for another QEMU guest to finish (default %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="do not boot: rebuild the report from --raw of an earlier run")
    args = p.parse_args(argv)
    if args.runtime is None:
        args.runtime = 1.0 if args.smoke else 10.0
    if args.ramp is None:
        args.ramp = 0.0 if args.smoke else 2.0
    date = datetime.date.today().isoformat()
    out = (args.out or (REPO / "build" / "bench-smoke" if args.smoke
                        else REPO / "docs" / "benchmarks" / date)).resolve()
    raw_dir = (args.raw or REPO / "build" / "bench" / out.name).resolve()

    if args.report_only:
        host = json.loads((raw_dir / "host.json").read_text())
    else:
        raw_dir.mkdir(parents=True, exist_ok=True)
        (raw_dir / "raw.json").unlink(missing_ok=True)
        host = host_facts(argv, args.commit)
        rc = boot_guest(args, raw_dir, host)
        (raw_dir / "host.json").write_text(json.dumps(host, indent=1) + "\n")
        if not (raw_dir / "raw.json").exists():
            say(f"the guest wrote no raw.json (vm-run exit {rc}); see "
                f"{raw_dir / 'guest.log'} and {raw_dir / 'console.log'}")
            return 1
    res = write_report(raw_dir, out, host)
    summary = report.markdown(res).split("## Every figure")[0]
    print(summary)
    try:
        shown = out.relative_to(Path.cwd())
    except ValueError:
        shown = out
    say(f"wrote {shown}/results.md, results.json, chart.png")
    failed = [e for p in res["peers"] for e in p["errors"]]
    if failed or host.get("vm_run_exit", 0) != 0:
        say(f"FAILED: {len(failed)} error(s), guest exit {host.get('vm_run_exit')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
