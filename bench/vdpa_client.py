"""pyvduse vs qemu-storage-daemon as vhost-vdpa devices, driven by libblkio clients in the guest.

Each daemon exports a disk as a VDUSE device bound to ``vhost_vdpa``; a
user-space client in the guest opens ``/dev/vhost-vdpa-N`` with libblkio's
``virtio-blk-vhost-vdpa`` driver, as a VMM would, and keeps a fixed number of
requests in flight for a fixed time. The disk (``--backends``):

* ``file``: a 256 MiB file on the guest's tmpfs, filled with data (the write
  rows overwrite it: it is a scratch file);
* ``null``: a disk of the same size that reads as zeroes and drops writes
  (pyvduse ``null size=...``, QSD ``null-co,read-zeroes=on``): the daemons'
  own overhead. QSD's ``aio=`` applies to files only, so on this backend
  ``qsd-threads`` and ``qsd-io_uring`` are one daemon, ``qsd``.

The load (``--rows``): ``randread-4k`` and ``randwrite-4k`` (4 KiB at random
offsets, at every depth of ``--depths``), ``read-1m`` and ``write-1m`` (1 MiB
one after the other, wrapping at the end, at ``--seq-depth``). Two clients
(``--clients``):

* ``c``: bench/blkio_load.c (compiled by bench/blkio_load.py);
* ``python``: :class:`pyvduse.testing.blkio.BlkioClient` through ctypes in a
  child process (this file's ``pyload`` command);

each in every wait mode of ``--waits``: ``block`` (the default: the client
sleeps in ``blkioq_do_io`` until the device's interrupt wakes it; the
Python client calls ``wait(1)``) or ``loop`` (it polls for completions in a
busy loop, ``min_completions`` 0, and needs no interrupt). Both clients write
non-zero data; before every write job on the file backend the first 16 MiB
of the image are zeroed, and afterwards the job records how many of their
4 KiB blocks it wrote (``probe_blocks_written``), so that a write that never
reached the file shows.

Daemons (``--daemons``): ``pyvduse`` (this tree), ``pyvduse-base`` (the
sources of ``--baseline COMMIT``, only when given), ``qsd-threads`` and
``qsd-io_uring`` (QEMU's vduse-blk export, ``aio=threads`` / ``aio=io_uring``,
attached to ``vhost_vdpa`` by pyvduse.binding as ``pyvduse serve --attach
vhost`` attaches itself). Every round runs, per backend, every daemon in turn
(the order reverses each round) and every row, client, wait and depth against
it; the summary takes the best round of each figure and compares pyvduse with
the better QSD per (backend, row, client, wait, depth).
Per job it records the client's figures (IOPS, MiB/s, latency, its CPU), the
daemon's CPU per request and per thread, its context switches, the guest's
CPU use, and for pyvduse the IOTLB updates it served (its debug log).

On the host (no ``/dev/vduse/control``) it boots ONE guest with
scripts/vm-run (waiting until no other guest runs) and writes DIR/results.json
and DIR/results.md from the guest's raw.json::

    .venv/bin/python bench/vdpa_client.py --out DIR [--rounds 2] [--seconds 8]
        [--rows randread-4k,randwrite-4k,read-1m,write-1m] [--backends file,null]
        [--depths 1,32] [--seq-depth 8] [--clients c,python] [--waits block,loop]
        [--baseline COMMIT] [--profile] [--daemons pyvduse,qsd-threads,qsd-io_uring]
        [--pyvduse-args '--poll-max-us 0']

The guest's timeout (``--timeout``) defaults to twice the expected duration
(from the number of jobs and ``--seconds``) plus 10 minutes; the host prints
the expected duration before it boots the guest.

Run it on an otherwise idle machine: the results give the CPU that other
work used on the host during the run.

``--profile`` adds, after the rounds, a run of each pyvduse daemon under
``py-spy record`` (``.venv/bin/py-spy`` or on PATH: ``pip install py-spy``)
at QD32 with the C client (4 KiB random reads, the first backend), and puts
the hottest functions in the results.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import errno
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

DRIVER = "virtio-blk-vhost-vdpa"
IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 256
BLOCK = 4096
START_TIMEOUT = 300.0
TARGETS = {1: 1.0, 32: 0.8}
"""pyvduse / QSD for 4 KiB random reads, file backend: at QD1 and at QD32."""
TARGET_ROW = ("file", "randread-4k")
DAEMONS = ("pyvduse", "pyvduse-base", "qsd-threads", "qsd-io_uring")
ROWS: dict[str, tuple[str, int]] = {
    "randread-4k": ("randread", 4096),
    "randwrite-4k": ("randwrite", 4096),
    "read-1m": ("read", 1 << 20),
    "write-1m": ("write", 1 << 20),
}
"""Row name: (the clients' rw mode, block size); rand* rows run at --depths, the rest at
--seq-depth."""
BACKENDS = ("file", "null")
RW_MODES = ("randread", "randwrite", "read", "write")
PROBE_BYTES = 16 << 20
"""Zeroed before each write job on the file backend; the job's writes show there."""
JOB_OVERHEAD = 2.5
"""Seconds per job beyond --seconds in the TCG guest (client start, sampling; measured ~2)."""
START_COST = 5.0
"""Seconds per daemon start and stop in the guest."""
FIXED_COST = 120.0
"""Seconds for the boot, the image, building the C client and the reports."""


def say(msg: str) -> None:
    print(f"vdpa_client: {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------- the plan


def _choose(text: str, known: Any, what: str) -> list[str]:
    chosen = list(dict.fromkeys(x for x in text.split(",") if x))
    if not chosen or set(chosen) - set(known):
        raise SystemExit(f"vdpa_client: {what} are {', '.join(known)} (comma-separated), "
                         f"not {text!r}")
    return chosen


class Plan:
    """What a run measures: the same on the host (the timeout) as in the guest."""

    def __init__(self, args: argparse.Namespace, baseline: bool) -> None:
        self.rows = _choose(args.rows, ROWS, "rows")
        self.backends = _choose(args.backends, BACKENDS, "backends")
        self.clients = _choose(args.clients, ("c", "python"), "clients")
        self.waits = _choose(args.waits, ("block", "loop"), "waits")
        kinds = _choose(args.daemons, DAEMONS, "daemons")
        if baseline:
            kinds = kinds if "pyvduse-base" in kinds else [*kinds, "pyvduse-base"]
        else:
            kinds = [k for k in kinds if k != "pyvduse-base"]
        self.kinds = kinds
        try:
            self.depths = list(dict.fromkeys(int(d) for d in args.depths.split(",") if d))
        except ValueError:
            raise SystemExit(f"vdpa_client: --depths takes numbers: {args.depths!r}") from None
        self.seq_depth = args.seq_depth
        if not self.depths or min(self.depths) < 1 or self.seq_depth < 1:
            raise SystemExit("vdpa_client: depths must be positive")

    def depths_of(self, row: str) -> list[int]:
        """Random rows run at every --depths, sequential ones at --seq-depth."""
        return self.depths if ROWS[row][0].startswith("rand") else [self.seq_depth]

    def kinds_of(self, backend: str) -> list[str]:
        """The daemons for ``backend``: on null, QSD's aio= does not apply: one ``qsd``."""
        if backend == "file":
            return self.kinds
        kinds = [k for k in self.kinds if k.startswith("pyvduse")]
        return [*kinds, "qsd"] if any(k.startswith("qsd") for k in self.kinds) else kinds

    def starts_per_round(self) -> int:
        return sum(len(self.kinds_of(b)) for b in self.backends)

    def jobs_per_round(self) -> int:
        return (self.starts_per_round() * sum(len(self.depths_of(r)) for r in self.rows)
                * len(self.clients) * len(self.waits))

    def estimate(self, rounds: int, seconds: float, profile: bool) -> float:
        """Expected seconds of the guest's run."""
        total = (FIXED_COST + rounds * self.jobs_per_round() * (seconds + JOB_OVERHEAD)
                 + rounds * self.starts_per_round() * START_COST)
        if profile:
            pyvduses = sum(k.startswith("pyvduse") for k in self.kinds_of(self.backends[0]))
            total += pyvduses * (seconds + JOB_OVERHEAD + START_COST + 10)
        return total


# -------------------------------------------------------------------- the Python client


def python_load(path: str, iodepth: int, seconds: float, bs: int, size: int,
                wait: str = "block", rw: str = "randread") -> dict[str, Any]:
    """``bs`` byte requests at ``iodepth`` for ``seconds`` through BlkioClient.

    ``rw``: ``randread``/``randwrite`` at random ``bs``-aligned offsets, ``read``/``write``
    one after the other from offset 0, wrapping at the end (as bench/blkio_load.c does),
    within the first ``size`` bytes (0: all). Writes send non-zero (random) data.
    ``wait``: ``block`` reaps with ``wait(1)``, ``loop`` with ``wait(0)`` in a busy loop.
    """
    from pyvduse.testing.blkio import BlkioClient

    if rw not in RW_MODES:
        raise ValueError(f"rw must be one of {', '.join(RW_MODES)}, not {rw!r}")
    rng = random.Random(1)
    write = rw.endswith("write")
    sequential = not rw.startswith("rand")
    with BlkioClient(DRIVER, path, timeout=None) as client:
        blocks = min(size or client.capacity, client.capacity) // bs
        space = client.buffer(iodepth * bs)
        if write:
            space[:] = os.urandom(iodepth * bs)
        views = [space[i * bs:(i + 1) * bs] for i in range(iodepth)]
        submit = client.submit_write if write else client.submit_read
        next_block = 0

        def offset() -> int:
            nonlocal next_block
            if not sequential:
                return rng.randrange(blocks) * bs
            block, next_block = next_block, (next_block + 1) % blocks
            return block * bs

        slot_of: dict[int, int] = {}
        errors = completions = 0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        deadline = t0 + seconds
        for i in range(iodepth):
            slot_of[submit(offset(), views[i])] = i
        in_flight = iodepth
        stopping = False
        minimum = 1 if wait == "block" else 0
        while in_flight:
            done = client.wait(minimum, None)
            if time.monotonic() >= deadline:
                stopping = True
            for completion in done:
                slot = slot_of.pop(completion.tag)
                completions += 1
                errors += completion.ret != 0
                if stopping:
                    in_flight -= 1
                else:
                    slot_of[submit(offset(), views[slot])] = slot
        elapsed = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"driver": DRIVER, "path": path, "rw": rw, "bs": bs, "iodepth": iodepth,
            "mode": wait, "seconds": elapsed, "completions": completions, "errors": errors,
            "iops": completions / elapsed, "mib_s": completions * bs / elapsed / (1 << 20),
            "lat_us_mean": iodepth / (completions / elapsed) * 1e6,
            "cpu_usr": 100 * (r1.ru_utime - r0.ru_utime) / elapsed,
            "cpu_sys": 100 * (r1.ru_stime - r0.ru_stime) / elapsed}


# -------------------------------------------------------------------- guest: measuring


def _task_stats(pid: int) -> dict[int, tuple[float, int]]:
    """Per thread of ``pid``: (CPU seconds, context switches)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches:" in line)
        out[int(task.name)] = ((int(fields[11]) + int(fields[12])) / tick, switches)
    return out


def _cpu_times() -> list[int]:
    """Per guest CPU: busy ticks (everything but idle and iowait)."""
    busy = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            v = [int(x) for x in line.split()[1:9]]
            busy.append(sum(v) - v[3] - v[4])
    return busy


def _processes() -> dict[int, tuple[str, int]]:
    """Name and CPU ticks of every process in the guest (kernel threads too), by pid.

    A kworker's name changes with the work it runs: the pid identifies it.
    """
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d.name)] = (name, int(fields[11]) + int(fields[12]))
    return out


def _process_cpu(pid: int) -> float:
    """CPU seconds of process ``pid``, its exited threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sample:
    """The daemon's, the guest's and every process's CPU use from here to :meth:`finish`.

    The daemon's threads are sampled every 0.2 s by a thread of our own:
    pyvduse's queue thread lives only while a client has the device (it
    exits at the reset of the client's close), so a thread's use is the
    difference between the first and the last time it was seen.
    """

    def __init__(self, pid: int, log: Path | None) -> None:
        self.pid = pid
        self.log = log
        self.t = time.monotonic()
        self.cpu = _process_cpu(pid)
        self.cpus = _cpu_times()
        self.processes = _processes()
        self.iotlb = self._iotlb()
        self.first: dict[int, tuple[float, int]] = dict(_task_stats(pid))
        self.last: dict[int, tuple[float, int]] = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _iotlb(self) -> int:
        return self.log.read_text(errors="replace").count("IOTLB update") if self.log else 0

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(OSError):
                for tid, value in _task_stats(self.pid).items():
                    self.first.setdefault(tid, (0.0, 0))  # born during the job
                    self.last[tid] = value

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        for tid, value in _task_stats(self.pid).items():
            self.first.setdefault(tid, (0.0, 0))
            self.last[tid] = value
        wall = time.monotonic() - self.t
        tick = os.sysconf("SC_CLK_TCK")
        cpu = _process_cpu(self.pid) - self.cpu
        threads = []
        switches = 0
        for tid, (c, n) in self.last.items():
            c0, n0 = self.first[tid]
            switches += n - n0
            if c - c0 > 0.005:
                threads.append(round(100 * (c - c0) / wall, 1))
        guest = [round(100 * (a - b) / tick / wall, 1)
                 for a, b in zip(_cpu_times(), self.cpus, strict=True)]
        used = collections.Counter({f"{name}[{pid}]": ticks - self.processes.get(pid, ("", 0))[1]
                                    for pid, (name, ticks) in _processes().items()})
        top = [(who, round(100 * ticks / tick / wall, 1)) for who, ticks in used.most_common(5)
               if ticks > 0]
        return {
            "wall": round(wall, 2),
            "daemon_cpu_s": cpu,
            "daemon_cpu_pct": round(100 * cpu / wall, 1),
            "daemon_threads_cpu_pct": sorted(threads, reverse=True)[:8],
            "daemon_ctx_switches": switches,
            "guest_cpu_pct": guest,
            "guest_top_processes_cpu_pct": top,
            "iotlb_updates": self._iotlb() - self.iotlb,
        }


# -------------------------------------------------------------------- guest: daemons


def vhost_node(name: str) -> str:
    for found in sorted(Path("/sys/bus/vdpa/devices", name).glob("vhost-vdpa-*")):
        node = Path("/dev", found.name)
        if node.exists():
            return str(node)
    return ""


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], log: Path,
             timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the daemon exited {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], what: str) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not stop on SIGTERM") from None


