"""Guest side of the side-by-side benchmark: every peer, every fio workload.

Runs INSIDE the VM guest that bench/run boots (scripts/vm-run), as root, with
the project's virtualenv interpreter (``.venv/bin/python bench/guest_bench.py``):
/dev/vduse exists there and the kernel has nbd, null_blk and brd as modules.

It starts every peer, each over the same backing file on the guest's tmpfs
(or its null device, or a kernel device), finds each block device and checks
it belongs to that server; then runs each fio job (libaio, direct=1, JSON
output) on every peer in turn, the starting peer rotating from one workload to
the next, so that a change in the host's load spreads over all peers; it
samples each daemon's CPU time (utime+stime from /proc/PID/stat) around its
jobs and its peak RSS (VmHWM from /proc/PID/status), and stops every peer
cleanly. This happens twice: with one queue (one nbd connection) for the
single-job workloads and the 1-queue mixed job, then with two queues for the
2-queue 2-job mixed job.

Writes into --out (default $VM_RUN_OUTDIR): ``raw.json`` (all figures, rewritten
after every peer, so a partial run still has data) and ``fio/PEER/WORKLOAD.json``
(fio's own output). Exit status 0 when every peer ran every workload, 1 otherwise.
The host side (bench/host.py) turns raw.json into the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYVDUSE = str(Path(sys.executable).with_name("pyvduse"))
PLUGIN = str(HERE / "nbdkit_passthrough.py")
SIZE = 1 << 30  # 1 GiB device / backing file
QUEUE_SIZE = 256
START_TIMEOUT = 300.0  # Python under TCG takes ~10 s to start; leave room for a loaded host
STOP_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"bench [{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Workload:
    id: str
    label: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    queues: int = 1  # device queues (nbd connections) this workload runs on
    extra: tuple[str, ...] = ()

    def fio_args(self, filename: str, runtime: float, ramp: float, output: str) -> list[str]:
        return [
            f"--name={self.id}", f"--filename={filename}", "--ioengine=libaio", "--direct=1",
            f"--rw={self.rw}", *self.extra, f"--bs={self.bs}", f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}", "--group_reporting", "--time_based",
            f"--runtime={runtime:g}", f"--ramp_time={ramp:g}", "--norandommap",
            "--randrepeat=0", "--lat_percentiles=1", "--output-format=json",
            f"--output={output}",
        ]


WORKLOADS = [
    Workload("randread-4k-qd1", "4K rand read QD1", "randread", "4k", 1),
    Workload("randwrite-4k-qd1", "4K rand write QD1", "randwrite", "4k", 1),
    Workload("randread-4k-qd32", "4K rand read QD32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "4K rand write QD32", "randwrite", "4k", 32),
    Workload("seqread-1m-qd8", "1M seq read QD8", "read", "1M", 8),
    Workload("seqwrite-1m-qd8", "1M seq write QD8", "write", "1M", 8),
    Workload("mixed-4k-qd16-1q1j", "4K 70/30 QD16 1 queue 1 job", "randrw", "4k", 16,
             numjobs=1, queues=1, extra=("--rwmixread=70",)),
    Workload("mixed-4k-qd16-2q2j", "4K 70/30 QD16 2 queues 2 jobs", "randrw", "4k", 16,
             numjobs=2, queues=2, extra=("--rwmixread=70",)),
]
SMOKE_WORKLOADS = ("randread-4k-qd1", "mixed-4k-qd16-1q1j", "mixed-4k-qd16-2q2j")


# ------------------------------------------------------------------ helpers

def run(cmd: list[str], timeout: float = 120.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def wait_for(what: str, pred: Callable[[], bool], timeout: float,
             alive: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if alive is not None and alive.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited {alive.returncode} while waiting for {what}: {tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def vdpa_disk(name: str) -> str:
    """Kernel name of the block device bound to vdpa device ``name``, or ""."""
    for block in Path("/sys/bus/vdpa/devices", name).glob("virtio*/block/*"):
        return block.name
    return ""


def check_disk(disk: str, must_contain: str) -> str:
    """Check /sys/block/DISK is the expected device of SIZE bytes; return /dev/DISK."""
    sys_path = Path("/sys/block", disk)
    real = os.path.realpath(sys_path)
    if not sys_path.exists() or must_contain not in real:
        raise RuntimeError(f"/sys/block/{disk} -> {real} does not belong to {must_contain!r}")
    sectors = int((sys_path / "size").read_text())
    if sectors * 512 != SIZE:
        raise RuntimeError(f"{disk}: {sectors} sectors, expected {SIZE // 512}")
    dev = f"/dev/{disk}"
    if not Path(dev).is_block_device():
        raise RuntimeError(f"{dev} is not a block device")
    return dev


def stop_process(proc: subprocess.Popen[bytes], what: str) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM") from None


def version_of(cmd: list[str]) -> str:
    try:
        proc = run(cmd, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "?"


# -------------------------------------------------------------------- peers

@dataclass
class Served:
    """A peer's block device while it is up."""

    device: str  # what fio opens
    pid: int | None  # the user-space server to account CPU/RSS to, if any
    detail: dict[str, Any] = field(default_factory=dict)


