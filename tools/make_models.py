#!/usr/bin/env python
"""Build the bundled example model repository (Triton layout).

Usage::

    python tools/make_models.py [--out DIR] [--only NAME ...]

Writes ``DIR/<model>/1/model.onnx`` (plus ``config.pbtxt`` where the model has one) for:

* ``digits``        scikit-learn MLP on the bundled 8x8 digits data (a real classifier)
* ``identity_fp32`` Triton's classic identity model, FP32 [-1, 16]
* ``add_sub``       Triton's add/sub model; deliberately *no* config.pbtxt (the server
                    completes the configuration from the ONNX graph)
* ``string_upper``  BYTES in, BYTES out (ONNX StringNormalizer, upper-casing)
* ``identity_all``  one Identity per datatype, for datatype round-trip tests

``--digits-data DIR`` writes the digits data instead: ``calibration.npz`` (the training images)
and ``validation.npz`` (the held-out quarter, with labels), the files that
``tachyon optimize --model digits`` takes (README, "Optimising models").

``mlp_fp32`` (784-1024-1024-10, ~7 MB) is only built on request (``--only mlp_fp32``); it is
the benchmark model and is too large to commit.

Everything is deterministic (fixed seeds), uses ONNX opset 17 and IR version 8, so ONNX
Runtime >= 1.16 loads every model. Each model is checked with ONNX Runtime after it is written.
Dynamic dimensions are written as symbolic dims (``dim_param``), which ONNX Runtime and Triton
report as -1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model_repository"
SEED = 0

# Locale for StringNormalizer. ONNX Runtime's default is "en_US.UTF-8", which does not exist on
# many hosts (slim containers): the session then fails to *load*. "C" exists on every platform
# (the C++ standard guarantees it), at the price of upper-casing ASCII letters only: non-ASCII
# characters pass through unchanged ("Grüße" -> "GRüßE"), with their UTF-8 bytes intact.
# "C.UTF-8" would also upper-case letters such as "ü" on glibc Linux, but is not portable.
STRING_LOCALE = "C"


# --------------------------------------------------------------------------------------------
# helpers


def _tensor(name: str, elem_type: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _model(graph: onnx.GraphProto, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text.strip() + "\n", encoding="utf-8")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _describe(path: Path) -> None:
    """Print the input/output names, types and shapes as ONNX Runtime reports them."""
    sess = _session(path)
    for kind, args in (("in ", sess.get_inputs()), ("out", sess.get_outputs())):
        for a in args:
            print(f"    {kind} {a.name:<14} {a.type:<16} {a.shape}")


# --------------------------------------------------------------------------------------------
# digits: a real scikit-learn classifier


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as float32 images and int64 labels: (x_train, x_test, y_train,
    y_test), 75% / 25% stratified, fixed seed. The test quarter is the held-out data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=SEED, stratify=y
    )
    return parts[0], parts[1], parts[2], parts[3]


def write_digits_data(folder: Path) -> tuple[Path, Path]:
    """The digits data in `tachyon optimize`'s format: calibration.npz (the training images
    under INPUT) and validation.npz (the held-out images under INPUT, their classes under
    labels)."""
    x_train, x_test, _, y_test = digits_split()
    folder.mkdir(parents=True, exist_ok=True)
    calibration, validation = folder / "calibration.npz", folder / "validation.npz"
    np.savez_compressed(calibration, INPUT=x_train)
    np.savez_compressed(validation, INPUT=x_test, labels=y_test)
    return calibration, validation


def make_digits(model_dir: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = digits_split()
    clf = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=SEED),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    sk_acc = float((clf.predict(x_test) == y_test).mean())
    print(f"  digits: scikit-learn test accuracy {sk_acc:.4f} ({len(y_test)} test images)")

    onx = convert_sklearn(
        clf,
        "digits",
        initial_types=[("INPUT", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    graph = onx.graph
    # skl2onnx names its outputs "label" (INT64 [N]) and "probabilities" (FP32 [N, 10]).
    # Triton cannot express an output without non-batch dims when max_batch_size > 0, so the
    # label is reshaped to [N, 1] and both outputs get their public names.
    renames = {"label": "label_flat", "probabilities": "PROBABILITIES"}
    for node in graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "label_shape"))
    graph.node.append(
        helper.make_node("Reshape", ["label_flat", "label_shape"], ["LABEL"], name="LabelReshape")
    )
    del graph.output[:]
    graph.output.extend(
        [
            _tensor("LABEL", TensorProto.INT64, ["batch", 1]),
            _tensor("PROBABILITIES", TensorProto.FLOAT, ["batch", 10]),
        ]
    )
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    # skl2onnx declares the lowest opset its ops need (16 here); opset 17 only adds operators,
    # so declaring 17 changes no semantics.
    for opset in onx.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    onx.ir_version = IR_VERSION
    onx.producer_name = "tachyon-make_models (skl2onnx)"
    path = _save(onx, model_dir / "1" / "model.onnx")

    # Same predictions from ONNX Runtime, and the promised shapes.
    label, proba = _session(path).run(["LABEL", "PROBABILITIES"], {"INPUT": x_test})
    assert label.dtype == np.int64 and label.shape == (len(x_test), 1), label.shape
    assert proba.dtype == np.float32 and proba.shape == (len(x_test), 10), proba.shape
    ort_acc = float((label[:, 0] == y_test).mean())
    print(f"  digits: ONNX Runtime test accuracy {ort_acc:.4f}")
    assert abs(ort_acc - sk_acc) < 1e-9, (ort_acc, sk_acc)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)

    # version_policy all: version 2 is the int8 copy that `tachyon optimize` wrote (README,
    # "Optimising models"); both are served, and a request without a version gets version 2.
    _write_config(
        model_dir,
        """
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { all { } }
input [
  { name: "INPUT" data_type: TYPE_FP32 dims: [ 64 ] }
]
output [
  { name: "LABEL" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ 10 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value { string_value: "1" } }
""",
    )

    # A ready-to-send KServe v2 request with four test images, and their true labels.
    idx = [0, 1, 2, 3]
    images = x_test[idx]
    rows = ",\n".join(
        "          " + json.dumps([float(v) for v in img], separators=(",", ":")) for img in images
    )
    labels = json.dumps([int(v) for v in y_test[idx]])
    sample = (
        "{\n"
        '  "description": "4 test images from scikit-learn load_digits (8x8, pixel values 0-16,'
        " row-major) and their true labels. 'request' is a KServe v2 inference request body"
        ' for the digits model.",\n'
        f'  "labels": {labels},\n'
        '  "request": {\n'
        '    "inputs": [\n'
        "      {\n"
        '        "name": "INPUT",\n'
        '        "shape": [4, 64],\n'
        '        "datatype": "FP32",\n'
        '        "data": [\n'
        f"{rows}\n"
        "        ]\n"
        "      }\n"
        "    ],\n"
        '    "outputs": [{"name": "LABEL"}, {"name": "PROBABILITIES"}]\n'
        "  }\n"
        "}\n"
    )
    parsed = json.loads(sample)  # well-formed, and consistent with the model
    data = np.array(parsed["request"]["inputs"][0]["data"], np.float32)
    got, _ = _session(path).run(None, {"INPUT": data})
    print(f"  digits: sample.json labels {parsed['labels']}, model says {got[:, 0].tolist()}")
    (model_dir / "sample.json").write_text(sample, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# identity_fp32 / add_sub: the classic Triton test models


def make_identity_fp32(model_dir: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",  # graph named as in the benchmark's copy, so the two files are identical
        [_tensor("INPUT0", TensorProto.FLOAT, ["batch", 16])],
        [_tensor("OUTPUT0", TensorProto.FLOAT, ["batch", 16])],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    (out,) = _session(path).run(None, {"INPUT0": x})
    assert np.array_equal(out, x)
    _write_config(
        model_dir,
        """
name: "identity_fp32"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
""",
    )


def make_add_sub(model_dir: Path) -> None:
    # No config.pbtxt on purpose: the server must complete the configuration from the graph.
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [
            _tensor("INPUT0", TensorProto.FLOAT, ["batch", 16]),
            _tensor("INPUT1", TensorProto.FLOAT, ["batch", 16]),
        ],
        [
            _tensor("OUTPUT0", TensorProto.FLOAT, ["batch", 16]),
            _tensor("OUTPUT1", TensorProto.FLOAT, ["batch", 16]),
        ],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    stale = model_dir / "config.pbtxt"
    if stale.exists():
        stale.unlink()
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), np.float32)
    s, d = _session(path).run(None, {"INPUT0": a, "INPUT1": b})
    assert np.array_equal(s, a + b) and np.array_equal(d, a - b)


# --------------------------------------------------------------------------------------------
# string_upper: BYTES in and out


def make_string_upper(model_dir: Path) -> None:
    # StringNormalizer keeps one output element per input element, empty strings included: it
    # only drops elements that match `stopwords`, and none are set. Its one length quirk: an
    # input of zero elements is rejected by ONNX Runtime ("Single dimension value must be
    # greater than 0"), so a request with shape [0] fails. (Were every element a stopword, the
    # output would be [""], but with no stopwords that cannot happen.)
    graph = helper.make_graph(
        [
            helper.make_node(
                "StringNormalizer",
                ["TEXT"],
                ["UPPER"],
                case_change_action="UPPER",
                is_case_sensitive=1,
                locale=STRING_LOCALE,
            )
        ],
        "string_upper",
        [_tensor("TEXT", TensorProto.STRING, ["n"])],
        [_tensor("UPPER", TensorProto.STRING, ["n"])],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    sess = _session(path)
    for texts in (["hello", "Grüße", ""], [""], ["", "", "mIxEd 123"]):
        (out,) = sess.run(None, {"TEXT": np.array(texts, dtype=object)})
        print(f"  string_upper: {texts} -> {out.tolist()}")
        assert out.shape == (len(texts),), out.shape
    _write_config(
        model_dir,
        """
name: "string_upper"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] } ]
""",
    )


# --------------------------------------------------------------------------------------------
# identity_all: every datatype round-trips

# (Triton/KServe datatype, ONNX element type, numpy dtype)
DATATYPES: list[tuple[str, int, type | np.dtype]] = [
    ("BOOL", TensorProto.BOOL, np.bool_),
    ("UINT8", TensorProto.UINT8, np.uint8),
    ("UINT16", TensorProto.UINT16, np.uint16),
    ("UINT32", TensorProto.UINT32, np.uint32),
    ("UINT64", TensorProto.UINT64, np.uint64),
    ("INT8", TensorProto.INT8, np.int8),
    ("INT16", TensorProto.INT16, np.int16),
    ("INT32", TensorProto.INT32, np.int32),
    ("INT64", TensorProto.INT64, np.int64),
    ("FP16", TensorProto.FLOAT16, np.float16),
    ("FP32", TensorProto.FLOAT, np.float32),
    ("FP64", TensorProto.DOUBLE, np.float64),
    ("BYTES", TensorProto.STRING, np.object_),
]


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _sample(datatype: str, dtype: type | np.dtype, shape: tuple[int, int]) -> np.ndarray:
    n = shape[0] * shape[1]
    if datatype == "BYTES":
        # Python str objects: ONNX Runtime's Python API turns a `bytes` object into its repr
        # ("b'..'") and misreads fixed-width numpy "S" arrays, and it cannot carry bytes that
        # are not UTF-8 at all. Callers must decode BYTES elements to str before ORT.
        vals = ["", *(f"s{i}-é" if i % 2 else f"s{i}" for i in range(1, n))]
        return np.array(vals, dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    vals = np.linspace(float(info.min) / 2, float(info.max) / 2, n)
    return vals.astype(dtype).reshape(shape)


def make_identity_all(model_dir: Path) -> None:
    nodes, inputs, outputs = [], [], []
    for name, elem, _ in DATATYPES:
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
        inputs.append(_tensor(f"IN_{name}", elem, ["batch", "n"]))
        outputs.append(_tensor(f"OUT_{name}", elem, ["batch", "n"]))
    graph = helper.make_graph(nodes, "identity_all", inputs, outputs)
    path = _save(_model(graph), model_dir / "1" / "model.onnx")

    sess = _session(path)
    feed = {f"IN_{name}": _sample(name, dt, (2, 3)) for name, _, dt in DATATYPES}
    outs = sess.run([f"OUT_{name}" for name, _, _ in DATATYPES], feed)
    for (name, _, _), out in zip(DATATYPES, outs, strict=True):
        src = feed[f"IN_{name}"]
        if name == "BYTES":
            assert out.shape == src.shape and out.tolist() == src.tolist(), name
        else:
            assert out.dtype == src.dtype and np.array_equal(out, src), name

    cfg_in = ",\n".join(
        f'  {{ name: "IN_{n}" data_type: {_config_type(n)} dims: [ -1 ] }}' for n, _, _ in DATATYPES
    )
    cfg_out = ",\n".join(
        f'  {{ name: "OUT_{n}" data_type: {_config_type(n)} dims: [ -1 ] }}'
        for n, _, _ in DATATYPES
    )
    _write_config(
        model_dir,
        f"""
