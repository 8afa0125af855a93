"""Run bench/blkio_load.c, a libblkio load generator, against a vhost-user-blk or vhost-vdpa device.

The C program is compiled on demand with the machine's ``gcc`` against the
libblkio that ``scripts/setup-blkio`` unpacks into ``build/blkio/root``, into
``build/blkio/blkio_load`` (again whenever the source is newer than the
binary). The binary finds the library through an rpath relative to itself;
``PYVDUSE_LIBBLKIO`` (a path to ``libblkio.so.1``) overrides it at run time.

    python bench/blkio_load.py --driver virtio-blk-vhost-user --path /tmp/vhost.sock \\
        [--rw randread] [--bs 4096] [--iodepth 32] [--seconds 5] [--wait block|loop]

prints the program's one JSON line. From Python::

    from blkio_load import run_load
    result = run_load("virtio-blk-vhost-user", sock, "randread", 4096, 32, 5.0, "block")
    result["iops"], result["mib_s"], result["errors"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bench" / "blkio_load.c"
ROOT = REPO / "build" / "blkio" / "root"
LIBDIR = ROOT / "usr" / "lib" / "x86_64-linux-gnu"
BINARY = REPO / "build" / "blkio" / "blkio_load"
RW_MODES = ("randread", "randwrite", "read", "write")
WAIT_MODES = ("block", "loop")


class LoadError(RuntimeError):
    """Building or running the load generator failed; the message has its stderr."""


def build(*, force: bool = False) -> Path:
    """The compiled load generator, built first if missing or older than its source.

    Raises :class:`LoadError` if libblkio's header is missing (naming
    ``scripts/setup-blkio``) or gcc fails. Safe against concurrent builds: the
    binary is compiled to a temporary name and renamed into place.
    """
    if not force and BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    header = ROOT / "usr" / "include" / "blkio.h"
    if not header.exists() or not (LIBDIR / "libblkio.so").exists():
        raise LoadError(f"libblkio headers not found under {ROOT}: run scripts/setup-blkio")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise LoadError("no gcc/cc on PATH to build bench/blkio_load.c")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".blkio_load.", dir=BINARY.parent)
    os.close(fd)
    rpath = "$ORIGIN/" + os.path.relpath(LIBDIR, BINARY.parent)
    argv = [gcc, "-O2", "-g", "-Wall", "-Wextra", "-o", tmp, str(SOURCE),
            f"-I{ROOT / 'usr' / 'include'}", f"-L{LIBDIR}", "-lblkio", f"-Wl,-rpath,{rpath}"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LoadError(f"building {SOURCE.name} failed:\n{' '.join(argv)}\n{result.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, BINARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BINARY


def command(driver: str, path: str | os.PathLike[str], rw: str, bs: int, iodepth: int,
            seconds: float, wait_mode: str, *, queue_size: int | None = None,
            size: int | None = None) -> list[str]:
    """The load generator's command line (building it if needed)."""
    if rw not in RW_MODES:
        raise ValueError(f"rw must be one of {', '.join(RW_MODES)}, not {rw!r}")
    if wait_mode not in WAIT_MODES:
        raise ValueError(f"wait_mode must be one of {', '.join(WAIT_MODES)}, not {wait_mode!r}")
    argv = [str(build()), "--driver", driver, "--path", os.fspath(path), "--rw", rw,
            "--bs", str(bs), "--iodepth", str(iodepth), "--seconds", str(seconds),
            "--wait", wait_mode]
    if queue_size is not None:
        argv += ["--queue-size", str(queue_size)]
    if size is not None:
        argv += ["--size", str(size)]
    return argv


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    override = env.get("PYVDUSE_LIBBLKIO")
    if override:
        library_dir = str(Path(override).resolve().parent)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (library_dir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def run_load(driver: str, path: str | os.PathLike[str], rw: str, bs: int, iodepth: int,
             seconds: float, wait_mode: str, *, queue_size: int | None = None,
             size: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run one load and return its result: the JSON object bench/blkio_load.c prints.

    Keys: ``driver``, ``path``, ``rw``, ``bs``, ``iodepth``, ``mode`` (the wait
    mode), ``size``, ``seconds`` (elapsed), ``completions``, ``errors``,
    ``iops``, ``mib_s``, ``lat_us_mean``, ``cpu_usr``, ``cpu_sys`` (% of one
    CPU). Failed requests are counted in ``errors``, not raised; a run that
    cannot start or do I/O (no server, libblkio error), or lasts longer than
    ``timeout`` (default: ``seconds`` + 30), raises :class:`LoadError` with the
    program's stderr.
    """
    argv = command(driver, path, rw, bs, iodepth, seconds, wait_mode, queue_size=queue_size,
                   size=size)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                env=_environment(),
                                timeout=timeout if timeout is not None else seconds + 30)
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"{' '.join(argv)} did not finish in {e.timeout} s") from e
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise LoadError(f"{' '.join(argv)} exited with status {result.returncode}:\n"
                        f"{result.stderr.strip()}")
    data: dict[str, Any] = json.loads(lines[-1])
    if result.stderr.strip():
        data["stderr"] = result.stderr.strip()
    return data


def main(argv: list[str] | None = None) -> int:
    """Command line: build if needed, run one load, print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", default="virtio-blk-vhost-user",
                        help="virtio-blk-vhost-user (default) or virtio-blk-vhost-vdpa")
    parser.add_argument("--path", required=True, help="vhost-user socket or /dev/vhost-vdpa-N")
    parser.add_argument("--rw", choices=RW_MODES, default="randread")
    parser.add_argument("--bs", type=int, default=4096)
    parser.add_argument("--iodepth", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--wait", choices=WAIT_MODES, default="block")
    parser.add_argument("--queue-size", type=int)
    parser.add_argument("--size", type=int, help="use only the first SIZE bytes")
    parser.add_argument("--build-only", action="store_true", help="build and print the path")
    args = parser.parse_args(argv)
    try:
        if args.build_only:
            print(build(force=True))
            return 0
        result = run_load(args.driver, args.path, args.rw, args.bs, args.iodepth, args.seconds,
                          args.wait, queue_size=args.queue_size, size=args.size)
    except LoadError as e:
        print(f"blkio_load: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
