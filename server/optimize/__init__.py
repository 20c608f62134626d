"""`tachyon optimize`: optimised versions of ONNX models (float16, int8), with a report.

    command.py   the command line and the run, start to end
    targets.py   one entry per --to target (ONNX Runtime's converters)
    data.py      calibration / validation data: files checked against the inputs, or generated
    measure.py   the source and the new version side by side
    report.py    report.md, report.png, report.json
    versions.py  source version, next version, atomic publish, version_policy
"""

from server.optimize.command import Request, Result, add_parser, optimize, run
from server.optimize.errors import OptimizeError

__all__ = ["OptimizeError", "Request", "Result", "add_parser", "optimize", "run"]