name: "identity_all"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
{cfg_in}
]
output [
{cfg_out}
]
""",
    )


# --------------------------------------------------------------------------------------------
# mlp_fp32: the benchmark model (not built by default)


def make_mlp(path: Path) -> Path:
    """Write the 784-1024-1024-10 FP32 MLP to ``path`` (a .onnx file) and return it.

    Same graph and same weights as /work/shared/bench/make_models.py (numpy default_rng(0),
    weights ~ N(0, 1/fan_in), zero biases, Gemm + Relu), so benchmark numbers compare.
    """
    rng = np.random.default_rng(SEED)
    dims = [784, 1024, 1024, 10]
    inits, nodes, prev = [], [], "INPUT0"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = np.zeros(dims[i + 1], np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        name = "OUTPUT0" if i == 2 else f"H{i}"
        nodes.append(
            helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [name if i == 2 else f"G{i}"])
        )
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"G{i}"], [name]))
        prev = name
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_tensor("INPUT0", TensorProto.FLOAT, ["batch", 784])],
        [_tensor("OUTPUT0", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    _save(model, path)
    x = np.random.default_rng(1).standard_normal((4, 784)).astype(np.float32)
    (out,) = _session(path).run(None, {"INPUT0": x})
    assert out.shape == (4, 10)
    return path


def _make_mlp_fp32(model_dir: Path) -> None:
    make_mlp(model_dir / "1" / "model.onnx")
    _write_config(
        model_dir,
        """
