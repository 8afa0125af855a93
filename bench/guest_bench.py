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
jobs, and that of the storage server behind a client (nbdkit, ceph-osd), and
its peak RSS (VmHWM from /proc/PID/status), and stops every peer cleanly.
This happens twice: with one queue (one nbd connection) for the single-job
workloads and the 1-queue mixed job, then with two queues for the 2-queue
2-job mixed job.

The RBD peers (pyvduse's rbd backend, QSD's rbd driver, the kernel rbd
client) come last, in a phase of their own: the local peers are stopped and
the backing file deleted first, then a throwaway one-node Ceph cluster
(scripts/ceph-cluster: memstore, so the image lives in the OSD's memory)
starts, one RBD_SIZE image is filled with data, and the RBD peers take turns
on it job by job, on RBD_WORKLOADS only (--rbd-workloads) to keep the full
run short. The cluster's background work (monitor, manager) thus never runs
during another peer's jobs.

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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import report  # bench/report.py: this script's folder is on sys.path

HERE = Path(__file__).resolve().parent
PYVDUSE = str(Path(sys.executable).with_name("pyvduse"))
PLUGIN = str(HERE / "nbdkit_passthrough.py")
SIZE = 1 << 30  # 1 GiB device / backing file
RBD_SIZE = 256 << 20  # the RBD image (memstore keeps it in the OSD's memory)
RBD_IMAGE = "rbd/bench"
CEPH_CLUSTER = str(HERE.parent / "scripts" / "ceph-cluster")
MGR_MODULES = "/usr/share/ceph/mgr"  # where Debian's ceph-mgr has its Python modules
QUEUE_SIZE = 256
# pyvduse-nolog: serve without the inflight log (a test-only switch of pyvduse's)
NO_LOG_ENV = "PYVDUSE_TEST_NO_INFLIGHT_LOG"
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
# The RBD peers run these only by default (bench/run --rbd-workloads): the full
# run stays under 30 minutes.
RBD_WORKLOADS = ("randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32",
                 "randwrite-4k-qd32", "seqread-1m-qd8", "seqwrite-1m-qd8")


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


def check_disk(disk: str, must_contain: str, size: int = SIZE) -> str:
    """Check /sys/block/DISK is the expected device of ``size`` bytes; return /dev/DISK."""
    sys_path = Path("/sys/block", disk)
    real = os.path.realpath(sys_path)
    if not sys_path.exists() or must_contain not in real:
        raise RuntimeError(f"/sys/block/{disk} -> {real} does not belong to {must_contain!r}")
    sectors = int((sys_path / "size").read_text())
    if sectors * 512 != size:
        raise RuntimeError(f"{disk}: {sectors} sectors, expected {size // 512}")
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

def stop_qsd_export(daemon: Any) -> None:
    """Detach a qemu-storage-daemon vduse-blk export (``vdpa dev del``) and stop the daemon.

    ``daemon`` has ``name``, ``added`` (attached through vdpa), ``proc`` and ``log``;
    ``added`` and ``proc`` are cleared. Raises if the daemon exits with an error.
    """
    if daemon.added:
        disk = vdpa_disk(daemon.name)
        run(["vdpa", "dev", "del", daemon.name])
        daemon.added = False
        if disk:
            wait_for(f"/sys/block/{disk} to go", lambda: not Path("/sys/block", disk).exists(),
                     60)
    if daemon.proc is not None:
        proc, daemon.proc = daemon.proc, None
        status = stop_process(proc, "qemu-storage-daemon")
        if status != 0:
            raise RuntimeError(f"qemu-storage-daemon exited {status}: "
                               f"{daemon.log.read_text()[-2000:]}")


@dataclass
class Served:
    """A peer's block device while it is up."""

    device: str  # what fio opens
    pid: int | None  # the user-space server to account CPU/RSS to, if any
    detail: dict[str, Any] = field(default_factory=dict)
    # The storage server behind a client (nbdkit, ceph-osd), whose CPU time is
    # measured around each job too; None when the peer is no client of one.
    server_pid: int | None = None


class Peer:
    id = ""
    label = ""
    group = ""  # pyvduse, qsd, nbd, kernel
    backing = ""  # file, null, ram or rbd
    daemon = True
    remote = False  # an RBD peer: runs in the last phase, on the Ceph cluster
    optional = False  # runs only when named in --peers
    size = SIZE  # bytes of the block device

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


class Nbdkit:
    """An nbdkit server on a Unix socket: the file plugin (one command for the
    kernel nbd client and for pyvduse's nbd backend), the Python pass-through
    plugin or the null plugin."""

    def __init__(self, work: Path, image: Path, plugin: str, name: str) -> None:
        self.plugin = plugin
        self.image = image
        self.sock = work / f"{name}.sock"
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        plugin = {"file": ["file", f"file={self.image}"],
                  "python": ["python", PLUGIN, f"file={self.image}"],
                  "null": ["null", f"size={SIZE}"]}[self.plugin]
        return ["nbdkit", "-f", "-U", str(self.sock), *plugin]

    def describe(self) -> str:
        return " ".join(self.command()).replace(PLUGIN, "bench/nbdkit_passthrough.py")

    def start(self) -> int:
        self.sock.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        wait_for("nbdkit's socket", self.sock.exists, START_TIMEOUT, self.proc, self.log)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            status = stop_process(proc, "nbdkit")
            if status != 0:
                raise RuntimeError(f"nbdkit exited {status}: {self.log.read_text()[-2000:]}")


class CephCluster:
    """The throwaway one-node Ceph cluster of scripts/ceph-cluster (memstore, no
    authentication, pool ``rbd``) and the one RBD_SIZE image all RBD peers use.

    The image has the ``layering`` feature only: no exclusive lock to pass from
    one client to the next (all RBD peers have it open at once), no object map.
    """

    def __init__(self, work: Path) -> None:
        self.dir = work / "ceph"
        self.conf = self.dir / "ceph.conf"
        self.up = False
        self.error = "not started"

    def rbd(self, *args: str) -> list[str]:
        return ["rbd", "-c", str(self.conf), *args]

    def start(self) -> dict[str, Any]:
        """Start the cluster, create and fill the image; return what it took."""
        shutil.rmtree(self.dir, ignore_errors=True)
        cmd = [CEPH_CLUSTER, str(self.dir)]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", socket.gethostname()):
            # The guest's hostname is the kernel's "(none)", which is no valid CRUSH
            # name: the OSD then fails to set its CRUSH location (host=HOSTNAME) at
            # start. Give the cluster's daemons a UTS namespace named "localhost"
            # (where scripts/ceph-cluster puts the OSD in the CRUSH map).
            cmd = ["unshare", "--uts", "--", "sh", "-c",
                   'echo localhost >/proc/sys/kernel/hostname && exec "$0" "$@"', *cmd]
        # The manager loads every Python module it finds, each in a sub-interpreter
        # of its own: ~6 s apiece under TCG, ~3 minutes in all, and until then no
        # placement group state is known (scripts/ceph-cluster gives up after 60 s).
        # The benchmark needs none of them: a module path with only their base
        # files (the health then says the always-on modules failed, no matter).
        modules = self.dir.parent / "ceph-mgr-modules"
        shutil.rmtree(modules, ignore_errors=True)
        modules.mkdir()
        for name in ("mgr_module.py", "mgr_util.py"):
            (modules / name).symlink_to(Path(MGR_MODULES, name))
        env = dict(os.environ, CEPH_ARGS=f"--mgr_module_path={modules}")
        t = time.monotonic()
        log = self.dir.parent / "ceph-cluster.log"
        try:
            with log.open("wb") as out:
                status = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=out, env=env,
                                        timeout=900).returncode
        except subprocess.TimeoutExpired:
            status = -1
        if status != 0:
            text = log.read_text(errors="replace")
            say(f"scripts/ceph-cluster exited {status}:\n{text[-4000:]}")
            # its own lines say which step failed; the daemon's log tail follows them
            steps = [line for line in text.splitlines() if line.startswith("ceph-cluster:")]
            self.error = f"scripts/ceph-cluster exited {status}: {'; '.join(steps)[-1000:]}"
            raise RuntimeError(self.error)
        self.up = True
        self.error = ""
        started = time.monotonic() - t
        t = time.monotonic()
        data = self.dir.parent / "rbd-image.data"
        try:
            make_image(data, RBD_SIZE)
            run(self.rbd("import", "--no-progress", "--image-feature", "layering", str(data),
                         RBD_IMAGE), timeout=900)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            self.error = f"creating {RBD_IMAGE}: {exc}"
            raise RuntimeError(self.error) from None
        finally:
            data.unlink(missing_ok=True)
        return {"cluster_start_seconds": round(started, 1),
                "image_fill_seconds": round(time.monotonic() - t, 1),
                "image": RBD_IMAGE, "image_size": RBD_SIZE, "image_features": "layering",
                "objectstore": "memstore", "osd_pid": self.osd_pid()}

    def osd_pid(self) -> int:
        if not self.up:
            raise RuntimeError(f"the Ceph cluster is not up ({self.error})")
        return int((self.dir / "run" / "osd.0.pid").read_text())

    def stop(self) -> None:
        if self.up:
            self.up = False
            self.error = "stopped"
            run([CEPH_CLUSTER, "--stop", str(self.dir)], timeout=300)


