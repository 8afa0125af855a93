"""Runs inside a QEMU guest whose /dev/vda is a vhost-user-blk-pci disk served on the host.

Real clients on the real guest kernel's virtio-blk driver: fio writes and
verifies (libaio, direct, several jobs so both queues are used), a known
pattern is written with O_DIRECT for the host to compare in the image file,
and ext4 is made, mounted, written, read back and unmounted. Prints one JSON
line of results; exits non-zero on the first failure.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys

DEV = "/dev/vda"
PATTERN_OFFSET = 48 << 20  # past the fio area, before the ext4 test rewrites it all
PATTERN_SIZE = 1 << 20


def pattern() -> bytes:
    """The bytes the host expects at PATTERN_OFFSET (same function on both sides)."""
    out = bytearray()
    block = 0
    while len(out) < PATTERN_SIZE:
        out += hashlib.sha256(f"pyvduse-vhost-user-{block}".encode()).digest() * 128
        block += 1
    return bytes(out[:PATTERN_SIZE])


def run(*command: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def ext4_roundtrip() -> str:
    """mkfs.ext4, mount, write a file, unmount, mount again, compare; its digest."""
    data = os.urandom(8 << 20)
    run("mkfs.ext4", "-q", "-F", DEV)
    os.makedirs("/tmp/vu-mnt", exist_ok=True)
    run("mount", DEV, "/tmp/vu-mnt")
    with open("/tmp/vu-mnt/file", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    run("umount", "/tmp/vu-mnt")
    run("mount", DEV, "/tmp/vu-mnt")
    with open("/tmp/vu-mnt/file", "rb") as f:
        back = f.read()
    run("umount", "/tmp/vu-mnt")
    if back != data:
        sys.exit("ext4: the file read back after a remount differs")
    return hashlib.sha256(data).hexdigest()


def under_kills() -> None:
    """Random writes with verification while the host kills and restarts the daemon.

    Tells the host when the load starts (a file in the shared output folder),
    then runs fio for a fixed time with verification of what it wrote, both
    during the run (a backlog) and after it. Any lost or misplaced write, or an
    I/O error from a request the daemon dropped, fails fio.
    """
    outdir = os.environ["VM_RUN_OUTDIR"]
    with open(os.path.join(outdir, "load-started"), "w") as f:
        f.write("1\n")
    fio = run("fio", "--name=kills", f"--filename={DEV}", "--rw=randwrite", "--bs=4k",
              "--size=32M", "--ioengine=libaio", "--direct=1", "--iodepth=16",
              "--time_based", f"--runtime={os.environ.get('LOAD_SECONDS', '40')}",
              "--verify=crc32c", "--verify_backlog=256", "--do_verify=1", "--verify_fatal=1",
              "--output-format=json")
    job = json.loads(fio[fio.index("{"):])["jobs"][0]
    if job["error"] or not job["write"]["total_ios"]:
        sys.exit(f"fio under kills failed: {json.dumps(job)[:2000]}")
    print(json.dumps({"kills_fio_write_ios": job["write"]["total_ios"],
                      "kills_fio_read_ios": job["read"]["total_ios"],
                      "kills_fio_errors": job["error"]}), flush=True)


def main() -> None:
    if sys.argv[1:] == ["under-kills"]:
        under_kills()
        return
    results: dict[str, object] = {}
    name = os.path.basename(DEV)
    with open(f"/sys/block/{name}/size") as f:
        results["sectors"] = int(f.read())
    queues = os.listdir(f"/sys/block/{name}/mq")
    results["hw_queues"] = len(queues)
    results["ext4"] = ext4_roundtrip()
    fio = run("fio", "--name=verify", f"--filename={DEV}", "--rw=randwrite", "--bs=4k",
              "--size=32M", "--ioengine=libaio", "--direct=1", "--iodepth=16", "--numjobs=2",
              "--offset_increment=16M", "--size=16M", "--verify=crc32c", "--do_verify=1",
              "--verify_fatal=1", "--group_reporting", "--output-format=json")
    job = json.loads(fio[fio.index("{"):])["jobs"][0]
    results["fio_write_ios"] = job["write"]["total_ios"]
    results["fio_read_ios"] = job["read"]["total_ios"]
    results["fio_errors"] = job["error"]
    if job["error"] or not job["read"]["total_ios"]:
        sys.exit(f"fio verify failed: {json.dumps(job)[:2000]}")
    buf = mmap.mmap(-1, PATTERN_SIZE)
    buf.write(pattern())
    fd = os.open(DEV, os.O_RDWR | os.O_DIRECT)
    try:
        if os.pwritev(fd, [buf], PATTERN_OFFSET) != PATTERN_SIZE:
            sys.exit("short O_DIRECT write")
        os.fsync(fd)
        back = mmap.mmap(-1, PATTERN_SIZE)
        if os.preadv(fd, [back], PATTERN_OFFSET) != PATTERN_SIZE or back[:] != buf[:]:
            sys.exit("the pattern read back differs")
    finally:
        os.close(fd)
    results["pattern"] = "written"
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