class Peer:
    id = ""
    label = ""
    group = ""  # pyvduse, qsd, nbd, kernel
    backing = ""  # file or null
    daemon = True

    def __init__(self, work: Path, image: Path) -> None:
        self.work = work
        self.image = image
        self.log = work / f"{self.id}.log"

    def start(self, queues: int) -> Served:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self, queues: int) -> str:
        return ""


class PyvdusePeer(Peer):
    group = "pyvduse"

    def __init__(self, work: Path, image: Path, backing: str) -> None:
        self.id = f"pyvduse-{backing}"
        self.label = f"pyvduse {backing}"
        self.backing = backing
        self.name = f"pyvduse{backing}"
        super().__init__(work, image)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfile = work / f"{self.name}.pid"

    def command(self, queues: int) -> list[str]:
        backend = (["file", f"path={self.image}"] if self.backing == "file"
                   else ["null", f"size={SIZE}"])
        return [PYVDUSE, "serve", "--name", self.name, "--num-queues", str(queues),
                "--queue-size", str(QUEUE_SIZE), "--pidfile", str(self.pidfile), *backend]

    def describe(self, queues: int) -> str:
        return " ".join(self.command(queues)).replace(PYVDUSE, ".venv/bin/pyvduse")

    def start(self, queues: int) -> Served:
        self.pidfile.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(queues), stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_for("the pidfile", self.pidfile.exists, START_TIMEOUT, self.proc, self.log)
        disk = vdpa_disk(self.name)
        dev = check_disk(disk, f"/vduse/{self.name}/")
        return Served(dev, self.proc.pid, {"disk": disk})

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        status = stop_process(proc, "pyvduse")
        if status != 0:
            raise RuntimeError(f"pyvduse exited {status}: {self.log.read_text()[-2000:]}")
        if Path("/dev/vduse", self.name).exists():
            raise RuntimeError(f"/dev/vduse/{self.name} left behind")


class QsdPeer(Peer):
    group = "qsd"

    def __init__(self, work: Path, image: Path, backing: str, aio: str = "") -> None:
        self.backing = backing
        self.aio = aio
        self.name = f"qsd{aio.replace('_', '')}" if backing == "file" else "qsdnull"
        self.id = f"qsd-{aio}" if backing == "file" else "qsd-null"
        self.label = f"QSD file aio={aio}" if backing == "file" else "QSD null-co"
        super().__init__(work, image)
        self.proc: subprocess.Popen[bytes] | None = None
        self.added = False

    def command(self, queues: int) -> list[str]:
        if self.backing == "file":
            blockdev = (f"driver=file,filename={self.image},node-name=disk0,aio={self.aio},"
                        "cache.direct=off")
        else:
            blockdev = f"driver=null-co,node-name=disk0,size={SIZE},read-zeroes=on"
        export = (f"type=vduse-blk,id=e0,node-name=disk0,writable=on,name={self.name},"
                  f"num-queues={queues},queue-size={QUEUE_SIZE}")
        return ["qemu-storage-daemon", "--blockdev", blockdev, "--export", export]

    def describe(self, queues: int) -> str:
        return (" ".join(self.command(queues))
                + f" & vdpa dev add name {self.name} mgmtdev vduse")

    def start(self, queues: int) -> Served:
        env = dict(os.environ, TMPDIR=str(self.work))  # QSD needs a writable TMPDIR
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(queues), stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.work)
        wait_for(f"/dev/vduse/{self.name}", Path("/dev/vduse", self.name).exists,
                 START_TIMEOUT, self.proc, self.log)
        # `vdpa dev add` fails with EINVAL until the daemon has set up its queues.
        deadline = time.monotonic() + 60
        while True:
            proc = run(["vdpa", "dev", "add", "name", self.name, "mgmtdev", "vduse"],
                       check=False)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"vdpa dev add {self.name}: {proc.stderr.strip()}")
            time.sleep(0.5)
        self.added = True
        wait_for(f"the block device of {self.name}", lambda: bool(vdpa_disk(self.name)), 60)
        disk = vdpa_disk(self.name)
        dev = check_disk(disk, f"/vduse/{self.name}/")
        return Served(dev, self.proc.pid, {"disk": disk})

    def stop(self) -> None:
        if self.added:
            disk = vdpa_disk(self.name)
            run(["vdpa", "dev", "del", self.name])
            self.added = False
            if disk:
                wait_for(f"/sys/block/{disk} to go", lambda: not Path("/sys/block", disk).exists(),
                         60)
        if self.proc is not None:
            proc, self.proc = self.proc, None
            status = stop_process(proc, "qemu-storage-daemon")
            if status != 0:
                raise RuntimeError(f"qemu-storage-daemon exited {status}: "
                                   f"{self.log.read_text()[-2000:]}")


