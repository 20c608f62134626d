"""`tachyon bench`: the bundled benchmark suite.

A load generator for any KServe v2 server (gRPC and HTTP; closed loop over concurrencies, open
loop at request rates without coordinated omission; several client processes), scenario files,
report folders with plots, and a comparison against the peers run-peers knows.

    client.py    the load: one process, its own event loop, prebuilt request bytes
    runner.py    checks before any load, client processes, one point at a time, server stats
    inputs.py    request tensors from metadata or a data file, serialized once
    control.py   metadata, readiness, statistics, one probe request (gRPC or HTTP)
    results.py   exact merging, percentiles, the server-side split
    report.py    report.md, raw.json, PNG plots
    scenario.py  scenario files
    servers.py   `tachyon serve` and the peers, started on free ports
    compare.py   `tachyon bench compare`
"""

from server.bench.cli import add_parser, run

__all__ = ["add_parser", "run"]