class Daemon:
    """``kind`` (pyvduse, pyvduse-base, qsd-threads, qsd-io_uring; ``qsd`` on the null
    backend) serving ``backend`` (``file``: ``image``; ``null``: as large, no data)."""

    def __init__(self, kind: str, backend: str, work: Path, image: Path,
                 args: argparse.Namespace) -> None:
        self.kind = kind
        self.backend = backend
        suffix = "" if backend == "file" else backend
        self.name = "vdpa" + kind.replace("-", "").replace("_", "") + suffix
        self.work = work
        self.image = image
        self.args = args
        self.log = work / f"{kind}-{backend}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.attached = False
        self.node = ""

    @property
    def pyvduse(self) -> bool:
        return self.kind.startswith("pyvduse")

    def command(self) -> list[str]:
        if self.pyvduse:
            backend = (["file", f"path={self.image}"] if self.backend == "file"
                       else ["null", f"size={IMAGE_SIZE}"])
            return [sys.executable, "-m", "pyvduse", "serve", "--name", self.name,
                    "--attach", "vhost", "--queue-size", str(QUEUE_SIZE),
                    "--pidfile", str(self.work / f"{self.name}.pid"), "--log-level", "debug",
                    *shlex.split(self.args.pyvduse_args), *backend]
        if self.backend == "file":
            aio = self.kind.split("-", 1)[1]
            blockdev = (f"driver=file,filename={self.image},node-name=disk0,aio={aio},"
                        "cache.direct=off")
        else:
            blockdev = f"driver=null-co,node-name=disk0,size={IMAGE_SIZE},read-zeroes=on"
        return ["qemu-storage-daemon", "--blockdev", blockdev,
                "--export", f"type=vduse-blk,id=e0,node-name=disk0,writable=on,name={self.name},"
                f"num-queues=1,queue-size={QUEUE_SIZE}"]

    def describe(self) -> str:
        cmd = shlex.join(self.command()).replace(sys.executable, ".venv/bin/python")
        cmd = cmd.replace(str(self.work), "$WORK")
        if self.kind == "pyvduse-base":
            cmd = f"PYTHONPATH=<src of {self.args.baseline}> {cmd}"
        if not self.pyvduse:
            cmd = (f"TMPDIR=$WORK {cmd} & (vdpa dev add name {self.name} mgmtdev vduse, "
                   "bound to vhost_vdpa through driver_override)")
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.work))
        if self.kind == "pyvduse-base":
            env["PYTHONPATH"] = self.args.baseline_src
        return env

    def source(self) -> str:
        """Where this daemon's pyvduse package comes from (checks ``--baseline``)."""
        proc = subprocess.run([sys.executable, "-c", "import pyvduse; print(pyvduse.__file__)"],
                              capture_output=True, text=True, env=self.env(), cwd=self.work,
                              check=True)
        where = proc.stdout.strip()
        if self.kind == "pyvduse-base" and not where.startswith(self.args.baseline_src):
            raise RuntimeError(f"pyvduse-base would import pyvduse from {where}, not from "
                               f"{self.args.baseline_src}")
        return where.replace(str(REPO), "$REPO")

    def start(self) -> None:
        env = self.env()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.work)
        if self.pyvduse:
            pidfile = self.work / f"{self.name}.pid"
            wait_for("the pidfile", pidfile.exists, self.proc, self.log)
        else:
            wait_for(f"/dev/vduse/{self.name}", Path("/dev/vduse", self.name).exists,
                     self.proc, self.log)
            self._attach()
        wait_for("the vhost-vdpa node", lambda: bool(vhost_node(self.name)), self.proc,
                 self.log, 60)
        self.node = vhost_node(self.name)

    def _attach(self) -> None:
        from pyvduse.binding import attach
        from pyvduse.netlink import NetlinkError, VdpaClient

        deadline = time.monotonic() + 60
        while True:
            try:
                with VdpaClient() as client:
                    attach(self.name, "vhost_vdpa", client, timeout=30)
                self.attached = True
                return
            except NetlinkError as exc:  # EINVAL until QSD has set up its queues
                if exc.errno != errno.EINVAL or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.attached:
            from pyvduse.binding import detach
            from pyvduse.netlink import VdpaClient

            with VdpaClient() as client:
                detach(self.name, client)
            self.attached = False
        if self.proc is not None:
            proc, self.proc = self.proc, None
            status = stop_process(proc, self.kind)
            if status != 0:
                raise RuntimeError(f"{self.kind} exited {status}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")