name: "mlp_fp32"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
""",
    )


# --------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits": make_digits,
    "identity_fp32": make_identity_fp32,
    "add_sub": make_add_sub,
    "string_upper": make_string_upper,
    "identity_all": make_identity_all,
    "mlp_fp32": _make_mlp_fp32,
}
DEFAULT_MODELS = [name for name in BUILDERS if name != "mlp_fp32"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"model repository directory (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BUILDERS),
        metavar="NAME",
        help=f"build only these models (choices: {', '.join(BUILDERS)}); "
        "mlp_fp32 is built only when named here",
    )
    parser.add_argument(
        "--digits-data",
        type=Path,
        metavar="DIR",
        help="instead of models, write the digits data for `tachyon optimize`: "
        "DIR/calibration.npz (training images) and DIR/validation.npz (held-out images, labels)",
    )
    args = parser.parse_args(argv)
    if args.digits_data is not None:
        for path in write_digits_data(args.digits_data):
            print(f"wrote {path}")
        return 0

    out: Path = args.out
    for name in args.only or DEFAULT_MODELS:
        print(f"{name}:")
        model_dir = out / name
        BUILDERS[name](model_dir)
        path = model_dir / "1" / "model.onnx"
        print(f"  wrote {path} ({path.stat().st_size:,} bytes)")
        _describe(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