class NbdPeer(Peer):
    group = "nbd"
    PLUGINS = ("file", "python", "null")

    def __init__(self, work: Path, image: Path, plugin: str) -> None:
        self.plugin = plugin
        self.nbd = f"nbd{self.PLUGINS.index(plugin)}"
        self.backing = "null" if plugin == "null" else "file"
        self.id = f"nbdkit-{plugin}"
        self.label = {"file": "nbdkit file", "python": "nbdkit Python plugin",
                      "null": "nbdkit null"}[plugin]
        super().__init__(work, image)
        self.sock = work / f"nbdkit-{plugin}.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.connected = False

    def command(self) -> list[str]:
        plugin = {"file": ["file", f"file={self.image}"],
                  "python": ["python", PLUGIN, f"file={self.image}"],
                  "null": ["null", f"size={SIZE}"]}[self.plugin]
        return ["nbdkit", "-f", "-U", str(self.sock), *plugin]

    def client(self, queues: int) -> list[str]:
        return ["nbd-client", "-unix", str(self.sock), f"/dev/{self.nbd}", "-b", "512",
                "-C", str(queues)]

    def describe(self, queues: int) -> str:
        return (" ".join(self.command()).replace(PLUGIN, "bench/nbdkit_passthrough.py")
                + " & " + " ".join(self.client(queues)))

    def start(self, queues: int) -> Served:
        self.sock.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        wait_for("nbdkit's socket", self.sock.exists, START_TIMEOUT, self.proc, self.log)
        run(self.client(queues), timeout=120)
        self.connected = True
        size_file = Path("/sys/block", self.nbd, "size")
        wait_for(f"{self.nbd} to have a size", lambda: int(size_file.read_text()) > 0, 60)
        dev = check_disk(self.nbd, "/virtual/block/nbd")
        return Served(dev, self.proc.pid, {"disk": self.nbd})

    def stop(self) -> None:
        if self.connected:
            run(["nbd-client", "-d", f"/dev/{self.nbd}"], timeout=120)
            self.connected = False
            size_file = Path("/sys/block", self.nbd, "size")
            wait_for(f"{self.nbd} to disconnect", lambda: int(size_file.read_text()) == 0, 60)
        if self.proc is not None:
            proc, self.proc = self.proc, None
            status = stop_process(proc, "nbdkit")
            if status != 0:
                raise RuntimeError(f"nbdkit exited {status}: {self.log.read_text()[-2000:]}")


class KernelPeer(Peer):
    """The ceiling: fio straight on the tmpfs file, or on brd / null_blk. No daemon."""

    group = "kernel"
    daemon = False

    def __init__(self, work: Path, image: Path, kind: str) -> None:
        self.kind = kind
        self.backing = {"file": "file", "brd": "ram", "null_blk": "null"}[kind]
        self.id = f"kernel-{kind}"
        self.label = {"file": "fio on the tmpfs file", "brd": "kernel brd",
                      "null_blk": "kernel null_blk"}[kind]
        super().__init__(work, image)
        self.loaded = False

    def modprobe(self) -> list[str]:
        if self.kind == "brd":
            return ["modprobe", "brd", "rd_nr=1", f"rd_size={SIZE // 1024}", "max_part=0"]
        return ["modprobe", "null_blk", "nr_devices=1", f"gb={SIZE >> 30}"]

    def describe(self, queues: int) -> str:
        return f"fio on {self.image.name} (tmpfs)" if self.kind == "file" else " ".join(
            self.modprobe())

    def start(self, queues: int) -> Served:
        if self.kind == "file":
            return Served(str(self.image), None)
        module = self.modprobe()[1]
        run(self.modprobe())
        self.loaded = True
        disk = "ram0" if self.kind == "brd" else "nullb0"
        wait_for(f"/sys/block/{disk}", Path("/sys/block", disk).exists, 30)
        dev = check_disk(disk, f"/block/{disk}")
        return Served(dev, None, {"disk": disk, "module": module})

    def stop(self) -> None:
        if self.loaded:
            run(["rmmod", "brd" if self.kind == "brd" else "null_blk"], timeout=120)
            self.loaded = False