class PyvdusePeer(Peer):
    """pyvduse on a backend; ``log=False``: without its inflight log (the test-only
    switch), to measure what the log costs against the same daemon with it;
    ``metrics=True``: with ``--metrics`` (every request counted), to measure what
    counting costs against the same daemon without it."""

    group = "pyvduse"

    #: Extra ``pyvduse serve`` options for every pyvduse peer (``--pyvduse-args``).
    extra_args: ClassVar[list[str]] = []

    def __init__(self, work: Path, image: Path, backend: str,
                 ceph: CephCluster | None = None, log: bool = True,
                 metrics: bool = False) -> None:
        if (not log or metrics) and backend != "file":
            raise ValueError("only the file backend has peers without the inflight log "
                             "or with metrics")
        self.id = ("pyvduse-nolog" if not log else "pyvduse-metrics" if metrics
                   else f"pyvduse-{backend}")
        self.label = {"file": "pyvduse file", "null": "pyvduse null",
                      "nbd": "pyvduse nbd", "rbd": "pyvduse rbd"}[backend]
        if not log:
            self.label += ", no inflight log"
            self.optional = True
        self.metrics = metrics
        if metrics:
            self.label += ", metrics on"
            self.optional = True
        self.log_on = log
        self.backend = backend
        self.backing = "file" if backend == "nbd" else backend
        self.remote = backend == "rbd"
        self.size = RBD_SIZE if backend == "rbd" else SIZE
        self.name = self.id.replace("-", "")
        super().__init__(work, image)
        self.ceph = ceph
        # pyvduse's nbd backend against its own nbdkit, the same command as nbdkit-file's
        self.nbdkit = Nbdkit(work, image, "file", f"{self.id}-nbdkit") if backend == "nbd" else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfile = work / f"{self.name}.pid"

    def backend_args(self, queues: int) -> list[str]:
        if self.nbdkit is not None:
            return ["nbd", f"uri=nbd+unix:///?socket={self.nbdkit.sock}",
                    f"connections={queues}"]
        if self.ceph is not None:
            # librbd's cache off, as for qsd-rbd (cache.direct=on) and the kernel client
            pool, image = RBD_IMAGE.split("/")
            return ["rbd", f"pool={pool}", f"image={image}", f"conf={self.ceph.conf}",
                    "cache=off"]
        if self.backend == "file":
            return ["file", f"path={self.image}"]
        return ["null", f"size={SIZE}"]

    def command(self, queues: int) -> list[str]:
        counted = ["--metrics", "127.0.0.1:0"] if self.metrics else []
        return [PYVDUSE, "serve", "--name", self.name, "--num-queues", str(queues),
                "--queue-size", str(QUEUE_SIZE), "--pidfile", str(self.pidfile),
                *counted, *self.extra_args, *self.backend_args(queues)]

    def env(self) -> dict[str, str] | None:
        return None if self.log_on else dict(os.environ, **{NO_LOG_ENV: "1"})

    def describe(self, queues: int) -> str:
        cmd = " ".join(self.command(queues)).replace(PYVDUSE, ".venv/bin/pyvduse")
        if not self.log_on:
            cmd = f"{NO_LOG_ENV}=1 {cmd}"
        return f"{self.nbdkit.describe()} & {cmd}" if self.nbdkit is not None else cmd

    def start(self, queues: int) -> Served:
        server_pid = None
        if self.nbdkit is not None:
            server_pid = self.nbdkit.start()
        elif self.ceph is not None:
            server_pid = self.ceph.osd_pid()
        self.pidfile.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(queues), stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env())
        wait_for("the pidfile", self.pidfile.exists, START_TIMEOUT, self.proc, self.log)
        disk = vdpa_disk(self.name)
        dev = check_disk(disk, f"/vduse/{self.name}/", self.size)
        return Served(dev, self.proc.pid, {"disk": disk}, server_pid)

    def stop(self) -> None:
        try:
            if self.proc is not None:
                proc, self.proc = self.proc, None
                status = stop_process(proc, "pyvduse")
                if status != 0:
                    raise RuntimeError(f"pyvduse exited {status}: {self.log.read_text()[-2000:]}")
                if Path("/dev/vduse", self.name).exists():
                    raise RuntimeError(f"/dev/vduse/{self.name} left behind")
        finally:
            if self.nbdkit is not None:
                self.nbdkit.stop()


