"""A real VM on a pyvduse vhost-user-blk disk: QEMU's vhost-user-blk-pci, the guest kernel's
virtio-blk driver, fio verify and ext4 in the guest, bytes compared in the image on the host.

One guest boot (scripts/vm-run, TCG): the daemon runs here on the host with
``--transport vhost-user``; QEMU gets the socket as a ``vhost-user-blk-pci``
device with two queues and its RAM in a shared memfd (the back-end maps it).
The guest runs tests/vm/vhost_user_guest.py on /dev/vda. Afterwards the
daemon is stopped with SIGTERM: it must exit 0 and remove its socket, and the
image must hold the pattern the guest wrote. Fails (never skips) if the
guest did not run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vhost_user_guest as guest  # noqa: E402

GUEST_MEMORY = "2G"
VM_RUN = REPO / "scripts" / "vm-run"
GUEST_PYTHON = REPO / ".venv" / "bin" / "python"
GUEST_SCRIPT = REPO / "tests" / "vm" / "vhost_user_guest.py"
JITTER = REPO / "tests" / "guest" / "jitter_backend.py"


class Daemon:
    """``pyvduse serve --transport vhost-user`` on a file, restartable with the same options."""

    def __init__(self, sock: Path, image: Path, log: Path, *, jitter: bool = False) -> None:
        self.sock = sock
        self.log = log
        # jitter: every transfer held 0-3 ms on a pool of 8 threads, so that requests are
        # in flight, and complete out of order, whenever the daemon is killed
        backend = (["--io-threads", "8", "--io-threads-min", "4k", "python",
                    f"script={JITTER}", "class=JitterFileBackend", f"path={image}"]
                   if jitter else ["file", f"path={image}"])
        self.argv = [sys.executable, "-m", "pyvduse", "serve", "--transport", "vhost-user",
                     "--socket", str(sock), "--num-queues", "2", "--name", "vu0", *backend]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not _listening(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the daemon did not listen on {self.sock}:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it had to be killed)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _listening(path: Path) -> bool:
    """Whether a UNIX socket listens at ``path`` (per /proc/net/unix, without connecting)."""
    if not path.is_socket():
        return False
    wanted = os.fsencode(path)
    with open("/proc/net/unix", "rb") as table:
        return any(line.split()[-1] == wanted for line in table.readlines()[1:]
                   if len(line.split()) >= 8 and line.split()[5] == b"01")


def _vm_command(outdir: Path, sock: Path, guest_args: list[str], env: list[str],
                reconnect: bool = False) -> list[str]:
    chardev = f"socket,id=vu0,path={sock}" + (",reconnect=1" if reconnect else "")
    qemu = ["-object", f"memory-backend-memfd,id=mem0,size={GUEST_MEMORY},share=on",
            "-machine", "memory-backend=mem0", "-chardev", chardev,
            "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=2"]
    return [str(VM_RUN), "--outdir", str(outdir), "--memory", GUEST_MEMORY,
            "--timeout", "15m", *[f"--env={e}" for e in env],
            *[f"--qemu-arg={arg}" for arg in qemu], "--",
            str(GUEST_PYTHON), str(GUEST_SCRIPT), *guest_args]


def _results(stdout: str) -> dict[str, object]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"the guest printed no results:\n{stdout[-4000:]}"
    results: dict[str, object] = json.loads(lines[-1])
    return results


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    return image


def test_a_vm_boots_on_a_vhost_user_blk_disk_and_its_writes_reach_the_image(
        tmp_path: Path) -> None:
    image = _image(tmp_path)
    daemon = Daemon(tmp_path / "vu.sock", image, tmp_path / "daemon.log")
    daemon.start()
    try:
        proc = subprocess.run(_vm_command(REPO / "build" / "vm-vhost-user", daemon.sock, [], []),
                              capture_output=True, text=True, timeout=1200,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        report = proc.stdout + proc.stderr
        assert proc.returncode == 0, (f"the guest failed (vm-run exit {proc.returncode}):\n"
                                      f"{report[-4000:]}\ndaemon:\n{daemon.tail()}")
        results = _results(proc.stdout)
        assert results["sectors"] == (128 << 20) // 512
        assert results["hw_queues"] == 2
        assert results["fio_read_ios"] > 0 and results["fio_errors"] == 0  # type: ignore[operator]
        assert results["pattern"] == "written" and len(str(results["ext4"])) == 64
    finally:
        code = daemon.stop()
    assert code == 0, f"the daemon exited with {code}:\n{daemon.tail()}"
    assert not daemon.sock.exists(), "the daemon left its socket behind"
    with open(image, "rb") as f:
        f.seek(guest.PATTERN_OFFSET)
        assert f.read(guest.PATTERN_SIZE) == guest.pattern(), \
            "the image does not hold what the guest wrote"


KILLS = 3


def test_a_vm_loses_nothing_when_the_daemon_is_killed_and_restarted(tmp_path: Path) -> None:
    """SIGKILL the daemon under fio verify load, start it again: QEMU reconnects
    (``reconnect=1``), hands back the inflight buffer (INFLIGHT_SHMFD), the new
    daemon resubmits what was in flight, and fio finds every write."""
    image = _image(tmp_path)
    daemon = Daemon(tmp_path / "vu.sock", image, tmp_path / "daemon.log", jitter=True)
    outdir = REPO / "build" / "vm-vhost-user-kills"
    outdir.mkdir(parents=True, exist_ok=True)
    started = outdir / "load-started"
    started.unlink(missing_ok=True)
    daemon.start()
    vm = subprocess.Popen(_vm_command(outdir, daemon.sock, ["under-kills"],
                                      ["LOAD_SECONDS=40"], reconnect=True),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    try:
        deadline = time.monotonic() + 600
        while not started.exists():
            assert vm.poll() is None, f"the guest ended before its load:\n{vm.stdout.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the guest never started its load"
            time.sleep(0.2)
        for _ in range(KILLS):
            time.sleep(5)
            daemon.kill()
            daemon.start()
        output, _ = vm.communicate(timeout=900)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        code = daemon.stop()
    assert vm.returncode == 0, (f"the guest failed (vm-run exit {vm.returncode}):\n"
                                f"{output[-4000:]}\ndaemon:\n{daemon.tail()}")
    results = _results(output)
    assert results["kills_fio_errors"] == 0 and results["kills_fio_write_ios"] > 0  # type: ignore[operator]
    assert code == 0, f"the daemon exited with {code}:\n{daemon.tail()}"
    log = daemon.log.read_text()
    assert log.count("front-end connected") >= KILLS + 1, log[-4000:]
    resubmitted = [int(n) for n in re.findall(r"(\d+) request\(s\) to resubmit", log)]
    assert sum(resubmitted) > 0, f"no kill found requests in flight:\n{log[-4000:]}"