def make_peers(work: Path, image: Path) -> list[Peer]:
    return [
        PyvdusePeer(work, image, "file"),
        QsdPeer(work, image, "file", "threads"),
        QsdPeer(work, image, "file", "io_uring"),
        NbdPeer(work, image, "file"),
        NbdPeer(work, image, "python"),
        KernelPeer(work, image, "file"),
        PyvdusePeer(work, image, "null"),
        QsdPeer(work, image, "null"),
        NbdPeer(work, image, "null"),
        KernelPeer(work, image, "null_blk"),
        KernelPeer(work, image, "brd"),
    ]


# --------------------------------------------------------------------- fio

class Fio:
    """fio run from a copy on the tmpfs: loading it and its ~60 shared libraries
    (librbd, glusterfs, ...) over the 9p root costs ~10 s of emulated system time
    per start; from the tmpfs it is page-cache resident."""

    def __init__(self, work: Path) -> None:
        self.env = dict(os.environ)
        self.binary = shutil.which("fio") or "/usr/bin/fio"
        self.cmd_prefix = [self.binary]
        copy = work / "fio-copy"
        try:
            libs = []
            for line in run(["ldd", self.binary]).stdout.splitlines():
                m = re.search(r"=>\s+(/\S+)", line)
                if m:
                    libs.append(m.group(1))
            (copy / "lib").mkdir(parents=True, exist_ok=True)
            for lib in libs:
                shutil.copy(lib, copy / "lib" / Path(lib).name)
            shutil.copy(self.binary, copy / "fio")
            self.env["LD_LIBRARY_PATH"] = str(copy / "lib")
            self.cmd_prefix = [str(copy / "fio")]
        except (OSError, RuntimeError) as exc:
            say(f"could not copy fio to the tmpfs ({exc}); running it from the shared root")

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return run([*self.cmd_prefix, *args], timeout=timeout, env=self.env)


