"""vhost-user-blk side by side: pyvduse vs qemu-storage-daemon, one libblkio client, on this host.

Both daemons serve the same backend (a file filled with data, or a null
device) on a UNIX socket, one after the other in each round; the same client,
bench/blkio_load.c on libblkio's ``virtio-blk-vhost-user`` driver, runs every
workload against each. Per row the best of the rounds counts (rounds
alternate the daemons' order). Reported: IOPS, MiB/s, the client's mean
latency, the server's CPU time per request, and the ratio pyvduse / QSD.

    .venv/bin/python bench/vhost_user.py [--rounds 2] [--seconds 5] \\
        [--wait block|loop] [--out DIR]

writes DIR/results.json (raw figures, every round, command lines, versions)
and DIR/results.md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from blkio_load import run_load  # noqa: E402

DRIVER = "virtio-blk-vhost-user"
IMAGE_SIZE = 1 << 30

# name, rw, block size, iodepth
WORKLOADS: tuple[tuple[str, str, int, int], ...] = (
    ("randread-4k-qd1", "randread", 4096, 1),
    ("randread-4k-qd32", "randread", 4096, 32),
    ("randwrite-4k-qd1", "randwrite", 4096, 1),
    ("randwrite-4k-qd32", "randwrite", 4096, 32),
    ("read-1m-qd8", "read", 1 << 20, 8),
    ("write-1m-qd8", "write", 1 << 20, 8),
)
TARGETS = {"qd1": 1.0, "qd32": 0.8}
"""The issue's targets for the file backend: pyvduse / QSD at iodepth 1 and 32."""


@dataclass(frozen=True)
class Peer:
    """One daemon serving one backend."""

    daemon: str  # "pyvduse" or "qsd"
    backend: str  # "file" or "null"

    @property
    def name(self) -> str:
        return f"{self.daemon}-{self.backend}"

    def argv(self, sock: Path, image: Path) -> list[str]:
        if self.daemon == "pyvduse":
            backend = (["file", f"path={image}"] if self.backend == "file"
                       else ["null", f"size={IMAGE_SIZE}"])
            return [sys.executable, "-m", "pyvduse", "serve", "--transport", "vhost-user",
                    "--socket", str(sock), "--name", "bench0", "--log-level", "warning",
                    *backend]
        if self.backend == "file":
            blockdev = f"driver=file,node-name=d0,filename={image},cache.direct=off,aio=threads"
        else:
            blockdev = f"driver=null-co,node-name=d0,size={IMAGE_SIZE},read-zeroes=on"
        return ["qemu-storage-daemon", "--blockdev", blockdev, "--export",
                f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
                "writable=on,num-queues=1"]


PEERS = (Peer("pyvduse", "file"), Peer("qsd", "file"), Peer("pyvduse", "null"),
         Peer("qsd", "null"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(image: Path) -> None:
    """A file of IMAGE_SIZE bytes of data (not holes: reads must read)."""
    block = os.urandom(1 << 20)
    with open(image, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def serve(peer: Peer, sock: Path, image: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``peer`` and wait (bounded) until its socket accepts connections."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(peer.argv(sock, image), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{peer.name} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    time.sleep(0.2)  # the socket file appears at bind(), listen() follows
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_peer(peer: Peer, workdir: Path, image: Path, seconds: float, wait: str
             ) -> dict[str, Any]:
    """Every workload against one start of ``peer``."""
    sock = workdir / f"{peer.name}.sock"
    log = workdir / f"{peer.name}.log"
    proc = serve(peer, sock, image, log)
    rows: dict[str, Any] = {}
    try:
        for name, rw, bs, depth in WORKLOADS:
            before = cpu_seconds(proc.pid)
            result = run_load(DRIVER, sock, rw, bs, depth, seconds, wait)
            result["server_cpu_s"] = round(cpu_seconds(proc.pid) - before, 3)
            result["server_cpu_us_per_io"] = round(
                1e6 * result["server_cpu_s"] / max(result["completions"], 1), 2)
            rows[name] = result
    finally:
        status = stop(proc)
    if status != 0:
        raise RuntimeError(f"{peer.name} exited with {status}:\n{log.read_text()[-2000:]}")
    return rows


def best(rounds: list[dict[str, Any]], peer: str, workload: str) -> dict[str, Any]:
    """The round with the most IOPS for (peer, workload)."""
    runs = [r[peer][workload] for r in rounds if peer in r]
    return max(runs, key=lambda run: run["iops"])


def report(results: dict[str, Any]) -> str:
    """The results as Markdown: a row per workload and backend, ratios and targets."""
    rounds = results["rounds"]
    lines = [f"# vhost-user-blk: pyvduse vs qemu-storage-daemon ({results['date']})", "",
             f"Client: `bench/blkio_load.c` on libblkio `{DRIVER}`, wait mode "
             f"`{results['wait']}`; {results['seconds']} s per run, best of "
             f"{len(rounds)} rounds (daemons alternate order). Backend file: "
             f"{IMAGE_SIZE >> 20} MiB of data on the host's file system, page cache on "
             "(QSD `cache.direct=off,aio=threads`, pyvduse `file` defaults); null: QSD "
             "`null-co,read-zeroes=on`, pyvduse `null`.", "",
             f"Command: `{results['command']}`", "",
             "| backend | workload | pyvduse IOPS | QSD IOPS | ratio | target | "
             "pyvduse CPU µs/IO | QSD CPU µs/IO |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for backend in ("file", "null"):
        for name, _rw, _bs, depth in WORKLOADS:
            ours = best(rounds, f"pyvduse-{backend}", name)
            theirs = best(rounds, f"qsd-{backend}", name)
            ratio = ours["iops"] / theirs["iops"] if theirs["iops"] else 0.0
            target = TARGETS.get(f"qd{depth}") if backend == "file" else None
            verdict = "" if target is None else (
                f"{target:.1f}x {'met' if ratio >= target else 'missed'}")
            lines.append(f"| {backend} | {name} | {ours['iops']:,.0f} | {theirs['iops']:,.0f} "
                         f"| {ratio:.2f}x | {verdict} | {ours['server_cpu_us_per_io']} | "
                         f"{theirs['server_cpu_us_per_io']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--wait", choices=("block", "loop"), default="block")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-vhost-user")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the image and sockets go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if shutil.which("qemu-storage-daemon") is None:
        parser.error("qemu-storage-daemon not found (scripts/setup-vm installs it)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        image = workdir / "disk.img"
        fill(image)
        rounds: list[dict[str, Any]] = []
        for number in range(args.rounds):
            order = PEERS if number % 2 == 0 else tuple(reversed(PEERS))
            this: dict[str, Any] = {}
            for peer in order:
                print(f"round {number + 1}: {peer.name}", file=sys.stderr, flush=True)
                this[peer.name] = run_peer(peer, workdir, image, args.seconds, args.wait)
            rounds.append(this)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/vhost_user.py", *(argv if argv is not None
                                                      else sys.argv[1:])]),
        "wait": args.wait, "seconds": args.seconds, "rounds": rounds,
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(),
                 "qsd": subprocess.run(["qemu-storage-daemon", "--version"],
                                       capture_output=True, text=True).stdout.splitlines()[0],
                 "pyvduse_commit": subprocess.run(
                     ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                     capture_output=True, text=True).stdout.strip()},
        # the interpreter as the README's command names it, not this machine's path
        "peers": {peer.name: [".venv/bin/python" if arg == sys.executable else arg
                              for arg in peer.argv(Path("SOCK"), Path("IMAGE"))]
                  for peer in PEERS},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report(results)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