class QsdPeer(Peer):
    group = "qsd"

    def __init__(self, work: Path, image: Path, backing: str, aio: str = "",
                 ceph: CephCluster | None = None) -> None:
        self.backing = backing
        self.aio = aio
        self.ceph = ceph
        self.remote = backing == "rbd"
        self.size = RBD_SIZE if backing == "rbd" else SIZE
        self.name = f"qsd{aio.replace('_', '')}" if backing == "file" else f"qsd{backing}"
        self.id = f"qsd-{aio}" if backing == "file" else f"qsd-{backing}"
        self.label = {"file": f"QSD file aio={aio}", "null": "QSD null-co",
                      "rbd": "QSD rbd"}[backing]
        super().__init__(work, image)
        self.proc: subprocess.Popen[bytes] | None = None
        self.added = False

    def command(self, queues: int) -> list[str]:
        if self.backing == "file":
            blockdev = (f"driver=file,filename={self.image},node-name=disk0,aio={self.aio},"
                        "cache.direct=off")
        elif self.ceph is not None:
            # cache.direct=on: QEMU turns librbd's cache off (rbd_cache=false)
            pool, image = RBD_IMAGE.split("/")
            blockdev = (f"driver=rbd,pool={pool},image={image},conf={self.ceph.conf},"
                        "node-name=disk0,cache.direct=on")
        else:
            blockdev = f"driver=null-co,node-name=disk0,size={SIZE},read-zeroes=on"
        export = (f"type=vduse-blk,id=e0,node-name=disk0,writable=on,name={self.name},"
                  f"num-queues={queues},queue-size={QUEUE_SIZE}")
        return ["qemu-storage-daemon", "--blockdev", blockdev, "--export", export]

    def describe(self, queues: int) -> str:
        return (" ".join(self.command(queues))
                + f" & vdpa dev add name {self.name} mgmtdev vduse")

    def start(self, queues: int) -> Served:
        server_pid = self.ceph.osd_pid() if self.ceph is not None else None
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
        dev = check_disk(disk, f"/vduse/{self.name}/", self.size)
        return Served(dev, self.proc.pid, {"disk": disk}, server_pid)

    def stop(self) -> None:
        stop_qsd_export(self)


