"""Runs tests/guest in one VM boot with the real VDUSE driver, and reports each test.

One guest boot (scripts/vm-run) runs pytest on tests/guest and writes a JUnit
report to the shared output folder. Each guest test then becomes one test
here that passes only if the guest ran it and it passed: a guest that did not
boot, crashed or skipped a test makes these fail, never skip.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = REPO / "tests" / "guest"
OUTDIR = REPO / "build" / "vm-tests"


def guest_test_ids() -> list[str]:
    """``module::test`` for every test function in tests/guest, found without importing."""
    ids = []
    for path in sorted(GUEST_TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        ids += [f"{path.stem}::{node.name}" for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return ids


def _outcome(case: ET.Element) -> tuple[str, str]:
    for tag in ("failure", "error", "skipped"):
        child = case.find(tag)
        if child is not None:
            return tag, (child.get("message") or "") + "\n" + (child.text or "")
    return "passed", ""


@pytest.fixture(scope="module")
def guest_results() -> dict[str, tuple[str, str]]:
    OUTDIR.mkdir(parents=True, exist_ok=True)
    junit = OUTDIR / "junit.xml"
    for stale in (junit, OUTDIR / "exit-code"):
        stale.unlink(missing_ok=True)
    python = Path(sys.executable)
    command = [str(REPO / "scripts" / "vm-run"), "--outdir", str(OUTDIR), "--",
               str(python), "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA",
               "--rootdir", str(GUEST_TESTS), "--junitxml", str(junit), str(GUEST_TESTS)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    (OUTDIR / "vm-run.out").write_text(proc.stdout + proc.stderr)
    if not junit.exists():
        pytest.fail(f"the guest produced no test report (vm-run exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}\n{proc.stdout[-4000:]}")
    results = {}
    for case in ET.parse(junit).iter("testcase"):
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        results[f"{module}::{case.get('name')}"] = _outcome(case)
    return results


@pytest.mark.parametrize("test_id", guest_test_ids())
def test_in_guest(test_id: str, guest_results: dict[str, tuple[str, str]]) -> None:
    assert test_id in guest_results, f"{test_id} did not run in the guest"
    outcome, detail = guest_results[test_id]
    assert outcome == "passed", f"{test_id} {outcome} in the guest:\n{detail}"
