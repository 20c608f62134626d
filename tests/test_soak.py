"""benchmarks/soak.py, briefly: 20 seconds of mixed valid and invalid traffic, reloads, a
raising backend and clients that go away, against a real server; the verdict must be pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_short_soak_passes(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "20",
               "--reload-secs", "4", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    reports = list(tmp_path.glob("soak-*.json"))
    assert len(reports) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(reports[0].read_text())
    failed = [r for r in report["rules"] if not r["pass"]]
    assert run.returncode == 0 and report["pass"] and not failed, (failed, run.stdout[-3000:])
    classes = report["classes"]
    for name in ("grpc valid", "http JSON valid", "http binary valid", "grpc invalid",
                 "http invalid", "flaky (raising backend)", "grpc cancelled",
                 "http disconnects", "grpc raw disconnects", "reload probes"):
        assert classes[name]["requests"] > 0, name
    assert len(report["reloads"]) >= 2
    assert (tmp_path / reports[0].name.replace(".json", ".md")).read_text().count("| yes |") \
        == len(report["rules"])