class NbdPeer(Peer):
    """nbdkit + the kernel nbd client; the daemon measured is nbdkit (also the server)."""

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
        self.nbdkit = Nbdkit(work, image, plugin, self.id)
        self.connected = False

    def client(self, queues: int) -> list[str]:
        return ["nbd-client", "-unix", str(self.nbdkit.sock), f"/dev/{self.nbd}", "-b", "512",
                "-C", str(queues)]

    def describe(self, queues: int) -> str:
        return self.nbdkit.describe() + " & " + " ".join(self.client(queues))

    def start(self, queues: int) -> Served:
        pid = self.nbdkit.start()
        run(self.client(queues), timeout=120)
        self.connected = True
        size_file = Path("/sys/block", self.nbd, "size")
        wait_for(f"{self.nbd} to have a size", lambda: int(size_file.read_text()) > 0, 60)
        dev = check_disk(self.nbd, "/virtual/block/nbd")
        return Served(dev, pid, {"disk": self.nbd}, pid)

    def stop(self) -> None:
        if self.connected:
            run(["nbd-client", "-d", f"/dev/{self.nbd}"], timeout=120)
            self.connected = False
            size_file = Path("/sys/block", self.nbd, "size")
            wait_for(f"{self.nbd} to disconnect", lambda: int(size_file.read_text()) == 0, 60)
        self.nbdkit.stop()


