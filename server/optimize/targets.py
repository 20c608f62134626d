"""What `tachyon optimize --to T` can make of an ONNX model: one `Target` entry per T.

Each target turns the source version's model file into the new version's, with ONNX Runtime's
own tools. A new target (say `tensorrt`) is one more entry in `TARGETS`: a function that writes
`job.output`, whether it needs calibration data, the file name it writes when that differs from
the source's, and the execution providers its result is measured on.

Every target keeps the model's input and output names and datatypes (float16 keeps float32
inputs and outputs: `keep_io_types`), because a model's config.pbtxt is shared by all its
versions: the new version is served under the same config as the old ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import extras
from server.optimize.compact import compact
from server.optimize.data import DataSet
from server.optimize.errors import FAILED, OptimizeError

CPU = ("CPUExecutionProvider",)
CALIBRATION_BATCH = 32
# int8-static quantises the operators that hold weights and do the arithmetic; the others
# (Softmax, pooling, ...) stay float, so e.g. probabilities keep their float precision
STATIC_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True, slots=True)
class ConvertJob:
    """One conversion: read `source`, write `output`; `scratch` is a private folder."""

    source: Path
    output: Path
    scratch: Path
    calibration: DataSet | None
    max_batch_size: int  # 0: the model takes rows along its first axis without a limit


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    summary: str  # one line for --help and the report
    convert: Callable[[ConvertJob], list[str]]  # returns the steps taken, for the report
    needs_calibration: bool = False
    filename: str | None = None  # None: the source's file name
    providers: tuple[str, ...] = field(default=CPU)  # where the result is measured


def optimize_offline(source: Path, output: Path) -> str:
    """ONNX Runtime's graph optimisation, saved (SessionOptions.optimized_model_filepath).

    The basic level only (constant folding, redundant-node elimination, semantics-preserving
    fusions): its result runs on every execution provider. The extended and layout levels
    write provider-specific operators, so those stay with the server's session at load time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(output)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=list(CPU))
    return "ONNX Runtime graph optimisation offline, basic level (portable across providers)"


# Tensors whose type shape inference cannot tell (outputs of ai.onnx.ml operators such as
# scikit-learn's Scaler) are float: the models optimize converts are float models.
_EXTRA = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def _pre_process(job: ConvertJob) -> tuple[Path, str]:
    """quant_pre_process: the basic-level optimisation plus shape inference, which
    quantisation needs to know tensor types and shapes. Symbolic shape inference (sympy)
    refuses operators it does not know (ai.onnx.ml ones, such as scikit-learn's Scaler); then
    it is told to give their outputs their first input's rank, and failing that ONNX's own
    shape inference runs alone."""
    from onnxruntime.quantization import quant_pre_process

    prepared = job.scratch / "prepared.onnx"
    step = "quant_pre_process: ONNX Runtime graph optimisation offline (basic level) and {}"
    tries: list[tuple[dict[str, bool], str]] = [
        ({}, "symbolic and ONNX shape inference"),
        ({"guess_output_rank": True}, "symbolic shape inference (unknown operators' outputs "
         "take their first input's rank) and ONNX shape inference"),
    ]
    if importlib.util.find_spec("sympy") is None:
        tries = []
    for options, said in tries:
        try:
            # a failed symbolic inference saves "sym_shape_infer_temp.onnx" (and its external
            # data) in the working folder: keep them in the scratch folder
            source, target = job.source.resolve(), prepared.resolve()
            with contextlib.chdir(job.scratch):
                quant_pre_process(str(source), str(target), **options)
            return prepared, step.format(said)
        except Exception:  # "Incomplete symbolic shape inference" and the like
            continue
    quant_pre_process(str(job.source), str(prepared), skip_symbolic_shape=True)
    return prepared, step.format("ONNX shape inference (symbolic shape inference failed or "
                                 "sympy is missing)")


def to_fp16(job: ConvertJob) -> list[str]:
    """Graph optimisation first, then float16. The optimised graph can lose the types the
    converter needs around operators it keeps in float32 (ai.onnx.ml ones): when its result
    does not load, the source is converted as it is. (Never optimise after the conversion:
    ONNX Runtime would save the float32 fallbacks of the machine it ran on.)"""
    optimized = job.scratch / "optimized.onnx"
    steps = [optimize_offline(job.source, optimized)]
    try:
        _convert_fp16(optimized, job.output)
    except Exception:  # the converter's result does not load (mixed float/float16 types)
        _convert_fp16(job.source, job.output)
        steps = [
            "no offline graph optimisation: the float16 conversion of the optimised graph did "
            "not load in ONNX Runtime, so the source graph was converted as it is"
        ]
    steps.append(
        "convert_float_to_float16(keep_io_types=True): float16 weights and arithmetic, "
        "float32 inputs and outputs (the served config's datatypes stay); operators without "
        "float16 support stay float32 behind Cast nodes"
    )
    steps.append(compact(job.output))
    return steps


def _convert_fp16(source: Path, output: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(output))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(output), options, providers=list(CPU))


def to_int8_dynamic(job: ConvertJob) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared, step = _pre_process(job)
    quantize_dynamic(
        str(prepared), str(job.output), weight_type=QuantType.QInt8, extra_options=_EXTRA
    )
    return [
        step,
        "quantize_dynamic: int8 weights; activations quantised to uint8 at run time, per batch",
        compact(job.output),
    ]


def to_int8_static(job: ConvertJob) -> list[str]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    data = job.calibration
    if data is None:  # the command refuses this earlier; kept for direct callers
        raise OptimizeError("int8-static needs --calibration data")
    prepared, step = _pre_process(job)
    batch = min(job.max_batch_size or CALIBRATION_BATCH, CALIBRATION_BATCH)
    quantize_static(
        str(prepared),
        str(job.output),
        _reader(data, batch),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(STATIC_OPS),
        extra_options={**_EXTRA, "OpTypesToExcludeOutputQuantization": list(STATIC_OPS)},
    )
    return [
        step,
        f"quantize_static: QDQ format; {', '.join(STATIC_OPS)} get int8 weights and uint8 "
        f"inputs whose fixed scales come from MinMax calibration on {data.origin} (batches "
        f"of {batch}), and give float outputs; other operators stay float. A row's result "
        "does not depend on the other rows of its batch",
        compact(job.output),
    ]


def _reader(data: DataSet, batch: int) -> Any:
    """A CalibrationDataReader over the calibration rows, `batch` rows at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, Any]] = (
                data.take(start, min(start + batch, data.rows))
                for start in range(0, data.rows, batch)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    return Rows()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("fp16", "float16 weights and arithmetic (float32 inputs and outputs)", to_fp16),
        Target(
            "int8-dynamic",
            "int8 weights, activations quantised at run time (no calibration data)",
            to_int8_dynamic,
        ),
        Target(
            "int8-static",
            "int8 weights and activations, scales calibrated on --calibration data",
            to_int8_static,
            needs_calibration=True,
        ),
    )
}


def convert(target: Target, job: ConvertJob) -> list[str]:
    """Run a target; a library failure becomes an OptimizeError naming the target."""
    try:
        return target.convert(job)
    except OptimizeError:
        raise
    except ImportError as exc:
        raise OptimizeError(extras.missing(f"--to {target.name}", "optimize", exc)) from exc
    except Exception as exc:  # ONNX Runtime's tools raise many kinds
        raise OptimizeError(
            f"--to {target.name}: converting {job.source} failed: {type(exc).__name__}: {exc}",
            FAILED,
        ) from exc
