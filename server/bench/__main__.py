"""`python -m server.bench ...`: the same as `tachyon bench ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server.bench import add_parser, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tachyon")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
