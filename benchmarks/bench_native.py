"""Micro-benchmarks of ``server._native`` against its Python references.

Times each native function and the realistic pure-Python alternative on batch sizes the server
sees (STRING_CASES below), prints a table of per-call medians with the ratio reference / native
(> 1 means the native code is faster), and writes every raw timing to
``benchmarks/results/native_micro.json``. (The native batch gather and scatter were removed: no
faster than ``b"".join``, and unused; see ``benchmarks/results/batch-assembly-20261127.md``.)

    python benchmarks/bench_native.py [--repeat 15] [--min-time 0.05] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server import _native  # noqa: E402
from tests import native_reference as ref  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "native_micro.json"

# (strings, min length, max length)
STRING_CASES = [(32, 10, 100), (1000, 10, 100)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "gil_release_threshold": _native.GIL_RELEASE_THRESHOLD,
    }


def time_call(fn: Callable[[], Any], repeat: int, min_time: float) -> dict[str, Any]:
    """Per-call seconds of `repeat` runs, each looping long enough to reach `min_time`."""
    timer = timeit.Timer(fn)
    number = 1
    while True:
        if timer.timeit(number) >= min_time:
            break
        number *= 2
    runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
    return {"number": number, "per_call_s": runs, "median_s": statistics.median(runs)}


def random_strings(rng: np.random.Generator, count: int, lo: int, hi: int) -> list[str]:
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 éü日"))
    lengths = rng.integers(lo, hi + 1, size=count)
    return ["".join(rng.choice(alphabet, size=int(k))) for k in lengths]


def string_cases(rng: np.random.Generator) -> list[dict[str, Any]]:
    cases = []
    for count, lo, hi in STRING_CASES:
        items = random_strings(rng, count, lo, hi)
        encoded = ref.encode_bytes(items)
        cases.append(
            {
                "case": f"encode_bytes {count} str of {lo}-{hi} chars",
                "check": lambda i=items: _native.encode_bytes(i) == ref.encode_bytes(i),
                "native": {"encode_bytes": lambda i=items: _native.encode_bytes(i)},
                "reference": {"struct.pack + b''.join": lambda i=items: ref.encode_bytes(i)},
            }
        )
        cases.append(
            {
                "case": f"decode_bytes {count} elements ({len(encoded)} B)",
                "check": lambda e=encoded, c=count: (
                    _native.decode_bytes(e, c) == ref.decode_bytes(e, c)
                ),
                "native": {"decode_bytes": lambda e=encoded, c=count: _native.decode_bytes(e, c)},
                "reference": {
                    "struct.unpack_from loop": lambda e=encoded, c=count: ref.decode_bytes(e, c)
                },
            }
        )
        cases.append(
            {
                "case": f"bytes_sizes {count} elements",
                "check": lambda e=encoded: _native.bytes_sizes(e) == ref.bytes_sizes(e),
                "native": {"bytes_sizes": lambda e=encoded: _native.bytes_sizes(e)},
                "reference": {"struct.unpack_from loop": lambda e=encoded: ref.bytes_sizes(e)},
            }
        )
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per function")
    parser.add_argument(
        "--min-time", type=float, default=0.05, help="seconds each timed run loops for at least"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    info = machine()
    print(f"command: {command}")
    print(
        f"machine: {info['platform']} | {info['cpu']} | {info['cpu_count']} CPUs | "
        f"Python {info['python']} | numpy {info['numpy']}"
    )
    print(f"timing: median of {args.repeat} runs, each >= {args.min_time * 1e3:.0f} ms\n")

    rng = np.random.default_rng(2024)
    results = []
    header = f"{'case':<44} {'implementation':<32} {'median':>11} {'ref/native':>11}"
    print(header)
    print("-" * len(header))
    for case in string_cases(rng):
        if not case["check"]():
            raise SystemExit(f"native and reference disagree on {case['case']}")
        timed: dict[str, dict[str, dict[str, Any]]] = {"native": {}, "reference": {}}
        for side in ("native", "reference"):
            for name, fn in case[side].items():
                timed[side][name] = time_call(fn, args.repeat, args.min_time)
        primary_name, primary = next(iter(timed["native"].items()))
        for side in ("native", "reference"):
            for name, t in timed[side].items():
                ratio = ""
                if side == "reference":
                    t["ratio_vs_native"] = t["median_s"] / primary["median_s"]
                    ratio = f"{t['ratio_vs_native']:.2f}x"
                label = f"{name}" if side == "native" else f"ref: {name}"
                print(f"{case['case']:<44} {label:<32} {t['median_s'] * 1e6:>9.2f}us {ratio:>11}")
        results.append({"case": case["case"], "ratios_against": primary_name, **timed})
        print()

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": info,
        "repeat": args.repeat,
        "min_time_s": args.min_time,
        "results": results,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"raw results: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
