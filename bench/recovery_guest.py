"""Guest side of the recovery benchmark: SIGKILL a daemon under load, time its comeback.

Runs INSIDE the VM guest that bench/recovery boots (scripts/vm-run), as root,
with the project's virtualenv interpreter (``.venv/bin/python
bench/recovery_guest.py``). For each daemon in turn (pyvduse, then
qemu-storage-daemon's vduse-blk export), on the same backing file on the
guest's tmpfs, with 2 queues of 128 entries:

1. start the daemon and find its /dev/vdX;
2. put a write load on the raw device: fio randwrite 4 KiB, iodepth 16,
   2 jobs on separate halves of the device, libaio, direct, time based;
3. ``--kills`` times: let the load settle, wait until
   /sys/block/vdX/inflight is non-zero, SIGKILL the daemon, then restart it
   with the same command line, and measure from the restart (just before
   the new process is spawned) until (a) its pidfile exists and (b) a 4 KiB
   O_DIRECT read at a fixed offset, issued by a thread at the restart,
   completes (it waits in the rings until the new daemon serves them);
   after every restart the device must still be the same /dev/vdX;
4. fio must end without error (if its time runs out before the kills are
   done, another fio run takes over, and it must end without error too);
   the kernel must log no I/O error and no broken ring; the daemon is then
   stopped cleanly.

Writes ``recovery.json`` (every kill's figures) into --out (default
$VM_RUN_OUTDIR), rewritten after each kill; fio's JSON output goes to
``fio/``. Exit status 0 when every kill recovered and every check passed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_bench import (  # bench/ is not a package
    Fio,
    check_disk,
    make_image,
    pyvduse_source,
    run,
    say,
    stop_process,
    stop_qsd_export,
    vdpa_disk,
    version_of,
    wait_for,
)

PYVDUSE = str(Path(sys.executable).with_name("pyvduse"))
SIZE = 256 << 20  # the backing file and the device
QUEUES = 2
QUEUE_SIZE = 128
READ_OFFSET = 4 << 20  # the probe read: 4 KiB here, O_DIRECT
START_TIMEOUT = 300.0
RECOVERY_TIMEOUT = 300.0  # a restart not served by then counts as a failed recovery
KERNEL_ERRORS = ("I/O error", "is not a head", "Buffer I/O", "blk_update_request")


def fio_args(device: str, runtime: float, output: Path) -> list[str]:
    """The write load: 2 jobs, each on its own half of the device."""
    half = SIZE // 2
    return [
        "--name=load", f"--filename={device}", "--ioengine=libaio", "--direct=1",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2", f"--size={half}",
        f"--offset_increment={half}", "--time_based", f"--runtime={runtime:g}",
        "--norandommap", "--randrepeat=0", "--group_reporting", "--output-format=json",
        f"--output={output}",
    ]


def startup_baseline(repeat: int = 3) -> dict[str, float]:
    """For scale, with no load: seconds to start the interpreter alone, and to start
    ``pyvduse serve --help`` (the interpreter and the daemon's imports); medians."""
    out = {}
    for key, cmd in (("python_seconds", [sys.executable, "-c", "pass"]),
                     ("pyvduse_help_seconds", [PYVDUSE, "serve", "--help"])):
        times = []
        for _ in range(repeat):
            t = time.monotonic()
            run(cmd)
            times.append(time.monotonic() - t)
        out[key] = round(sorted(times)[len(times) // 2], 3)
    return out


def inflight(disk: str) -> int:
    reads, writes = Path("/sys/block", disk, "inflight").read_text().split()
    return int(reads) + int(writes)


def dmesg_lines() -> list[str]:
    return run(["dmesg"]).stdout.splitlines()


# ------------------------------------------------------------------ daemons

class Daemon:
    """A daemon serving NAME; ``spawn`` runs its one command line (first start and restarts)."""

    id = ""
    label = ""

    def __init__(self, work: Path, image: Path) -> None:
        self.work = work
        self.image = image
        self.name = f"rec{self.id.replace('-', '')}"
        self.pidfile = work / f"{self.name}.pid"
        self.log = work / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def describe(self) -> str:
        return " ".join(self.command()).replace(PYVDUSE, ".venv/bin/pyvduse")

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the command line (the caller removed any stale pidfile)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(), cwd=self.work)
        return self.proc

    def start(self) -> str:
        """First start: create the device, attach it; return its kernel name (vdX)."""
        raise NotImplementedError

    def resubmitted(self, log_offset: int) -> int | None:
        """Requests the daemon said it resubmitted, from its log after ``log_offset``."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


class PyvduseDaemon(Daemon):
    id = "pyvduse"
    label = "pyvduse"

    def command(self) -> list[str]:
        return [PYVDUSE, "serve", "--name", self.name, "--pidfile", str(self.pidfile),
                "--num-queues", str(QUEUES), "--queue-size", str(QUEUE_SIZE),
                "file", f"path={self.image}"]

    def start(self) -> str:
        self.pidfile.unlink(missing_ok=True)
        proc = self.spawn()
        wait_for("the pidfile", self.pidfile.exists, START_TIMEOUT, proc, self.log)
        return vdpa_disk(self.name)

    def resubmitted(self, log_offset: int) -> int | None:
        text = self.log.read_bytes()[log_offset:].decode(errors="replace")
        found = re.findall(r"re-attached .*?(\d+) request\(s\) resubmitted", text)
        return int(found[-1]) if found else None

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        status = stop_process(proc, "pyvduse")
        if status != 0:
            raise RuntimeError(f"pyvduse exited {status}: {self.log.read_text()[-2000:]}")
        if Path("/dev/vduse", self.name).exists():
            raise RuntimeError(f"/dev/vduse/{self.name} left behind")


class QsdDaemon(Daemon):
    id = "qsd"
    label = "qemu-storage-daemon"

    def __init__(self, work: Path, image: Path) -> None:
        super().__init__(work, image)
        self.added = False

    def command(self) -> list[str]:
        export = (f"type=vduse-blk,id=e0,node-name=disk0,writable=on,name={self.name},"
                  f"num-queues={QUEUES},queue-size={QUEUE_SIZE}")
        return ["qemu-storage-daemon", "--blockdev",
                f"driver=file,filename={self.image},node-name=disk0", "--export", export,
                "--pidfile", str(self.pidfile)]

    def env(self) -> dict[str, str]:
        # its reconnect log goes to $TMPDIR/vduse-blk-NAME: a writable directory
        return dict(os.environ, TMPDIR=str(self.work))

    def describe(self) -> str:
        return (f"TMPDIR={self.work} " + " ".join(self.command())
                + f" & vdpa dev add name {self.name} mgmtdev vduse (first start only)")

    def start(self) -> str:
        self.pidfile.unlink(missing_ok=True)
        (self.work / f"vduse-blk-{self.name}").unlink(missing_ok=True)
        proc = self.spawn()
        wait_for("the pidfile", self.pidfile.exists, START_TIMEOUT, proc, self.log)
        deadline = time.monotonic() + 60
        while True:  # EINVAL until the daemon has set its queues up
            added = run(["vdpa", "dev", "add", "name", self.name, "mgmtdev", "vduse"],
                        check=False)
            if added.returncode == 0:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"vdpa dev add {self.name}: {added.stderr.strip()}")
            time.sleep(0.5)
        self.added = True
        wait_for(f"the block device of {self.name}", lambda: bool(vdpa_disk(self.name)), 60)
        return vdpa_disk(self.name)

    def stop(self) -> None:
        stop_qsd_export(self)


DAEMONS = {d.id: d for d in (PyvduseDaemon, QsdDaemon)}


# -------------------------------------------------------------- one phase

class ProbeRead(threading.Thread):
    """One 4 KiB O_DIRECT read at READ_OFFSET; records when it returned."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)  # a read that never returns must not hold the exit
        self.fd = fd
        self.done_at: float | None = None
        self.error = ""

    def run(self) -> None:
        buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
        try:
            got = os.preadv(self.fd, [buf], READ_OFFSET)
            self.done_at = time.monotonic()
            if got != 4096:
                self.error = f"short read: {got} bytes"
        except OSError as exc:
            self.done_at = time.monotonic()
            self.error = f"read failed: {exc}"
        finally:
            buf.close()


class Load:
    """The fio write load; a new run takes over when one ends before the kills are done."""

    def __init__(self, fio: Fio, device: str, runtime: float, out_dir: Path) -> None:
        self.fio = fio
        self.device = device
        self.runtime = runtime
        self.out_dir = out_dir
        self.proc: subprocess.Popen[str] | None = None
        self.ends_at = 0.0
        self.runs: list[dict[str, Any]] = []
        self.output = out_dir / "run1.json"

    def start(self, runtime: float | None = None) -> None:
        runtime = runtime or self.runtime
        output = self.out_dir / f"run{len(self.runs) + 1}.json"
        args = fio_args(self.device, runtime, output)
        self.proc = subprocess.Popen([*self.fio.cmd_prefix, *args], env=self.fio.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ends_at = time.monotonic() + runtime
        shown = " ".join(args).replace(self.device, "/dev/vdX").replace(str(output), "OUT.json")
        self.runs.append({"fio": f"fio {shown}", "runtime": runtime,
                          "output": f"fio/{self.out_dir.name}/{output.name}"})
        self.output = output

    def remaining(self) -> float:
        return self.ends_at - time.monotonic()

    def finish(self) -> None:
        """Wait for the current run to end; record whether it ended without error."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        out, _ = proc.communicate(timeout=max(self.remaining(), 0) + RECOVERY_TIMEOUT)
        rec = self.runs[-1]
        rec["exit"] = proc.returncode
        try:
            data = json.loads(self.output.read_text())
            job = data["jobs"][0]
            rec["error"] = job.get("error", 0)
            rec["write_ios"] = job["write"]["total_ios"]
            rec["write_iops"] = round(job["write"]["iops"], 1)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            rec["error"] = f"no fio report: {exc}; output: {out[-1500:]}"
        if proc.returncode != 0 and not rec.get("error"):
            rec["error"] = f"fio exited {proc.returncode}: {out[-1500:]}"
        rec["ok"] = proc.returncode == 0 and rec["error"] == 0 and rec.get("write_ios", 0) > 0


def run_phase(daemon: Daemon, record: dict[str, Any], fio: Fio, args: argparse.Namespace,
              out: Path, save: Any) -> None:
    """Start ``daemon``, load it, kill and restart it ``args.kills`` times, into ``record``.

    A failure after the start is recorded in ``record["errors"]``; one before is raised.
    """
    record.update({"label": daemon.label, "command": daemon.describe(), "kills": []})
    mark = len(dmesg_lines())
    say(f"{daemon.id}: starting: {record['command']}")
    t = time.monotonic()
    disk = daemon.start()
    device = check_disk(disk, f"/vduse/{daemon.name}/", SIZE)
    record["start_seconds"] = round(time.monotonic() - t, 2)
    record["device"] = device
    say(f"{daemon.id}: {device} up after {record['start_seconds']} s")
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    fio_dir = out / "fio" / daemon.id
    fio_dir.mkdir(parents=True, exist_ok=True)
    load = Load(fio, device, args.fio_runtime[daemon.id], fio_dir)
    cycles: list[float] = []
    try:
        load.start()
        record["fio"] = load.runs
        for k in range(args.kills):
            # Enough fio time left for this kill's restart? (else: let this run end, check it,
            # and start another one)
            need = args.settle + 2 * max(cycles, default=args.first_cycle) + 5
            if load.remaining() < need:
                say(f"{daemon.id}: fio ends in {load.remaining():.0f} s, less than a kill "
                    f"needs ({need:.0f} s): letting it end, starting another run")
                load.finish()
                if not load.runs[-1]["ok"]:
                    raise RuntimeError(f"fio failed: {load.runs[-1]['error']}")
                load.start(max(args.fio_runtime[daemon.id] / 2, need * 2))
            cycle_start = time.monotonic()
            time.sleep(args.settle)
            busy = wait_busy(disk, load)
            assert daemon.proc is not None
            daemon.proc.kill()
            daemon.proc.wait()
            daemon.pidfile.unlink(missing_ok=True)  # SIGKILL leaves it: time the new one
            log_offset = daemon.log.stat().st_size
            # the restart: the probe read is issued, then the same command line spawned
            probe = ProbeRead(fd)
            t0 = time.monotonic()
            probe.start()
            proc = daemon.spawn()
            pid_at = None
            while pid_at is None:
                if daemon.pidfile.exists():
                    pid_at = time.monotonic()
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"the restarted daemon exited {proc.returncode}: "
                                       f"{daemon.log.read_text(errors='replace')[-2000:]}")
                if time.monotonic() - t0 > RECOVERY_TIMEOUT:
                    raise RuntimeError(f"no pidfile {RECOVERY_TIMEOUT:.0f} s after the restart")
                time.sleep(0.005)
            probe.join(max(RECOVERY_TIMEOUT - (time.monotonic() - t0), 1))
            if probe.done_at is None:
                raise RuntimeError(f"the probe read did not complete within "
                                   f"{RECOVERY_TIMEOUT:.0f} s of the restart")
            if probe.error:
                raise RuntimeError(f"the probe read: {probe.error}")
            now_disk = vdpa_disk(daemon.name)
            if now_disk != disk:
                raise RuntimeError(f"the device moved from {disk} to {now_disk or 'nowhere'}")
            kill = {
                "kill": k + 1,
                "inflight_at_kill": busy,
                "pidfile_seconds": round(pid_at - t0, 3),
                "read_seconds": round(probe.done_at - t0, 3),
                "resubmitted": daemon.resubmitted(log_offset),
                "fio_run": len(load.runs),
            }
            record["kills"].append(kill)
            cycles.append(time.monotonic() - cycle_start)
            say(f"{daemon.id}: kill {k + 1}/{args.kills} at {busy} in flight: pidfile after "
                f"{kill['pidfile_seconds']:.2f} s, read after {kill['read_seconds']:.2f} s"
                + (f", {kill['resubmitted']} resubmitted" if kill["resubmitted"] is not None
                   else ""))
            save()
        say(f"{daemon.id}: kills done; fio ends in {max(load.remaining(), 0):.0f} s")
        load.finish()
        if not load.runs[-1]["ok"]:
            raise RuntimeError(f"fio failed: {load.runs[-1]['error']}")
        record["same_device"] = vdpa_disk(daemon.name) == disk
        if not record["same_device"]:
            raise RuntimeError(f"the device is no longer {disk} at the end")
    except Exception as exc:
        record["errors"].append(str(exc))
        say(f"{daemon.id}: FAILED: {exc}")
        if load.proc is not None:
            load.proc.kill()
            load.proc.wait()
    finally:
        os.close(fd)
        kernel = [line for line in dmesg_lines()[mark:]
                  if any(bad in line for bad in KERNEL_ERRORS)]
        record["kernel_errors"] = kernel[:20]
        if kernel:
            record["errors"].append(f"the kernel logged {len(kernel)} error line(s): {kernel[0]}")
        if not record["errors"]:
            t = time.monotonic()
            try:
                daemon.stop()
                record["stop_seconds"] = round(time.monotonic() - t, 2)
            except Exception as exc:
                record["errors"].append(f"stop: {exc}")
        elif daemon.proc is not None:
            daemon.proc.send_signal(signal.SIGKILL)  # leave the device: the guest goes away
        record["log_tail"] = daemon.log.read_text(errors="replace")[-1500:]


def wait_busy(disk: str, load: Load, timeout: float = 60.0) -> int:
    """Wait until the kernel has requests in flight on ``disk``; return how many."""
    deadline = time.monotonic() + timeout
    while True:
        busy = inflight(disk)
        if busy:
            return busy
        if load.proc is not None and load.proc.poll() is not None:
            raise RuntimeError(f"fio ended early (exit {load.proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no request in flight on {disk} for {timeout:.0f} s")
        time.sleep(0.002)


# -------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("VM_RUN_OUTDIR", ".")))
    p.add_argument("--daemons", default="pyvduse,qsd",
                   help="comma-separated, in this order (default: %(default)s)")
    p.add_argument("--kills", type=int, default=10, help="kills per daemon (default 10)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds of load after a recovery before the next kill (default 1.5)")
    p.add_argument("--fio-runtime", default="pyvduse=120,qsd=60",
                   help="fio's runtime per daemon, seconds (default %(default)s); a run "
                        "that ends before the kills are done is followed by another")
    p.add_argument("--first-cycle", type=float, default=10.0,
                   help="seconds a kill is assumed to take before one was measured")
    args = p.parse_args()
    runtimes = dict(item.split("=") for item in args.fio_runtime.split(","))
    args.fio_runtime = {d: float(runtimes.get(d, 120)) for d in DAEMONS}
    chosen = args.daemons.split(",")
    unknown = set(chosen) - set(DAEMONS)
    if unknown:
        say(f"unknown daemon(s): {', '.join(sorted(unknown))}")
        return 2
    if not Path("/dev/vduse/control").exists():
        say("/dev/vduse/control missing: this runs in the VM guest (bench/recovery)")
        return 2
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "recovery"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    t = time.monotonic()
    make_image(image, SIZE)
    say(f"backing file: {SIZE >> 20} MiB of data on the tmpfs in {time.monotonic() - t:.1f} s")
    fio = Fio(work)
    baseline = startup_baseline()
    say(f"with no load: python -c pass {baseline['python_seconds']:.2f} s, pyvduse serve "
        f"--help {baseline['pyvduse_help_seconds']:.2f} s")
    out_file = args.out / "recovery.json"
    raw: dict[str, Any] = {
        "meta": {
            "guest_kernel": platform.release(),
            "guest_cpus": os.cpu_count(),
            "guest_mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "fio": version_of(["fio", "--version"]),
            "qemu_storage_daemon": version_of(["qemu-storage-daemon", "--version"]),
            "python": platform.python_version(),
            "pyvduse_source": pyvduse_source(),
            "size": SIZE,
            "queues": QUEUES,
            "queue_size": QUEUE_SIZE,
            "kills": args.kills,
            "settle": args.settle,
            "read_offset": READ_OFFSET,
            "startup_baseline": baseline,
            "load": "fio " + " ".join(fio_args("/dev/vdX", 0, Path("OUT.json")))
            .replace("--runtime=0", "--runtime=R"),
        },
        "daemons": [],
    }

    def save() -> None:
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=1) + "\n")
        tmp.replace(out_file)

    failed = False
    for daemon_id in chosen:
        daemon = DAEMONS[daemon_id](work, image)
        record: dict[str, Any] = {"id": daemon_id, "errors": []}
        raw["daemons"].append(record)
        try:
            run_phase(daemon, record, fio, args, args.out, save)
        except Exception as exc:  # the start failed
            record["errors"].append(f"start: {exc}")
            say(f"{daemon_id}: FAILED: {exc}")
            if daemon.proc is not None:
                daemon.proc.kill()
        failed |= bool(record["errors"])
        save()
    for record in raw["daemons"]:
        for err in record["errors"]:
            say(f"{record['id']}: error: {err}")
    say("FAILED" if failed else "every kill recovered")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