# -------------------------------------------------------------------- guest: jobs


def run_client(client: str, wait: str, node: str, depth: int, row: str,
               args: argparse.Namespace) -> dict[str, Any]:
    rw, bs = ROWS[row]
    if client == "c":
        from blkio_load import run_load

        return run_load(DRIVER, node, rw, bs, depth, args.seconds, wait,
                        size=IMAGE_SIZE, timeout=args.seconds + 120)
    proc = subprocess.run([sys.executable, __file__, "pyload", "--path", node, "--iodepth",
                           str(depth), "--seconds", str(args.seconds), "--size",
                           str(IMAGE_SIZE), "--wait", wait, "--rw", rw, "--bs", str(bs)],
                          capture_output=True, text=True, timeout=args.seconds + 180,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"python client exited {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def zero_probe(image: Path) -> None:
    """Zero the image's first PROBE_BYTES (a write job's data shows there afterwards)."""
    with image.open("r+b") as f:
        f.write(bytes(PROBE_BYTES))


def probe_written(image: Path) -> int:
    """How many 4 KiB blocks of the image's first PROBE_BYTES are not zero."""
    with image.open("rb") as f:
        data = f.read(PROBE_BYTES)
    zero = bytes(BLOCK)
    return sum(data[i:i + BLOCK] != zero for i in range(0, len(data), BLOCK))


def run_job(daemon: Daemon, row: str, client: str, wait: str, depth: int,
            args: argparse.Namespace) -> dict[str, Any]:
    assert daemon.proc is not None
    probe = daemon.backend == "file" and ROWS[row][0].endswith("write")
    if probe:
        zero_probe(daemon.image)
    log = daemon.log if daemon.pyvduse else None
    sample = Sample(daemon.proc.pid, log)
    try:
        result = run_client(client, wait, daemon.node, depth, row, args)
    finally:
        figures = sample.finish()
    completions = int(result["completions"])
    cpu, switches = figures.pop("daemon_cpu_s"), figures.pop("daemon_ctx_switches")
    figures["daemon_cpu_us_per_io"] = round(1e6 * cpu / completions, 1) if completions else None
    figures["daemon_ctx_switches_per_io"] = (round(switches / completions, 2) if completions
                                             else None)
    result.update(figures)
    result.update(daemon=daemon.kind, backend=daemon.backend, row=row, client=client,
                  wait=wait, probe_blocks_written=probe_written(daemon.image) if probe else None)
    written = "" if not probe else f", wrote {result['probe_blocks_written']} probe blocks"
    say(f"{daemon.backend:4} {row:12} {daemon.kind:13} {client:6} {wait:5} QD{depth:<2}: "
        f"{result['iops']:8,.0f} IOPS {result['mib_s']:7,.1f} MiB/s, errors {result['errors']}"
        f"{written}, daemon {result['daemon_cpu_pct']:5.1f}% "
        f"({result['daemon_cpu_us_per_io']} us/IO, threads "
        f"{result['daemon_threads_cpu_pct']}), client {result['cpu_usr'] + result['cpu_sys']:.0f}%"
        f", guest CPUs {result['guest_cpu_pct']}, IOTLB updates {result['iotlb_updates']}, "
        f"top {result['guest_top_processes_cpu_pct']}")
    return result


def make_image(path: Path) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(block)


def profile(daemon: Daemon, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The daemon under py-spy while the C client reads at QD32: its hottest functions."""
    assert daemon.proc is not None
    spy = args.py_spy
    raw = out / f"profile-{daemon.kind}.txt"
    duration = max(2, int(args.seconds) - 1)
    sampler = subprocess.Popen([spy, "record", "--pid", str(daemon.proc.pid), "--duration",
                                str(duration), "--rate", "250", "--nonblocking", "--threads",
                                "--format", "raw", "--output", str(raw)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    result = run_client("c", "block", daemon.node, 32, "randread-4k", args)
    text = sampler.communicate(timeout=120)[0].decode(errors="replace")
    summary: dict[str, Any] = {"backend": daemon.backend,
                               "iops_while_sampled": round(result["iops"]),
                               "py_spy": text.replace(str(REPO), "$REPO").strip().splitlines()[-3:]}
    if not raw.exists():
        return summary
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    summary["samples"] = total
    summary["self"] = [(f, round(100 * n / total, 1)) for f, n in own.most_common(25)]
    summary["inclusive"] = [(f, round(100 * n / total, 1)) for f, n in inclusive.most_common(40)]
    return summary


def guest_main(args: argparse.Namespace) -> int:
    plan = Plan(args, bool(args.baseline_src))
    out = Path(args.raw)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "vdpa-bench"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    make_image(image)
    from blkio_load import build

    build()
    daemons = {b: [Daemon(k, b, work, image, args) for k in plan.kinds_of(b)]
               for b in plan.backends}
    every = [d for ds in daemons.values() for d in ds]
    raw: dict[str, Any] = {
        "argv": [a.replace(str(REPO), "$REPO") for a in sys.argv[1:]],
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "qsd": subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                              text=True, check=False).stdout.splitlines()[0],
        "image_bytes": IMAGE_SIZE,
        "queue_size": QUEUE_SIZE,
        "seconds": args.seconds,
        "rows": {r: {"rw": ROWS[r][0], "bs": ROWS[r][1], "depths": plan.depths_of(r)}
                 for r in plan.rows},
        "backends": plan.backends,
        "clients": plan.clients,
        "waits": plan.waits,
        "probe_bytes": PROBE_BYTES,
        "commands": {f"{d.kind} ({d.backend})": d.describe() for d in every},
        "pyvduse_sources": {d.kind: d.source() for d in every if d.pyvduse},
        "jobs": [],
        "profiles": {},
    }
    say(f"{args.rounds} rounds of {plan.jobs_per_round()} jobs of {args.seconds:g} s")

    def save() -> None:
        (out / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")

    for round_ in range(args.rounds):
        for backend in plan.backends:
            order = daemons[backend] if round_ % 2 == 0 else daemons[backend][::-1]
            for daemon in order:
                daemon.start()
                try:
                    for row in plan.rows:
                        for client in plan.clients:
                            for wait in plan.waits:
                                for depth in plan.depths_of(row):
                                    job = run_job(daemon, row, client, wait, depth, args)
                                    job["round"] = round_
                                    raw["jobs"].append(job)
                                    save()
                finally:
                    daemon.stop()
    if args.profile:
        for daemon in daemons[plan.backends[0]]:
            if not daemon.pyvduse:
                continue
            daemon.start()
            try:
                raw["profiles"][daemon.kind] = profile(daemon, args, out)
            finally:
                daemon.stop()
            save()
    save()
    say("done")
    return 0


# -------------------------------------------------------------------- report


def _job_key(job: dict[str, Any]) -> tuple[str, str, str, str, str, int]:
    """(backend, row, daemon, client, wait, depth); jobs from before --rows and --backends
    were 4 KiB random reads on the file."""
    return (job.get("backend", "file"), job.get("row", "randread-4k"), job["daemon"],
            job["client"], job["wait"], int(job["iodepth"]))


def _order(raw: dict[str, Any]) -> Any:
    """A sort key for (backend, row, daemon, client, wait, depth): the run's own order of
    backends and rows, then client, wait, depth, and the daemon last."""
    backends = list(raw.get("backends", BACKENDS))
    rows = list(raw.get("rows", ROWS))

    def key(k: tuple[str, str, str, str, str, int]) -> tuple[Any, ...]:
        backend, row, daemon, client, wait, depth = k
        return (backends.index(backend) if backend in backends else len(backends),
                rows.index(row) if row in rows else len(rows), client, wait, depth,
                not daemon.startswith("pyvduse"), daemon)
    return key


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Best round per (backend, row, daemon, client, wait, depth); pyvduse / the better QSD."""
    Key = tuple[str, str, str, str, str, int]
    best: dict[Key, dict[str, Any]] = {}
    rounds: dict[Key, list[float]] = collections.defaultdict(list)
    for job in raw["jobs"]:
        key = _job_key(job)
        rounds[key].append(round(job["iops"]))
        if key not in best or job["iops"] > best[key]["iops"]:
            best[key] = job
    order = _order(raw)
    rows = []
    for key in sorted(best, key=order):
        job = best[key]
        backend, row, daemon, client, wait, depth = key
        bs = job.get("bs", BLOCK)
        rows.append({"backend": backend, "row": row, "daemon": daemon, "client": client,
                     "wait": wait, "iodepth": depth,
                     "iops": round(job["iops"]),
                     "mib_s": round(job.get("mib_s", job["iops"] * bs / (1 << 20)), 1),
                     "rounds": rounds[key],
                     "errors": sum(j["errors"] for j in raw["jobs"] if _job_key(j) == key),
                     "lat_us_mean": round(job["lat_us_mean"], 1),
                     "client_cpu_pct": round(job["cpu_usr"] + job["cpu_sys"], 1),
                     "daemon_cpu_pct": job["daemon_cpu_pct"],
                     "daemon_cpu_us_per_io": job["daemon_cpu_us_per_io"],
                     "daemon_threads_cpu_pct": job["daemon_threads_cpu_pct"],
                     "daemon_ctx_switches_per_io": job["daemon_ctx_switches_per_io"],
                     "guest_cpu_pct": job["guest_cpu_pct"],
                     "iotlb_updates": job["iotlb_updates"],
                     "probe_blocks_written": [j.get("probe_blocks_written") for j in raw["jobs"]
                                              if _job_key(j) == key]})
    ratios = []
    for key in sorted(best, key=order):
        backend, row, daemon, client, wait, depth = key
        if not daemon.startswith("pyvduse"):
            continue
        qsds = [(k[2], j["iops"]) for k, j in best.items()
                if k[2].startswith("qsd") and k[:2] + k[3:] == (backend, row, client, wait, depth)]
        if not qsds:
            continue
        qsd, qsd_iops = max(qsds, key=lambda item: item[1])
        ratio = best[key]["iops"] / qsd_iops
        target = TARGETS.get(depth) if (backend, row) == TARGET_ROW else None
        ratios.append({"backend": backend, "row": row, "daemon": daemon, "client": client,
                       "wait": wait, "iodepth": depth, "vs": qsd,
                       "ratio": round(ratio, 2), "target": target,
                       "met": None if target is None else ratio >= target})
    writes = [j for j in raw["jobs"] if j.get("probe_blocks_written") is not None]
    return {"rows": rows, "ratios": ratios,
            "write_jobs_checked": len(writes),
            "write_jobs_without_data": [[*_job_key(j), j["round"]] for j in writes
                                        if not j["probe_blocks_written"]],
            "jobs_with_errors": [[*_job_key(j), j["round"], j["errors"]]
                                 for j in raw["jobs"] if j["errors"]]}


def _describe_rows(raw: dict[str, Any]) -> str:
    rows = raw.get("rows") or {"randread-4k": {"rw": "randread", "bs": BLOCK, "depths": None}}
    parts = []
    for name, row in rows.items():
        depths = "" if not row.get("depths") else (
            f" at QD {', '.join(str(d) for d in row['depths'])}")
        parts.append(f"`{name}` ({row['rw']} of {row['bs'] >> 10} KiB{depths})")
    return ", ".join(parts)


def markdown(results: dict[str, Any]) -> str:
    raw, summary, host = results["raw"], results["summary"], results["host"]
    size = raw["image_bytes"] >> 20
    backends = raw.get("backends", ["file"])
    described = {"file": f"`file` (a {size} MiB file on the guest's tmpfs)",
                 "null": f"`null` ({size} MiB, reads zeroes, drops writes; one QSD, `qsd`, "
                         "since aio= applies to files only)"}
    lines = [f"# vhost-vdpa clients: pyvduse vs qemu-storage-daemon, {host['date']}", "",
             f"Command: `{host['command']}`", "",
             f"pyvduse: {host['pyvduse_commit']}; guest kernel {raw['kernel']}, "
             f"{raw['qsd']}, Python {raw['python']}; host: {host['machine']}; "
             f"other work on the host used {host.get('host_cpu_used_by_others', '?')} "
             f"of its {host.get('host_cpus', '?')} cores on average during the run "
             f"(load average before: {' '.join(host['loadavg_before'])}; the guest ran "
             f"{host.get('wall_seconds', 0) / 60:.1f} min).", "",
             f"Rows: {_describe_rows(raw)}"
             + ("; sequential rows go through the disk from offset 0 and wrap"
                if any(not r["rw"].startswith("rand") for r in raw.get("rows", {}).values())
                else "")
             + f". Backends: {', '.join(described[b] for b in backends)}. "
             f"{raw['seconds']:g} s per job, queue size {raw['queue_size']}, best of "
             f"{1 + max(j['round'] for j in raw['jobs'])} rounds (every round's IOPS in "
             "brackets). Client wait: `block` sleeps until the device's interrupt (C "
             "`--wait block`, Python `wait(1)`), `loop` polls (C `--wait loop`, Python "
             "`wait(0)` in a loop). Ratio: pyvduse's IOPS / the better QSD's; targets only "
             "for 4 KiB random reads on the file.", ""]
    checked, missing = summary.get("write_jobs_checked", 0), summary.get(
        "write_jobs_without_data", [])
    if checked:
        least = min(j["probe_blocks_written"] for j in raw["jobs"]
                    if j.get("probe_blocks_written") is not None)
        lines += [f"Writes: {checked} write jobs on the file backend each zeroed the image's "
                  f"first {raw.get('probe_bytes', PROBE_BYTES) >> 20} MiB first; "
                  + (f"every one wrote data there (at least {least:,} 4 KiB blocks)."
                     if not missing else f"**{len(missing)} wrote nothing there**: {missing}."),
                  ""]
    if summary.get("jobs_with_errors"):
        lines += [f"**Failed requests** (backend, row, daemon, client, wait, QD, round, "
                  f"errors): {summary['jobs_with_errors']}", ""]
    lines += ["| backend | row | client | wait | QD | pyvduse | vs | ratio | target |",
              "|---|---|---|---|---:|---|---|---:|---|"]
    for r in summary["ratios"]:
        target = "" if r["target"] is None else (
            f">= {r['target']}x {'met' if r['met'] else 'MISSED'}")
        lines.append(f"| {r.get('backend', 'file')} | {r.get('row', 'randread-4k')} | "
                     f"{r['client']} | {r['wait']} | {r['iodepth']} | {r['daemon']} | "
                     f"{r['vs']} | **{r['ratio']:.2f}x** | {target} |")
    lines += ["", "| backend | row | client | wait | QD | daemon | IOPS (rounds) | MiB/s | "
              "lat us | client CPU % | daemon CPU % | daemon us/IO | daemon threads CPU % | "
              "ctx sw/IO | guest CPUs % | IOTLB updates |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in summary["rows"]:
        lines.append(
            f"| {r.get('backend', 'file')} | {r.get('row', 'randread-4k')} | {r['client']} | "
            f"{r['wait']} | {r['iodepth']} | {r['daemon']} | {r['iops']:,} "
            f"({', '.join(f'{x:,.0f}' for x in r['rounds'])}) | {r.get('mib_s', '')} | "
            f"{r['lat_us_mean']} | "
            f"{r['client_cpu_pct']} | {r['daemon_cpu_pct']} | {r['daemon_cpu_us_per_io']} | "
            f"{r['daemon_threads_cpu_pct']} | {r['daemon_ctx_switches_per_io']} | "
            f"{r['guest_cpu_pct']} | {r['iotlb_updates'] if r['daemon'].startswith('py') else ''}"
            " |")
    lines += ["", "Commands (in the guest; `$WORK` is a directory on its tmpfs):", ""]
    lines += [f"* {k}: `{v}`" for k, v in raw["commands"].items()]
    for kind, prof in raw.get("profiles", {}).items():
        lines += ["", f"Profile of {kind} ({prof.get('backend', 'file')} backend) at QD32 "
                  f"(C client, 4 KiB random reads; py-spy, {prof.get('samples')} samples, "
                  f"{prof['iops_while_sampled']:,} IOPS while sampled), self time:", ""]
        lines += [f"* {pct}% {frame}" for frame, pct in prof.get("self", [])[:15]]
    return "\n".join(lines) + "\n"


def host_main(args: argparse.Namespace, argv: list[str]) -> int:
    import host

    plan = Plan(args, bool(args.baseline))
    estimate = plan.estimate(args.rounds, args.seconds, args.profile)
    timeout = args.timeout or f"{round(2 * estimate + 600)}s"
    out = Path(args.out or REPO / "build" / "bench" /
               f"{datetime.date.today().isoformat()}-vhost-vdpa")
    raw_dir = (out / "raw" if args.out else out).resolve()  # the guest's daemons run elsewhere
    raw_dir.mkdir(parents=True, exist_ok=True)
    guest_cmd = [".venv/bin/python", "bench/vdpa_client.py", "--in-guest", "--raw",
                 str(raw_dir), "--rounds", str(args.rounds), "--seconds", f"{args.seconds:g}",
                 "--daemons", args.daemons, "--clients", args.clients, "--depths", args.depths,
                 "--seq-depth", str(args.seq_depth), "--rows", args.rows,
                 "--backends", args.backends, "--waits", args.waits,
                 "--pyvduse-args", args.pyvduse_args]
    if args.baseline:
        src = host.commit_sources(args.baseline, raw_dir)  # ["--env", "PYTHONPATH=..."]
        guest_cmd += ["--baseline", args.baseline, "--baseline-src", src[1].split("=", 1)[1]]
    if args.profile:
        spy = args.py_spy or shutil.which("py-spy", path=f"{REPO / '.venv' / 'bin'}:"
                                          f"{os.environ.get('PATH', '')}")
        if not spy:
            raise SystemExit("vdpa_client: --profile needs py-spy (.venv/bin/pip install py-spy)")
        guest_cmd += ["--profile", "--py-spy", str(Path(spy).resolve())]
    facts = host.host_facts([], None)
    facts["command"] = shlex.join(["bench/vdpa_client.py", *(
        a.replace(f"{REPO}/", "") for a in argv)])
    facts["jobs"] = args.rounds * plan.jobs_per_round()
    facts["expected_seconds"] = round(estimate)
    facts["guest_timeout"] = timeout
    run_args = argparse.Namespace(commit=None, timeout=timeout, max_wait=args.max_wait)
    say(f"{facts['jobs']} jobs of {args.seconds:g} s: expect about {estimate / 60:.0f} min "
        f"in the guest (its timeout: {timeout}); host load average {os.getloadavg()}")
    rc = host.run_guest(run_args, raw_dir, guest_cmd, facts, say, memory="2G")
    raw_file = raw_dir / "raw.json"
    if not raw_file.exists():
        say(f"no raw.json from the guest (vm-run exit {rc}); see {raw_dir / 'guest.log'}")
        return 1
    raw = json.loads(raw_file.read_text())
    results = {"host": facts, "raw": raw, "summary": summarize(raw)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return rc


def main(argv: list[str]) -> int:
    if argv[:1] == ["pyload"]:
        parser = argparse.ArgumentParser(prog="vdpa_client.py pyload")
        parser.add_argument("--path", required=True)
        parser.add_argument("--iodepth", type=int, default=1)
        parser.add_argument("--seconds", type=float, default=5.0)
        parser.add_argument("--bs", type=int, default=BLOCK)
        parser.add_argument("--size", type=int, default=0)
        parser.add_argument("--wait", choices=("block", "loop"), default="block")
        parser.add_argument("--rw", choices=RW_MODES, default="randread")
        a = parser.parse_args(argv[1:])
        print(json.dumps(python_load(a.path, a.iodepth, a.seconds, a.bs, a.size, a.wait,
                                     a.rw)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder (host; default build/bench/DATE-vhost-vdpa)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, of {', '.join(ROWS)} (default: all)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)} (default: both)")
    parser.add_argument("--daemons", default="pyvduse,qsd-threads,qsd-io_uring",
                        help=f"comma-separated, of {', '.join(DAEMONS)}")
    parser.add_argument("--clients", default="c,python")
    parser.add_argument("--depths", default="1,32", help="queue depths of the random rows")
    parser.add_argument("--seq-depth", type=int, default=8,
                        help="queue depth of the sequential 1 MiB rows (default: 8)")
    parser.add_argument("--waits", default="block",
                        help="the clients' wait modes, comma-separated: block, loop")
    parser.add_argument("--pyvduse-args", default="", help="extra 'pyvduse serve' options")
    parser.add_argument("--baseline", help="also run pyvduse-base: src/pyvduse of this commit")
    parser.add_argument("--profile", action="store_true", help="py-spy each pyvduse at QD32")
    parser.add_argument("--py-spy", help="the py-spy binary (default: .venv/bin or PATH)")
    parser.add_argument("--timeout", help="the guest's (vm-run --timeout; default: twice the "
                        "expected duration, from the number of jobs, plus 10 min)")
    parser.add_argument("--max-wait", type=float, default=3600.0,
                        help="seconds to wait for another guest to finish")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-src", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        return guest_main(args)
    if Path("/dev/vduse/control").exists():
        say("this machine has VDUSE: run with --in-guest --raw DIR to measure here")
    return host_main(args, argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
