"""`tachyon index tune` on the issue's target: a 200k x 128 IVF index (issue 14, part 2).

    flock /tmp/tachyon-bench.lock python benchmarks/index_tune_bench.py [--rows 200000]
        [--recall 0.95] [--factories "IVF512,SQ8;IVF512,SQfp16"]

Synthetic clustered data (a Gaussian mixture: 4000 fixed centres, noise 0.7, fixed seeds;
more clusters than IVF lists, so neighbours spread over several lists and nprobe matters):
`index build` makes IVF512,Flat with nprobe 1, then `index tune` chooses nprobe for the recall
on 1000 tuning queries and checks it on 1000 held-out ones, with --factories encodings built
and swept beside it. 1000 fresh queries the tune never saw check every candidate that met the
recall once more, with its queries/s (median of 5 runs, batches of 32, the server's thread
count) side by side with exact search (IndexFlatL2) on the same queries.
Prints the command, the machine and the tables; writes
benchmarks/results/index-tune-<stamp>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import index_build, index_tune  # noqa: E402
from server import index_tune_report as report  # noqa: E402
from server.index_sweep import recall_per_query, search_timed  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from _harness import print_header  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import make_vectors  # noqa: E402

DIM, K, NLIST, CLUSTERS, NOISE = 128, 10, 512, 4000, 0.7
RUNS = 5


def mixture(seed: int, rows: int) -> np.ndarray:
    return make_vectors.mixture(seed, rows, DIM, CLUSTERS, NOISE)


def median_qps(index: faiss.Index, queries: np.ndarray, threads: int) -> float:
    return statistics.median(search_timed(index, queries, K, 32, threads, 0.5)[1]
                             for _ in range(RUNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--factories", default="IVF512,SQ8;IVF512,SQfp16")
    args = parser.parse_args()
    machine = print_header()
    work = Path(tempfile.mkdtemp(prefix="index-tune-bench-"))
    vectors = mixture(0, args.rows)
    np.save(work / "vectors.npy", vectors)
    np.save(work / "queries.npy", mixture(7, 2000))
    fresh = mixture(99, 1000)
    started = time.perf_counter()
    index_build.build(work / "vectors.npy", f"IVF{NLIST},Flat", work / "repo", "ivf",
                      train_size=NLIST * 40, nprobe=1)
    build_s = time.perf_counter() - started
    factories = tuple(f for f in args.factories.split(";") if f)
    started = time.perf_counter()
    result = index_tune.tune(
        work / "repo", "ivf", work / "queries.npy",
        index_tune.TuneOptions(recall=args.recall, factories=factories, train_size=NLIST * 40),
        vectors_path=work / "vectors.npy", progress=True)
    tune_s = time.perf_counter() - started
    chosen = result.chosen
    assert not result.failure and chosen is not None and chosen.chosen is not None, \
        result.failure
    exact = faiss.IndexFlatL2(DIM)
    exact.add(vectors)
    _, want = exact.search(fresh, K)
    threads = int(result.info["threads"])
    exact_qps = median_qps(exact, fresh, threads)
    rows = []
    for c in result.candidates:  # each index is left at its chosen setting
        if c.chosen is None:
            continue
        recall = float(recall_per_query(c.index.search(fresh, K)[1], want).mean())
        qps = median_qps(c.index, fresh, threads)
        rows.append({"candidate": c.name, "setting": f"{c.parameter}={c.chosen.value}",
                     "chosen": c is chosen, "recall_tuning": c.chosen.recall,
                     "recall_holdout": c.holdout_recall, "recall_fresh": recall,
                     "qps_median": qps, "speedup_vs_exact": qps / exact_qps,
                     "memory_mib": c.memory_bytes / 2**20})
    summary = {
        "rows": args.rows, "dim": DIM, "factory": f"IVF{NLIST},Flat", "recall_target": args.recall,
        "exact_qps_median": exact_qps, "candidates_meeting": rows, "build_s": build_s,
        "tune_s": tune_s, "threads": threads, "batch": 32, "runs": RUNS,
    }
    table = report.table(result.candidates, args.recall, chosen)
    lines = [
        f"# index tune: {args.rows:,} x {DIM} IVF{NLIST},Flat, recall@{K} >= {args.recall}",
        "", f"- command: `{' '.join([sys.executable, *sys.argv])}`", f"- machine: {machine}",
        f"- data: Gaussian mixture, {CLUSTERS} centres, noise {NOISE}; 1000 tuning + 1000 "
        "held-out queries, 1000 fresh queries", f"- build {build_s:.1f} s, tune {tune_s:.1f} s "
        f"(exact neighbours, {len(factories)} factories built, sweeps)", "", table, "",
        f"Fresh queries (never seen by the tune), queries/s the median of {RUNS} runs at batch "
        f"32 with {threads} thread(s); exact search (IndexFlatL2): {exact_qps:,.0f} queries/s.",
        "", "| candidate | setting | recall tuning | recall held-out | recall fresh | queries/s | "
        "vs exact | MiB |", "|" + " --- |" * 8,
        *(f"| {r['candidate']}{' (chosen)' if r['chosen'] else ''} | {r['setting']} | "
          f"{r['recall_tuning']:.4f} | {r['recall_holdout']:.4f} | {r['recall_fresh']:.4f} | "
          f"{r['qps_median']:,.0f} | {r['speedup_vs_exact']:.1f}x | {r['memory_mib']:.1f} |"
          for r in rows), "",
    ]
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"index-tune-{stamp}"
    out.with_suffix(".md").write_text(text)
    raw = json.loads(result.report[report.RAW])
    out.with_suffix(".json").write_text(json.dumps({**summary, "tune": raw}, indent=1))
    if report.PLOT in result.report:
        out.with_suffix(".png").write_bytes(result.report[report.PLOT])
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
