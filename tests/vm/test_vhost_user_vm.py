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


def _wait_for_socket(path: Path, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the daemon did not create {path}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_a_vm_boots_on_a_vhost_user_blk_disk_and_its_writes_reach_the_image(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    sock = tmp_path / "vu.sock"
    log = tmp_path / "daemon.log"
    outdir = REPO / "build" / "vm-vhost-user"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "pyvduse", "serve", "--transport", "vhost-user",
             "--socket", str(sock), "--num-queues", "2", "--name", "vu0",
             "file", f"path={image}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(sock, server, log)
        qemu = ["-object", f"memory-backend-memfd,id=mem0,size={GUEST_MEMORY},share=on",
                "-machine", "memory-backend=mem0",
                "-chardev", f"socket,id=vu0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=2"]
        command = [str(REPO / "scripts" / "vm-run"), "--outdir", str(outdir),
                   "--memory", GUEST_MEMORY, "--timeout", "15m",
                   *[f"--qemu-arg={arg}" for arg in qemu], "--",
                   str(REPO / ".venv" / "bin" / "python"),
                   str(REPO / "tests" / "vm" / "vhost_user_guest.py")]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        report = proc.stdout + proc.stderr
        assert proc.returncode == 0, (f"the guest failed (vm-run exit {proc.returncode}):\n"
                                      f"{report[-4000:]}\ndaemon:\n{log.read_text()[-3000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, f"the guest printed no results:\n{report[-4000:]}"
        results = json.loads(lines[-1])
        assert results["sectors"] == (128 << 20) // 512
        assert results["hw_queues"] == 2
        assert results["fio_read_ios"] > 0 and results["fio_errors"] == 0
        assert results["pattern"] == "written" and len(str(results["ext4"])) == 64
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            code = None
    assert code == 0, f"the daemon exited with {code}:\n{log.read_text()[-3000:]}"
    assert not sock.exists(), "the daemon left its socket behind"
    with open(image, "rb") as f:
        f.seek(guest.PATTERN_OFFSET)
        assert f.read(guest.PATTERN_SIZE) == guest.pattern(), \
            "the image does not hold what the guest wrote"
