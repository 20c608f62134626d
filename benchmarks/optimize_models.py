"""`tachyon optimize` side by side: every target of a model, each measured against version 1.

    flock /tmp/tachyon-bench.lock python benchmarks/optimize_models.py [--model digits|mlp]
        [--timing-runs 2000]

digits: the bundled classifier, calibrated on its training images and validated on the held-out
quarter (accuracy); mlp: the 784-1024-1024-10 benchmark MLP (tools/make_models.py mlp_fp32),
calibrated on and compared over generated rows (output agreement). Each target is a real
`tachyon optimize` run in a scratch repository holding version 1 only; its report is the
measurement (both versions in one process, alternating run by run). Prints the command, the
machine and each target's medians and ratios; writes
benchmarks/results/optimize-<model>-<stamp>.md (the summary, then every report.md) and .json
(every report.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _harness import ROOT, print_header

sys.path.insert(0, str(ROOT / "tools"))
from make_models import make_mlp, write_digits_data

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("int8-static", "int8-dynamic", "fp16")


def prepare(model: str, work: Path) -> tuple[Path, list[str]]:
    """A scratch repository with version 1 of the model, and the data flags for optimize."""
    repo = work / "repo"
    if model == "digits":
        (repo / "digits" / "1").mkdir(parents=True)
        shutil.copy(ROOT / "model_repository" / "digits" / "1" / "model.onnx",
                    repo / "digits" / "1" / "model.onnx")
        shutil.copy(ROOT / "model_repository" / "digits" / "config.pbtxt",
                    repo / "digits" / "config.pbtxt")
        calibration, validation = write_digits_data(work / "data")
        return repo, ["--calibration", str(calibration), "--validation", str(validation)]
    make_mlp(repo / "mlp" / "1" / "model.onnx")
    (repo / "mlp" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
        'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n')
    rows = np.random.default_rng(0).standard_normal((512, 784)).astype(np.float32)
    np.save(work / "rows.npy", rows)
    return repo, ["--calibration", str(work / "rows.npy")]


def run_target(repo: Path, model: str, target: str, data: list[str], runs: int) -> Path:
    command = [str(ROOT / ".venv" / "bin" / "tachyon"), "optimize", "--repository", str(repo),
               "--model", model, "--to", target, "--from-version", "1",
               "--timing-runs", str(runs)]
    if target == "int8-static" or model == "digits":
        command += data
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    folder = max((p for p in (repo / model).iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    return folder


def summary_line(raw: dict[str, Any]) -> str:
    lat, thr = raw["latency"], raw["throughput"]
    quality = (f"accuracy {raw['accuracy']['source']:.2%} -> {raw['accuracy']['target']:.2%}"
               if raw["accuracy"] else
               f"{raw['agreement'][0]['output']} agreement {raw['agreement'][0]['agree']:.2%}")
    return (f"| {raw['target']} | {raw['size_ratio']:.2f}x | {quality} | "
            f"{lat['source']['median_s'] * 1e6:.1f} / {lat['target']['median_s'] * 1e6:.1f} µs "
            f"= {raw['latency_speedup']:.2f}x | "
            f"{thr['source']['rows_per_s']:,.0f} / {thr['target']['rows_per_s']:,.0f} rows/s "
            f"= {raw['throughput_speedup']:.2f}x |")


def _demoted(report: str) -> str:
    """A report.md as a section: headings one level down, without its figure."""
    lines = [("#" + line if line.startswith("#") else line) for line in report.splitlines()]
    return "\n".join(line for line in lines if not line.startswith("![")) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "mlp"), default="digits")
    parser.add_argument("--timing-runs", type=int, default=2000)
    args = parser.parse_args()
    machine = print_header()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports, raws = [], []
    with tempfile.TemporaryDirectory(prefix="optimize-bench-") as scratch:
        repo, data = prepare(args.model, Path(scratch))
        for target in TARGETS:
            folder = run_target(repo, args.model, target, data, args.timing_runs)
            raws.append(json.loads((folder / "report.json").read_text()))
            reports.append((folder / "report.md").read_text().replace(scratch, "$SCRATCH"))
    header = [
        f"# tachyon optimize: {args.model}, every target against version 1",
        "",
        f"Command: `{' '.join([sys.executable, *sys.argv])}`",
        "",
        f"Machine: {machine}",
        "",
        "| target | size | quality | latency batch 1, median (v1 / new) | "
        "throughput batch 32 (v1 / new) |",
        "| --- | --- | --- | --- | --- |",
        *(summary_line(raw) for raw in raws),
        "",
        "Ratios: new size / v1 size; speed = v1 time / new time (> 1: the new one is faster).",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n".join(_demoted(r) for r in reports)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"optimize-{args.model}-{stamp}"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(raws, indent=2) + "\n", encoding="utf-8")
    print("\n".join(header[6:-1]))
    print(f"wrote {out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
