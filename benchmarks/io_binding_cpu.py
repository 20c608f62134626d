"""I/O binding vs the plain `session.run` path on the CPU EP, through the batcher, in one run
(issue 12: the default of `parameters.io_binding` on a CPU instance).

    python benchmarks/io_binding_cpu.py [--requests 2000] [--repeats 5]

The MLP 784-1024-1024-10 behind a DynamicBatcher (max_batch_size 64, one instance, one
intra-op thread), `--requests` single-row requests submitted at once so that batches fill;
samples/s per path, medians of the repeats alternating the two paths, and their ratio.
Writes benchmarks/results/io-binding-cpu-<stamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _harness import print_header  # noqa: E402
from make_models import make_mlp  # noqa: E402

from server.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from server.batching import DynamicBatcher  # noqa: E402
from server.model_config import parse_config, to_spec  # noqa: E402
from server.statistics import ModelStats  # noqa: E402

CONFIG = """
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "io_binding" value: { string_value: "%s" } }
"""


def samples_per_second(version: Path, binding: str, requests: int) -> tuple[float, float]:
    """(samples/s, mean batch size) of one pass."""
    spec = to_spec(parse_config(CONFIG % binding, "mlp"), "onnxruntime")
    backend = OnnxRuntimeBackend(spec, version, 0)
    backend.load()
    rows = np.random.default_rng(0).standard_normal((requests, 1, 784), np.float32)
    stats = ModelStats()

    async def main() -> float:
        batcher = DynamicBatcher(spec, [backend], stats)
        batcher.start()
        await asyncio.gather(*(batcher.submit({"INPUT0": r}, ["OUTPUT0"], 1) for r in rows[:256]))
        start = time.perf_counter()
        await asyncio.gather(*(batcher.submit({"INPUT0": r}, ["OUTPUT0"], 1) for r in rows))
        elapsed = time.perf_counter() - start
        await batcher.drain()
        return elapsed

    elapsed = asyncio.run(main())
    backend.unload()
    return requests / elapsed, stats.inference_count / max(stats.execution_count, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    machine = print_header()
    version = Path(tempfile.mkdtemp(prefix="io-binding-")) / "1"
    make_mlp(version / "model.onnx")
    runs: dict[str, list[float]] = {"false": [], "true": []}
    batch: dict[str, list[float]] = {"false": [], "true": []}
    for _ in range(args.repeats):
        for binding in ("false", "true"):
            rate, mean_batch = samples_per_second(version, binding, args.requests)
            runs[binding].append(rate)
            batch[binding].append(mean_batch)
    plain, bound = (statistics.median(runs[b]) for b in ("false", "true"))
    lines = [
        "# I/O binding vs plain session.run, CPU EP, through the batcher", "",
        f"- command: `{' '.join(sys.argv)}`", f"- machine: {machine}",
        f"- MLP 784-1024-1024-10, {args.requests} single-row requests at once, max_batch_size "
        f"64, one instance, one intra-op thread; median of {args.repeats} alternating passes",
        "", "| path | samples/s (median) | all passes | mean batch |", "| --- | --- | --- | --- |",
        f"| plain (`io_binding` false) | {plain:,.0f} | "
        f"{', '.join(f'{r:,.0f}' for r in runs['false'])} | "
        f"{statistics.mean(batch['false']):.1f} |",
        f"| bound (`io_binding` true) | {bound:,.0f} | "
        f"{', '.join(f'{r:,.0f}' for r in runs['true'])} | {statistics.mean(batch['true']):.1f} |",
        "", f"bound / plain: {bound / plain:.2f}x", "",
    ]
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"io-binding-cpu-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "argv": sys.argv, "runs": runs, "mean_batch": batch}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