class KernelPeer(Peer):
    """The ceiling: fio straight on the tmpfs file, or on brd / null_blk; and the
    kernel rbd client. No daemon."""

    group = "kernel"
    daemon = False

    def __init__(self, work: Path, image: Path, kind: str,
                 ceph: CephCluster | None = None) -> None:
        self.kind = kind
        self.ceph = ceph
        self.backing = {"file": "file", "brd": "ram", "null_blk": "null", "rbd": "rbd"}[kind]
        self.remote = kind == "rbd"
        self.size = RBD_SIZE if kind == "rbd" else SIZE
        self.id = f"kernel-{kind}"
        self.label = {"file": "fio on the tmpfs file", "brd": "kernel brd",
                      "null_blk": "kernel null_blk", "rbd": "kernel rbd"}[kind]
        super().__init__(work, image)
        self.loaded = False
        self.mapped = ""

    def modprobe(self) -> list[str]:
        if self.kind == "brd":
            return ["modprobe", "brd", "rd_nr=1", f"rd_size={SIZE // 1024}", "max_part=0"]
        if self.kind == "rbd":
            return ["modprobe", "rbd"]
        return ["modprobe", "null_blk", "nr_devices=1", f"gb={SIZE >> 30}"]

    def rbd_map(self) -> list[str]:
        assert self.ceph is not None
        # noudev: the guest may have no udev daemon to announce the device;
        # ms_mode=prefer-crc: the monitor has a msgr2 address only (the default,
        # legacy, needs a v1 one)
        return self.ceph.rbd("map", "-o", "noudev,ms_mode=prefer-crc", RBD_IMAGE)

    def describe(self, queues: int) -> str:
        if self.kind == "file":
            return f"fio on {self.image.name} (tmpfs)"
        if self.kind == "rbd":
            return " ".join(self.rbd_map()) + " (the kernel rbd client)"
        return " ".join(self.modprobe())

    def start(self, queues: int) -> Served:
        if self.kind == "file":
            return Served(str(self.image), None)
        if self.ceph is not None:
            osd = self.ceph.osd_pid()
            run(self.modprobe())
            self.mapped = run(self.rbd_map(), timeout=300).stdout.strip()
            if not self.mapped:  # find it in sysfs: /sys/bus/rbd/devices/ID/{pool,name}
                pool, name = RBD_IMAGE.split("/")
                for d in Path("/sys/bus/rbd/devices").iterdir():
                    if ((d / "pool").read_text().strip(), (d / "name").read_text().strip()) \
                            == (pool, name):
                        self.mapped = f"/dev/rbd{d.name}"
            disk = Path(self.mapped).name
            wait_for(f"/sys/block/{disk}", Path("/sys/block", disk).exists, 30)
            dev = check_disk(disk, "/devices/rbd/", self.size)
            return Served(dev, None, {"disk": disk, "module": "rbd"}, osd)
        module = self.modprobe()[1]
        run(self.modprobe())
        self.loaded = True
        disk = "ram0" if self.kind == "brd" else "nullb0"
        wait_for(f"/sys/block/{disk}", Path("/sys/block", disk).exists, 30)
        dev = check_disk(disk, f"/block/{disk}")
        return Served(dev, None, {"disk": disk, "module": module})

    def stop(self) -> None:
        if self.mapped:
            assert self.ceph is not None
            mapped, self.mapped = self.mapped, ""
            run(self.ceph.rbd("unmap", "-o", "noudev", mapped), timeout=120)
        if self.loaded:
            run(["rmmod", "brd" if self.kind == "brd" else "null_blk"], timeout=120)
            self.loaded = False