def fio_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """IOPS, bandwidth and latency (total: submission + completion) of one fio JSON report."""
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    dirs: dict[str, Any] = {}
    for d in ("read", "write"):
        st = job[d]
        ios = st.get("total_ios", 0)
        if not ios:
            continue
        lat = st.get("lat_ns", {})
        pct = lat.get("percentile") or st.get("clat_ns", {}).get("percentile") or {}
        dirs[d] = {
            "iops": st["iops"],
            "bw_bytes": st["bw_bytes"],
            "ios": ios,
            "lat_mean_us": lat.get("mean", 0.0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000,
        }
    if not dirs:
        raise RuntimeError("fio did no I/O")
    total_ios = sum(v["ios"] for v in dirs.values())
    return {
        "iops": sum(v["iops"] for v in dirs.values()),
        "bw_bytes": sum(v["bw_bytes"] for v in dirs.values()),
        "lat_mean_us": sum(v["lat_mean_us"] * v["ios"] for v in dirs.values()) / total_ios,
        "lat_p99_us": max(v["lat_p99_us"] for v in dirs.values()),
        "ios": total_ios,
        "dirs": dirs,
        "fio_cpu_usr": job.get("usr_cpu"),
        "fio_cpu_sys": job.get("sys_cpu"),
    }


# -------------------------------------------------------------------- main

def pyvduse_source() -> str:
    """Where the daemon's pyvduse package comes from (bench/run --commit sets PYTHONPATH)."""
    import pyvduse

    where = str(Path(pyvduse.__file__).resolve())
    extra = os.environ.get("PYTHONPATH", "")
    if extra and where.startswith(str(Path(extra).resolve())):
        return "a commit's sources (bench/run --commit)"
    return "the working tree (the venv's editable install)"


def make_image(path: Path) -> None:
    """SIZE bytes of non-zero data, every page allocated (no holes) on the tmpfs."""
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(SIZE >> 20):
            f.write(block)


def new_entry(peer: Peer) -> dict[str, Any]:
    return {"id": peer.id, "label": peer.label, "group": peer.group, "backing": peer.backing,
            "daemon": peer.daemon, "phases": [], "results": {}, "errors": []}


def start_peer(peer: Peer, queues: int, record: dict[str, Any]) -> Served:
    t = time.monotonic()
    try:
        served = peer.start(queues)
    except BaseException:
        with contextlib.suppress(Exception):
            peer.stop()
        raise
    record["start_seconds"] = round(time.monotonic() - t, 2)
    record["device"] = served.device
    record.update(served.detail)
    disk = served.detail.get("disk")
    if disk:
        queue_dir = Path("/sys/block", disk, "queue")
        record["logical_block_size"] = int((queue_dir / "logical_block_size").read_text())
        mq = Path("/sys/block", disk, "mq")
        record["hw_queues"] = len(list(mq.iterdir())) if mq.exists() else None
    if served.pid is not None:
        record["rss_at_start"] = peak_rss(served.pid)
    return served


def finish_peer(peer: Peer, served: Served, record: dict[str, Any]) -> None:
    try:
        if served.pid is not None:
            record["rss_peak"] = peak_rss(served.pid)
            record["cpu_seconds_total"] = cpu_seconds(served.pid)
    finally:
        t = time.monotonic()
        peer.stop()
        record["stop_seconds"] = round(time.monotonic() - t, 2)


def run_job(peer: Peer, served: Served, w: Workload, fio: Fio, args: argparse.Namespace,
            out: Path, queues: int) -> dict[str, Any]:
    fio_args = w.fio_args(served.device, args.runtime, args.ramp, str(out))
    cpu0 = cpu_seconds(served.pid) if served.pid else None
    t = time.monotonic()
    fio.run(fio_args, timeout=args.runtime + args.ramp + 600)
    m = fio_metrics(json.loads(out.read_text()))
    m["wall_seconds"] = round(time.monotonic() - t, 2)
    if served.pid is not None and cpu0 is not None:
        cpu = cpu_seconds(served.pid) - cpu0
        m["daemon_cpu_seconds"] = round(cpu, 3)
        # The daemon idles (blocked on its kicks) outside fio's I/O window, so
        # CPU over ramp + runtime is its load under I/O.
        m["daemon_cpu_percent"] = round(100 * cpu / (args.runtime + args.ramp), 1)
    m["queues"] = queues
    return m


def run_all(peers: list[Peer], workloads: list[Workload], fio: Fio, args: argparse.Namespace,
            fio_dir: Path, save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Serve every peer at once and run each workload on each peer in turn.

    Peers take turns job by job (the starting peer rotates from one workload to the
    next), so a change in the host's load while the benchmark runs spreads over
    all peers instead of landing on whichever peer happened to run then. An idle
    server costs nothing: each waits on its kick eventfds or sockets.
    """
    entries = {peer.id: new_entry(peer) for peer in peers}
    rotation = 0
    for queues in sorted({w.queues for w in workloads}):
        batch = [w for w in workloads if w.queues == queues]
        up: list[tuple[Peer, Served, dict[str, Any]]] = []
        try:
            for peer in peers:
                record: dict[str, Any] = {"queues": queues, "command": peer.describe(queues),
                                          "workloads": [w.id for w in batch]}
                entries[peer.id]["phases"].append(record)
                say(f"{peer.id}: starting with {queues} queue(s): {record['command']}")
                try:
                    served = start_peer(peer, queues, record)
                except Exception as exc:
                    entries[peer.id]["errors"].append(f"start with {queues} queue(s): {exc}")
                    say(f"{peer.id}: FAILED to start: {exc}")
                    traceback.print_exc()
                    continue
                up.append((peer, served, record))
                say(f"{peer.id}: {served.device} up after {record['start_seconds']} s")
            for w in batch:
                order = up[rotation % len(up):] + up[:rotation % len(up)] if up else []
                rotation += 1
                for peer, served, _record in order:
                    entry = entries[peer.id]
                    out = fio_dir / peer.id / f"{w.id}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        m = run_job(peer, served, w, fio, args, out, queues)
                    except Exception as exc:
                        entry["errors"].append(f"{w.id}: {exc}")
                        say(f"{peer.id}: {w.id} FAILED: {exc}")
                        continue
                    entry["results"][w.id] = m
                    say(f"{peer.id}: {w.id}: {m['iops']:,.0f} IOPS "
                        f"{m['bw_bytes'] / 2**20:,.1f} MiB/s mean {m['lat_mean_us']:,.0f} us "
                        f"p99 {m['lat_p99_us']:,.0f} us"
                        + (f" daemon CPU {m['daemon_cpu_percent']}%"
                           if "daemon_cpu_percent" in m else "")
                        + f" ({m['wall_seconds']} s)")
                save(list(entries.values()))
        finally:
            for peer, served, record in up:
                try:
                    finish_peer(peer, served, record)
                except Exception as exc:
                    entries[peer.id]["errors"].append(f"stop with {queues} queue(s): {exc}")
                    say(f"{peer.id}: FAILED to stop cleanly: {exc}")
                if peer.log.exists():
                    record["log_tail"] = peer.log.read_text(errors="replace")[-1500:]
            save(list(entries.values()))
    return list(entries.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("VM_RUN_OUTDIR", ".")))
    p.add_argument("--runtime", type=float, default=10.0, help="fio measured seconds per job")
    p.add_argument("--ramp", type=float, default=2.0, help="fio ramp seconds before measuring")
    p.add_argument("--smoke", action="store_true",
                   help=f"only {', '.join(SMOKE_WORKLOADS)} per peer (use a short --runtime)")
    p.add_argument("--peers", help="comma-separated peer ids (default: all)")
    p.add_argument("--workloads", help="comma-separated workload ids (default: all)")
    args = p.parse_args()

    if not Path("/dev/vduse/control").exists():
        say("/dev/vduse/control missing: this runs in the VM guest (bench/run)")
        return 2
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    fio_dir = args.out / "fio"
    shutil.rmtree(fio_dir, ignore_errors=True)

    workloads = WORKLOADS
    if args.smoke:
        workloads = [w for w in WORKLOADS if w.id in SMOKE_WORKLOADS]
    if args.workloads:
        wanted = args.workloads.split(",")
        workloads = [w for w in WORKLOADS if w.id in wanted]
    peers = make_peers(work, image)
    if args.peers:
        wanted = args.peers.split(",")
        unknown = set(wanted) - {peer.id for peer in peers}
        if unknown:
            say(f"unknown peer(s): {', '.join(sorted(unknown))}")
            return 2
        peers = [peer for peer in peers if peer.id in wanted]

    t = time.monotonic()
    make_image(image)
    say(f"backing file: {SIZE >> 20} MiB of data on the tmpfs in {time.monotonic() - t:.1f} s")
    run(["modprobe", "nbd", f"nbds_max={len(NbdPeer.PLUGINS)}"])
    fio = Fio(work)

    meta = {
        "guest_kernel": platform.release(),
        "guest_cpus": os.cpu_count(),
        "guest_mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "fio": version_of(["fio", "--version"]),
        "qemu_storage_daemon": version_of(["qemu-storage-daemon", "--version"]),
        "nbdkit": version_of(["nbdkit", "--version"]),
        "nbd_client": version_of(["nbd-client", "-V"]),
        "python": platform.python_version(),
        "pyvduse_source": pyvduse_source(),
        "runtime": args.runtime,
        "ramp": args.ramp,
        "smoke": args.smoke,
        "size": SIZE,
        "queue_size": QUEUE_SIZE,
        "fio_common": "--ioengine=libaio --direct=1 --time_based --norandommap --randrepeat=0 "
                      "--group_reporting --lat_percentiles=1 --output-format=json",
    }
    raw: dict[str, Any] = {
        "meta": meta,
        "workloads": [{"id": w.id, "label": w.label, "queues": w.queues, "numjobs": w.numjobs,
                       "fio": " ".join(w.fio_args("DEV", args.runtime, args.ramp, "OUT.json"))}
                      for w in workloads],
        "peers": [],
    }
    out_file = args.out / "raw.json"

    def save(entries: list[dict[str, Any]]) -> None:
        raw["peers"] = entries
        meta["guest_seconds"] = round(time.monotonic() - T0, 1)
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=1) + "\n")
        tmp.replace(out_file)

    entries = run_all(peers, workloads, fio, args, fio_dir, save)
    failed = False
    for entry in entries:
        failed |= bool(entry["errors"])
        for err in entry["errors"]:
            say(f"{entry['id']}: error: {err}")
    image.unlink(missing_ok=True)
    say("FAILED: some peers or workloads did not run" if failed else "all peers ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
