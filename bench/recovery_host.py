"""Host side of the recovery benchmark; started by bench/recovery (see there).

Waits until no other QEMU guest runs, boots ONE guest with scripts/vm-run that
runs bench/recovery_guest.py, then writes results.json (every kill's figures,
the summaries and the ratios) and results.md from the guest's recovery.json.
``--report-only`` redoes the report from an earlier run's raw folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # bench/ is not a package
import recovery_report

REPO = Path(__file__).resolve().parent.parent
VM_MEMORY = "2G"  # the 256 MiB file and fio's copy on the tmpfs (half of it)


def say(msg: str) -> None:
    print(f"bench/recovery: {msg}", file=sys.stderr, flush=True)


def boot_guest(args: argparse.Namespace, raw_dir: Path, facts: dict[str, Any]) -> int:
    guest_cmd = [".venv/bin/python", "bench/recovery_guest.py", "--kills", str(args.kills),
                 "--settle", f"{args.settle:g}", "--daemons", args.daemons]
    if args.fio_runtime:
        guest_cmd += ["--fio-runtime", args.fio_runtime]
    return host.run_guest(args, raw_dir, guest_cmd, facts, say, memory=VM_MEMORY)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/recovery", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kills per daemon (default 10)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds of load after a recovery before the next kill (default 1.5)")
    p.add_argument("--daemons", default="pyvduse,qsd",
                   help="which daemons, in this order (default %(default)s)")
    p.add_argument("--fio-runtime", metavar="ID=S,...",
                   help="fio's runtime per daemon (default pyvduse=120,qsd=60); another run "
                        "takes over if one ends before the kills are done")
    p.add_argument("--out", type=Path,
                   help="where results.{json,md} go (default docs/benchmarks/DATE-recovery)")
    p.add_argument("--raw", type=Path,
                   help="vm-run output folder (default build/bench/<name of --out>)")
    p.add_argument("--commit", metavar="REV",
                   help="serve src/pyvduse as committed in REV instead of the working tree")
    p.add_argument("--timeout", default="30m", help="vm-run timeout (default %(default)s)")
    p.add_argument("--max-wait", type=float, default=3600,
                   help="seconds to wait for another QEMU guest to finish (default %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="do not boot: rebuild the report from --raw of an earlier run")
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = (args.out or REPO / "docs" / "benchmarks" / f"{date}-recovery").resolve()
    raw_dir = (args.raw or REPO / "build" / "bench" / out.name).resolve()

    if args.report_only:
        facts = json.loads((raw_dir / "host.json").read_text())
    else:
        raw_dir.mkdir(parents=True, exist_ok=True)
        (raw_dir / "recovery.json").unlink(missing_ok=True)
        facts = host.host_facts(argv, args.commit)
        facts["command"] = shlex.join(
            ["bench/recovery", *(a.replace(f"{REPO}/", "") for a in argv)])
        rc = boot_guest(args, raw_dir, facts)
        (raw_dir / "host.json").write_text(json.dumps(facts, indent=1) + "\n")
        if not (raw_dir / "recovery.json").exists():
            say(f"the guest wrote no recovery.json (vm-run exit {rc}); see "
                f"{raw_dir / 'guest.log'} and {raw_dir / 'console.log'}")
            return 1
    raw = json.loads((raw_dir / "recovery.json").read_text())
    res = recovery_report.compute(raw, facts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = recovery_report.markdown(res)
    (out / "results.md").write_text(md)
    print(md.split("## Every kill")[0])
    say(f"wrote {out}/results.md, results.json")
    if not res["ok"] or facts.get("vm_run_exit", 0) != 0:
        say(f"FAILED: a check did not pass (guest exit {facts.get('vm_run_exit')})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