def make_peers(work: Path, image: Path, ceph: CephCluster) -> list[Peer]:
    return [
        PyvdusePeer(work, image, "file"),
        PyvdusePeer(work, image, "file", log=False),
        PyvdusePeer(work, image, "file", metrics=True),
        QsdPeer(work, image, "file", "threads"),
        QsdPeer(work, image, "file", "io_uring"),
        NbdPeer(work, image, "file"),
        PyvdusePeer(work, image, "nbd"),
        NbdPeer(work, image, "python"),
        KernelPeer(work, image, "file"),
        PyvdusePeer(work, image, "null"),
        QsdPeer(work, image, "null"),
        NbdPeer(work, image, "null"),
        KernelPeer(work, image, "null_blk"),
        KernelPeer(work, image, "brd"),
        PyvdusePeer(work, image, "rbd", ceph),
        QsdPeer(work, image, "rbd", ceph=ceph),
        KernelPeer(work, image, "rbd", ceph),
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


def make_image(path: Path, size: int = SIZE) -> None:
    """``size`` bytes of non-zero data, every page allocated (no holes) on the tmpfs."""
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def new_entry(peer: Peer, workloads: list[Workload]) -> dict[str, Any]:
    return {"id": peer.id, "label": peer.label, "group": peer.group, "backing": peer.backing,
            "daemon": peer.daemon, "remote": peer.remote, "size": peer.size,
            "workloads": [w.id for w in workloads], "phases": [], "results": {}, "errors": []}


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


def start_profile(pid: int, seconds: float, data: Path) -> subprocess.Popen[bytes]:
    """``perf record -g`` of process ``pid`` (every thread, io_uring workers too) for
    ``seconds``, into ``data``."""
    data.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["perf", "record", "-q", "-g", "-p", str(pid), "-o", str(data),
                             "--", "sleep", f"{seconds:.1f}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_profile(recorder: subprocess.Popen[bytes], data: Path, report: Path) -> None:
    """Wait for ``recorder``, then write its flat profile (threads, objects, symbols of
    1 % of the samples or more) to ``report`` and delete ``data``."""
    recorder.wait(timeout=120)
    with report.open("w") as out:
        subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                        "--percent-limit", "1", "--sort", "comm,dso,sym", "-g", "none"],
                       stdout=out, stderr=subprocess.STDOUT, timeout=300, check=False)
    data.unlink(missing_ok=True)


def run_job(peer: Peer, served: Served, w: Workload, fio: Fio, args: argparse.Namespace,
            out: Path, queues: int) -> dict[str, Any]:
    fio_args = w.fio_args(served.device, args.runtime, args.ramp, str(out))
    cpu0 = cpu_seconds(served.pid) if served.pid else None
    server0 = cpu_seconds(served.server_pid) if served.server_pid else None
    name = f"{out.parent.name}-{out.stem}"  # peer-job
    profile = args.out / "perf" / f"{name}.perf.data"
    recorder = (start_profile(served.pid, args.ramp + args.runtime, profile)
                if args.perf and served.pid else None)
    t = time.monotonic()
    fio.run(fio_args, timeout=args.runtime + args.ramp + 600)
    if recorder is not None:
        finish_profile(recorder, profile, profile.with_name(f"{name}.perf.txt"))
    m = fio_metrics(json.loads(out.read_text()))
    m["wall_seconds"] = round(time.monotonic() - t, 2)
    seconds = args.runtime + args.ramp
    if served.pid is not None and cpu0 is not None:
        cpu = cpu_seconds(served.pid) - cpu0
        m["daemon_cpu_seconds"] = round(cpu, 3)
        # The daemon idles (blocked on its kicks) outside fio's I/O window, so
        # CPU over ramp + runtime is its load under I/O.
        m["daemon_cpu_percent"] = round(100 * cpu / seconds, 1)
    if served.server_pid is not None and server0 is not None:
        cpu = cpu_seconds(served.server_pid) - server0
        m["server_cpu_seconds"] = round(cpu, 3)
        m["server_cpu_percent"] = round(100 * cpu / seconds, 1)
    m["queues"] = queues
    return m


