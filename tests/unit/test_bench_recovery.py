"""bench/recovery_report.py: medians, ranges and ratios of the recovery benchmark."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import recovery_report  # bench/ is not a package

HOST = {"date": "2026-01-01", "command": "bench/recovery", "machine": "test",
        "wall_seconds": 600, "host_cpu_used_by_others": 0.1, "host_cpus": 2}


def daemon(did: str, pidfile: list[float], read: list[float], *,
           resubmitted: bool = True, fio_ok: bool = True, same_device: bool = True,
           errors: list[str] | None = None) -> dict[str, Any]:
    kills = [{"kill": n, "inflight_at_kill": 30 + n, "pidfile_seconds": p, "read_seconds": r,
              "resubmitted": (20 + n) if resubmitted else None, "fio_run": 1}
             for n, (p, r) in enumerate(zip(pidfile, read, strict=True), 1)]
    return {"id": did, "label": did.upper(), "command": f"{did} serve", "kills": kills,
            "fio": [{"fio": "fio --name=load", "exit": 0 if fio_ok else 1, "ok": fio_ok,
                     "write_ios": 12345, "error": 0}],
            "same_device": same_device, "errors": errors or []}


def raw(*daemons: dict[str, Any]) -> dict[str, Any]:
    meta = {"guest_kernel": "6.12", "guest_cpus": 2, "guest_mem_bytes": 2 << 30,
            "fio": "fio-3.33", "qemu_storage_daemon": "7.2", "python": "3.11", "size": 256 << 20,
            "queues": 2, "queue_size": 128, "kills": 3, "settle": 1.5, "read_offset": 4 << 20,
            "load": "fio --rw=randwrite",
            "startup_baseline": {"python_seconds": 0.5, "pyvduse_help_seconds": 4.25}}
    return {"meta": meta, "daemons": list(daemons)}


def test_spread() -> None:
    assert recovery_report.spread([3.0, 1.0, 2.0, 10.0]) == {"n": 4, "median": 2.5, "min": 1.0,
                                                              "max": 10.0}
    assert recovery_report.spread([]) == {"n": 0, "median": None, "min": None, "max": None}


def test_medians_and_ratios() -> None:
    res = recovery_report.compute(raw(daemon("pyvduse", [6.0, 5.0, 7.0], [6.5, 5.5, 9.0]),
                                      daemon("qsd", [1.0, 1.5, 2.0], [2.0, 2.5, 3.0],
                                             resubmitted=False)), HOST)
    p, q = res["summary"]["pyvduse"], res["summary"]["qsd"]
    assert p["pidfile_seconds"] == {"n": 3, "median": 6.0, "min": 5.0, "max": 7.0}
    assert p["read_seconds"]["median"] == 6.5
    assert p["resubmitted"]["median"] == 22
    assert q["resubmitted"]["n"] == 0
    assert p["ok"] and q["ok"] and res["ok"]
    assert res["ratios"]["pidfile_seconds"]["median"] == pytest.approx(4.0)
    assert res["ratios"]["read_seconds"] == {"median": pytest.approx(2.6),
                                             "min": pytest.approx(2.75),
                                             "max": pytest.approx(3.0)}
    md = recovery_report.markdown(res)
    assert "| PYVDUSE | 3 | 6.00 s (5.00 to 7.00) | 6.50 s (5.50 to 9.00) | 32 (31 to 33) | " \
           "22 (21 to 23) | yes (1 run(s)) | yes |" in md
    assert "| QSD | 3 | 1.50 s (1.00 to 2.00) | 2.50 s (2.00 to 3.00) | 32 (31 to 33) | " \
           "not reported | yes (1 run(s)) | yes |" in md
    assert "| restart → pidfile | 4.00x | 5.00x | 3.50x |" in md
    assert "| PYVDUSE | 2 | 32 | 5.00 s | 5.50 s | 22 |" in md
    assert "| QSD | 3 | 33 | 2.00 s | 3.00 s | n/a |" in md
    assert "`python -c pass`) starts in 0.50 s, `pyvduse serve --help`" in md
    assert "takes 4.25 s." in md
    assert "## Errors" not in md


def test_a_failed_check_fails_the_run() -> None:
    for bad in ({"fio_ok": False}, {"same_device": False},
                {"errors": ["the probe read did not complete"]}):
        res = recovery_report.compute(raw(daemon("pyvduse", [6.0], [7.0], **bad),
                                          daemon("qsd", [1.0], [2.0])), HOST)
        assert not res["ok"], bad
        assert not res["summary"]["pyvduse"]["ok"]
    md = recovery_report.markdown(res)
    assert "* PYVDUSE: the probe read did not complete" in md
    no_kill = recovery_report.compute(raw(daemon("pyvduse", [], [])), HOST)
    assert not no_kill["ok"]
    assert no_kill["ratios"] == {}
    assert "n/a" in recovery_report.markdown(no_kill)