def run_all(peers: list[Peer], workloads: list[Workload], fio: Fio, args: argparse.Namespace,
            fio_dir: Path, entries: dict[str, dict[str, Any]],
            save: Callable[[list[dict[str, Any]]], None]) -> None:
    """Serve every peer at once and run each workload on each peer in turn.

    Peers take turns job by job (the starting peer rotates from one workload to the
    next), so a change in the host's load while the benchmark runs spreads over
    all peers instead of landing on whichever peer happened to run then. An idle
    server costs nothing: each waits on its kick eventfds or sockets. A peer runs
    only the workloads of its entry (the RBD peers: a subset); the results go
    into ``entries``. With ``args.rounds`` > 1 the whole sequence of jobs runs that
    many times (each round starting with the next peer); every round's figures are
    kept under the entry's ``rounds`` and ``results`` holds their mean.
    """
    rounds = args.rounds
    rotation = 0
    for queues in sorted({w.queues for w in workloads}):
        batch = [w for w in workloads if w.queues == queues]
        up: list[tuple[Peer, Served, dict[str, Any]]] = []
        try:
            for peer in peers:
                mine = [w.id for w in batch if w.id in entries[peer.id]["workloads"]]
                if not mine:
                    continue
                record: dict[str, Any] = {"queues": queues, "command": peer.describe(queues),
                                          "workloads": mine}
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
            jobs = [(n, w) for n in range(1, rounds + 1) for w in batch]
            for n, w in jobs:
                if n > 1 and w is batch[0] and len(batch) % max(len(up), 1) == 0:
                    rotation += 1  # else the round would start with the same peer again
                order = up[rotation % len(up):] + up[:rotation % len(up)] if up else []
                rotation += 1
                for peer, served, _record in order:
                    entry = entries[peer.id]
                    if w.id not in entry["workloads"]:
                        continue
                    name = w.id if rounds == 1 else f"{w.id}.round{n}"
                    out = fio_dir / peer.id / f"{name}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        m = run_job(peer, served, w, fio, args, out, queues)
                    except Exception as exc:
                        entry["errors"].append(f"{name}: {exc}")
                        say(f"{peer.id}: {name} FAILED: {exc}")
                        continue
                    if rounds == 1:
                        entry["results"][w.id] = m
                    else:
                        m["round"] = n
                        done = entry.setdefault("rounds", {}).setdefault(w.id, [])
                        done.append(m)
                        entry["results"][w.id] = report.mean_of_rounds(done)
                    say(f"{peer.id}: {name}: {m['iops']:,.0f} IOPS "
                        f"{m['bw_bytes'] / 2**20:,.1f} MiB/s mean {m['lat_mean_us']:,.0f} us "
                        f"p99 {m['lat_p99_us']:,.0f} us"
                        + (f" daemon CPU {m['daemon_cpu_percent']}%"
                           if "daemon_cpu_percent" in m else "")
                        + (f" server CPU {m['server_cpu_percent']}%"
                           if "server_cpu_percent" in m else "")
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("VM_RUN_OUTDIR", ".")))
    p.add_argument("--runtime", type=float, default=10.0, help="fio measured seconds per job")
    p.add_argument("--ramp", type=float, default=2.0, help="fio ramp seconds before measuring")
    p.add_argument("--smoke", action="store_true",
                   help=f"only {', '.join(SMOKE_WORKLOADS)} per peer (use a short --runtime)")
    p.add_argument("--peers", help="comma-separated peer ids, started in this order (default: "
                   "all but pyvduse-nolog and pyvduse-metrics)")
    p.add_argument("--workloads", help="comma-separated workload ids (default: all)")
    p.add_argument("--pyvduse-args", default="", help="extra 'pyvduse serve' options")
    p.add_argument("--perf", action="store_true",
                   help="record each daemon with perf during each job (OUT/perf/*.perf.txt; "
                        "perturbs the figures: for profiles, not for measurements)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every job this many times, peers alternating (default 1)")
    p.add_argument("--rbd-workloads",
                   help="comma-separated workload ids the RBD peers run, or 'all' (default: "
                        f"{', '.join(RBD_WORKLOADS)}; with --workloads: those)")
    args = p.parse_args()
    PyvdusePeer.extra_args = shlex.split(args.pyvduse_args)

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
    rbd_wanted: list[str] | None = list(RBD_WORKLOADS)
    if args.rbd_workloads == "all" or (args.workloads and not args.rbd_workloads):
        rbd_wanted = None
    elif args.rbd_workloads:
        rbd_wanted = args.rbd_workloads.split(",")
    rbd_workloads = [w for w in workloads if rbd_wanted is None or w.id in rbd_wanted]
    ceph = CephCluster(work)
    peers = make_peers(work, image, ceph)
    if args.peers:
        wanted = args.peers.split(",")
        unknown = set(wanted) - {peer.id for peer in peers}
        if unknown:
            say(f"unknown peer(s): {', '.join(sorted(unknown))}")
            return 2
        # in the order given: peers start (and get their /dev/vdX) in that order
        peers = sorted((peer for peer in peers if peer.id in wanted),
                       key=lambda peer: wanted.index(peer.id))
    else:
        peers = [peer for peer in peers if not peer.optional]
    local = [peer for peer in peers if not peer.remote]
    remote = [peer for peer in peers if peer.remote]

    if local:
        t = time.monotonic()
        make_image(image)
        say(f"backing file: {SIZE >> 20} MiB of data on the tmpfs in "
            f"{time.monotonic() - t:.1f} s")
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
        "ceph": version_of(["ceph", "--version"]) if remote else None,
        "python": platform.python_version(),
        "pyvduse_source": pyvduse_source(),
        "runtime": args.runtime,
        "ramp": args.ramp,
        "smoke": args.smoke,
        "size": SIZE,
        "rbd_size": RBD_SIZE,
        "rbd_workloads": [w.id for w in rbd_workloads],
        "queue_size": QUEUE_SIZE,
        "rounds": args.rounds,
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

    entries = {peer.id: new_entry(peer, rbd_workloads if peer.remote else workloads)
               for peer in peers}
    if local:
        run_all(local, workloads, fio, args, fio_dir, entries, save)
    image.unlink(missing_ok=True)  # room on the tmpfs for the Ceph cluster
    if remote and rbd_workloads:
        say(f"starting a Ceph cluster; RBD peers on a {RBD_SIZE >> 20} MiB image, workloads: "
            + ", ".join(w.id for w in rbd_workloads))
        try:
            meta["rbd"] = ceph.start()
            say(f"Ceph cluster up after {meta['rbd']['cluster_start_seconds']} s, image "
                f"{RBD_IMAGE} filled in {meta['rbd']['image_fill_seconds']} s")
        except Exception as exc:  # the peers fail to start, saying why
            say(f"Ceph cluster FAILED: {exc}")
        try:
            run_all(remote, rbd_workloads, fio, args, fio_dir, entries, save)
        finally:
            try:
                ceph.stop()
            except Exception as exc:
                say(f"stopping the Ceph cluster FAILED: {exc}")
    save(list(entries.values()))
    failed = False
    for entry in entries.values():
        failed |= bool(entry["errors"])
        for err in entry["errors"]:
            say(f"{entry['id']}: error: {err}")
    say("FAILED: some peers or workloads did not run" if failed else "all peers ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
